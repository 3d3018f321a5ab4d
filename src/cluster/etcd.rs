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

/// Runs `$body` with `$c` bound to the current endpoint's client; when it
/// fails before the timeout (refused, no leader there), with the next
/// endpoints in turn. A timeout is not retried: the request may have been
/// applied.
macro_rules! call {
    ($self:expr, |$c:ident| $body:expr) => {{
        use std::sync::atomic::Ordering;
        let n = $self.clients.len();
        let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
        let mut last = String::new();
        let mut out = None;
        // Rounds over the endpoints until one answers or the deadline: a
        // leader election (a member just died) refuses for a moment.
        'rounds: while out.is_none() {
            let first = $self.current.load(Ordering::Relaxed) % n;
            for i in 0..n {
                let at = (first + i) % n;
                #[allow(unused_mut)]
                let mut $c = $self.clients[at].clone();
                match tokio::time::timeout_at(deadline, async { $body }).await {
                    Ok(Ok(v)) => {
                        $self.current.store(at, Ordering::Relaxed);
                        out = Some(Ok(v));
                        break 'rounds;
                    }
                    Ok(Err(e)) => last = etcd_client::Error::to_string(&e),
                    Err(_) => break 'rounds,
                }
            }
            if tokio::time::Instant::now() + RETRY_PAUSE >= deadline {
                break;
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
        out.unwrap_or_else(|| {
            Err(EtcdError::Unavailable(if last.is_empty() {
                format!("no answer within {} s", REQUEST_TIMEOUT.as_secs())
            } else {
                last
            }))
        })
    }};
}

/// Pause between two rounds over the endpoints.
const RETRY_PAUSE: Duration = Duration::from_millis(200);

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

/// One client per endpoint: a request goes to the endpoint that answered
/// last and moves on to the next when that one cannot be reached (the
/// balanced channel of a single multi-endpoint client keeps sending to a
/// dead member).
#[derive(Clone)]
pub struct Etcd {
    clients: Vec<Client>,
    current: std::sync::Arc<std::sync::atomic::AtomicUsize>,
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
        let mut clients = Vec::new();
        for e in &endpoints {
            let c = Client::connect([e], Some(options.clone()))
                .await
                .map_err(|err| EtcdError::Config(format!("etcd endpoint {e}: {err}")))?;
            clients.push(c);
        }
        if clients.is_empty() {
            return Err(EtcdError::Config("no etcd endpoint".into()));
        }
        Ok(Self {
            clients,
            current: std::sync::Arc::default(),
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

    /// Every key under `rel` (a prefix) with the store's revision.
    pub async fn range(&self, rel: &str) -> Result<(Vec<Entry>, i64), EtcdError> {
        let key = self.key(rel);
        let resp = call!(self, |c| c
            .get(key.clone(), Some(GetOptions::new().with_prefix()))
            .await)?;
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
        let key = self.key(rel);
        let resp = call!(self, |c| c.get(key.clone(), None).await)?;
        Ok(resp.kvs().first().map(|kv| Entry {
            key: self.rel(kv.key()),
            value: kv.value().to_vec(),
            mod_revision: kv.mod_revision(),
        }))
    }

    pub async fn put(&self, rel: &str, value: Vec<u8>) -> Result<(), EtcdError> {
        let key = self.key(rel);
        call!(self, |c| c.put(key.clone(), value.clone(), None).await)?;
        Ok(())
    }

    pub async fn delete(&self, rel: &str) -> Result<(), EtcdError> {
        let key = self.key(rel);
        call!(self, |c| c.delete(key.clone(), None).await)?;
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
        let txn = Txn::new().when(compares).and_then(ops);
        let resp = call!(self, |c| c.txn(txn.clone()).await)?;
        Ok(resp.succeeded())
    }

    /// A new lease of `ttl` seconds.
    pub async fn grant(&self, ttl: i64) -> Result<i64, EtcdError> {
        Ok(call!(self, |c| c.lease_grant(ttl, None).await)?.id())
    }

    /// Renews a lease once; its remaining TTL (0: it expired).
    pub async fn keep_alive(&self, lease: i64) -> Result<i64, EtcdError> {
        call!(self, |c| {
            let (mut keeper, mut stream) = c.lease_keep_alive(lease).await?;
            keeper.keep_alive().await?;
            Ok(stream.message().await?.map_or(0, |r| r.ttl()))
        })
    }

    /// Changes under the whole prefix after `revision`, sent to `tx` until
    /// the watch fails or `tx` closes.
    pub async fn watch(
        &self,
        revision: i64,
        tx: &tokio::sync::mpsc::Sender<Vec<Change>>,
    ) -> Result<(), EtcdError> {
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1);
        let prefix = self.prefix.clone();
        let mut stream = call!(self, |c| c
            .watch(prefix.clone(), Some(options.clone()))
            .await)?;
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
