//! Cluster mode's settings (`--cluster`, `VMAN_ETCD_ENDPOINTS`,
//! `VMAN_NODE_NAME`, `VMAN_ADVERTISE_URL`, `VMAN_CLUSTER_TOKEN`,
//! `VMAN_ETCD_CA/CERT/KEY`, `VMAN_CLUSTER_PREFIX`, `VMAN_NODE_TTL_SECS`,
//! `VMAN_PLACEMENT`) and their checks. Without `--cluster` none of them is
//! read and vman is the single-host server it always was.

use clap::{Args, ValueEnum};
use std::path::PathBuf;

#[derive(Debug, Clone, Args)]
pub struct ClusterConfig {
    /// Join a cluster: VMs of every node through any node, placement and
    /// node liveness in etcd (needs VMAN_ETCD_ENDPOINTS, VMAN_NODE_NAME,
    /// VMAN_ADVERTISE_URL and VMAN_CLUSTER_TOKEN).
    #[arg(long = "cluster", env = "VMAN_CLUSTER", action = clap::ArgAction::Set, num_args = 0..=1,
          default_value = "0", default_missing_value = "1",
          value_parser = clap::builder::BoolishValueParser::new())]
    pub enabled: bool,

    /// Comma-separated etcd v3 endpoints, e.g. http://10.0.0.1:2379.
    #[arg(long = "etcd", env = "VMAN_ETCD_ENDPOINTS", value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,

    /// This node's name in the cluster (letters, digits, `.`, `_`, `-`).
    #[arg(long, env = "VMAN_NODE_NAME")]
    pub node_name: Option<String>,

    /// The URL other nodes reach this node's API at, e.g. http://10.0.0.1:8000
    /// [default with port 0: the address actually bound].
    #[arg(long = "advertise", env = "VMAN_ADVERTISE_URL")]
    pub advertise_url: Option<String>,

    /// Shared secret of node-to-node calls (header X-Vman-Cluster-Token); the
    /// same on every node, at least 16 non-space characters.
    #[arg(long, env = "VMAN_CLUSTER_TOKEN", hide_env_values = true)]
    pub cluster_token: Option<String>,

    /// CA certificate (PEM) of the etcd endpoints (https).
    #[arg(long, env = "VMAN_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,

    /// Client certificate (PEM) presented to etcd.
    #[arg(long, env = "VMAN_ETCD_CERT")]
    pub etcd_cert: Option<PathBuf>,

    /// Key (PEM) of VMAN_ETCD_CERT.
    #[arg(long, env = "VMAN_ETCD_KEY")]
    pub etcd_key: Option<PathBuf>,

    /// Prefix of every etcd key vman writes (several clusters may share one
    /// etcd under different prefixes).
    #[arg(long, env = "VMAN_CLUSTER_PREFIX", default_value = "/vman")]
    pub cluster_prefix: String,

    /// Seconds a node stays online without a heartbeat (its etcd lease's
    /// TTL; kept alive every third of it).
    #[arg(long, env = "VMAN_NODE_TTL_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(2..=300))]
    pub node_ttl_secs: u64,

    /// Where POST /vms places a VM that does not name a node: `spread` (the
    /// node with the most free memory) or `pack` (the fullest that fits).
    #[arg(long, env = "VMAN_PLACEMENT", value_enum, default_value_t = Placement::Spread)]
    pub placement: Placement,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Placement {
    Spread,
    Pack,
}

/// A node name: 1-63 letters, digits, `.`, `_`, `-`, starting with a letter
/// or digit (it becomes part of etcd keys and of answers).
pub fn valid_node_name(raw: &str) -> bool {
    !raw.is_empty()
        && raw.len() <= 63
        && raw.starts_with(|c: char| c.is_ascii_alphanumeric())
        && raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl ClusterConfig {
    /// What clap cannot check: the settings cluster mode needs together.
    pub fn validate(&self) -> Result<(), String> {
        if !self.enabled {
            return Ok(());
        }
        if self.etcd_endpoints.iter().all(|e| e.trim().is_empty()) {
            return Err("--cluster needs VMAN_ETCD_ENDPOINTS (--etcd http://host:2379,...)".into());
        }
        match &self.node_name {
            Some(n) if valid_node_name(n) => {}
            Some(n) => {
                return Err(format!(
                    "VMAN_NODE_NAME {n:?} is not a node name (1-63 letters, digits, '.', '_', '-')"
                ))
            }
            None => return Err("--cluster needs VMAN_NODE_NAME (--node-name)".into()),
        }
        match &self.cluster_token {
            Some(t) if t.chars().filter(|c| !c.is_whitespace()).count() >= 16 => {}
            _ => {
                return Err(
                    "--cluster needs VMAN_CLUSTER_TOKEN with at least 16 non-space characters"
                        .into(),
                )
            }
        }
        if let Some(url) = &self.advertise_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(format!(
                    "VMAN_ADVERTISE_URL {url:?} must start with http:// or https://"
                ));
            }
        }
        if self.etcd_cert.is_some() != self.etcd_key.is_some() {
            return Err("VMAN_ETCD_CERT and VMAN_ETCD_KEY go together".into());
        }
        let p = &self.cluster_prefix;
        if !p.starts_with('/') || p.len() < 2 || p.ends_with('/') {
            return Err(format!(
                "VMAN_CLUSTER_PREFIX {p:?} must start with '/' and not end with one (e.g. /vman)"
            ));
        }
        Ok(())
    }
}
