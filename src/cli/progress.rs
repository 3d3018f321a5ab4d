//! Root disk progress while a start runs. POST .../actions/start answers
//! only once QEMU runs, after the server made the root disk (a copy of the
//! boot disk can take a while), so the request is sent from a scoped thread
//! while this one polls GET /vms/{id} for `provisioning` (bytes done and
//! total) and shows it: an indicatif byte bar on a terminal's stderr, one
//! line when the copy begins and one when it is done elsewhere, nothing
//! under `-q`.

use std::sync::mpsc;
use std::time::Duration;

use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use serde_json::Value;

use super::client::{seg, CliError, Client};
use super::output::Out;

/// How often the VM is polled while the start runs.
const POLL: Duration = Duration::from_millis(100);

/// What the polls saw of the root disk being made.
#[derive(Debug, Default, Clone, PartialEq)]
struct Seen {
    method: String,
    done: u64,
    total: u64,
}

fn provisioning(vm: &Value) -> Option<Seen> {
    let p = vm.get("provisioning").filter(|p| p.is_object())?;
    Some(Seen {
        method: p["method"].as_str().unwrap_or("copy").to_owned(),
        done: p["bytes_done"].as_u64().unwrap_or(0),
        total: p["bytes_total"].as_u64().unwrap_or(0),
    })
}

/// POST /vms/{id}/actions/{verb} (`body` or none) while showing the root
/// disk's progress on `bar` (a spinner from `Out::progress`, hidden when
/// output is not for a person at a terminal). The server's answer, or its
/// refusal, is the result; a failed poll only stops the display.
pub fn act_watching(
    c: &Client,
    out: Out,
    bar: &ProgressBar,
    id: &str,
    verb: &str,
    body: Option<&Value>,
) -> Result<Value, CliError> {
    let path = format!("/vms/{}", seg(id));
    let action = format!("{path}/actions/{verb}");
    let (spinner_style, message) = (bar.style(), bar.message());
    let mut seen: Option<Seen> = None;
    let answer = std::thread::scope(|scope| {
        let (tx, rx) = mpsc::channel();
        scope.spawn(move || {
            let answer = match body {
                Some(b) => c.post(&action, b),
                None => c.post_empty(&action),
            };
            let _ = tx.send(answer);
        });
        let mut polling = true;
        // The first look soon: a short copy may be over within one POLL.
        let mut wait = POLL / 4;
        loop {
            match rx.recv_timeout(wait) {
                Ok(answer) => return answer,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(CliError::failed("the start request was lost"))
                }
                Err(mpsc::RecvTimeoutError::Timeout) => wait = POLL,
            }
            if !polling {
                continue;
            }
            let Ok(vm) = c.get(&path) else {
                polling = false;
                continue;
            };
            if let Some(now) = provisioning(&vm) {
                show(out, bar, id, seen.as_ref(), &now);
                seen = Some(now);
            }
        }
    });
    if let Some(last) = &seen {
        if answer.is_ok() && last.total > 0 {
            bar.set_position(last.total);
            out.note(
                bar,
                &format!(
                    "root disk of {id} ready: {} by {}",
                    HumanBytes(last.total),
                    last.method
                ),
            );
        }
        bar.set_style(spinner_style);
        bar.set_message(message);
        bar.unset_length();
    }
    answer
}

/// Shows `now`: the first time a line saying what is made (and the byte
/// bar on a terminal), then the bar's position.
fn show(out: Out, bar: &ProgressBar, id: &str, before: Option<&Seen>, now: &Seen) {
    if before.is_none() {
        let what = if now.total > 0 {
            format!(
                "making the root disk of {id}: {} by {}",
                HumanBytes(now.total),
                now.method
            )
        } else {
            format!("making the root disk of {id} ({})", now.method)
        };
        out.note(bar, &what);
        if now.total > 0 && !bar.is_hidden() {
            if let Ok(style) = ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} ({binary_bytes_per_sec}, {eta})",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_message(format!("copying the root disk of {id}"));
        }
    }
    bar.set_length(now.total);
    bar.set_position(now.done);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn provisioning_is_read_when_the_server_reports_it() {
        assert_eq!(provisioning(&json!({"provisioning": null})), None);
        assert_eq!(provisioning(&json!({})), None);
        assert_eq!(
            provisioning(
                &json!({"provisioning": {"method": "convert", "bytes_done": 5, "bytes_total": 9}})
            ),
            Some(Seen {
                method: "convert".into(),
                done: 5,
                total: 9
            })
        );
    }
}
