//! Hostile images (issue 9, "keep them closed"): a folder of crafted images
//! — backing files outside the image folders, `json:` backing, external
//! data files, raw files with an image header, other formats, chains too
//! deep, symlink loops and escapes, files swapped or rebased after a VM was
//! created — each refused with a 400 and a clear detail at create and, for
//! the swaps, at start; an inotify watch on the outside folder proves that
//! nothing (vman, qemu-img or QEMU) ever opened a file there. And the race
//! of hole 3: a symlink in the chain flipped in a loop during starts never
//! lets QEMU open the outside file.

use std::ffi::CString;
use std::fs;
use std::os::unix::fs::{symlink, FileExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use crate::harness::{qemu_processes, tiny_image, Vman, SERVER};

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf8 path")
}

/// Watches a folder for any open or read of a file in it (by anyone).
struct OpenWatch {
    fd: i32,
}

impl OpenWatch {
    /// Starts watching, and proves the watch sees an open (of a canary).
    fn new(dir: &Path) -> OpenWatch {
        let canary = dir.join(".canary");
        fs::write(&canary, b"x").expect("canary");
        // SAFETY: plain syscalls; the path is a valid C string.
        let watch = unsafe {
            let fd = libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC);
            assert!(fd >= 0, "inotify_init1");
            let c = CString::new(s(dir)).expect("cstring");
            let wd = libc::inotify_add_watch(fd, c.as_ptr(), libc::IN_OPEN | libc::IN_ACCESS);
            assert!(wd >= 0, "inotify_add_watch");
            OpenWatch { fd }
        };
        drop(fs::File::open(&canary).expect("open canary"));
        let seen = watch.opened();
        assert!(
            seen.iter().any(|n| n.starts_with(".canary")),
            "the watch does not see opens: {seen:?}"
        );
        watch
    }

    /// Names of the files opened or read since the watch began.
    fn opened(&self) -> Vec<String> {
        let mut names = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            // SAFETY: buf is valid for its length.
            let n = unsafe { libc::read(self.fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                break;
            }
            let mut at = 0usize;
            while at + 16 <= n as usize {
                let mask = u32::from_ne_bytes(buf[at + 4..at + 8].try_into().expect("4"));
                let len = u32::from_ne_bytes(buf[at + 12..at + 16].try_into().expect("4")) as usize;
                let name = String::from_utf8_lossy(&buf[at + 16..at + 16 + len])
                    .trim_end_matches('\0')
                    .to_string();
                names.push(format!("{name} (mask {mask:#x})"));
                at += 16 + len;
            }
        }
        names
    }
}

impl Drop for OpenWatch {
    fn drop(&mut self) {
        // SAFETY: our own fd.
        unsafe { libc::close(self.fd) };
    }
}

/// The image folder, the outside folder with the host files a hostile
/// image would reach for, and a vman allowed only the image folder.
struct Setup {
    _tmp: tempfile::TempDir,
    images: PathBuf,
    outside: PathBuf,
    vman: Vman,
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().expect("tempdir");
    let images = tmp.path().join("images");
    let outside = tmp.path().join("outside");
    fs::create_dir_all(&images).expect("images");
    fs::create_dir_all(&outside).expect("outside");
    // Host files: a qcow2 and a raw one holding "secrets".
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        s(&outside.join("secret.qcow2")),
        "64M",
    ]);
    fs::write(outside.join("secret.raw"), vec![0x5au8; 1 << 20]).expect("secret");
    let default = images.join("default.qcow2");
    fs::copy(tiny_image(), &default).expect("default");
    let vman = Vman::builder()
        .env("VMAN_IMAGE_DIRS", &images)
        .env("VMAN_DEFAULT_BOOT_DISK", &default)
        .start();
    vman.template("tiny", 128);
    Setup {
        _tmp: tmp,
        images,
        outside,
        vman,
    }
}

/// A plain good qcow2 in the image folder.
fn good(images: &Path, name: &str) -> PathBuf {
    let p = images.join(name);
    qemu_img(&["create", "-q", "-f", "qcow2", s(&p), "64M"]);
    p
}

/// Replaces the declared backing format extension of a qcow2 by an unknown
/// (ignored) one, leaving a backing file without a declared format.
fn strip_backing_format(p: &Path) {
    let mut bytes = fs::read(p).expect("read");
    let at = bytes
        .windows(4)
        .position(|w| w == [0xe2, 0x79, 0x2a, 0xca])
        .expect("backing format extension");
    bytes[at..at + 4].copy_from_slice(&[0x12, 0x34, 0x56, 0x78]);
    fs::write(p, bytes).expect("write");
}

/// Writes a qcow2 header naming `backing` into the start of a raw file, as
/// a guest can through its own `/dev/vda`.
fn write_qcow2_header(raw: &Path, backing: &Path) {
    let tmp = raw.with_extension("hdr");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-F",
        "raw",
        "-b",
        s(backing),
        s(&tmp),
        "1M",
    ]);
    let header = fs::read(&tmp).expect("header");
    fs::remove_file(&tmp).expect("rm");
    fs::File::options()
        .write(true)
        .open(raw)
        .expect("open raw")
        .write_all_at(&header[..header.len().min(64 << 10)], 0)
        .expect("write header");
}

/// The crafted images refused when a VM is created with them, and what
/// the refusal must say.
fn crafted(images: &Path, outside: &Path) -> Vec<(&'static str, PathBuf, &'static str)> {
    let secret = outside.join("secret.qcow2");
    let mut v = Vec::new();
    let mut add = |name: &'static str, p: PathBuf, says: &'static str| v.push((name, p, says));

    let p = images.join("backing-outside.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-F",
        "qcow2",
        "-b",
        s(&secret),
        s(&p),
        "64M",
    ]);
    add(
        "qcow2 backed by an outside file",
        p,
        "outside the allowed image folders",
    );

    let p = images.join("backing-relative-escape.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-F",
        "qcow2",
        "-b",
        "../outside/secret.qcow2",
        s(&p),
        "64M",
    ]);
    add(
        "qcow2 backed by ../outside",
        p,
        "outside the allowed image folders",
    );

    let p = images.join("backing-json.qcow2");
    let spec = format!(
        r#"json:{{"driver":"file","filename":"{}"}}"#,
        s(&outside.join("secret.raw"))
    );
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-F",
        "raw",
        "-b",
        &spec,
        s(&p),
        "64M",
    ]);
    add(
        "qcow2 with a json: backing file",
        p,
        "not protocols or json",
    );

    let p = images.join("backing-nbd.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-F",
        "raw",
        "-b",
        "nbd://127.0.0.1:1/x",
        s(&p),
        "64M",
    ]);
    add(
        "qcow2 with a protocol backing file",
        p,
        "not protocols or json",
    );

    let p = images.join("data-file.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("data_file={}", s(&outside.join("data.raw"))),
        s(&p),
        "1M",
    ]);
    add("qcow2 with an external data file", p, "external data file");

    let p = images.join("raw-looking.img");
    fs::write(&p, vec![0u8; 1 << 20]).expect("raw");
    write_qcow2_header(&p, &outside.join("secret.raw"));
    add(
        "raw-named file with a qcow2 header backed outside",
        p,
        "outside the allowed image folders",
    );

    for (fmt, says) in [
        ("vmdk", "vmdk"),
        ("vdi", "vdi"),
        ("vhdx", "vhdx"),
        ("qed", "qed"),
    ] {
        let p = images.join(format!("disk.{fmt}"));
        qemu_img(&["create", "-q", "-f", fmt, s(&p), "16M"]);
        add(
            match fmt {
                "vmdk" => "vmdk image",
                "vdi" => "vdi image",
                "vhdx" => "vhdx image",
                _ => "qed image",
            },
            p,
            says,
        );
    }
    let p = images.join("disk.luks");
    let mut luks = b"LUKS\xba\xbe\x00\x02".to_vec();
    luks.resize(1 << 20, 0);
    fs::write(&p, luks).expect("luks");
    add("LUKS header", p, "luks");

    // A chain of 17 files (the limit is 16).
    let mut below = good(images, "chain-00.qcow2");
    for i in 1..17 {
        let p = images.join(format!("chain-{i:02}.qcow2"));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-F",
            "qcow2",
            "-b",
            s(&below),
            s(&p),
            "64M",
        ]);
        below = p;
    }
    add("backing chain of 17 files", below, "more than 16 files");

    symlink(images.join("loop-b.qcow2"), images.join("loop-a.qcow2")).expect("ln");
    symlink(images.join("loop-a.qcow2"), images.join("loop-b.qcow2")).expect("ln");
    add(
        "symlink loop",
        images.join("loop-a.qcow2"),
        "symbolic links",
    );

    let a = images.join("cycle-a.qcow2");
    let b = images.join("cycle-b.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-F",
        "qcow2",
        "-b",
        s(&b),
        s(&a),
        "64M",
    ]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-F",
        "qcow2",
        "-b",
        s(&a),
        s(&b),
        "64M",
    ]);
    add("backing chain that loops", a, "loops");

    let p = images.join("link-outside.qcow2");
    symlink(&secret, &p).expect("ln");
    add(
        "symlink pointing outside",
        p,
        "outside the allowed image folders",
    );

    let p = images.join("backing-via-link.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-F",
        "qcow2",
        "-b",
        "link-outside.qcow2",
        s(&p),
        "64M",
    ]);
    add(
        "backing file through a symlink pointing outside",
        p,
        "outside the allowed image folders",
    );

    let base = good(images, "plain-base.qcow2");
    let p = images.join("no-backing-format.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-F",
        "qcow2",
        "-b",
        s(&base),
        s(&p),
        "64M",
    ]);
    strip_backing_format(&p);
    add(
        "backing file without a declared format",
        p,
        "without its format",
    );

    v
}

/// Every crafted image is refused at create, as `qcow2_path` and as
/// `boot_disk`, with a 400 that says why; no VM is recorded; nothing in the
/// outside folder is opened. Prints the number of crafted images.
#[test]
fn hostile_images_are_refused_at_create() {
    let t = setup();
    let cases = crafted(&t.images, &t.outside);
    let watch = OpenWatch::new(&t.outside);
    for (what, path, says) in &cases {
        for field in ["qcow2_path", "boot_disk"] {
            let (st, body) = t
                .vman
                .create_vm(json!({"template_name": "tiny", "name": "h", field: path}));
            assert_eq!(st, 400, "{what} as {field}: {body}");
            let detail = body["detail"].as_str().unwrap_or("");
            assert!(detail.starts_with(field), "{what} as {field}: {detail}");
            assert!(detail.contains(says), "{what} as {field}: {detail}");
        }
    }
    assert_eq!(t.vman.get("/vms").as_array().map(Vec::len), Some(0));
    let opened = watch.opened();
    assert!(opened.is_empty(), "outside files were opened: {opened:?}");
    eprintln!(
        "hostile images refused at create: {} crafted images",
        cases.len()
    );
}

fn start_refused(vman: &Vman, id: &str, says: &str) {
    let (st, body) = vman.start_vm(id);
    assert_eq!(st, 400, "{id}: {body}");
    let detail = body["detail"].as_str().unwrap_or("");
    assert!(detail.contains(says), "{id}: {detail}");
    assert!(
        qemu_processes(&vman.storage).is_empty(),
        "{id}: a QEMU runs"
    );
}

/// Issue 9, hole 1: `boot_disk` (and the default boot disk) get the full
/// check at start: a file swapped after the VM was created, or rebased
/// (`qemu-img rebase -u`) onto a host file, or given an external data
/// file, is refused and nothing outside is opened.
#[test]
fn hole1_boot_disk_is_checked_again_at_start() {
    let t = setup();
    let (vman, images, outside) = (&t.vman, &t.images, &t.outside);
    let secret = outside.join("secret.qcow2");
    let mut swaps = 0;
    // Swapped for a qcow2 backed outside.
    let bd = good(images, "bd-swap.qcow2");
    assert_eq!(
        vman.create_vm(json!({"template_name": "tiny", "name": "swap", "boot_disk": bd}))
            .0,
        201
    );
    let evil = images.join("evil.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-F",
        "qcow2",
        "-b",
        s(&secret),
        s(&evil),
        "64M",
    ]);
    // Rebased onto a host file.
    let bd2 = good(images, "bd-rebase.qcow2");
    assert_eq!(
        vman.create_vm(json!({"template_name": "tiny", "name": "rebase", "boot_disk": bd2}))
            .0,
        201
    );
    // An external data file added.
    let bd3 = good(images, "bd-data.qcow2");
    assert_eq!(
        vman.create_vm(json!({"template_name": "tiny", "name": "datafile", "boot_disk": bd3}))
            .0,
        201
    );
    let with_data = images.join("with-data.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("data_file={}", s(&outside.join("data2.raw"))),
        s(&with_data),
        "1M",
    ]);
    // A qcow2 boot disk swapped for a vmdk.
    let bd4 = good(images, "bd-vmdk.qcow2");
    assert_eq!(
        vman.create_vm(json!({"template_name": "tiny", "name": "vmdk", "boot_disk": bd4}))
            .0,
        201
    );
    let vmdk = images.join("swap.vmdk");
    qemu_img(&["create", "-q", "-f", "vmdk", s(&vmdk), "16M"]);

    // Replaced by a symlink to a host file.
    let bd5 = good(images, "bd-symlink.qcow2");
    assert_eq!(
        vman.create_vm(json!({"template_name": "tiny", "name": "symswap", "boot_disk": bd5}))
            .0,
        201
    );

    let watch = OpenWatch::new(outside);
    fs::remove_file(&bd5).expect("rm");
    symlink(&secret, &bd5).expect("ln");
    start_refused(vman, "symswap", "outside the allowed image folders");
    swaps += 1;
    fs::rename(&evil, &bd).expect("swap");
    start_refused(vman, "swap", "outside the allowed image folders");
    swaps += 1;
    qemu_img(&["rebase", "-u", "-F", "qcow2", "-b", s(&secret), s(&bd2)]);
    start_refused(vman, "rebase", "outside the allowed image folders");
    swaps += 1;
    fs::rename(&with_data, &bd3).expect("swap");
    start_refused(vman, "datafile", "external data file");
    swaps += 1;
    fs::rename(&vmdk, &bd4).expect("swap");
    start_refused(
        vman,
        "vmdk",
        "was accepted as a qcow2 image but is now vmdk",
    );
    swaps += 1;
    // The default boot disk, rebased onto a host file.
    assert_eq!(
        vman.create_vm(json!({"template_name": "tiny", "name": "dflt"}))
            .0,
        201
    );
    qemu_img(&[
        "rebase",
        "-u",
        "-F",
        "qcow2",
        "-b",
        s(&secret),
        s(&images.join("default.qcow2")),
    ]);
    start_refused(vman, "dflt", "outside the allowed image folders");
    swaps += 1;
    for id in ["symswap", "swap", "rebase", "datafile", "vmdk", "dflt"] {
        assert!(
            !vman.vm_dir(id).join("root.qcow2").exists(),
            "{id}: a root disk was made"
        );
        assert_eq!(vman.vm(id)["state"], "error");
    }
    let opened = watch.opened();
    assert!(opened.is_empty(), "outside files were opened: {opened:?}");
    eprintln!("hole 1: {swaps} boot disks swapped after create refused at start");
}

/// Issue 9, hole 2: formats are pinned when an image is accepted; a raw
/// image that now starts with a qcow2 header (as a guest writes through
/// its own `/dev/vda`) is refused at start, as `qcow2_path` and as another
/// VM's `boot_disk`; an existing root disk rebased onto a host file and a
/// data disk swapped for one backed outside are refused too.
#[test]
fn hole2_raw_image_that_grew_a_qcow2_header_is_refused() {
    let t = setup();
    let (vman, images, outside) = (&t.vman, &t.images, &t.outside);
    let raw = images.join("shared.img");
    fs::write(&raw, vec![0u8; 4 << 20]).expect("raw");
    for (id, field) in [("rawroot", "qcow2_path"), ("rawboot", "boot_disk")] {
        let (st, b) = vman.create_vm(json!({"template_name": "tiny", "name": id, field: raw}));
        assert_eq!(st, 201, "{b}");
    }
    // An existing root disk made by vman, then rebased onto a host file.
    assert_eq!(
        vman.create_vm(json!({"template_name": "tiny", "name": "existing"}))
            .0,
        201
    );
    let (st, b) = vman.start_vm("existing");
    assert_eq!(st, 202, "{b}");
    let (st, _) = vman.post("/vms/existing/actions/stop", json!({"force": true}));
    assert_eq!(st, 202);
    // A data disk attached (cold), then swapped for a qcow2 backed outside.
    assert_eq!(
        vman.create_vm(json!({"template_name": "tiny", "name": "withdisk"}))
            .0,
        201
    );
    let (st, disk) = vman.post("/disks", json!({"size": 1, "name": "d1"}));
    assert_eq!(st, 201, "{disk}");
    let id = disk["id"].as_str().expect("id").to_string();
    let (st, b) = vman.post(&format!("/disks/{id}/attach"), json!({"vm_id": "withdisk"}));
    assert_eq!(st, 200, "{b}");
    let evil = images.join("evil-data.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-F",
        "qcow2",
        "-b",
        s(&outside.join("secret.qcow2")),
        s(&evil),
        "1G",
    ]);

    let watch = OpenWatch::new(outside);
    write_qcow2_header(&raw, &outside.join("secret.raw"));
    start_refused(
        vman,
        "rawroot",
        "was accepted as a raw image but now starts with a qcow2 header",
    );
    start_refused(
        vman,
        "rawboot",
        "was accepted as a raw image but now starts with a qcow2 header",
    );
    qemu_img(&[
        "rebase",
        "-u",
        "-F",
        "qcow2",
        "-b",
        s(&outside.join("secret.qcow2")),
        s(&vman.vm_dir("existing").join("root.qcow2")),
    ]);
    start_refused(vman, "existing", "outside the allowed image folders");
    fs::rename(
        &evil,
        vman.storage.join("disks").join(format!("{id}.qcow2")),
    )
    .expect("swap");
    start_refused(vman, "withdisk", "backing file");
    let opened = watch.opened();
    assert!(opened.is_empty(), "outside files were opened: {opened:?}");
}

/// The pinned formats reach QEMU explicitly: a raw `qcow2_path` is a `raw`
/// node, every file is passed by descriptor, and QEMU's command line names
/// no image path at all.
#[test]
fn hole2_formats_are_pinned_and_passed_explicitly() {
    let t = setup();
    let (vman, images) = (&t.vman, &t.images);
    let raw = images.join("plain.img");
    fs::write(&raw, vec![0u8; 4 << 20]).expect("raw");
    assert_eq!(
        vman.create_vm(json!({"template_name": "tiny", "name": "r", "qcow2_path": raw}))
            .0,
        201
    );
    let (st, b) = vman.start_vm("r");
    assert_eq!(st, 202, "{b}");
    let procs = qemu_processes(&vman.storage);
    assert_eq!(procs.len(), 1, "{procs:?}");
    let cmd = &procs[0].1;
    assert!(
        cmd.contains(r#""driver":"raw","file":"root-file""#),
        "{cmd}"
    );
    assert!(cmd.contains("/dev/fdset/1"), "{cmd}");
    assert!(!cmd.contains("plain.img"), "{cmd}");
    let (st, _) = vman.post("/vms/r/actions/stop", json!({"force": true}));
    assert_eq!(st, 202);
}

/// Issue 9, hole 3: a symlink in a backing chain flipped between an image
/// and a host file in a loop while a VM starts again and again. A start
/// either is refused (the link pointed outside at the check) or runs a
/// QEMU that holds only the checked files: no QEMU ever has the outside
/// file open, and no process ever opened it.
#[test]
fn hole3_symlink_flips_never_reach_qemu() {
    let t = setup();
    let (vman, images, outside) = (&t.vman, &t.images, &t.outside);
    let base = images.join("base.qcow2");
    fs::copy(tiny_image(), &base).expect("base");
    let link = images.join("link.qcow2");
    symlink("base.qcow2", &link).expect("ln");
    let top = images.join("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-F",
        "qcow2",
        "-b",
        "link.qcow2",
        s(&top),
        "64M",
    ]);
    assert_eq!(
        vman.create_vm(json!({"template_name": "tiny", "name": "race", "qcow2_path": top}))
            .0,
        201
    );
    let secret = outside.join("secret.qcow2");

    let watch = OpenWatch::new(outside);
    let stop = Arc::new(AtomicBool::new(false));
    let flipper = {
        let (stop, images, secret) = (stop.clone(), images.clone(), secret.clone());
        std::thread::spawn(move || {
            let mut flips = 0u64;
            let tmp = images.join("link.tmp");
            while !stop.load(Ordering::Relaxed) {
                let target: &Path = if flips.is_multiple_of(2) {
                    &secret
                } else {
                    Path::new("base.qcow2")
                };
                let _ = fs::remove_file(&tmp);
                symlink(target, &tmp).expect("ln");
                fs::rename(&tmp, images.join("link.qcow2")).expect("flip");
                flips += 1;
                std::thread::sleep(Duration::from_micros(200));
            }
            flips
        })
    };
    let (mut ran, mut refused) = (0, 0);
    // At least 20 starts, and more until 5 of them ran a QEMU (a start
    // refused proves less than one that ran with the link flipping).
    let mut round = 0;
    while round < 20 || (ran < 5 && round < 100) {
        round += 1;
        let (st, body) = vman.start_vm("race");
        match st {
            202 => {
                ran += 1;
                let procs = qemu_processes(&vman.storage);
                assert_eq!(procs.len(), 1, "round {round}: {procs:?}");
                let pid = procs[0].0;
                for fd in fs::read_dir(format!("/proc/{pid}/fd"))
                    .expect("fds")
                    .flatten()
                {
                    let target = fs::read_link(fd.path()).unwrap_or_default();
                    assert!(
                        !target.starts_with(outside),
                        "round {round}: QEMU has {} open",
                        target.display()
                    );
                }
                let (st, b) = vman.post("/vms/race/actions/stop", json!({"force": true}));
                assert_eq!(st, 202, "round {round}: {b}");
            }
            400 => {
                refused += 1;
                let detail = body["detail"].as_str().unwrap_or("");
                assert!(
                    detail.contains("outside the allowed image folders")
                        || detail.contains("changed while it was being checked")
                        || detail.contains("does not exist"),
                    "round {round}: {detail}"
                );
                assert!(qemu_processes(&vman.storage).is_empty());
            }
            other => panic!("round {round}: {other} {body}"),
        }
        vman.wait_state("race", if st == 202 { "stopped" } else { "error" }, SERVER);
    }
    stop.store(true, Ordering::Relaxed);
    let flips = flipper.join().expect("flipper");
    assert!(ran > 0, "no start ran a QEMU in {round} rounds");
    let opened = watch.opened();
    assert!(opened.is_empty(), "outside files were opened: {opened:?}");
    eprintln!("hole 3 race: {round} starts ({ran} ran, {refused} refused) over {flips} symlink flips; outside file never opened");
}
