//! The `vman` binary: loads `.env`, parses arguments, sets up logging and
//! dispatches. Everything else lives in the library (`vman serve` and
//! `vman db` here; the client commands in `vman::cli`).

use clap::{CommandFactory, Parser, Subcommand};
use std::process::ExitCode;

use vman::config::Config;

#[derive(Parser)]
#[command(name = "vman", version, about = "A VM manager for one Linux host")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the REST API server.
    Serve(Box<Config>),
    /// Database tools: consistent backups, rebuilding lost records.
    #[command(subcommand)]
    Db(DbCommand),
    /// The client commands (template, vm, disk, health, launch, ...).
    #[command(flatten)]
    Client(vman::cli::Command),
}

#[derive(Subcommand)]
enum DbCommand {
    /// Copy the database to PATH with SQLite's online backup API (consistent
    /// while `vman serve` runs; PATH must not exist).
    Backup {
        path: std::path::PathBuf,
        #[command(flatten)]
        config: Box<Config>,
    },
    /// Rebuild records from the storage folders: a stopped VM per folder in
    /// vms/, a disk per file in disks/. Run it with `vman serve` stopped.
    Recover {
        /// Template of the recovered VMs (created when missing).
        #[arg(long, default_value = "recovered")]
        template: String,
        /// vCPUs of that template when it is created.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        cpus: u32,
        /// Memory (MiB) of that template when it is created.
        #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..))]
        ram_mib: u64,
        #[command(flatten)]
        config: Box<Config>,
    },
}

fn main() -> ExitCode {
    // `.env` in the working directory; variables already set win.
    if let Err(e) = dotenvy::dotenv() {
        if !e.not_found() {
            eprintln!("vman: cannot read .env: {e}");
            return ExitCode::from(2);
        }
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) if e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            // `vman vm` alone: its help, as a usage error.
            let _ = e.print();
            return ExitCode::from(2);
        }
        Err(e) => {
            // One clear line, not clap's usage block.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            eprintln!(
                "vman: {}",
                name_env_var(&Cli::command(), first.trim_start_matches("error: "))
            );
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Command::Serve(config) => serve(*config),
        Command::Db(cmd) => db(cmd),
        Command::Client(cmd) => vman::cli::run(cmd, Cli::command()),
    }
}

fn db(cmd: DbCommand) -> ExitCode {
    use vman::service::database;
    match cmd {
        DbCommand::Backup { path, config } => match database::backup(&config, &path) {
            Ok(pages) => {
                println!(
                    "backed up {} to {} ({pages} pages)",
                    config.db_path().display(),
                    path.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("vman: backup failed: {e}");
                ExitCode::FAILURE
            }
        },
        DbCommand::Recover {
            template,
            cpus,
            ram_mib,
            config,
        } => {
            let name = match vman::model::Name::parse("--template", &template) {
                Ok(n) => n,
                Err(e) => {
                    eprintln!("vman: {e}");
                    return ExitCode::from(2);
                }
            };
            let template = database::RecoverTemplate {
                name,
                cpu_count: cpus,
                ram_mib,
            };
            match database::recover(&config, &template) {
                Ok(report) => {
                    for line in &report.recorded {
                        println!("recorded {line}");
                    }
                    for line in &report.skipped {
                        println!("skipped {line}");
                    }
                    println!(
                        "recovered {} record(s) into {}; not recoverable: template sizes, \
                         qcow2_path/boot_disk, metadata, disk mount points, attachments of \
                         stopped VMs",
                        report.recorded.len(),
                        config.db_path().display()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("vman: recover failed: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Clap names the flag (`'--port <PORT>'`); most users set the variable,
/// so name both (`--port / VMAN_PORT`) when the flag has one.
fn name_env_var(cli: &clap::Command, message: &str) -> String {
    let Some(start) = message.find("'--") else {
        return message.to_owned();
    };
    let rest = &message[start + 3..];
    let Some(end) = rest.find('\'') else {
        return message.to_owned();
    };
    let flag = rest[..end].split_whitespace().next().unwrap_or("");
    let Some(var) = env_of(cli, flag) else {
        return message.to_owned();
    };
    format!("{}--{flag} / {var}{}", &message[..start], &rest[end + 1..])
}

/// The environment variable of the flag `--long`, anywhere in the tree.
fn env_of(cmd: &clap::Command, long: &str) -> Option<String> {
    cmd.get_arguments()
        .find(|a| a.get_long() == Some(long))
        .and_then(|a| a.get_env())
        .map(|v| v.to_string_lossy().into_owned())
        .or_else(|| cmd.get_subcommands().find_map(|s| env_of(s, long)))
}

fn serve(config: Config) -> ExitCode {
    if let Err(e) = config.validate() {
        eprintln!("vman: {e}");
        return ExitCode::from(2);
    }
    if let Err(e) = vman::logging::init(
        config.log_level,
        &config.log_dir,
        config.log_max_bytes,
        config.log_backup_count,
    ) {
        eprintln!(
            "vman: cannot write logs to {}: {e}",
            config.log_dir.display()
        );
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vman: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(vman::app::serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("vman: {e:#}");
            ExitCode::FAILURE
        }
    }
}
