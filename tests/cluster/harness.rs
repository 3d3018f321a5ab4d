//! The cluster tests' harness: three etcd members (Debian's `etcd`) on
//! free loopback ports with their own data folders, and three `vman serve
//! --cluster` nodes (the e2e harness's `Vman`: real binary, port 0, own
//! storage, tiny guests under TCG) joined to them. Everything is killed on
//! drop, guests included.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::e2e::{Vman, SERVER};

/// The cluster token every node of a test shares.
pub const TOKEN: &str = "cluster-test-token-0123456789";
/// Node lease TTL of the tests (seconds): short, so losses show quickly.
pub const TTL: u64 = 3;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

struct Member {
    name: String,
    client: u16,
    peer: u16,
    child: Option<Child>,
}

/// Three etcd members on loopback.
pub struct Etcd {
    dir: tempfile::TempDir,
    members: Vec<Member>,
}

impl Etcd {
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("vman-etcd-")
            .tempdir()
            .expect("etcd dir");
        let members: Vec<Member> = (1..=3)
            .map(|i| Member {
                name: format!("e{i}"),
                client: free_port(),
                peer: free_port(),
                child: None,
            })
            .collect();
        let mut etcd = Self { dir, members };
        for i in 0..3 {
            etcd.start_member(i);
        }
        etcd.wait_quorum();
        etcd
    }

    fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts member `i` (again, on its data folder).
    pub fn start_member(&mut self, i: usize) {
        let initial = self.initial_cluster();
        let data: PathBuf = self.dir.path().join(&self.members[i].name);
        let log = std::fs::File::create(
            self.dir
                .path()
                .join(format!("{}.log", self.members[i].name)),
        )
        .expect("etcd log");
        let m = &mut self.members[i];
        let child = Command::new("etcd")
            .arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&data)
            .arg("--listen-client-urls")
            .arg(format!("http://127.0.0.1:{}", m.client))
            .arg("--advertise-client-urls")
            .arg(format!("http://127.0.0.1:{}", m.client))
            .arg("--listen-peer-urls")
            .arg(format!("http://127.0.0.1:{}", m.peer))
            .arg("--initial-advertise-peer-urls")
            .arg(format!("http://127.0.0.1:{}", m.peer))
            .arg("--initial-cluster")
            .arg(initial)
            .arg("--initial-cluster-token")
            .arg(format!("vman-test-{}", std::process::id()))
            .arg("--initial-cluster-state")
            .arg("new")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd (scripts/setup.sh installs etcd-server)");
        m.child = Some(child);
    }

    /// Kills member `i` (SIGKILL).
    pub fn stop_member(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("http://127.0.0.1:{}", m.client))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Waits until a write through etcdctl succeeds (a leader and quorum).
    pub fn wait_quorum(&self) {
        let start = Instant::now();
        loop {
            let ok = Command::new("etcdctl")
                .env("ETCDCTL_API", "3")
                .args(["--endpoints", &self.endpoints(), "--command-timeout=2s"])
                .args(["put", "/harness/probe", "1"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return;
            }
            assert!(
                start.elapsed() < SERVER * 2,
                "etcd has no quorum after {:?}",
                SERVER * 2
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.stop_member(i);
        }
    }
}

/// Three etcd members and three vman nodes n1, n2, n3.
pub struct Cluster {
    /// Dropped before `etcd` (fields drop in order).
    pub nodes: Vec<Vman>,
    pub etcd: Etcd,
}

/// Host memory in MiB (/proc/meminfo).
pub fn host_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(4096, |kib| kib / 1024)
}

/// Placement capacity of each test node, in MiB (whatever the host has).
pub const CAPACITY_MIB: u64 = 960;

impl Cluster {
    pub fn start() -> Self {
        let etcd = Etcd::start();
        // Each node may reserve about CAPACITY_MIB, whatever the host's memory.
        let overcommit = format!("{:.6}", CAPACITY_MIB as f64 / host_mib() as f64);
        let nodes = (1..=3)
            .map(|i| {
                Vman::builder()
                    .env("VMAN_CLUSTER", "1")
                    .env("VMAN_ETCD_ENDPOINTS", etcd.endpoints())
                    .env("VMAN_NODE_NAME", format!("n{i}"))
                    .env("VMAN_CLUSTER_TOKEN", TOKEN)
                    .env("VMAN_NODE_TTL_SECS", TTL.to_string())
                    .env("VMAN_MEMORY_OVERCOMMIT", &overcommit)
                    .with_tiny_default()
                    .start()
            })
            .collect();
        let cluster = Self { nodes, etcd };
        cluster.wait_online(&["n1", "n2", "n3"]);
        cluster
    }

    /// Node `n` (1-based, as its name).
    pub fn n(&self, n: usize) -> &Vman {
        &self.nodes[n - 1]
    }

    pub fn n_mut(&mut self, n: usize) -> &mut Vman {
        &mut self.nodes[n - 1]
    }

    /// Waits until every node lists `names` online.
    pub fn wait_online(&self, names: &[&str]) {
        for node in &self.nodes {
            wait_until(SERVER, "nodes online", || {
                let list = node.get("/cluster/nodes");
                names.iter().all(|n| {
                    list.as_array().is_some_and(|a| {
                        a.iter().any(|x| x["name"] == *n && x["status"] == "online")
                    })
                })
            });
        }
    }

    /// GET /cluster/nodes of node `n` by name.
    pub fn nodes_seen_by(&self, n: usize) -> Vec<Value> {
        self.n(n)
            .get("/cluster/nodes")
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// A template made through n1, waited for on every node.
    pub fn template(&self, name: &str, ram_mib: u64) {
        self.n(1).template(name, ram_mib);
        for node in &self.nodes {
            wait_until(SERVER, "template mirrored", || {
                node.call("GET", &format!("/templates/{name}"), None).0 == 200
            });
        }
    }

    /// Creates a VM through node `via`, returns its JSON.
    pub fn create(&self, via: usize, body: Value) -> Value {
        let (s, b) = self.n(via).post("/vms", body);
        assert_eq!(s, 201, "create through n{via}: {b}");
        b
    }

    /// A VM pinned to node `on`, created through `via`.
    pub fn create_on(&self, via: usize, on: usize, id: &str, template: &str) -> Value {
        self.create(
            via,
            json!({"template_name": template, "name": id, "node": format!("n{on}")}),
        )
    }
}

/// Polls `check` until true; panics after `deadline`.
pub fn wait_until(deadline: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < deadline, "{what}: not after {deadline:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
