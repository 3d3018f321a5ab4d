//! `vman events [--follow] [--type T] [--resource R] [--since ID]`: the
//! server's event journal. Without `--follow`, past events
//! (`GET /events?follow=false`) as a table or `--format json|yaml`; with it,
//! the Server-Sent Events stream (`GET /events`), one line per event (a JSON
//! object per line with `--format json`), reconnecting with `Last-Event-ID`
//! when the server drops the stream while it is still up. The filters are
//! checked by the server: a bad one is its 422, exit 1.

use std::io::{BufRead, BufReader, Write};

use clap::Args as ClapArgs;
use serde_json::Value;

use super::client::{answer, seg, CliError, Client};
use super::output::{self, Column, Format, Out};

#[derive(Debug, ClapArgs)]
pub struct Args {
    /// Keep printing events as they happen (Ctrl-C ends).
    #[arg(long, short)]
    follow: bool,
    /// Only events of this kind: vm, disk, template or observer.
    #[arg(long = "type", value_name = "TYPE")]
    kind: Option<String>,
    /// Only events of this VM, disk or template id.
    #[arg(long)]
    resource: Option<String>,
    /// Only events after this event id (with --follow: replayed first).
    #[arg(long)]
    since: Option<String>,
    /// Without --follow: at most this many (the newest; server default 1000).
    #[arg(long, conflicts_with = "follow")]
    limit: Option<String>,
}

/// Pause before resuming a dropped stream (a server that drops streams in
/// a loop is not hammered).
const RECONNECT_PAUSE: std::time::Duration = std::time::Duration::from_millis(500);

const COLUMNS: [Column; 6] = [
    Column::new("ID", "/id"),
    Column::new("TIME", "/time"),
    Column::new("TYPE", "/type"),
    Column::new("RESOURCE", "/resource"),
    Column::new("ACTION", "/action"),
    Column::with("DETAIL", "/detail", detail),
];

/// `detail` on one line: `key=value` pairs, `-` when empty.
fn detail(v: &Value) -> String {
    match v {
        Value::Object(m) if !m.is_empty() => m
            .iter()
            .map(|(k, v)| format!("{k}={}", output::cell(v)))
            .collect::<Vec<_>>()
            .join(" "),
        Value::Object(_) | Value::Null => "-".into(),
        _ => output::cell(v),
    }
}

pub fn run(c: &Client, out: Out, args: Args) -> Result<(), CliError> {
    let mut query = Vec::new();
    if let Some(t) = &args.kind {
        query.push(format!("type={}", seg(t)));
    }
    if let Some(r) = &args.resource {
        query.push(format!("resource={}", seg(r)));
    }
    if !args.follow {
        if let Some(s) = &args.since {
            query.push(format!("since={}", seg(s)));
        }
        if let Some(l) = &args.limit {
            query.push(format!("limit={}", seg(l)));
        }
        query.push("follow=false".into());
        let list = c.get(&format!("/events?{}", query.join("&")))?;
        return out.list(&list, &COLUMNS);
    }
    follow(c, out, &query, args.since)
}

/// Streams events; a dropped stream is resumed after the last event seen.
fn follow(c: &Client, out: Out, query: &[String], since: Option<String>) -> Result<(), CliError> {
    let path = if query.is_empty() {
        "/events".to_owned()
    } else {
        format!("/events?{}", query.join("&"))
    };
    // The resume point: --since first, then the last event printed.
    let mut last: Option<String> = since;
    let mut printer = Printer::new(out);
    loop {
        let headers: Vec<(&str, String)> = last
            .iter()
            .map(|id| ("last-event-id", id.clone()))
            .collect();
        let resp = c.get_stream(&path, &headers)?;
        let status = resp.status().as_u16();
        if status != 200 {
            let text = resp.text().unwrap_or_default();
            answer(status, &text)?;
            return Err(CliError::failed(format!(
                "the server answered {status} instead of an event stream"
            )));
        }
        // The server subscribed before answering: from here on nothing is
        // missed (scripts and tests may wait for this line on stderr).
        if !out.quiet {
            eprintln!("vman: following events at {} (Ctrl-C ends)", c.url(&path));
        }
        let mut reader = BufReader::new(resp);
        let mut sse = Sse::default();
        let mut line = String::new();
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                // The server ended the stream (or the connection broke):
                // reconnect; if the server is down, that is exit 3.
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            if let Some((id, data)) = sse.feed(line.trim_end_matches(['\r', '\n'])) {
                if let Some(id) = id {
                    last = Some(id);
                }
                if !printer.print(&data) {
                    return Ok(());
                }
            }
        }
        std::thread::sleep(RECONNECT_PAUSE);
    }
}

/// One line per event on stdout.
struct Printer {
    out: Out,
}

impl Printer {
    fn new(out: Out) -> Self {
        Self { out }
    }

    /// False when stdout is closed (`| head`).
    fn print(&mut self, data: &str) -> bool {
        let v: Value = serde_json::from_str(data).unwrap_or(Value::String(data.to_owned()));
        let line = match self.out.format {
            Format::Json => serde_json::to_string(&v).unwrap_or_else(|_| data.to_owned()),
            Format::Yaml => {
                let y = serde_norway::to_string(&v).unwrap_or_else(|_| data.to_owned());
                format!("---\n{}", y.trim_end())
            }
            Format::Table if self.out.quiet => output::cell(&v["id"]),
            Format::Table => COLUMNS
                .iter()
                .map(|c| (c.render)(v.pointer(c.pointer).unwrap_or(&Value::Null)))
                .collect::<Vec<_>>()
                .join("  "),
        };
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "{line}")
            .and_then(|()| stdout.flush())
            .is_ok()
    }
}

/// The Server-Sent Events wire format, line by line: `id:` and `data:`
/// fields, `:` comments (keep-alives), a blank line ends an event.
#[derive(Default)]
struct Sse {
    id: Option<String>,
    data: Vec<String>,
}

impl Sse {
    /// Takes one line (without its end); answers `(id, data)` when it ends
    /// an event that carried data.
    fn feed(&mut self, line: &str) -> Option<(Option<String>, String)> {
        if line.is_empty() {
            let id = self.id.take();
            if self.data.is_empty() {
                return None;
            }
            let data = std::mem::take(&mut self.data).join("\n");
            return Some((id, data));
        }
        if line.starts_with(':') {
            return None;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "id" => self.id = Some(value.to_owned()),
            "data" => self.data.push(value.to_owned()),
            _ => {}
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_lines_make_events_and_skip_keep_alives() {
        let mut sse = Sse::default();
        assert_eq!(sse.feed(": keep-alive"), None);
        assert_eq!(sse.feed(""), None);
        assert_eq!(sse.feed("id: 7"), None);
        assert_eq!(sse.feed("data: {\"id\":7}"), None);
        assert_eq!(
            sse.feed(""),
            Some((Some("7".into()), "{\"id\":7}".to_owned()))
        );
        assert_eq!(sse.feed("data:a"), None);
        assert_eq!(sse.feed("data: b"), None);
        assert_eq!(sse.feed(""), Some((None, "a\nb".to_owned())));
    }

    #[test]
    fn details_fit_one_line() {
        assert_eq!(detail(&Value::Null), "-");
        assert_eq!(detail(&serde_json::json!({})), "-");
        assert_eq!(
            detail(&serde_json::json!({"reason": "killed", "state": "stopped"})),
            "reason=killed state=stopped"
        );
    }
}
