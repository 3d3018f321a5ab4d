//! `bridge` network mode (issue 11 part C), as root, inside a network
//! namespace each test creates (`ip netns add`): vman and everything it
//! starts (QEMU, dnsmasq, `ip`, `nft`) run in it, because the test thread
//! enters it (`setns`, what `ip netns exec` does for the network) before it
//! spawns vman. The `Netns` guard kills what runs in the namespace and
//! removes it in every outcome. Without root these tests say so and skip.

use std::fs;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::{Vman, GUEST};

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

macro_rules! require_root {
    () => {
        if !is_root() {
            eprintln!("SKIPPED: bridge tests need root (network namespace, bridge, TAP, nftables)");
            return;
        }
    };
}

/// A network namespace the current thread has entered; dropping it kills
/// every process in it, returns the thread to its namespace and deletes it.
struct Netns {
    name: String,
    original: fs::File,
    /// vman's runtime folders (under /run) to remove as well.
    run_dirs: std::cell::RefCell<Vec<std::path::PathBuf>>,
}

impl Netns {
    fn enter(tag: &str) -> Self {
        let name = format!("vman-t-{tag}-{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(std::process::Stdio::null())
            .status();
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("run ip netns add");
        assert!(ok.success(), "ip netns add {name} failed");
        let original = fs::File::open("/proc/thread-self/ns/net").expect("own netns");
        let target = fs::File::open(format!("/run/netns/{name}")).expect("new netns");
        // SAFETY: setns on descriptors we hold; it changes only this thread.
        let rc = unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) };
        let guard = Self {
            name,
            original,
            run_dirs: Default::default(),
        };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        sh("ip link set lo up");
        guard
    }

    /// Removes the runtime folder of the vman on `storage` at the end.
    fn owns_run_dir_of(&self, storage: &Path) {
        self.run_dirs.borrow_mut().push(run_dir(storage));
    }

    /// The namespace's inode, as /proc/<pid>/ns/net links show it.
    fn id(&self) -> Option<String> {
        fs::read_link(format!("/run/netns/{}", self.name))
            .ok()
            .map(|p| p.to_string_lossy().into_owned())
            .or_else(|| {
                use std::os::unix::fs::MetadataExt;
                let ino = fs::metadata(format!("/run/netns/{}", self.name))
                    .ok()?
                    .ino();
                Some(format!("net:[{ino}]"))
            })
    }

    /// Processes (pid, command) that live in the namespace.
    fn processes(&self) -> Vec<(i32, String)> {
        let Some(id) = self.id() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let ns = fs::read_link(format!("/proc/{pid}/ns/net"))
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default();
            if ns == id {
                let cmd = fs::read(format!("/proc/{pid}/cmdline"))
                    .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                    .unwrap_or_default();
                // Threads of this test binary live there too (this thread).
                if pid != std::process::id() as i32 {
                    out.push((pid, cmd));
                }
            }
        }
        out
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for (pid, _) in self.processes() {
            // SAFETY: kill(2) on a process of the test's own namespace.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        // SAFETY: back to the namespace this thread came from.
        unsafe { libc::setns(self.original.as_raw_fd(), libc::CLONE_NEWNET) };
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        for dir in self.run_dirs.borrow().iter() {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

/// Runs a shell command in this thread's namespace; its stdout.
fn sh(cmd: &str) -> String {
    let out = Command::new("sh")
        .args(["-c", cmd])
        .output()
        .expect("run sh");
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Interfaces of the namespace besides lo.
fn interfaces() -> Vec<String> {
    let v: Value = serde_json::from_str(&sh("ip -j link show")).expect("ip json");
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l["ifname"].as_str().map(str::to_owned))
        .filter(|n| n != "lo")
        .collect()
}

fn nft_tables() -> String {
    sh("nft list tables")
}

/// The runtime folder vman uses for this storage (see
/// `operator::bridge::Owner`): /run/vman/bridge-<fnv of the storage>.
fn run_dir(storage: &Path) -> std::path::PathBuf {
    let canonical = fs::canonicalize(storage).unwrap_or_else(|_| storage.to_path_buf());
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in canonical.to_string_lossy().bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    Path::new("/run/vman").join(format!("bridge-{:08x}", h as u32))
}

fn create_bridge_vm(v: &Vman, name: &str) -> Value {
    let (s, vm) =
        v.create_vm(json!({"template_name": "small", "name": name, "network": {"mode": "bridge"}}));
    assert_eq!(s, 201, "{vm}");
    vm
}

/// Types `cmd` into the guest's root shell, and waits for the line the
/// shell prints afterwards: `<tag>-<n>` with n computed by the shell, so
/// the echo of the typed command never matches.
fn run_in_guest(v: &Vman, id: &str, cmd: &str, tag: &str) -> bool {
    let before = v.console(id).matches(&format!("{tag}-OK-7")).count()
        + v.console(id).matches(&format!("{tag}-FAIL-7")).count();
    v.type_line(
        id,
        &format!("if {cmd}; then echo {tag}-OK-$((3+4)); else echo {tag}-FAIL-$((3+4)); fi"),
    );
    let start = Instant::now();
    loop {
        let c = v.console(id);
        let ok = c.matches(&format!("{tag}-OK-7")).count();
        let fail = c.matches(&format!("{tag}-FAIL-7")).count();
        if ok + fail > before {
            return ok > 0 && fail == 0;
        }
        assert!(
            start.elapsed() < GUEST,
            "no answer to {cmd:?} on {id}:\n{c}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn bridge_guests_get_their_addresses_by_dhcp_reach_each_other_but_not_the_api_and_leave_nothing() {
    require_root!();
    let ns = Netns::enter("br");
    let bridge = "br-vmantest";
    let mut v = Vman::builder()
        .with_tiny_default()
        // Listening on every address (the gateway's too): only the rules
        // keep guests off the API.
        .host("0.0.0.0")
        .api_token("bridge-test-token-0123456789")
        .env("VMAN_BRIDGE_NAME", bridge)
        .env("VMAN_SUBNET", "10.77.0.0/24")
        .start();
    ns.owns_run_dir_of(&v.storage);
    let port = v
        .base
        .rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches('/')
        .to_owned();
    v.template("small", 128);
    let cfg = v.get("/network/config");
    assert_eq!(cfg["bridge_name"], bridge, "{cfg}");
    assert_eq!(cfg["gateway"], "10.77.0.1");
    assert_eq!(cfg["status"], "idle");
    let a = create_bridge_vm(&v, "guest-a");
    let b = create_bridge_vm(&v, "guest-b");
    assert_eq!(a["local_ip"], "10.77.0.2");
    assert_eq!(b["local_ip"], "10.77.0.3");
    assert_eq!(interfaces(), Vec::<String>::new(), "nothing before a start");
    for id in ["guest-a", "guest-b"] {
        let (s, body) = v.start_vm(id);
        assert_eq!(s, 202, "{body}");
    }
    let cfg = v.get("/network/config");
    assert_eq!(cfg["status"], "active");
    assert_eq!(cfg["allocated_ips"], 2);
    assert_eq!(cfg["available_ips"], 251);
    v.wait_console("guest-a", "vman-guest: eth0 address 10.77.0.2", 1);
    v.wait_console("guest-b", "vman-guest: eth0 address 10.77.0.3", 1);
    v.wait_console("guest-a", "vman-guest: ready", 1);
    v.wait_console("guest-b", "vman-guest: ready", 1);
    // One guest reaches the other.
    assert!(run_in_guest(
        &v,
        "guest-a",
        "ping -c 2 -W 5 10.77.0.3 >/dev/null",
        "PINGAB"
    ));
    assert!(run_in_guest(
        &v,
        "guest-b",
        "ping -c 2 -W 5 10.77.0.2 >/dev/null",
        "PINGBA"
    ));
    // The API listens on the gateway's address too, and answers there
    // from the host ...
    let from_host = sh(&format!("curl -s -m 5 http://10.77.0.1:{port}/health"));
    assert!(from_host.contains("ok"), "{from_host}");
    // ... but never to a guest (refused by the rules). (busybox 1.35's
    // `wget -T` crashes in the tiny guest: `timeout` bounds it instead.)
    assert!(
        !run_in_guest(
            &v,
            "guest-a",
            &format!("timeout 10 wget -q -O /dev/null http://10.77.0.1:{port}/health"),
            "API"
        ),
        "a guest reached the vman API on the gateway"
    );
    // 169.254.169.254:80 reaches vman's metadata listener on the gateway
    // (nftables DNAT), which names the VM by the guest's source address
    // (pinned to the TAP by the anti-spoofing rules): each guest reads its
    // own instance id, whatever it asks.
    for (guest, other) in [("guest-a", "guest-b"), ("guest-b", "guest-a")] {
        assert!(
            run_in_guest(
                &v,
                guest,
                &format!(
                    "timeout 20 wget -q -O - http://169.254.169.254/latest/meta-data/instance-id \
                     | grep -qx {guest}"
                ),
                "META"
            ),
            "{guest} did not read its own instance id\n{}",
            v.console(guest)
        );
        assert!(
            run_in_guest(
                &v,
                guest,
                &format!(
                    "timeout 20 wget -q -O - --header 'X-Vman-Id: {other}' \
                     http://169.254.169.254/latest/meta-data/local-hostname | grep -qx {guest}"
                ),
                "META-OTHER"
            ),
            "{guest} asking as {other} did not get its own data\n{}",
            v.console(guest)
        );
    }
    // A guest that takes another address is cut off (anti-spoofing).
    assert!(run_in_guest(
        &v,
        "guest-a",
        "ip addr add 10.77.0.50/24 dev eth0 && ! ping -c 2 -W 3 -I 10.77.0.50 10.77.0.3 >/dev/null",
        "SPOOF"
    ));
    let taps: Vec<String> = interfaces()
        .into_iter()
        .filter(|i| i.starts_with("vman"))
        .collect();
    assert_eq!(taps.len(), 2, "{:?}", interfaces());
    assert!(nft_tables().contains("vman_bridge"));
    assert!(ns.processes().iter().any(|(_, c)| c.contains("dnsmasq")));
    // Stop one: its TAP goes, the bridge stays for the other.
    let (s, body) = v.post("/vms/guest-a/actions/stop", json!({"force": true}));
    assert_eq!(s, 202, "{body}");
    let left = interfaces();
    assert!(
        left.contains(&bridge.to_owned()) && left.len() == 2,
        "{left:?}"
    );
    // A stopped bridge VM keeps its allocated address (the user-mode
    // teardown clears a lease address; this one is the VM's own).
    let a = v.get("/vms/guest-a");
    assert_eq!(a["state"], "stopped", "{a}");
    assert_eq!(
        (&a["local_ip"], &a["network"]["local_ip"]),
        (&json!("10.77.0.2"), &json!("10.77.0.2")),
        "{a}"
    );
    // Stop and delete the other: nothing of the bridge stays.
    let (s, body) = v.call("DELETE", "/vms/guest-b", None);
    assert_eq!(s, 204, "{body}");
    let (s, body) = v.call("DELETE", "/vms/guest-a", None);
    assert_eq!(s, 204, "{body}");
    assert_eq!(interfaces(), Vec::<String>::new());
    assert!(!nft_tables().contains("vman_bridge"), "{}", nft_tables());
    let storage = v.storage.clone();
    v.sigterm();
    let procs = ns.processes();
    assert!(procs.is_empty(), "left running in the namespace: {procs:?}");
    assert!(
        !run_dir(&storage).exists(),
        "{} stays",
        run_dir(&storage).display()
    );
    assert_eq!(interfaces(), Vec::<String>::new());
}

#[test]
fn bridge_network_config_figures_a_full_subnet_and_bad_network_input() {
    require_root!();
    let ns = Netns::enter("cfg");
    let v = Vman::builder()
        .env("VMAN_BRIDGE_NAME", "br-vmancfg")
        .env("VMAN_SUBNET", "10.78.0.0/29")
        .env("VMAN_VLAN_ID", "100")
        .env("VMAN_BRIDGE_NAT", "1")
        .start();
    ns.owns_run_dir_of(&v.storage);
    v.template("small", 128);
    let cfg = v.get("/network/config");
    assert_eq!(
        (
            &cfg["vlan_id"],
            &cfg["subnet"],
            &cfg["gateway"],
            &cfg["allocated_ips"],
            &cfg["available_ips"]
        ),
        (
            &json!(100),
            &json!("10.78.0.0/29"),
            &json!("10.78.0.1"),
            &json!(0),
            &json!(5)
        ),
        "{cfg}"
    );
    assert_eq!(cfg["dns"], json!(["10.78.0.1"]));
    for n in 0..5 {
        let vm = create_bridge_vm(&v, &format!("vm{n}"));
        assert_eq!(vm["local_ip"], format!("10.78.0.{}", n + 2));
    }
    let (s, body) = v
        .create_vm(json!({"template_name": "small", "name": "vm5", "network": {"mode": "bridge"}}));
    assert_eq!(
        (s, body["code"].as_str()),
        (400, Some("subnet_full")),
        "{body}"
    );
    let (s, _) = v.call("GET", "/vms/vm5", None);
    assert_eq!(s, 404, "a refused VM is not created");
    let cfg = v.get("/network/config");
    assert_eq!(
        (&cfg["allocated_ips"], &cfg["available_ips"]),
        (&json!(5), &json!(0))
    );
    // Deleting frees the address; the next VM gets it.
    let (s, _) = v.call("DELETE", "/vms/vm1", None);
    assert_eq!(s, 204);
    let vm = create_bridge_vm(&v, "vm6");
    assert_eq!(vm["local_ip"], "10.78.0.3");
    // Bad input: 422 naming the field, nothing created.
    for bad in [
        json!({"mode": "bogus"}),
        json!({"mode": "bridge", "extra": 1}),
        json!("bridge"),
        json!({}),
    ] {
        let (s, body) =
            v.create_vm(json!({"template_name": "small", "name": "bad", "network": bad}));
        assert_eq!(s, 422, "{bad}: {body}");
        assert!(
            body["detail"].as_str().unwrap_or("").contains("network"),
            "{body}"
        );
    }
    let (s, _) = v.call("GET", "/vms/bad", None);
    assert_eq!(s, 404);
    // A bridge of that name that vman did not make is never used.
    sh("ip link add br-vmancfg type bridge");
    let (s, body) = v.start_vm("vm0");
    assert_eq!(
        (s, body["code"].as_str()),
        (400, Some("bridge_failed")),
        "{body}"
    );
    assert!(
        body["detail"]
            .as_str()
            .unwrap_or("")
            .contains("not created by this vman"),
        "{body}"
    );
    assert_eq!(v.vm("vm0")["state"], "error");
    assert_eq!(
        interfaces(),
        vec!["br-vmancfg".to_owned()],
        "foreign bridge kept, no TAP left"
    );
    assert!(!nft_tables().contains("vman_bridge"));
    // Nor tables of vman's name that another vman made.
    sh("ip link del br-vmancfg");
    sh("printf 'table inet vman_bridge {\\n comment \"vman:someone\"\\n}\\n' | nft -f -");
    let (s, body) = v.start_vm("vm0");
    assert_eq!(
        (s, body["code"].as_str()),
        (400, Some("bridge_failed")),
        "{body}"
    );
    assert!(
        body["detail"]
            .as_str()
            .unwrap_or("")
            .contains("another vman"),
        "{body}"
    );
    assert!(sh("nft list table inet vman_bridge").contains("vman:someone"));
    assert_eq!(
        interfaces(),
        Vec::<String>::new(),
        "the bridge it made is gone"
    );
}

#[test]
fn bridge_mode_without_the_tools_is_a_400_at_creation_and_network_config_says_not_configured() {
    // No root needed: without ip/bridge/nft/dnsmasq on PATH (they live in
    // /usr/sbin) the host cannot do bridge networking, as without root.
    let v = Vman::builder().env("PATH", "/usr/bin:/bin").start();
    v.template("small", 128);
    let cfg = v.get("/network/config");
    assert_eq!(cfg["status"], "not_configured", "{cfg}");
    let (s, body) =
        v.create_vm(json!({"template_name": "small", "name": "b", "network": {"mode": "bridge"}}));
    assert_eq!(
        (s, body["code"].as_str()),
        (400, Some("network_unavailable")),
        "{body}"
    );
    assert!(
        body["detail"].as_str().unwrap_or("").contains("bridge"),
        "{body}"
    );
    let (s, _) = v.call("GET", "/vms/b", None);
    assert_eq!(s, 404, "nothing created");
    let (s, body) =
        v.create_vm(json!({"template_name": "small", "name": "b", "network": {"mode": "bogus"}}));
    assert_eq!((s, body["code"].as_str()), (422, Some("invalid")), "{body}");
}

/// The dnsmasq processes of the namespace (pids).
fn dnsmasqs(ns: &Netns) -> Vec<i32> {
    ns.processes()
        .into_iter()
        .filter(|(_, c)| c.starts_with("dnsmasq") || c.contains("/dnsmasq "))
        .map(|(p, _)| p)
        .collect()
}

#[test]
fn bridge_is_kept_across_a_vman_restart_a_dead_dnsmasq_comes_back_and_leftovers_go() {
    require_root!();
    let ns = Netns::enter("rs");
    let bridge = "br-vmanrs";
    let mut v = Vman::builder()
        .with_tiny_default()
        .env("VMAN_BRIDGE_NAME", bridge)
        .env("VMAN_SUBNET", "10.79.0.0/24")
        .env("VMAN_OBSERVER_INTERVAL", "1")
        .start();
    ns.owns_run_dir_of(&v.storage);
    v.template("small", 128);
    create_bridge_vm(&v, "keep");
    let (s, body) = v.start_vm("keep");
    assert_eq!(s, 202, "{body}");
    v.wait_console("keep", "vman-guest: eth0 address 10.79.0.2", 1);
    let before = interfaces();
    let dns = dnsmasqs(&ns);
    assert_eq!(dns.len(), 1, "{:?}", ns.processes());
    // A crash of vman: the guest's network stays, and the new vman takes
    // it over (same dnsmasq, same TAP), without removing anything.
    v.restart();
    assert_eq!(interfaces(), before);
    assert_eq!(dnsmasqs(&ns), dns, "dnsmasq kept, not restarted");
    assert_eq!(v.get("/network/config")["status"], "active");
    assert!(v.log_count("TAP") > 0);
    // dnsmasq dies: the observer starts it again.
    // SAFETY: kill(2) of a process in the test's namespace.
    unsafe { libc::kill(dns[0], libc::SIGKILL) };
    let start = Instant::now();
    loop {
        let now = dnsmasqs(&ns);
        if now.len() == 1 && now != dns {
            break;
        }
        assert!(start.elapsed() < GUEST, "dnsmasq not restarted: {now:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    v.type_line(
        "keep",
        "udhcpc -n -q -i eth0 -s /etc/vman/udhcpc && echo RENEW-$((3+4))",
    );
    v.wait_console("keep", "RENEW-7", 1);
    // vman crashes and the guest dies meanwhile: the next vman removes the
    // TAP, the bridge, the rules and dnsmasq it finds with no VM.
    v.kill9();
    for (pid, cmd) in ns.processes() {
        if cmd.contains("qemu-system") {
            // SAFETY: kill(2) of a process in the test's namespace.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(!interfaces().is_empty());
    v.restart();
    let start = Instant::now();
    while !interfaces().is_empty() || !dnsmasqs(&ns).is_empty() {
        assert!(
            start.elapsed() < GUEST,
            "leftovers stay: {:?} {:?}",
            interfaces(),
            ns.processes()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(!nft_tables().contains("vman_bridge"), "{}", nft_tables());
    assert_eq!(v.get("/network/config")["status"], "idle");
}

/// A second namespace standing for the outside world, joined to the
/// test's namespace by a veth pair (`vmup0` here, 10.200.0.1; `vmup1`
/// there, 10.200.0.2). Deleted on drop.
struct Outside {
    name: String,
}

impl Outside {
    fn new(tag: &str) -> Self {
        let name = format!("vman-t-{tag}-out-{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(std::process::Stdio::null())
            .status();
        sh(&format!("ip netns add {name}"));
        let out = Self { name };
        sh(&format!(
            "ip link add vmup0 type veth peer name vmup1 netns {n} && \
             ip addr add 10.200.0.1/24 dev vmup0 && ip link set vmup0 up && \
             ip netns exec {n} sh -c 'ip link set lo up && ip addr add 10.200.0.2/24 dev vmup1 && ip link set vmup1 up'",
            n = out.name
        ));
        out
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

#[test]
fn bridge_nat_lets_guests_out_with_dns_on_the_gateway_and_without_it_they_stay_in() {
    require_root!();
    let ns = Netns::enter("nat");
    let _outside = Outside::new("nat");
    for nat in ["1", "0"] {
        let v = Vman::builder()
            .with_tiny_default()
            .env("VMAN_BRIDGE_NAME", "br-vmannat")
            .env("VMAN_SUBNET", "10.81.0.0/24")
            .env("VMAN_BRIDGE_NAT", nat)
            .start();
        ns.owns_run_dir_of(&v.storage);
        v.template("small", 128);
        create_bridge_vm(&v, "out");
        let (s, body) = v.start_vm("out");
        assert_eq!(s, 202, "{body}");
        v.wait_console("out", "vman-guest: eth0 address 10.81.0.2", 1);
        v.wait_console("out", "vman-guest: ready", 1);
        let reached = run_in_guest(&v, "out", "ping -c 2 -W 5 10.200.0.2 >/dev/null", "OUT");
        let dns = run_in_guest(
            &v,
            "out",
            "grep -q 'nameserver 10.81.0.1' /etc/resolv.conf",
            "DNS",
        );
        assert_eq!(
            (reached, dns),
            (nat == "1", nat == "1"),
            "NAT={nat}:\n{}",
            v.console("out")
        );
        let (s, _) = v.call("DELETE", "/vms/out", None);
        assert_eq!(s, 204);
        assert_eq!(interfaces(), vec!["vmup0".to_owned()]);
    }
}
