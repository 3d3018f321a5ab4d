//! Makes a root disk the way vman does at start, for benchmarks and manual
//! checks: `provision <qemu-img> <source> <dest> copy|overlay [grow_to_bytes]`.
//! The source's chain is checked first, as vman checks a boot disk.
//! Prints the report as one JSON line; exits 1 with the reason on error.

use std::path::Path;
use std::process::ExitCode;

use vman::operator::image::{self, Provision};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 5 || args.len() > 6 {
        eprintln!("usage: provision <qemu-img> <source> <dest> copy|overlay [grow_to_bytes]");
        return ExitCode::from(2);
    }
    let mode = match args[4].as_str() {
        "copy" => Provision::Copy,
        "overlay" => Provision::Overlay,
        other => {
            eprintln!("provision: mode must be copy or overlay, not {other}");
            return ExitCode::from(2);
        }
    };
    let grow_to = match args.get(5).map(|s| s.parse::<u64>()) {
        None => None,
        Some(Ok(n)) => Some(n),
        Some(Err(e)) => {
            eprintln!("provision: bad grow_to_bytes: {e}");
            return ExitCode::from(2);
        }
    };
    let (qemu_img, source, dest) = (
        Path::new(&args[1]),
        Path::new(&args[2]),
        Path::new(&args[3]),
    );
    // The source is checked as vman checks a boot disk (its own folder
    // allowed): whole chain, files kept open and read by descriptor.
    let folder = source
        .canonicalize()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf));
    let policy = image::ImagePolicy::new(folder.into_iter().collect(), None);
    let result = policy
        .open_chain(source, image::Top::Trusted, None, false)
        .and_then(|chain| {
            let progress = image::Progress::new();
            image::provision(qemu_img, &chain, dest, mode, grow_to, &progress)
        });
    match result {
        Ok(r) => {
            let out = serde_json::json!({
                "method": r.method,
                "bytes": r.bytes,
                "elapsed_ms": r.elapsed.as_secs_f64() * 1000.0,
                "info": r.info,
            });
            println!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("provision: {e}");
            ExitCode::FAILURE
        }
    }
}
