//! The only file that talks to etcd: connection (endpoints, TLS client
//! certificates, timeouts), reads of a key range, puts, transactions,
//! leases and the prefix watch, each failure sorted into `EtcdError`.
//! Keys are given relative to the cluster prefix (`nodes/n1`).

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp, WatchOptions,
};

use crate::config::ClusterConfig;

/// How long one etcd request may take before the cluster counts as
/// unavailable (no quorum answers by then).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// etcd did not answer (no quorum, every endpoint down, timeout).
    #[error("etcd has no quorum or cannot be reached: {0}")]
    Unavailable(String),
    /// A setting is wrong (certificate file, endpoint).
    #[error("{0}")]
    Config(String),
}

impl From<etcd_client::Error> for EtcdError {
    fn from(e: etcd_client::Error) -> Self {
        Self::Unavailable(e.to_string())
    }
}

/// One key as read: value and the revision it was last written at.
#[derive(Debug, Clone)]
pub struct Entry {
    pub key: String,
    pub value: Vec<u8>,
    pub mod_revision: i64,
}

/// A condition of a transaction.
#[derive(Debug, Clone)]
pub enum Cond {
    /// The key was last written at this revision (0: it does not exist).
    ModRevision(String, i64),
    /// The key does not exist.
    Absent(String),
    /// The key holds exactly this value.
    Value(String, Vec<u8>),
}

/// A write of a transaction.
#[derive(Debug, Clone)]
pub enum Op {
    Put(String, Vec<u8>),
    /// Put bound to a lease.
    PutLease(String, Vec<u8>, i64),
    Delete(String),
}

/// A change seen by the watch (key relative to the prefix).
#[derive(Debug, Clone)]
pub enum Change {
    Put(Entry),
    Delete(String),
}

#[derive(Clone)]
pub struct Etcd {
    client: Client,
    prefix: String,
}

impl Etcd {
    /// Connects lazily: etcd being down at start-up is not fatal (the node
    /// serves its local VMs and joins once etcd answers).
    pub async fn connect(cfg: &ClusterConfig) -> Result<Self, EtcdError> {
        let mut options = ConnectOptions::new()
            .with_timeout(REQUEST_TIMEOUT)
            .with_connect_timeout(Duration::from_secs(2))
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_require_leader(true);
        if cfg.etcd_ca.is_some() || cfg.etcd_cert.is_some() {
            let read = |p: &std::path::PathBuf| {
                std::fs::read(p)
                    .map_err(|e| EtcdError::Config(format!("cannot read {}: {e}", p.display())))
            };
            let mut tls = etcd_client::TlsOptions::new();
            if let Some(ca) = &cfg.etcd_ca {
                tls = tls.ca_certificate(etcd_client::Certificate::from_pem(read(ca)?));
            }
            if let (Some(cert), Some(key)) = (&cfg.etcd_cert, &cfg.etcd_key) {
                tls = tls.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
            }
            options = options.with_tls(tls);
        }
        let endpoints: Vec<String> = cfg
            .etcd_endpoints
            .iter()
            .map(|e| e.trim().to_owned())
            .filter(|e| !e.is_empty())
            .collect();
        let client = Client::connect(endpoints, Some(options))
            .await
            .map_err(|e| EtcdError::Config(format!("etcd endpoints: {e}")))?;
        Ok(Self {
            client,
            prefix: format!("{}/", cfg.cluster_prefix),
        })
    }

    fn key(&self, rel: &str) -> String {
        format!("{}{rel}", self.prefix)
    }

    fn rel(&self, key: &[u8]) -> String {
        let key = String::from_utf8_lossy(key);
        key.strip_prefix(&self.prefix).unwrap_or(&key).to_owned()
    }

    /// Runs one request with the timeout (a request to a cluster without
    /// quorum may otherwise wait for a leader for long).
    async fn timed<T>(
        fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, EtcdError> {
        match tokio::time::timeout(REQUEST_TIMEOUT, fut).await {
            Ok(r) => r.map_err(EtcdError::from),
            Err(_) => Err(EtcdError::Unavailable(format!(
                "no answer within {} s",
                REQUEST_TIMEOUT.as_secs()
            ))),
        }
    }

    /// Every key under `rel` (a prefix) with the store's revision.
    pub async fn range(&self, rel: &str) -> Result<(Vec<Entry>, i64), EtcdError> {
        let mut c = self.client.clone();
        let resp = Self::timed(c.get(self.key(rel), Some(GetOptions::new().with_prefix()))).await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let entries = resp
            .kvs()
            .iter()
            .map(|kv| Entry {
                key: self.rel(kv.key()),
                value: kv.value().to_vec(),
                mod_revision: kv.mod_revision(),
            })
            .collect();
        Ok((entries, revision))
    }

    /// One key, if present.
    pub async fn get(&self, rel: &str) -> Result<Option<Entry>, EtcdError> {
        let mut c = self.client.clone();
        let resp = Self::timed(c.get(self.key(rel), None)).await?;
        Ok(resp.kvs().first().map(|kv| Entry {
            key: self.rel(kv.key()),
            value: kv.value().to_vec(),
            mod_revision: kv.mod_revision(),
        }))
    }

    pub async fn put(&self, rel: &str, value: Vec<u8>) -> Result<(), EtcdError> {
        let mut c = self.client.clone();
        Self::timed(c.put(self.key(rel), value, None)).await?;
        Ok(())
    }

    pub async fn delete(&self, rel: &str) -> Result<(), EtcdError> {
        let mut c = self.client.clone();
        Self::timed(c.delete(self.key(rel), None)).await?;
        Ok(())
    }

    /// All `ops` if every condition holds; `Ok(false)` when one does not.
    pub async fn txn(&self, when: Vec<Cond>, ops: Vec<Op>) -> Result<bool, EtcdError> {
        let compares: Vec<Compare> = when
            .into_iter()
            .map(|c| match c {
                Cond::ModRevision(k, r) => Compare::mod_revision(self.key(&k), CompareOp::Equal, r),
                Cond::Absent(k) => Compare::create_revision(self.key(&k), CompareOp::Equal, 0),
                Cond::Value(k, v) => Compare::value(self.key(&k), CompareOp::Equal, v),
            })
            .collect();
        let ops: Vec<TxnOp> = ops
            .into_iter()
            .map(|o| match o {
                Op::Put(k, v) => TxnOp::put(self.key(&k), v, None),
                Op::PutLease(k, v, lease) => {
                    TxnOp::put(self.key(&k), v, Some(PutOptions::new().with_lease(lease)))
                }
                Op::Delete(k) => TxnOp::delete(self.key(&k), None),
            })
            .collect();
        let mut c = self.client.clone();
        let resp = Self::timed(c.txn(Txn::new().when(compares).and_then(ops))).await?;
        Ok(resp.succeeded())
    }

    /// A new lease of `ttl` seconds.
    pub async fn grant(&self, ttl: i64) -> Result<i64, EtcdError> {
        let mut c = self.client.clone();
        Ok(Self::timed(c.lease_grant(ttl, None)).await?.id())
    }

    /// Renews a lease once; its remaining TTL (0: it expired).
    pub async fn keep_alive(&self, lease: i64) -> Result<i64, EtcdError> {
        let mut c = self.client.clone();
        let fut = async move {
            let (mut keeper, mut stream) = c.lease_keep_alive(lease).await?;
            keeper.keep_alive().await?;
            Ok::<_, etcd_client::Error>(stream.message().await?.map_or(0, |r| r.ttl()))
        };
        Self::timed(fut).await
    }

    /// Changes under the whole prefix after `revision`, sent to `tx` until
    /// the watch fails or `tx` closes.
    pub async fn watch(
        &self,
        revision: i64,
        tx: &tokio::sync::mpsc::Sender<Vec<Change>>,
    ) -> Result<(), EtcdError> {
        let mut c = self.client.clone();
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1);
        let mut stream = Self::timed(c.watch(self.prefix.clone(), Some(options))).await?;
        while let Some(resp) = stream.message().await? {
            if resp.canceled() {
                return Err(EtcdError::Unavailable("watch cancelled".into()));
            }
            let changes: Vec<Change> = resp
                .events()
                .iter()
                .filter_map(|ev| {
                    let kv = ev.kv()?;
                    Some(match ev.event_type() {
                        etcd_client::EventType::Put => Change::Put(Entry {
                            key: self.rel(kv.key()),
                            value: kv.value().to_vec(),
                            mod_revision: kv.mod_revision(),
                        }),
                        etcd_client::EventType::Delete => Change::Delete(self.rel(kv.key())),
                    })
                })
                .collect();
            if tx.send(changes).await.is_err() {
                return Ok(());
            }
        }
        Err(EtcdError::Unavailable("watch ended".into()))
    }
}
