//! GET /metrics: Prometheus text that a parser accepts, counters that move
//! with what happens, request series by route template (never the raw
//! path), and per-VM series (a real QEMU under TCG with an empty disk) that
//! go away with their VM.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use openmetrics_parser::{prometheus::parse_prometheus, PrometheusValue};
use serde_json::json;

use crate::common::Server;
use crate::make_vm;

const DEADLINE: Duration = Duration::from_secs(60);

/// One series: a histogram's value is its count.
#[derive(Debug)]
struct Sample {
    metric: String,
    labels: HashMap<String, String>,
    value: f64,
}

/// Scrapes, checks the text line by line, and parses it with a
/// grammar-based parser of the Prometheus text format.
fn scrape(s: &Server) -> Vec<Sample> {
    let r = s.request("GET", "/metrics", None);
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        r.content_type.as_deref(),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    strict_check(&r.text);
    let parsed =
        parse_prometheus(&r.text).unwrap_or_else(|e| panic!("does not parse: {e:?}\n{}", r.text));
    let mut out = Vec::new();
    for (name, family) in parsed.families {
        let names = family.get_label_names().to_vec();
        for sample in family.iter_samples() {
            let set = sample.get_labelset().expect("labels");
            let labels = names
                .iter()
                .filter_map(|n| Some((n.clone(), set.get_label_value(n)?.to_owned())))
                .collect();
            let value = match &sample.value {
                PrometheusValue::Unknown(n) | PrometheusValue::Gauge(n) => n.as_f64(),
                PrometheusValue::Counter(c) => c.value.as_f64(),
                PrometheusValue::Histogram(h) => h.count.unwrap_or(0) as f64,
                PrometheusValue::Summary(_) => f64::NAN,
            };
            out.push(Sample {
                metric: name.clone(),
                labels,
                value,
            });
        }
    }
    out
}

/// What a parser may let through: every family has HELP and TYPE before
/// its samples, every sample line is `vman_name{labels} number`, and no
/// series appears twice.
fn strict_check(text: &str) {
    let mut typed: HashSet<String> = HashSet::new();
    let mut series: HashSet<&str> = HashSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let name = parts.next().expect("name");
            let kind = parts.next().expect("kind");
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            assert!(typed.insert(name.to_owned()), "family twice: {line}");
            continue;
        }
        if line.starts_with("# HELP vman_") {
            continue;
        }
        let (head, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line}"));
        value
            .parse::<f64>()
            .unwrap_or_else(|_| panic!("value of {line}"));
        let name = head.split('{').next().expect("name");
        assert!(name.starts_with("vman_"), "{line}");
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| typed.contains(*f)))
            .unwrap_or(name);
        assert!(typed.contains(family), "sample before its TYPE: {line}");
        assert!(series.insert(head), "series twice: {line}");
    }
}

fn value(samples: &[Sample], metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| {
            s.metric == metric
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
}

fn about_vm<'a>(samples: &'a [Sample], vm: &str) -> Vec<&'a Sample> {
    samples
        .iter()
        .filter(|s| s.labels.get("vm").map(String::as_str) == Some(vm))
        .collect()
}

#[test]
fn counters_move_with_starts_stops_and_exits_and_vm_series_go_with_the_vm() {
    let s = Server::start();
    let _guests = crate::KillGuests(s.storage_path().to_owned());
    let before = scrape(&s);
    assert_eq!(
        value(&before, "vman_vms", &[("state", "running")]),
        Some(0.0)
    );
    assert_eq!(
        value(&before, "vman_vm_starts_total", &[("result", "ok")]),
        Some(0.0)
    );

    let (status, body) = s.post_json(
        "/templates",
        &json!({"name": "t", "cpu_count": 1, "ram_mib": 64}),
    );
    assert_eq!(status, 201, "{body}");
    make_vm(&s, "t", Some("m1"));
    let (status, body) = s.post_json("/vms/m1/actions/start", &json!({}));
    assert_eq!(status, 202, "{body}");

    let running = scrape(&s);
    assert_eq!(
        value(&running, "vman_vms", &[("state", "running")]),
        Some(1.0)
    );
    assert_eq!(
        value(&running, "vman_vm_starts_total", &[("result", "ok")]),
        Some(1.0)
    );
    assert!(value(&running, "vman_vm_memory_rss_bytes", &[("vm", "m1")]).is_some_and(|v| v > 0.0));
    assert!(value(&running, "vman_vm_cpu_seconds_total", &[("vm", "m1")]).is_some());
    // Disk figures come from QEMU's answer, which a scrape waits for only
    // briefly: the next scrapes have it.
    let start = Instant::now();
    loop {
        let now = scrape(&s);
        let reads = &[("vm", "m1"), ("disk", "root")];
        if value(&now, "vman_vm_disk_read_ops_total", reads).is_some() {
            assert!(value(&now, "vman_vm_disk_stats_age_seconds", &[("vm", "m1")]).is_some());
            break;
        }
        assert!(start.elapsed() < DEADLINE, "{:?}", about_vm(&now, "m1"));
        std::thread::sleep(Duration::from_millis(50));
    }
    // Requests by route template, not by raw path.
    assert_eq!(
        value(
            &running,
            "vman_http_requests_total",
            &[
                ("route", "/vms/{vm_id}/actions/start"),
                ("method", "POST"),
                ("status", "202")
            ]
        ),
        Some(1.0)
    );
    assert!(
        !running
            .iter()
            .any(|x| x.labels.get("route").is_some_and(|r| r.contains("m1"))),
        "a raw path became a label"
    );
    assert!(value(
        &running,
        "vman_http_request_duration_seconds",
        &[("route", "/vms/{vm_id}/actions/start"), ("method", "POST")]
    )
    .is_some_and(|count| count >= 1.0));

    // A forced stop is counted by method.
    let (status, body) = s.post_json("/vms/m1/actions/stop", &json!({"force": true}));
    assert_eq!(status, 202, "{body}");
    let method = body["method"].as_str().expect("method").to_owned();
    let stopped = scrape(&s);
    assert_eq!(
        value(&stopped, "vman_vm_stops_total", &[("method", &method)]),
        Some(1.0)
    );
    assert_eq!(
        value(&stopped, "vman_vms", &[("state", "stopped")]),
        Some(1.0)
    );
    assert!(
        about_vm(&stopped, "m1").is_empty(),
        "{:?}",
        about_vm(&stopped, "m1")
    );

    // A killed QEMU is an unexpected exit, and its recording is timed.
    let (status, body) = s.post_json("/vms/m1/actions/start", &json!({}));
    assert_eq!(status, 202, "{body}");
    let pid = s.get("/vms/m1").1["pid"].as_i64().expect("pid") as i32;
    // SAFETY: kill(2) of the VM's QEMU.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let start = Instant::now();
    loop {
        let now = scrape(&s);
        if value(&now, "vman_vm_exits_total", &[("reason", "unexpected")]) == Some(1.0) {
            assert_eq!(value(&now, "vman_exit_detection_seconds", &[]), Some(1.0));
            assert_eq!(value(&now, "vman_vms", &[("state", "error")]), Some(1.0));
            assert!(about_vm(&now, "m1").is_empty());
            break;
        }
        assert!(start.elapsed() < DEADLINE, "no exit counted");
        std::thread::sleep(Duration::from_millis(50));
    }

    // Started again, then deleted: its series go with it.
    let (status, body) = s.post_json("/vms/m1/actions/start", &json!({}));
    assert_eq!(status, 202, "{body}");
    assert!(!about_vm(&scrape(&s), "m1").is_empty());
    assert_eq!(s.delete("/vms/m1").0, 204);
    let gone = scrape(&s);
    assert!(
        about_vm(&gone, "m1").is_empty(),
        "{:?}",
        about_vm(&gone, "m1")
    );
    for state in ["running", "stopped", "error"] {
        assert_eq!(value(&gone, "vman_vms", &[("state", state)]), Some(0.0));
    }
    assert_eq!(
        value(&gone, "vman_vm_starts_total", &[("result", "ok")]),
        Some(3.0)
    );
}

#[test]
fn refused_and_unrouted_requests_are_counted_without_their_paths() {
    let s = Server::start();
    s.get("/no/such/route/abc123");
    s.get("/vms/does-not-exist");
    let samples = scrape(&s);
    assert_eq!(
        value(
            &samples,
            "vman_http_requests_total",
            &[("route", "unmatched"), ("method", "GET"), ("status", "404")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &samples,
            "vman_http_requests_total",
            &[
                ("route", "/vms/{vm_id}"),
                ("method", "GET"),
                ("status", "404")
            ]
        ),
        Some(1.0)
    );
    assert!(!samples
        .iter()
        .any(|x| x.labels.get("route").is_some_and(|r| r.contains("abc123"))));
}

#[test]
fn metrics_need_the_token() {
    let token = "0123456789abcdef0123";
    let s = Server::builder().api_token(token).start();
    let r = s.raw("GET", "/metrics", None, &[]);
    assert_eq!(r.status, 401, "{}", r.text);
    scrape(&s);
}
