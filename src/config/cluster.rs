//! Cluster settings (issue 14) as far as cold migration needs them: cluster
//! mode, this node's name and URL, the token of node-to-node calls, and the
//! test stand-in for etcd's placement (`VMAN_CLUSTER_STANDIN`, until the
//! etcd core is merged). The etcd settings come with the etcd core.

use clap::Args;
use std::path::PathBuf;

#[derive(Debug, Clone, Args, Default)]
pub struct ClusterConfig {
    /// Run as a node of a cluster (needs VMAN_NODE_NAME, VMAN_ADVERTISE_URL
    /// and VMAN_CLUSTER_TOKEN).
    #[arg(long = "cluster", env = "VMAN_CLUSTER", action = clap::ArgAction::Set, num_args = 0..=1,
          default_value = "false", default_missing_value = "true",
          value_parser = clap::builder::BoolishValueParser::new())]
    pub enabled: bool,

    /// This node's name in the cluster.
    #[arg(long = "node-name", env = "VMAN_NODE_NAME")]
    pub node_name: Option<String>,

    /// The URL other nodes reach this node's API at (e.g. http://10.0.0.1:8000).
    #[arg(long = "advertise", env = "VMAN_ADVERTISE_URL")]
    pub advertise_url: Option<String>,

    /// Shared secret of node-to-node calls (header X-Vman-Cluster-Token);
    /// at least 16 non-space characters.
    #[arg(
        long = "cluster-token",
        env = "VMAN_CLUSTER_TOKEN",
        hide_env_values = true
    )]
    pub cluster_token: Option<String>,

    /// Tests only: a folder shared by the nodes that stands in for etcd's
    /// node records and placement (until the etcd core is merged).
    #[arg(long = "cluster-standin", env = "VMAN_CLUSTER_STANDIN", hide = true)]
    pub standin: Option<PathBuf>,
}

/// Why cluster settings cannot work.
pub fn check(c: &ClusterConfig) -> Result<(), String> {
    if !c.enabled {
        return Ok(());
    }
    let token = c.cluster_token.as_deref().unwrap_or("");
    if token.chars().filter(|ch| !ch.is_whitespace()).count() < super::MIN_TOKEN_CHARS {
        return Err(format!(
            "--cluster needs VMAN_CLUSTER_TOKEN with at least {} non-space characters",
            super::MIN_TOKEN_CHARS
        ));
    }
    if c.node_name
        .as_deref()
        .is_none_or(|n| crate::model::Name::parse("node_name", n).is_err())
    {
        return Err("--cluster needs VMAN_NODE_NAME (a name: letters, digits, - and _)".into());
    }
    if !c
        .advertise_url
        .as_deref()
        .is_some_and(|u| u.starts_with("http://") || u.starts_with("https://"))
    {
        return Err("--cluster needs VMAN_ADVERTISE_URL (http://host:port)".into());
    }
    Ok(())
}
