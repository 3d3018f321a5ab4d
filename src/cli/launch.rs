//! `vman launch TEMPLATE [NAME]`: create + start + wait until the guest is
//! up, like `incus launch` / `multipass launch`. Up means: the VM is
//! `running` and either its console shows the ready marker (the images vman
//! builds print `vman-guest: ready`) or the server reports that the guest
//! fetched its metadata (`metadata_fetched_at`). Each step shows on a
//! spinner (on a terminal, not under `-q`); the wait is bounded by
//! `--timeout`. A VM that was created stays when a later step fails, and
//! the error says so.

use std::time::{Duration, Instant};

use serde_json::json;

use super::client::{seg, CliError, Client};
use super::output::Out;

/// What the images vman builds print once a shell is open on the console.
pub const READY_MARKER: &str = "vman-guest: ready";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Template to size the VM from.
    template: String,
    /// The VM's name (id); the server picks a UUID without it.
    name: Option<String>,
    /// Seconds to wait for the guest to come up after the start.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    timeout: u64,
    /// Console text that says the guest is up.
    #[arg(long, default_value = READY_MARKER)]
    ready_marker: String,
    /// Explicit root disk, used as is (inside VMAN_IMAGE_DIRS).
    #[arg(long, conflicts_with = "boot_disk")]
    qcow2_path: Option<String>,
    /// Image copied as its root disk instead of the default boot disk.
    #[arg(long)]
    boot_disk: Option<String>,
    /// Network mode (user, bridge, none; the server's default without it).
    #[arg(long)]
    network: Option<String>,
}

/// How often the VM and its console are polled while it boots.
const POLL: Duration = Duration::from_millis(250);

pub fn run(c: &Client, out: Out, args: Args) -> Result<(), CliError> {
    let began = Instant::now();
    let bar = out.progress(&format!("creating a VM from template {}", args.template));
    let vm = super::vm::create(
        c,
        &args.template,
        args.name.as_deref(),
        super::vm::Extra {
            qcow2_path: args.qcow2_path,
            boot_disk: args.boot_disk,
            network: args.network,
        },
    );
    let vm = match vm {
        Ok(vm) => vm,
        Err(e) => {
            bar.finish_and_clear();
            return Err(e);
        }
    };
    let id = vm["id"].as_str().unwrap_or_default().to_owned();
    out.note(&bar, &format!("created VM {id}"));
    let path = format!("/vms/{}", seg(&id));

    bar.set_message(format!("starting {id} (its root disk is prepared first)"));
    out.note(&bar, &format!("starting {id}"));
    if let Err(e) = super::progress::act_watching(c, out, &bar, &id, "start", None) {
        bar.finish_and_clear();
        return Err(kept(e, &id, "was created but did not start"));
    }
    out.note(&bar, &format!("{id} is running (QEMU started)"));

    bar.set_message(format!("waiting for {id} to boot"));
    let boot = Instant::now();
    let deadline = Duration::from_secs(args.timeout);
    let vm = loop {
        let vm = match c.get(&path) {
            Ok(vm) => vm,
            Err(e) => {
                bar.finish_and_clear();
                return Err(e);
            }
        };
        if vm["state"].as_str() != Some("running") {
            bar.finish_and_clear();
            let why = vm["last_error"].as_str().unwrap_or("no reason given");
            return Err(CliError::failed(format!(
                "VM {id} is {} instead of booting: {why}",
                vm["state"].as_str().unwrap_or("unknown")
            )));
        }
        if !vm["metadata_fetched_at"].is_null() {
            break vm;
        }
        match c.get(&format!("{path}/console")) {
            Ok(console) => {
                if console["console"]
                    .as_str()
                    .is_some_and(|t| t.contains(&args.ready_marker))
                {
                    break vm;
                }
            }
            Err(e) => {
                bar.finish_and_clear();
                return Err(e);
            }
        }
        if boot.elapsed() >= deadline {
            bar.finish_and_clear();
            return Err(CliError::failed(format!(
                "VM {id} runs but its guest did not come up within {} s (no {:?} on its console); \
                 it keeps running: see `vman vm logs {id}`",
                args.timeout, args.ready_marker
            )));
        }
        std::thread::sleep(POLL);
    };
    bar.finish_and_clear();
    let secs = began.elapsed().as_secs_f64();
    out.created(
        &format!(
            "VM {id} is up ({secs:.1} s; booted in {:.1} s)",
            boot.elapsed().as_secs_f64()
        ),
        &id,
        &json!({"vm": vm, "ready_after_s": (secs * 10.0).round() / 10.0}),
    )
}

/// An error of a later step, saying that the VM stays.
fn kept(e: CliError, id: &str, what: &str) -> CliError {
    match e {
        CliError::Refused {
            status,
            detail,
            code,
        } => CliError::Refused {
            status,
            detail: format!(
                "VM {id} {what} (it is kept; `vman vm delete {id}` removes it): {detail}"
            ),
            code,
        },
        other => other,
    }
}
