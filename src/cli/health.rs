//! `vman health`: GET /health as a table of checks; exit 1 when the server
//! says it is degraded (503), with the failing checks on stderr.

use reqwest::Method;
use serde_json::Value;

use super::client::{answer, CliError, Client};
use super::output::{self, Format, Out};

pub fn run(c: &Client, out: Out) -> Result<(), CliError> {
    let (status, text) = c.call_raw(Method::GET, "/health", None)?;
    // 200 ok and 503 degraded carry the same body; anything else is an error.
    let body: Value = match status {
        200 | 503 => serde_json::from_str(&text).or_else(|_| answer(status, &text))?,
        _ => answer(status, &text)?,
    };
    let degraded = status == 503;
    if out.format != Format::Table {
        out.object(&body)?;
    } else if !out.quiet {
        let mut text = format!("status: {}", body["status"].as_str().unwrap_or("unknown"));
        if let Some(v) = body["version"].as_str() {
            text.push_str(&format!(" (vman {v} at {})", c.base()));
        }
        if let Some(checks) = body["checks"].as_object() {
            let rows = checks
                .iter()
                .map(|(name, check)| {
                    vec![
                        name.clone(),
                        if check["ok"].as_bool() == Some(true) {
                            "ok".into()
                        } else {
                            "FAIL".into()
                        },
                        output::cell(&check["detail"]),
                    ]
                })
                .collect();
            text.push('\n');
            text.push_str(&output::table(vec!["CHECK", "STATUS", "DETAIL"], rows));
        }
        output::emit(&text);
    }
    if degraded {
        let failing: Vec<String> = body["checks"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter(|(_, c)| c["ok"].as_bool() != Some(true))
                    .map(|(n, c)| format!("{n}: {}", output::cell(&c["detail"])))
                    .collect()
            })
            .unwrap_or_default();
        let detail = if failing.is_empty() {
            "the server is degraded".to_owned()
        } else {
            format!("the server is degraded: {}", failing.join("; "))
        };
        return Err(CliError::Refused {
            status: Some(503),
            detail,
            code: None,
        });
    }
    Ok(())
}
