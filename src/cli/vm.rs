//! `vman vm ...` over /vms: create, list, show, start, stop, restart,
//! clone, delete, the console log (`logs [--follow]`, followed by polling
//! GET /vms/{id}/console), port forwards (/vms/{id}/ports) and cloud-init
//! metadata (/vms/{id}/metadata). A VM is named by its id, a `name` the
//! server reports, or a unique id prefix (`client::with_id`).

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use clap::Subcommand;
use serde_json::{json, Map, Value};

use super::client::{seg, with_id, CliError, Client, Kind};
use super::output::{self, Column, Format, Out};

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Create a VM (stopped). Without NAME the server picks a UUID.
    Create {
        name: Option<String>,
        /// Template to size it from.
        #[arg(long, short)]
        template: String,
        /// Explicit root disk, used as is (inside VMAN_IMAGE_DIRS).
        #[arg(long, conflicts_with = "boot_disk")]
        qcow2_path: Option<String>,
        /// Image copied as its root disk instead of the default boot disk.
        #[arg(long)]
        boot_disk: Option<String>,
        /// Network mode (user, bridge, none; the server's default without it).
        #[arg(long)]
        network: Option<String>,
    },
    /// List VMs.
    #[command(visible_alias = "ls")]
    List {
        /// Only VMs in this state (running, stopped, error).
        #[arg(long)]
        state: Option<String>,
    },
    /// Show one VM.
    Show { name: String },
    /// Start a VM (answers once QEMU runs; the guest then boots).
    Start { name: String },
    /// Stop a VM (ACPI power-off, then quit, then kill).
    Stop {
        name: String,
        /// Skip the graceful power-off.
        #[arg(long)]
        force: bool,
    },
    /// Restart a VM.
    Restart {
        name: String,
        /// Skip the graceful power-off.
        #[arg(long)]
        force: bool,
    },
    /// Clone a stopped VM: a new stopped VM with a copy of each disk (full),
    /// or a root disk linked on a new snapshot of the source (--linked).
    Clone {
        name: String,
        /// The new VM's name.
        #[arg(long = "name", value_name = "NEW")]
        new_name: String,
        /// Build the root disk on a snapshot of the source (qcow2 overlay)
        /// instead of copying it; data disks are copied either way.
        #[arg(long)]
        linked: bool,
    },
    /// Move a stopped VM, with its root and data disks, to another node of
    /// the cluster (cold migration).
    Migrate {
        name: String,
        /// The node to move it to.
        #[arg(long)]
        node: String,
    },
    /// Delete a VM (stopped first if running; its data disks are detached).
    #[command(visible_alias = "rm")]
    Delete { name: String },
    /// Print the serial console log (the last 50 kB the server keeps).
    Logs {
        name: String,
        /// Keep printing what the guest writes (Ctrl-C ends).
        #[arg(long, short)]
        follow: bool,
        /// Milliseconds between two polls with --follow.
        #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(50..=60_000))]
        interval: u64,
    },
    /// Attach to the serial console (raw terminal; Ctrl-] detaches). With
    /// stdin not a terminal: sends stdin, prints output, ends at its end.
    Console {
        name: String,
        /// Watch only: what you type is not sent.
        #[arg(long)]
        readonly: bool,
    },
    /// List, add or remove port forwards of a VM.
    Ports {
        name: String,
        #[command(subcommand)]
        action: Option<PortsCmd>,
    },
    /// Show, set or clear a VM's cloud-init metadata.
    Metadata {
        name: String,
        #[command(subcommand)]
        action: Option<MetadataCmd>,
    },
}

#[derive(Debug, Subcommand)]
pub enum PortsCmd {
    /// List the forwards (the default).
    #[command(visible_alias = "ls")]
    List,
    /// Forward a host port to GUEST_PORT.
    Add {
        guest_port: u16,
        /// Host port (the server picks a free one when absent).
        #[arg(long)]
        host_port: Option<u16>,
        /// tcp or udp (server default: tcp).
        #[arg(long)]
        protocol: Option<String>,
    },
    /// Remove the forward of HOST_PORT.
    #[command(visible_alias = "rm")]
    Remove {
        host_port: u16,
        /// tcp or udp: needed only when HOST_PORT forwards both.
        #[arg(long)]
        protocol: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum MetadataCmd {
    /// Show the metadata (the default).
    Show,
    /// Set fields; only the fields given change.
    Set {
        #[arg(long)]
        hostname: Option<String>,
        /// cloud-init user data.
        #[arg(long, conflicts_with = "user_data_file")]
        user_data: Option<String>,
        /// Read the user data from a file (`-`: standard input).
        #[arg(long)]
        user_data_file: Option<PathBuf>,
        /// An SSH public key (repeat for several; replaces the keys).
        #[arg(long = "ssh-key")]
        ssh_keys: Vec<String>,
        /// Read SSH public keys from a file, one per line (`-`: stdin).
        #[arg(long)]
        ssh_keys_file: Option<PathBuf>,
    },
    /// Remove all metadata.
    Clear,
}

/// The forwards of a VM object (`network.ports`, or `ports`) as
/// `2222->22/tcp, ...`.
fn ports_cell(vm: &Value) -> String {
    let list = vm
        .pointer("/network/ports")
        .or_else(|| vm.get("ports"))
        .unwrap_or(&Value::Null);
    let Some(items) = list.as_array() else {
        return output::cell(list);
    };
    if items.is_empty() {
        return "-".into();
    }
    items
        .iter()
        .map(|p| {
            format!(
                "{}->{}/{}",
                output::cell(&p["host_port"]),
                output::cell(&p["guest_port"]),
                p["protocol"].as_str().unwrap_or("tcp")
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The guest's address (`local_ip`, or `network.local_ip`).
fn ip_cell(vm: &Value) -> String {
    match vm.get("local_ip") {
        Some(ip) if !ip.is_null() => output::cell(ip),
        _ => output::cell(vm.pointer("/network/local_ip").unwrap_or(&Value::Null)),
    }
}

pub const COLUMNS: &[Column] = &[
    Column::new("ID", "/id"),
    Column::new("STATE", "/state"),
    Column::new("TEMPLATE", "/vm_template/name"),
    Column::new("CPUS", "/vm_template/cpu_count"),
    Column::new("RAM_MIB", "/vm_template/ram_mib"),
    // "": the whole VM object.
    Column::with("IP", "", ip_cell),
    Column::with("PORTS", "", ports_cell),
    Column::with("ERROR", "/last_error", output::short),
];

const PORT_COLUMNS: &[Column] = &[
    Column::new("HOST_PORT", "/host_port"),
    Column::new("GUEST_PORT", "/guest_port"),
    Column::new("PROTOCOL", "/protocol"),
    Column::new("HOST_ADDRESS", "/host_address"),
];

fn vm_path(id: &str) -> String {
    format!("/vms/{}", seg(id))
}

pub fn run(c: &Client, out: Out, cmd: Cmd) -> Result<(), CliError> {
    match cmd {
        Cmd::Create {
            name,
            template,
            qcow2_path,
            boot_disk,
            network,
        } => {
            let vm = create(
                c,
                &template,
                name.as_deref(),
                Extra {
                    qcow2_path,
                    boot_disk,
                    network,
                },
            )?;
            let id = vm["id"].as_str().unwrap_or("?");
            out.created(&format!("created VM {id} ({template})"), id, &vm)
        }
        Cmd::List { state } => {
            let path = match state {
                Some(s) => format!("/vms?state={}", seg(&s)),
                None => "/vms".into(),
            };
            out.list(&c.get(&path)?, COLUMNS)
        }
        Cmd::Show { name } => {
            let vm = with_id(c, Kind::Vm, &name, |id| c.get(&vm_path(id)))?;
            out.object(&vm)
        }
        Cmd::Start { name } => action(c, out, &name, "start", None, "started"),
        Cmd::Stop { name, force } => action(
            c,
            out,
            &name,
            "stop",
            force.then(|| json!({"force": true})),
            "stopped",
        ),
        Cmd::Restart { name, force } => action(
            c,
            out,
            &name,
            "restart",
            force.then(|| json!({"force": true})),
            "restarted",
        ),
        Cmd::Clone {
            name,
            new_name,
            linked,
        } => {
            let body = json!({"name": new_name, "linked": linked});
            let vm = with_id(c, Kind::Vm, &name, |id| {
                c.post(&format!("{}/clone", vm_path(id)), &body)
            })?;
            let id = vm["id"].as_str().unwrap_or("?");
            let how = if linked { "linked clone" } else { "clone" };
            out.created(&format!("created VM {id} ({how} of {name})"), id, &vm)
        }
        Cmd::Migrate { name, node } => {
            let bar = out.progress(&format!("migrate {name} to {node}"));
            let result = with_id(c, Kind::Vm, &name, |id| {
                let path = format!("{}/actions/migrate", vm_path(id));
                c.post(&path, &json!({ "node": node }))
                    .map(|a| (id.to_owned(), a))
            });
            bar.finish_and_clear();
            let (id, answer) = result?;
            let line = format!(
                "migrated VM {id} to {node} ({} bytes in {:.1} s)",
                answer.get("bytes").and_then(Value::as_u64).unwrap_or(0),
                answer.get("seconds").and_then(Value::as_f64).unwrap_or(0.0)
            );
            out.done(&line, &answer)
        }
        Cmd::Delete { name } => {
            let id = with_id(c, Kind::Vm, &name, |id| {
                c.delete(&vm_path(id)).map(|_| id.to_owned())
            })?;
            out.done(
                &format!("deleted VM {id}"),
                &json!({"status": "deleted", "id": id}),
            )
        }
        Cmd::Logs {
            name,
            follow,
            interval,
        } => logs(c, out, &name, follow, Duration::from_millis(interval)),
        Cmd::Console { name, readonly } => super::console::run(c, &name, readonly),
        Cmd::Ports { name, action } => ports(c, out, &name, action.unwrap_or(PortsCmd::List)),
        Cmd::Metadata { name, action } => {
            metadata(c, out, &name, action.unwrap_or(MetadataCmd::Show))
        }
    }
}

/// Optional fields of POST /vms (sent only when given).
#[derive(Debug, Default)]
pub struct Extra {
    pub qcow2_path: Option<String>,
    pub boot_disk: Option<String>,
    pub network: Option<String>,
}

/// POST /vms; shared with `launch`.
pub fn create(
    c: &Client,
    template: &str,
    name: Option<&str>,
    extra: Extra,
) -> Result<Value, CliError> {
    let mut body = Map::new();
    body.insert("template_name".into(), json!(template));
    if let Some(n) = name {
        body.insert("name".into(), json!(n));
    }
    if let Some(p) = extra.qcow2_path {
        body.insert("qcow2_path".into(), json!(p));
    }
    if let Some(p) = extra.boot_disk {
        body.insert("boot_disk".into(), json!(p));
    }
    if let Some(mode) = extra.network {
        body.insert("network".into(), json!({"mode": mode}));
    }
    c.post("/vms", &Value::Object(body))
}

fn action(
    c: &Client,
    out: Out,
    name: &str,
    verb: &str,
    body: Option<Value>,
    past: &str,
) -> Result<(), CliError> {
    let bar = out.progress(&format!("{verb} {name}"));
    let result = with_id(c, Kind::Vm, name, |id| {
        // A start (also a restart's) may make the root disk first: shown.
        let answer = if verb == "stop" {
            let path = format!("{}/actions/{verb}", vm_path(id));
            match &body {
                Some(b) => c.post(&path, b),
                None => c.post_empty(&path),
            }
        } else {
            super::progress::act_watching(c, out, &bar, id, verb, body.as_ref())
        }?;
        Ok((id.to_owned(), answer))
    });
    bar.finish_and_clear();
    let (id, answer) = result?;
    let mut line = format!("{past} VM {id}");
    if let Some(method) = answer.get("method").and_then(Value::as_str) {
        line.push_str(&format!(" ({method})"));
    }
    out.done(&line, &answer)
}

/// What to print of a newly polled console tail, given the previous poll.
/// The server keeps a bounded file and answers its last 50 kB (`console`,
/// `size` bytes of it) with the file's size (`file_size`): the growth of
/// `file_size` is what is new; when the file was trimmed meanwhile (it
/// shrank) or the text is not the bytes (invalid UTF-8 replaced), the end of
/// the previous tail is looked up in the new one instead.
#[derive(Debug, Default)]
pub struct Tail {
    last: Option<(String, u64)>,
}

impl Tail {
    pub fn next<'a>(&mut self, console: &'a str, size: u64, file_size: u64) -> &'a str {
        let new = match &self.last {
            None => console,
            Some((text, prev)) if file_size == *prev && text == console => "",
            Some((_, prev)) if file_size >= *prev && console.len() as u64 == size => {
                let delta = usize::try_from(file_size - prev).unwrap_or(usize::MAX);
                if delta >= console.len() {
                    console
                } else {
                    let mut start = console.len() - delta;
                    while !console.is_char_boundary(start) {
                        start += 1;
                    }
                    &console[start..]
                }
            }
            Some((text, _)) => after_overlap(text, console),
        };
        self.last = Some((console.to_owned(), file_size));
        new
    }
}

/// The part of `new` after the end of `old`: the longest of `old`'s last
/// 1024, 256, 64 or 16 bytes found in `new` marks it (a trimmed file lost
/// `old`'s beginning, not its end); all of `new` when none is found.
fn after_overlap<'a>(old: &str, new: &'a str) -> &'a str {
    for len in [1024, 256, 64, 16] {
        let mut start = old.len().saturating_sub(len);
        while !old.is_char_boundary(start) {
            start += 1;
        }
        let anchor = &old[start..];
        if anchor.is_empty() {
            return new;
        }
        if let Some(pos) = new.rfind(anchor) {
            return &new[pos + anchor.len()..];
        }
    }
    new
}

fn logs(
    c: &Client,
    out: Out,
    name: &str,
    follow: bool,
    interval: Duration,
) -> Result<(), CliError> {
    let (id, first) = with_id(c, Kind::Vm, name, |id| {
        Ok((id.to_owned(), c.get(&format!("{}/console", vm_path(id)))?))
    })?;
    let path = format!("{}/console", vm_path(&id));
    if !follow {
        if out.format != Format::Table {
            return out.object(&first);
        }
        print_console(&first["console"]);
        return Ok(());
    }
    let mut tail = Tail::default();
    let mut answer = first;
    loop {
        let console = answer["console"].as_str().unwrap_or("");
        let size = answer["size"].as_u64().unwrap_or(console.len() as u64);
        let file_size = answer["file_size"].as_u64().unwrap_or(size);
        let new = tail.next(console, size, file_size);
        if !new.is_empty() {
            match out.format {
                Format::Table => output::emit_raw(new),
                Format::Json => output::emit(&json!({"vm_id": id, "console": new}).to_string()),
                Format::Yaml => {
                    let doc = serde_norway::to_string(&json!({"vm_id": id, "console": new}))
                        .map_err(|e| CliError::failed(e.to_string()))?;
                    output::emit(&format!("---\n{}", doc.trim_end()));
                }
            }
        }
        std::thread::sleep(interval);
        answer = c.get(&path)?;
    }
}

fn print_console(v: &Value) {
    let text = v.as_str().unwrap_or("");
    output::emit_raw(text);
    if !text.is_empty() && !text.ends_with('\n') {
        output::emit_raw("\n");
    }
}

fn ports(c: &Client, out: Out, name: &str, cmd: PortsCmd) -> Result<(), CliError> {
    match cmd {
        PortsCmd::List => {
            let answer = with_id(c, Kind::Vm, name, |id| {
                c.get(&format!("{}/ports", vm_path(id)))
            })?;
            // An array, or an object holding `ports`.
            let list = match answer.get("ports") {
                Some(p) if out.format == Format::Table => p.clone(),
                _ => answer,
            };
            out.list(&list, PORT_COLUMNS)
        }
        PortsCmd::Add {
            guest_port,
            host_port,
            protocol,
        } => {
            let mut body = Map::new();
            body.insert("guest_port".into(), json!(guest_port));
            if let Some(h) = host_port {
                body.insert("host_port".into(), json!(h));
            }
            if let Some(p) = protocol {
                body.insert("protocol".into(), json!(p));
            }
            let body = Value::Object(body);
            let (id, answer) = with_id(c, Kind::Vm, name, |id| {
                Ok((
                    id.to_owned(),
                    c.post(&format!("{}/ports", vm_path(id)), &body)?,
                ))
            })?;
            let host = answer
                .get("host_port")
                .map(output::cell)
                .unwrap_or_else(|| host_port.map_or("?".into(), |h| h.to_string()));
            let proto = answer
                .get("protocol")
                .and_then(Value::as_str)
                .unwrap_or("tcp");
            out.done(
                &format!(
                    "forwarding host port {host} to {id}:{guest_port}/{proto}{}",
                    when(&answer)
                ),
                &answer,
            )
        }
        PortsCmd::Remove {
            host_port,
            protocol,
        } => {
            let query = protocol
                .map(|p| format!("?protocol={}", seg(&p)))
                .unwrap_or_default();
            let (id, answer) = with_id(c, Kind::Vm, name, |id| {
                let path = format!("{}/ports/{host_port}{query}", vm_path(id));
                Ok((id.to_owned(), c.delete(&path)?))
            })?;
            let mut v = json!({"status": "removed", "vm_id": id, "host_port": host_port});
            if let (Some(obj), Some(extra)) = (v.as_object_mut(), answer.as_object()) {
                obj.extend(extra.clone());
            }
            out.done(
                &format!(
                    "removed the forward of host port {host_port} from {id}{}",
                    when(&answer)
                ),
                &v,
            )
        }
    }
}

/// When a port change reaches the guest, as the server says (`applied`).
fn when(answer: &Value) -> &'static str {
    match answer.get("applied").and_then(Value::as_str) {
        Some("next_start") => " (from the VM's next start)",
        Some("now") => " (now)",
        _ => "",
    }
}

/// Reads a file, or standard input for `-`; a failure is a usage error.
fn read_input(path: &PathBuf) -> Result<String, CliError> {
    if path.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| CliError::Usage(format!("cannot read standard input: {e}")))?;
        return Ok(s);
    }
    std::fs::read_to_string(path)
        .map_err(|e| CliError::Usage(format!("cannot read {}: {e}", path.display())))
}

fn metadata(c: &Client, out: Out, name: &str, cmd: MetadataCmd) -> Result<(), CliError> {
    match cmd {
        MetadataCmd::Show => {
            let m = with_id(c, Kind::Vm, name, |id| {
                c.get(&format!("{}/metadata", vm_path(id)))
            })?;
            out.object(&m)
        }
        MetadataCmd::Set {
            hostname,
            user_data,
            user_data_file,
            ssh_keys,
            ssh_keys_file,
        } => {
            let mut body = Map::new();
            if let Some(h) = hostname {
                body.insert("hostname".into(), json!(h));
            }
            let user_data = match (user_data, user_data_file) {
                (Some(u), _) => Some(u),
                (None, Some(path)) => Some(read_input(&path)?),
                (None, None) => None,
            };
            if let Some(u) = user_data {
                body.insert("user_data".into(), json!(u));
            }
            let mut keys = ssh_keys;
            if let Some(path) = ssh_keys_file {
                keys.extend(
                    read_input(&path)?
                        .lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty() && !l.starts_with('#'))
                        .map(str::to_owned),
                );
            }
            if !keys.is_empty() {
                body.insert("ssh_keys".into(), json!(keys.join("\n")));
            }
            if body.is_empty() {
                return Err(CliError::Usage(
                    "nothing to set: give --hostname, --user-data[-file] or --ssh-key[s-file]"
                        .into(),
                ));
            }
            let body = Value::Object(body);
            let (id, m) = with_id(c, Kind::Vm, name, |id| {
                Ok((
                    id.to_owned(),
                    c.put(&format!("{}/metadata", vm_path(id)), &body)?,
                ))
            })?;
            out.done(&format!("metadata of {id} set"), &m)
        }
        MetadataCmd::Clear => {
            let id = with_id(c, Kind::Vm, name, |id| {
                c.delete(&format!("{}/metadata", vm_path(id)))
                    .map(|_| id.to_owned())
            })?;
            out.done(
                &format!("metadata of {id} cleared"),
                &json!({"status": "cleared", "vm_id": id}),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_poll_prints_everything_then_only_what_is_new() {
        let mut t = Tail::default();
        assert_eq!(t.next("boot\n", 5, 5), "boot\n");
        assert_eq!(t.next("boot\n", 5, 5), "");
        assert_eq!(t.next("boot\nready\n", 11, 11), "ready\n");
    }

    #[test]
    fn a_tail_window_that_slides_prints_only_the_growth() {
        let mut t = Tail::default();
        // The server shows the last 8 bytes of a growing file.
        assert_eq!(t.next("abcdefgh", 8, 100), "abcdefgh");
        assert_eq!(t.next("efghijkl", 8, 104), "ijkl");
        // More than the window grew: all of it (the rest is gone).
        assert_eq!(t.next("uvwxyz01", 8, 200), "uvwxyz01");
    }

    #[test]
    fn a_trimmed_file_is_followed_by_overlap() {
        let lines = |r: std::ops::Range<u32>| r.map(|i| format!("line {i}\n")).collect::<String>();
        let mut t = Tail::default();
        let old = lines(0..60);
        assert_eq!(t.next(&old, old.len() as u64, 5000), old);
        // The file was trimmed to its newest part (it shrank), then grew.
        let new = lines(40..65);
        assert_eq!(t.next(&new, new.len() as u64, 300), lines(60..65));
        // Nothing in common: all of it.
        let other = lines(100..103);
        assert_eq!(t.next(&other, other.len() as u64, 30), other);
    }

    #[test]
    fn replaced_invalid_bytes_do_not_cut_a_character() {
        let mut t = Tail::default();
        // Lossy text (size != text length): overlap, never a split char.
        assert_eq!(t.next("ab\u{fffd}", 3, 3), "ab\u{fffd}");
        assert_eq!(t.next("ab\u{fffd}c\u{fffd}", 5, 5), "c\u{fffd}");
    }
}
