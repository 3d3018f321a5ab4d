//! What the CLI prints: aligned tables for people (comfy-table), the
//! server's JSON or YAML as is for scripts (`--format json|yaml`), `-q` for
//! ids only and no progress, and the progress spinner of long work
//! (indicatif; only on a terminal's stderr and never under `-q`).

use std::io::{IsTerminal, Write};
use std::time::Duration;

use clap::ValueEnum;
use comfy_table::{presets, CellAlignment, ContentArrangement, Table};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;

use super::client::CliError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum Format {
    /// Aligned columns for people.
    #[default]
    Table,
    /// The server's JSON (one document; `vm logs --follow`: one per line).
    Json,
    /// The same as YAML.
    Yaml,
}

/// A column of a list: its header and where its value is (a JSON pointer
/// into each item), with an optional renderer.
pub struct Column {
    pub header: &'static str,
    pub pointer: &'static str,
    pub render: fn(&Value) -> String,
}

impl Column {
    pub const fn new(header: &'static str, pointer: &'static str) -> Self {
        Self {
            header,
            pointer,
            render: cell,
        }
    }

    pub const fn with(
        header: &'static str,
        pointer: &'static str,
        render: fn(&Value) -> String,
    ) -> Self {
        Self {
            header,
            pointer,
            render,
        }
    }
}

/// Where the output goes and how it looks.
#[derive(Debug, Clone, Copy)]
pub struct Out {
    pub format: Format,
    pub quiet: bool,
}

impl Out {
    /// Prints a JSON or YAML document; false for `Format::Table`.
    fn document(&self, v: &Value) -> Result<bool, CliError> {
        let text = match self.format {
            Format::Table => return Ok(false),
            Format::Json => {
                serde_json::to_string_pretty(v).map_err(|e| CliError::failed(e.to_string()))?
            }
            Format::Yaml => {
                let y = serde_norway::to_string(v).map_err(|e| CliError::failed(e.to_string()))?;
                y.trim_end().to_owned()
            }
        };
        emit(&text);
        Ok(true)
    }

    /// A list: a table of `columns`, `-q` the first column only (ids).
    pub fn list(&self, v: &Value, columns: &[Column]) -> Result<(), CliError> {
        if self.document(v)? {
            return Ok(());
        }
        let empty = Vec::new();
        let items = v.as_array().unwrap_or(&empty);
        if self.quiet {
            let mut text = String::new();
            for item in items {
                if let Some(first) = columns.first() {
                    text.push_str(&(first.render)(
                        item.pointer(first.pointer).unwrap_or(&Value::Null),
                    ));
                    text.push('\n');
                }
            }
            emit(text.trim_end());
            return Ok(());
        }
        let rows = items
            .iter()
            .map(|item| {
                columns
                    .iter()
                    .map(|c| (c.render)(item.pointer(c.pointer).unwrap_or(&Value::Null)))
                    .collect()
            })
            .collect();
        emit(&table(columns.iter().map(|c| c.header).collect(), rows));
        Ok(())
    }

    /// One object: `KEY  value` lines (nested objects as `a.b`).
    pub fn object(&self, v: &Value) -> Result<(), CliError> {
        if self.document(v)? {
            return Ok(());
        }
        let mut rows = Vec::new();
        flatten("", v, &mut rows);
        // What names the object first, then the rest by name.
        const FIRST: [&str; 4] = ["id", "name", "vm_id", "state"];
        rows.sort_by_key(|(k, _)| FIRST.iter().position(|f| f == k).unwrap_or(FIRST.len()));
        let rows = rows.into_iter().map(|(k, v)| vec![k, v]).collect();
        emit(&bare_table(rows));
        Ok(())
    }

    /// The outcome of an action: `message` for people (nothing under `-q`),
    /// `v` (the server's answer, or what the CLI says it did) for scripts.
    pub fn done(&self, message: &str, v: &Value) -> Result<(), CliError> {
        if self.document(v)? || self.quiet {
            return Ok(());
        }
        emit(message);
        Ok(())
    }

    /// The outcome of a creation: like `done`, but `-q` prints the new id
    /// (`id=$(vman vm create -t small -q)`).
    pub fn created(&self, message: &str, id: &str, v: &Value) -> Result<(), CliError> {
        if self.quiet && self.format == Format::Table {
            emit(id);
            return Ok(());
        }
        self.done(message, v)
    }

    /// A spinner on stderr with `message`, or a hidden one (`-q`, not a
    /// terminal, or a machine format: scripts read clean output).
    pub fn progress(&self, message: &str) -> ProgressBar {
        if self.quiet || !std::io::stderr().is_terminal() {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::new_spinner();
        if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} ({elapsed})") {
            bar.set_style(style);
        }
        bar.set_message(message.to_owned());
        bar.enable_steady_tick(Duration::from_millis(120));
        bar
    }

    /// A line on stderr for people (not under `-q`), e.g. a finished step.
    pub fn note(&self, bar: &ProgressBar, line: &str) {
        if self.quiet {
            return;
        }
        if bar.is_hidden() {
            eprintln!("{line}");
        } else {
            bar.println(line);
        }
    }
}

/// Writes `text` and a newline to stdout; a closed pipe (`| head`) ends
/// quietly instead of panicking.
pub fn emit(text: &str) {
    let mut out = std::io::stdout().lock();
    if text.is_empty() {
        return;
    }
    if writeln!(out, "{text}").and_then(|()| out.flush()).is_err() {
        std::process::exit(0);
    }
}

/// Writes raw bytes (console output) to stdout as they are.
pub fn emit_raw(text: &str) {
    let mut out = std::io::stdout().lock();
    if out
        .write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .is_err()
    {
        std::process::exit(0);
    }
}

/// An aligned table without borders, a header row on top (like `docker ps`).
pub fn table(headers: Vec<&str>, rows: Vec<Vec<String>>) -> String {
    let mut t = Table::new();
    t.set_header(headers);
    for row in rows {
        t.add_row(row);
    }
    render(t)
}

/// Rows only (key/value views).
fn bare_table(rows: Vec<Vec<String>>) -> String {
    let mut t = Table::new();
    for row in rows {
        t.add_row(row);
    }
    render(t)
}

fn render(mut t: Table) -> String {
    t.load_style(presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled);
    // Columns separated by three spaces, none before the first.
    for col in t.column_iter_mut() {
        col.set_padding((0, 3));
        col.set_cell_alignment(CellAlignment::Left);
    }
    trim_lines(&t.to_string())
}

fn trim_lines(text: &str) -> String {
    text.lines()
        .map(str::trim_end)
        .collect::<Vec<_>>()
        .join("\n")
}

/// A cell: `-` for null, strings as they are, arrays joined, objects as JSON.
pub fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) if s.is_empty() => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(items) if items.is_empty() => "-".into(),
        Value::Array(items) => items.iter().map(cell).collect::<Vec<_>>().join(", "),
        other => other.to_string(),
    }
}

/// A long text cut to its first line and 60 characters.
pub fn short(v: &Value) -> String {
    let full = cell(v);
    let line = full.lines().next().unwrap_or("");
    let cut: String = line.chars().take(60).collect();
    if cut.len() < full.len() {
        format!("{cut}...")
    } else {
        cut
    }
}

/// Bytes as GiB/MiB/KiB for people.
pub fn bytes(v: &Value) -> String {
    let Some(n) = v.as_u64() else { return cell(v) };
    const UNITS: [(&str, u64); 3] = [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    for (unit, size) in UNITS {
        if n >= size {
            let x = n as f64 / size as f64;
            return if n % size == 0 {
                format!("{} {unit}", n / size)
            } else {
                format!("{x:.1} {unit}")
            };
        }
    }
    format!("{n} B")
}

fn flatten(prefix: &str, v: &Value, rows: &mut Vec<(String, String)>) {
    match v {
        Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, rows);
            }
        }
        Value::Array(items) if items.iter().any(|i| i.is_object()) => {
            for (i, item) in items.iter().enumerate() {
                flatten(&format!("{prefix}[{i}]"), item, rows);
            }
        }
        other => rows.push((
            if prefix.is_empty() {
                "value".into()
            } else {
                prefix.to_owned()
            },
            match other {
                Value::Object(_) => "-".into(),
                v => cell(v),
            },
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tables_are_aligned_without_borders() {
        let t = table(
            vec!["ID", "STATE"],
            vec![
                vec!["a".into(), "running".into()],
                vec!["long-name".into(), "-".into()],
            ],
        );
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert!(lines[0].starts_with("ID "), "{t}");
        let col = lines[0].find("STATE").expect("header");
        assert_eq!(lines[1].find("running"), Some(col), "{t}");
        assert_eq!(lines[2].rfind('-'), Some(col), "{t}");
        assert!(lines.iter().all(|l| !l.ends_with(' ')));
    }

    #[test]
    fn cells_and_sizes_read_well() {
        assert_eq!(cell(&Value::Null), "-");
        assert_eq!(cell(&json!(["a", "b"])), "a, b");
        assert_eq!(cell(&json!(3)), "3");
        assert_eq!(bytes(&json!(1u64 << 30)), "1 GiB");
        assert_eq!(bytes(&json!(1536u64 << 20)), "1.5 GiB");
        assert_eq!(bytes(&json!(10)), "10 B");
        assert_eq!(short(&json!("line one\nline two")), "line one...");
    }

    #[test]
    fn objects_flatten_to_dotted_keys() {
        let mut rows = Vec::new();
        flatten(
            "",
            &json!({"id": "x", "t": {"name": "small"}, "ports": [{"p": 1}]}),
            &mut rows,
        );
        let mut keys: Vec<&str> = rows.iter().map(|(k, _)| k.as_str()).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["id", "ports[0].p", "t.name"]);
    }
}
