//! The `vman` client commands (`vman template|vm|disk|health|launch`, and
//! `completions`/`man` generated from the same clap definition): a pure
//! REST client of a running `vman serve` at `VMAN_URL`. It never opens the
//! database or storage; whatever it shows or changes goes through the API,
//! so it obeys the same rules, locks and token as curl.
//!
//! One file per resource (`template`, `vm`, `disk`, `health`, `launch`,
//! `events`), `console` for `vman vm console` (WebSocket, raw terminal),
//! `client` for HTTP and exit codes, `output` for tables, JSON/YAML and
//! progress.

pub mod client;
mod console;
mod disk;
mod events;
mod health;
mod launch;
pub mod output;
mod progress;
mod template;
mod vm;

use std::process::ExitCode;

use clap::{Args, Subcommand};

use client::{CliError, Client};
use output::{Format, Out};

/// Where the server is and how to print: accepted after any client command
/// (`vman vm list --format json`).
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// URL of the vman server.
    #[arg(
        long,
        env = "VMAN_URL",
        default_value = "http://127.0.0.1:8000",
        global = true
    )]
    pub url: String,

    /// API token, sent as `Authorization: Bearer` (when the server has one).
    #[arg(long, env = "VMAN_API_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,

    /// Output format: aligned table for people, or the server's JSON/YAML.
    #[arg(long, value_enum, default_value_t = Format::Table, global = true)]
    pub format: Format,

    /// Quiet: lists print only ids, actions print nothing, no progress.
    #[arg(short, long, global = true)]
    pub quiet: bool,
}

impl ClientArgs {
    fn connect(&self) -> Result<(Client, Out), CliError> {
        let client = Client::new(&self.url, self.token.clone())?;
        Ok((
            client,
            Out {
                format: self.format,
                quiet: self.quiet,
            },
        ))
    }
}

/// The client commands, flattened into the binary's top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Templates: the sizes VMs are made from.
    #[command(arg_required_else_help = true)]
    Template {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        cmd: template::Cmd,
    },
    /// Virtual machines.
    #[command(arg_required_else_help = true)]
    Vm {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        cmd: vm::Cmd,
    },
    /// Data disks.
    #[command(arg_required_else_help = true)]
    Disk {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        cmd: disk::Cmd,
    },
    /// The server's health checks (exit 1 when degraded).
    Health {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// The server's events: past ones, or `--follow` them as they happen.
    Events {
        #[command(flatten)]
        client: ClientArgs,
        #[command(flatten)]
        args: events::Args,
    },
    /// Create a VM from TEMPLATE, start it and wait until its guest is up
    /// (console prints `vman-guest: ready`, or the guest fetched its metadata).
    Launch {
        #[command(flatten)]
        client: ClientArgs,
        #[command(flatten)]
        args: launch::Args,
    },
    /// Print a shell completion script (e.g. `vman completions bash >
    /// /etc/bash_completion.d/vman`).
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff) of `vman` and its commands.
    Man,
}

/// Runs a client command; `root` is the binary's whole clap definition
/// (for completions and the man page).
pub fn run(cmd: Command, root: clap::Command) -> ExitCode {
    let result = match cmd {
        Command::Template { client, cmd } => client
            .connect()
            .and_then(|(c, out)| template::run(&c, out, cmd)),
        Command::Vm { client, cmd } => client.connect().and_then(|(c, out)| vm::run(&c, out, cmd)),
        Command::Disk { client, cmd } => client
            .connect()
            .and_then(|(c, out)| disk::run(&c, out, cmd)),
        Command::Health { client } => client.connect().and_then(|(c, out)| health::run(&c, out)),
        Command::Launch { client, args } => client
            .connect()
            .and_then(|(c, out)| launch::run(&c, out, args)),
        Command::Events { client, args } => client
            .connect()
            .and_then(|(c, out)| events::run(&c, out, args)),
        Command::Completions { shell } => {
            let mut root = root;
            let name = root.get_name().to_owned();
            clap_complete::generate(shell, &mut root, name, &mut std::io::stdout());
            Ok(())
        }
        Command::Man => man(root),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vman: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// The man page: `vman(1)` with every subcommand's page appended.
fn man(root: clap::Command) -> Result<(), CliError> {
    let mut root = root;
    root.build();
    let mut buf: Vec<u8> = Vec::new();
    render_man(&root, &mut buf)
        .map_err(|e| CliError::failed(format!("cannot render the man page: {e}")))?;
    output::emit_raw(&String::from_utf8_lossy(&buf));
    Ok(())
}

fn render_man(cmd: &clap::Command, buf: &mut Vec<u8>) -> std::io::Result<()> {
    clap_mangen::Man::new(cmd.clone()).render(buf)?;
    for sub in cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        let name = format!("{}-{}", cmd.get_name(), sub.get_name());
        let sub = sub.clone().name(name);
        render_man(&sub, buf)?;
    }
    Ok(())
}
