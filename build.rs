//! Embeds the built web console (`ui/dist`, made by `npm ci && npm run
//! build` in `ui/`) into the binary: writes `$OUT_DIR/ui_assets.rs`, a list
//! of (path, content type, ETag, `include_bytes!`) that `src/api/ui.rs`
//! serves at `/ui`. Without `ui/dist` the list is empty and `/ui` answers a
//! page saying how to build it; `cargo build` never needs Node.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::{env, fs};

fn main() {
    let root = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let dist = root.join("ui/dist");
    // A missing path would make cargo rerun this script on every build:
    // watch `ui/` itself until `dist` exists (its creation changes `ui/`).
    if dist.is_dir() {
        println!("cargo:rerun-if-changed=ui/dist");
    } else {
        println!("cargo:rerun-if-changed=ui/package.json");
        println!("cargo:rerun-if-changed=ui");
    }
    println!("cargo:rerun-if-changed=build.rs");

    let mut files = Vec::new();
    if dist.is_dir() {
        collect(&dist, &dist, &mut files);
    }
    files.sort();
    let mut out =
        String::from("/// Built by build.rs from ui/dist.\npub static ASSETS: &[Asset] = &[\n");
    for (rel, abs) in &files {
        let bytes = fs::read(abs).expect("read a ui/dist file");
        let etag = format!("\"{:016x}\"", fnv1a(&bytes));
        writeln!(
            out,
            "    Asset {{ path: {rel:?}, content_type: {:?}, etag: {etag:?}, body: include_bytes!({:?}) }},",
            content_type(rel),
            abs.display().to_string()
        )
        .expect("write to a String");
    }
    out.push_str("];\n");
    let target = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR")).join("ui_assets.rs");
    fs::write(target, out).expect("write ui_assets.rs");
}

/// Every file under `dir`, as (path relative to `dist` with `/`, absolute path).
fn collect(dist: &Path, dir: &Path, files: &mut Vec<(String, PathBuf)>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect(dist, &path, files);
        } else if let Ok(rel) = path.strip_prefix(dist) {
            let rel = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join("/");
            files.push((rel, path));
        }
    }
}

fn content_type(path: &str) -> &'static str {
    match path.rsplit('.').next().unwrap_or("") {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" | "map" => "application/json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "woff2" => "font/woff2",
        "txt" => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

/// FNV-1a 64: a content hash for the ETag (not a security property).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}
