//! Disk files moved node to node for cold migration (issue 14): the size
//! and SHA-256 of a file, reading it out in chunks for a streamed HTTP
//! body, receiving one into a `.<name>.partial-<random>` file next to its
//! destination (the name the start-up sweep of `leftovers` removes) that
//! becomes the destination only complete, checked (size, digest, the image
//! policy: pinned format, standalone, no data file) and fsynced, by a
//! rename that never replaces a file; and the peer node's internal routes
//! as an HTTP client (`Peer`).
//!
//! The file work is synchronous (the service runs it on a blocking thread);
//! `Peer` is async.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::image::{ImageError, ImageFormat, ImagePolicy, Partial, Top};

/// Chunk of a streamed file.
pub const CHUNK: usize = 1 << 20;

/// Header carrying the cluster token on node-to-node calls.
pub const TOKEN_HEADER: &str = "x-vman-cluster-token";
pub const SIZE_HEADER: &str = "x-vman-size";
pub const SHA_HEADER: &str = "x-vman-sha256";
pub const FORMAT_HEADER: &str = "x-vman-format";

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("received {got} bytes but {expected} were announced; nothing was kept")]
    Size { expected: u64, got: u64 },
    #[error("the received file's SHA-256 is {got} but {expected} was announced; nothing was kept")]
    Digest { expected: String, got: String },
    #[error("the received image is refused: {0}")]
    Image(#[from] ImageError),
    #[error("the received image has a backing file; only standalone images are imported")]
    Backing,
    #[error("node {node} answered {status}: {detail}")]
    Peer {
        node: String,
        status: u16,
        code: String,
        detail: String,
    },
    #[error("node {node} cannot be reached: {detail}")]
    Unreachable { node: String, detail: String },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> TransferError {
    let what = what.into();
    move |source| TransferError::Io { what, source }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Size and SHA-256 (lower-case hex) of a file, read once.
pub fn digest(path: &Path) -> Result<(u64, String), TransferError> {
    let mut f = File::open(path).map_err(io_err(format!("cannot open {}", path.display())))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut size = 0u64;
    loop {
        let n = f
            .read(&mut buf)
            .map_err(io_err(format!("cannot read {}", path.display())))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, hex(&hasher.finalize())))
}

/// Reads `path` in `CHUNK`s into `tx` (blocking; the receiving side is the
/// HTTP body). Stops quietly when the receiver is gone.
pub fn read_chunks(
    path: &Path,
    tx: tokio::sync::mpsc::Sender<Result<bytes::Bytes, io::Error>>,
) -> Result<(), TransferError> {
    let mut f = File::open(path).map_err(io_err(format!("cannot open {}", path.display())))?;
    loop {
        let mut buf = vec![0u8; CHUNK];
        let n = match f.read(&mut buf) {
            Ok(n) => n,
            Err(e) => {
                let detail = e.to_string();
                let _ = tx.blocking_send(Err(io::Error::other(detail.clone())));
                return Err(io_err(format!("cannot read {}", path.display()))(e));
            }
        };
        if n == 0 {
            return Ok(());
        }
        buf.truncate(n);
        if tx.blocking_send(Ok(bytes::Bytes::from(buf))).is_err() {
            return Ok(());
        }
    }
}

/// What the sender announces of a file.
#[derive(Debug, Clone)]
pub struct Announced {
    pub size: u64,
    /// Lower-case hex SHA-256.
    pub sha256: String,
    pub format: ImageFormat,
}

/// A file being received: written to a partial file, hashed as it comes.
pub struct Incoming {
    partial: Partial,
    file: File,
    dest: PathBuf,
    hasher: Sha256,
    written: u64,
    expected: u64,
}

impl Incoming {
    /// Starts receiving `expected` bytes for `dest` (whose folder is made).
    /// `Exists` when `dest` is there already.
    pub fn create(dest: &Path, expected: u64) -> Result<Self, TransferError> {
        let (Some(dir), Some(name)) = (dest.parent(), dest.file_name()) else {
            return Err(ImageError::NotAFile {
                path: dest.to_path_buf(),
            }
            .into());
        };
        std::fs::create_dir_all(dir).map_err(io_err(format!("cannot create {}", dir.display())))?;
        if dest.exists() {
            return Err(ImageError::Exists {
                path: dest.to_path_buf(),
            }
            .into());
        }
        let (partial, file) = Partial::create(dir, name)?;
        Ok(Self {
            partial,
            file,
            dest: dest.to_path_buf(),
            hasher: Sha256::new(),
            written: 0,
            expected,
        })
    }

    /// Appends a chunk; more bytes than announced is an error at once.
    pub fn write(&mut self, data: &[u8]) -> Result<(), TransferError> {
        let got = self.written + data.len() as u64;
        if got > self.expected {
            return Err(TransferError::Size {
                expected: self.expected,
                got,
            });
        }
        self.file.write_all(data).map_err(io_err(format!(
            "cannot write {}",
            self.partial.path().display()
        )))?;
        self.hasher.update(data);
        self.written = got;
        Ok(())
    }

    /// Checks size, digest and the image (format `format`, no backing file,
    /// through the policy every disk passes), then fsyncs and renames the
    /// file into place. Returns the image's virtual size. On any error the
    /// partial file is removed and `dest` is untouched.
    pub fn finish(
        self,
        sha256: &str,
        format: ImageFormat,
        policy: &ImagePolicy,
    ) -> Result<u64, TransferError> {
        let Self {
            partial,
            file,
            dest,
            hasher,
            written,
            expected,
        } = self;
        if written != expected {
            return Err(TransferError::Size {
                expected,
                got: written,
            });
        }
        let got = hex(&hasher.finalize());
        if !got.eq_ignore_ascii_case(sha256) {
            return Err(TransferError::Digest {
                expected: sha256.to_owned(),
                got,
            });
        }
        drop(file);
        let virtual_size = {
            let chain = policy.open_chain(partial.path(), Top::Trusted, Some(format), false)?;
            if chain.files.len() != 1 || chain.top().backing_file.is_some() {
                return Err(TransferError::Backing);
            }
            chain.top().virtual_size
        };
        partial.persist(&dest)?;
        Ok(virtual_size)
    }
}

/// Another node's internal routes.
#[derive(Clone)]
pub struct Peer {
    client: reqwest::Client,
    pub node: String,
    base: String,
    token: String,
    /// `VMAN_API_TOKEN`, sent as a bearer token too when set (the nodes of
    /// a cluster share it).
    api_token: Option<String>,
}

impl Peer {
    pub fn new(node: &str, base_url: &str, token: &str, api_token: Option<&str>) -> Self {
        Self {
            client: reqwest::Client::new(),
            node: node.to_owned(),
            base: base_url.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
            api_token: api_token.map(str::to_owned),
        }
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let req = self
            .client
            .request(method, format!("{}{path}", self.base))
            .header(TOKEN_HEADER, &self.token);
        match &self.api_token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    fn unreachable(&self, e: reqwest::Error) -> TransferError {
        TransferError::Unreachable {
            node: self.node.clone(),
            detail: e.to_string(),
        }
    }

    async fn answer(&self, reply: reqwest::Response) -> Result<(), TransferError> {
        let status = reply.status();
        if status.is_success() {
            return Ok(());
        }
        let body: serde_json::Value = reply.json().await.unwrap_or_default();
        let text = |k: &str| {
            body.get(k)
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_owned()
        };
        Err(TransferError::Peer {
            node: self.node.clone(),
            status: status.as_u16(),
            code: text("code"),
            detail: text("detail"),
        })
    }

    /// `PUT /cluster/internal/import/{vm}/{kind}/{file}` with the file as a
    /// streamed body (no Content-Type: the cross-site guard takes only JSON
    /// or none).
    pub async fn put_file(
        &self,
        vm: &str,
        kind: &str,
        file: &str,
        announced: &Announced,
        body: tokio::sync::mpsc::Receiver<Result<bytes::Bytes, io::Error>>,
    ) -> Result<(), TransferError> {
        let stream = futures_util::stream::unfold(body, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        let path = format!("/cluster/internal/import/{vm}/{kind}/{file}");
        let reply = self
            .request(reqwest::Method::PUT, &path)
            .header(SIZE_HEADER, announced.size.to_string())
            .header(SHA_HEADER, &announced.sha256)
            .header(FORMAT_HEADER, announced.format.as_str())
            .header("content-length", announced.size.to_string())
            .body(reqwest::Body::wrap_stream(stream))
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        self.answer(reply).await
    }

    /// `POST /cluster/internal/adopt/{vm}` with the VM's record.
    pub async fn adopt(&self, vm: &str, record: &serde_json::Value) -> Result<(), TransferError> {
        let path = format!("/cluster/internal/adopt/{vm}");
        let reply = self
            .request(reqwest::Method::POST, &path)
            .json(record)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        self.answer(reply).await
    }

    /// `DELETE /cluster/internal/import/{vm}`: the target forgets what it
    /// received for the VM (files, and the record while it is marked
    /// incoming) and the files it wrote for it.
    pub async fn cleanup(&self, vm: &str) -> Result<(), TransferError> {
        let path = format!("/cluster/internal/import/{vm}");
        let reply = self
            .request(reqwest::Method::DELETE, &path)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        self.answer(reply).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(dir: &Path) -> ImagePolicy {
        ImagePolicy::new(vec![dir.to_path_buf()], None)
    }

    fn raw_file(dir: &Path, bytes: &[u8]) -> PathBuf {
        let p = dir.join("src.img");
        std::fs::write(&p, bytes).expect("write");
        p
    }

    #[test]
    fn a_received_file_lands_only_when_size_and_digest_match() {
        let d = tempfile::tempdir().expect("tmp");
        let data = vec![7u8; 3 * CHUNK + 512];
        let src = raw_file(d.path(), &data);
        let (size, sha) = digest(&src).expect("digest");
        assert_eq!(size, data.len() as u64);
        let dest = d.path().join("in/disk.img");
        let mut inc = Incoming::create(&dest, size).expect("create");
        for c in data.chunks(CHUNK) {
            inc.write(c).expect("write");
        }
        inc.finish(&sha, ImageFormat::Raw, &policy(d.path()))
            .expect("finish");
        assert_eq!(std::fs::read(&dest).expect("read"), data);
        let names: Vec<_> = std::fs::read_dir(d.path().join("in"))
            .expect("ls")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("disk.img")]);
    }

    #[test]
    fn a_wrong_digest_keeps_nothing() {
        let d = tempfile::tempdir().expect("tmp");
        let dest = d.path().join("disk.img");
        let mut inc = Incoming::create(&dest, 4).expect("create");
        inc.write(b"abcd").expect("write");
        let e = inc
            .finish(&"0".repeat(64), ImageFormat::Raw, &policy(d.path()))
            .expect_err("refused");
        assert!(matches!(e, TransferError::Digest { .. }), "{e}");
        assert!(!dest.exists());
        assert_eq!(std::fs::read_dir(d.path()).expect("ls").count(), 0);
    }

    #[test]
    fn more_or_fewer_bytes_than_announced_are_refused() {
        let d = tempfile::tempdir().expect("tmp");
        let dest = d.path().join("disk.img");
        let mut inc = Incoming::create(&dest, 2).expect("create");
        assert!(matches!(inc.write(b"abc"), Err(TransferError::Size { .. })));
        drop(inc);
        let mut inc = Incoming::create(&dest, 5).expect("create");
        inc.write(b"abc").expect("write");
        let e = inc
            .finish("x", ImageFormat::Raw, &policy(d.path()))
            .expect_err("short");
        assert!(matches!(e, TransferError::Size { .. }), "{e}");
        assert_eq!(std::fs::read_dir(d.path()).expect("ls").count(), 0);
    }

    #[test]
    fn a_raw_claim_for_a_qcow2_file_is_refused_by_the_image_policy() {
        let d = tempfile::tempdir().expect("tmp");
        let mut data = b"QFI\xfb".to_vec();
        data.resize(4096, 0);
        let src = raw_file(d.path(), &data);
        let (size, sha) = digest(&src).expect("digest");
        let dest = d.path().join("disk.img");
        let mut inc = Incoming::create(&dest, size).expect("create");
        inc.write(&data).expect("write");
        let e = inc
            .finish(&sha, ImageFormat::Raw, &policy(d.path()))
            .expect_err("refused");
        assert!(matches!(e, TransferError::Image(_)), "{e}");
        assert!(!dest.exists());
    }
}
