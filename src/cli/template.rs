//! `vman template create|list|show|delete` over /templates.

use clap::Subcommand;
use serde_json::{json, Map, Value};

use super::client::{seg, CliError, Client};
use super::output::{Column, Out};

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Create a template (exactly one of --ram GiB and --ram-mib MiB).
    Create {
        name: String,
        /// vCPUs.
        #[arg(long)]
        cpus: u64,
        /// Memory in GiB.
        #[arg(long, conflicts_with = "ram_mib", required_unless_present = "ram_mib")]
        ram: Option<u64>,
        /// Memory in MiB (for sizes below 1 GiB).
        #[arg(long)]
        ram_mib: Option<u64>,
        /// Grow root disks to this many GiB after the copy.
        #[arg(long)]
        disk_size: Option<u64>,
    },
    /// List templates.
    #[command(visible_alias = "ls")]
    List,
    /// Show one template.
    Show { name: String },
    /// Delete a template (refused while VMs use it).
    #[command(visible_alias = "rm")]
    Delete { name: String },
}

pub const COLUMNS: &[Column] = &[
    Column::new("NAME", "/name"),
    Column::new("CPUS", "/cpu_count"),
    Column::new("RAM_MIB", "/ram_mib"),
    Column::new("DISK_GB", "/disk_size_gb"),
    Column::new("CREATED", "/created_at"),
];

pub fn run(c: &Client, out: Out, cmd: Cmd) -> Result<(), CliError> {
    match cmd {
        Cmd::Create {
            name,
            cpus,
            ram,
            ram_mib,
            disk_size,
        } => {
            let mut body = Map::new();
            body.insert("name".into(), json!(name));
            body.insert("cpu_count".into(), json!(cpus));
            if let Some(r) = ram {
                body.insert("ram_amount".into(), json!(r));
            }
            if let Some(r) = ram_mib {
                body.insert("ram_mib".into(), json!(r));
            }
            if let Some(d) = disk_size {
                body.insert("disk_size_gb".into(), json!(d));
            }
            let t = c.post("/templates", &Value::Object(body))?;
            let created = t["name"].as_str().unwrap_or(&name);
            out.created(
                &format!(
                    "created template {created} ({} vCPU, {} MiB)",
                    t["cpu_count"], t["ram_mib"]
                ),
                created,
                &t,
            )
        }
        Cmd::List => out.list(&c.get("/templates")?, COLUMNS),
        Cmd::Show { name } => out.object(&c.get(&format!("/templates/{}", seg(&name)))?),
        Cmd::Delete { name } => {
            c.delete(&format!("/templates/{}", seg(&name)))?;
            out.done(
                &format!("deleted template {name}"),
                &json!({"status": "deleted", "name": name}),
            )
        }
    }
}
