//! Integration tests of `scripts/build_boot_disk.sh`.
//!
//! These tests really build boot disks and boot them with QEMU under TCG
//! (`-accel tcg`; KVM does not work for guests on the development machines):
//!
//! * the `tiny` flavor is built once per test binary (shared through a
//!   `OnceLock`, into a directory under `CARGO_TARGET_TMPDIR` that is kept
//!   until `cargo clean`), then booted from the qcow2 alone (no `-kernel`):
//!   hostname marker, serial shell, disk hot-plug / hot-unplug, cold-attached
//!   disk, DHCP on a user-mode NIC, ACPI power-off through QMP;
//! * the `alpine` flavor with an unreachable mirror must fail cleanly;
//! * bad arguments must fail with one clear message;
//! * the `debian` flavor (slow: debootstrap) is built and booted only when
//!   `VMAN_TEST_DEBIAN=1` is set (otherwise that test prints that it is
//!   skipped and passes): to a `login:` prompt, then, with vman's slirp
//!   metadata layout served by `bench/nocloud.py` and the SMBIOS seed
//!   `ds=nocloud-net;s=http://169.254.169.254/nocloud/`, `ssh root@... hostname`
//!   with the seeded key prints the seeded hostname (needs socat, ssh).
//!
//! Needs: qemu-system-x86_64, qemu-img, Debian's apt mirror (for the kernel
//! .deb, cached in `$VMAN_CACHE_DIR` or `~/.cache/vman`), and the packages the
//! script lists (it installs them itself when run as root).
//!
//! Run: `cargo test --test boot_disk_script -- --nocapture` (prints timings).

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::thread::sleep;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tempfile::TempDir;

const BUILD_FAILED: &str = "building the tiny boot disk failed";
const BOOT_DEADLINE: Duration = Duration::from_secs(120);
const EVENT_DEADLINE: Duration = Duration::from_secs(60);
const POWEROFF_DEADLINE: Duration = Duration::from_secs(60);

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn script() -> PathBuf {
    repo_root().join("scripts/build_boot_disk.sh")
}

fn run_script(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new("bash");
    cmd.arg(script()).args(args).stdin(Stdio::null());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().expect("run scripts/build_boot_disk.sh")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

// ------------------------------------------------------------------ tiny image

struct TinyImage {
    // Kept for the whole test binary (statics are never dropped; the
    // directory lives under CARGO_TARGET_TMPDIR).
    _dir: TempDir,
    image: PathBuf,
}

static TINY: OnceLock<Result<TinyImage, String>> = OnceLock::new();

fn build_tiny() -> Result<TinyImage, String> {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    fs::create_dir_all(&base).map_err(|e| format!("create {}: {e}", base.display()))?;
    let dir = tempfile::Builder::new()
        .prefix("boot-disk-tiny-")
        .tempdir_in(&base)
        .map_err(|e| format!("tempdir: {e}"))?;
    let image = dir.path().join("tiny.qcow2");
    let started = Instant::now();
    let out = run_script(
        &[
            "--flavor",
            "tiny",
            "--output",
            image.to_str().expect("utf-8 path"),
        ],
        &[],
    );
    let took = started.elapsed();
    let stdout = text(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "{BUILD_FAILED}: {}\nstdout:\n{stdout}\nstderr:\n{}",
            out.status,
            text(&out.stderr)
        ));
    }
    let size = fs::metadata(&image)
        .map_err(|e| format!("built image {} missing: {e}", image.display()))?
        .len();
    let export_line = format!("export VMAN_DEFAULT_BOOT_DISK={}", image.display());
    if !stdout.lines().any(|l| l == export_line) {
        return Err(format!("no line `{export_line}` in the output:\n{stdout}"));
    }
    println!(
        "[timing] tiny build: {:.1} s, {} bytes ({:.1} MiB)",
        took.as_secs_f64(),
        size,
        size as f64 / 1048576.0
    );
    Ok(TinyImage { _dir: dir, image })
}

fn tiny_image() -> &'static Path {
    match TINY.get_or_init(build_tiny) {
        Ok(t) => &t.image,
        Err(e) => panic!("{e}"),
    }
}

// ------------------------------------------------------------------ QMP

struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: Vec<Value>,
}

impl Qmp {
    fn connect(path: &Path, deadline: Duration) -> Qmp {
        let started = Instant::now();
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if started.elapsed() < deadline => {
                    let _ = e;
                    sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("connect to QMP {}: {e}", path.display()),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("set QMP read timeout");
        let writer = stream.try_clone().expect("clone QMP stream");
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
            events: Vec::new(),
        };
        let greeting = qmp.read_message().expect("QMP greeting");
        assert!(greeting.get("QMP").is_some(), "bad greeting {greeting}");
        let r = qmp.execute("qmp_capabilities", None);
        assert!(r.get("return").is_some(), "qmp_capabilities: {r}");
        qmp
    }

    fn read_message(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|e| format!("read QMP: {e}"))?;
        if n == 0 {
            return Err("QMP connection closed".to_string());
        }
        serde_json::from_str(&line).map_err(|e| format!("bad QMP message {line:?}: {e}"))
    }

    /// Runs a command; returns the reply (`{"return":..}` or `{"error":..}`).
    fn execute(&mut self, command: &str, arguments: Option<Value>) -> Value {
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut line = msg.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .unwrap_or_else(|e| panic!("send QMP {command}: {e}"));
        loop {
            let m = self
                .read_message()
                .unwrap_or_else(|e| panic!("QMP {command}: {e}"));
            if m.get("event").is_some() {
                self.events.push(m);
            } else {
                return m;
            }
        }
    }

    fn execute_ok(&mut self, command: &str, arguments: Option<Value>) {
        let r = self.execute(command, arguments);
        assert!(r.get("return").is_some(), "QMP {command} failed: {r}");
    }

    fn wait_event(&mut self, name: &str, deadline: Duration) -> Value {
        let started = Instant::now();
        loop {
            if let Some(pos) = self.events.iter().position(|e| e["event"] == name) {
                return self.events.remove(pos);
            }
            assert!(
                started.elapsed() < deadline,
                "no QMP event {name} within {deadline:?}"
            );
            match self.read_message() {
                Ok(m) => {
                    if m.get("event").is_some() {
                        self.events.push(m);
                    }
                }
                Err(e) if e.contains("timed out") || e.contains("would block") => {}
                Err(e) => panic!("waiting for QMP event {name}: {e}"),
            }
        }
    }
}

// ------------------------------------------------------------------ guest

/// A QEMU process running a boot disk; killed on drop if still running.
struct Guest {
    child: Option<Child>,
    dir: TempDir,
    started: Instant,
}

impl Guest {
    /// Boots `image` through a fresh qcow2 overlay (so several guests can
    /// share one built image). `extra` is appended to the QEMU arguments.
    fn boot(image: &Path, name: &str, hostname_args: &[String], extra: &[String]) -> Guest {
        let dir = tempfile::tempdir().expect("guest tempdir");
        let overlay = dir.path().join("boot.qcow2");
        let st = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(image)
            .arg(&overlay)
            .status()
            .expect("run qemu-img create");
        assert!(st.success(), "qemu-img create overlay failed");
        let d = dir.path().display().to_string();
        let mut args: Vec<String> = vec![
            "-accel".into(),
            "tcg".into(),
            "-machine".into(),
            "q35".into(),
            "-m".into(),
            "256".into(),
            "-display".into(),
            "none".into(),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-name".into(),
            format!("guest={name}"),
            "-chardev".into(),
            format!(
                "socket,id=ser0,path={d}/serial.sock,server=on,wait=off,logfile={d}/console.txt,logappend=on"
            ),
            "-serial".into(),
            "chardev:ser0".into(),
            "-qmp".into(),
            format!("unix:{d}/qmp.sock,server=on,wait=off"),
            "-drive".into(),
            format!("file={},format=qcow2,if=virtio", overlay.display()),
        ];
        args.extend(hostname_args.iter().cloned());
        args.extend(extra.iter().cloned());
        let stderr = fs::File::create(dir.path().join("qemu.stderr")).expect("qemu stderr file");
        println!("[qemu] qemu-system-x86_64 {}", args.join(" "));
        let started = Instant::now();
        let child = Command::new("qemu-system-x86_64")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn qemu-system-x86_64");
        Guest {
            child: Some(child),
            dir,
            started,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn console(&self) -> String {
        fs::read(self.path("console.txt"))
            .map(|b| text(&b))
            .unwrap_or_default()
    }

    fn diagnostics(&self) -> String {
        let stderr = fs::read(self.path("qemu.stderr"))
            .map(|b| text(&b))
            .unwrap_or_default();
        format!(
            "--- console ---\n{}\n--- qemu stderr ---\n{stderr}",
            self.console()
        )
    }

    fn qmp(&self) -> Qmp {
        Qmp::connect(&self.path("qmp.sock"), Duration::from_secs(30))
    }

    /// Waits until a console line ends with `marker` (markers may follow a
    /// shell prompt on the same line). Returns the time since QEMU started.
    fn wait_console(&mut self, marker: &str, deadline: Duration) -> Duration {
        self.wait_console_line(marker, deadline, |l| l.trim_end().ends_with(marker))
    }

    /// Waits until some console line satisfies `matches`.
    fn wait_console_line(
        &mut self,
        marker: &str,
        deadline: Duration,
        matches: impl Fn(&str) -> bool,
    ) -> Duration {
        let started = Instant::now();
        loop {
            if self.console().lines().any(&matches) {
                return self.started.elapsed();
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(st)) = child.try_wait() {
                    panic!(
                        "QEMU exited ({st}) before console marker {marker:?}\n{}",
                        self.diagnostics()
                    );
                }
            }
            if started.elapsed() > deadline {
                panic!(
                    "no console marker {marker:?} within {deadline:?}\n{}",
                    self.diagnostics()
                );
            }
            sleep(Duration::from_millis(50));
        }
    }

    /// Types a line into the guest's serial shell.
    fn type_line(&self, line: &str) {
        let mut s = UnixStream::connect(self.path("serial.sock")).expect("connect serial socket");
        s.write_all(format!("{line}\n").as_bytes())
            .expect("write to serial socket");
        // Keep the connection open a moment so QEMU reads everything.
        sleep(Duration::from_millis(300));
    }

    /// Waits for QEMU to exit by itself; returns its exit status success flag.
    fn wait_exit(&mut self, deadline: Duration) -> std::process::ExitStatus {
        let started = Instant::now();
        let child = self.child.as_mut().expect("qemu child");
        loop {
            if let Some(st) = child.try_wait().expect("try_wait qemu") {
                self.child = None;
                return st;
            }
            if started.elapsed() > deadline {
                panic!(
                    "QEMU did not exit within {deadline:?} after system_powerdown\n{}",
                    self.diagnostics()
                );
            }
            sleep(Duration::from_millis(20));
        }
    }

    fn power_down(&mut self, qmp: &mut Qmp) -> Duration {
        let t = Instant::now();
        qmp.execute_ok("system_powerdown", None);
        let st = self.wait_exit(POWEROFF_DEADLINE);
        let took = t.elapsed();
        assert!(
            st.success(),
            "QEMU exit status {st} after system_powerdown\n{}",
            self.diagnostics()
        );
        assert!(
            self.console()
                .contains("vman-guest: power button, powering off"),
            "no power button marker\n{}",
            self.diagnostics()
        );
        took
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn oem_hostname(name: &str) -> Vec<String> {
    vec![
        "-smbios".to_string(),
        format!("type=11,value=vman.hostname={name}"),
    ]
}

// ------------------------------------------------------------------ tests

#[test]
fn tiny_boots_with_hostname_and_powers_off_on_system_powerdown() {
    let image = tiny_image();
    let name = "vman-test-boot1";
    let mut guest = Guest::boot(image, name, &oem_hostname(name), &[]);
    let boot = guest.wait_console(
        &format!("vman-guest: boot ok hostname={name}"),
        BOOT_DEADLINE,
    );
    let ready = guest.wait_console("vman-guest: ready", BOOT_DEADLINE);
    let console = guest.console();
    assert!(
        console.contains("vman-guest: disk added vda"),
        "boot disk not reported\n{console}"
    );
    assert!(
        !console.contains("eth0 address"),
        "no NIC, no address expected\n{console}"
    );
    let mut qmp = guest.qmp();
    let off = guest.power_down(&mut qmp);
    println!(
        "[timing] tiny boot (QEMU start -> boot ok): {:.2} s, -> ready: {:.2} s, system_powerdown -> QEMU exit: {:.2} s",
        boot.as_secs_f64(),
        ready.as_secs_f64(),
        off.as_secs_f64()
    );
}

#[test]
fn tiny_hotplug_disk_and_serial_shell() {
    let image = tiny_image();
    let name = "vman-test-hotplug";
    let extra: Vec<String> = ["-device", "pcie-root-port,id=rp1,chassis=1,slot=1"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut guest = Guest::boot(image, name, &oem_hostname(name), &extra);
    guest.wait_console(
        &format!("vman-guest: boot ok hostname={name}"),
        BOOT_DEADLINE,
    );
    guest.wait_console("vman-guest: ready", BOOT_DEADLINE);

    // The serial console is a root shell: type a command, read its output.
    guest.type_line("echo vman-typed-$((6*7)) $(hostname)");
    guest.wait_console(&format!("vman-typed-42 {name}"), EVENT_DEADLINE);

    let data = guest.path("data.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&data)
        .arg("32M")
        .status()
        .expect("qemu-img create data disk");
    assert!(st.success());

    let mut qmp = guest.qmp();
    qmp.execute_ok(
        "blockdev-add",
        Some(json!({
            "driver": "qcow2",
            "node-name": "hpdata",
            "file": { "driver": "file", "filename": data.display().to_string() }
        })),
    );
    let t = Instant::now();
    qmp.execute_ok(
        "device_add",
        Some(
            json!({ "driver": "virtio-blk-pci", "id": "hpdisk", "drive": "hpdata", "bus": "rp1" }),
        ),
    );
    guest.wait_console("vman-guest: disk added vdb", EVENT_DEADLINE);
    let added = t.elapsed();

    let t = Instant::now();
    qmp.execute_ok("device_del", Some(json!({ "id": "hpdisk" })));
    guest.wait_console("vman-guest: disk removed vdb", EVENT_DEADLINE);
    let removed = t.elapsed();
    qmp.wait_event("DEVICE_DELETED", EVENT_DEADLINE);
    qmp.execute_ok("blockdev-del", Some(json!({ "node-name": "hpdata" })));

    let off = guest.power_down(&mut qmp);
    println!(
        "[timing] hot-plug device_add -> 'disk added vdb': {:.2} s, device_del -> 'disk removed vdb': {:.2} s, powerdown -> exit: {:.2} s",
        added.as_secs_f64(),
        removed.as_secs_f64(),
        off.as_secs_f64()
    );
}

#[test]
fn tiny_reports_cold_disk_and_dhcp_address_and_serial_hostname() {
    let image = tiny_image();
    let name = "vman-test-cold";
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("cold.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&data)
        .arg("16M")
        .status()
        .expect("qemu-img create data disk");
    assert!(st.success());
    // Hostname through the SMBIOS system serial (fallback source).
    let hostname_args = vec!["-smbios".to_string(), format!("type=1,serial={name}")];
    let extra = vec![
        "-drive".to_string(),
        format!("file={},format=qcow2,if=virtio", data.display()),
        "-netdev".to_string(),
        "user,id=net0".to_string(),
        "-device".to_string(),
        "virtio-net-pci,netdev=net0".to_string(),
    ];
    let mut guest = Guest::boot(image, name, &hostname_args, &extra);
    guest.wait_console(
        &format!("vman-guest: boot ok hostname={name}"),
        BOOT_DEADLINE,
    );
    guest.wait_console("vman-guest: disk added vda", BOOT_DEADLINE);
    guest.wait_console("vman-guest: disk added vdb", BOOT_DEADLINE);
    let addr = guest.wait_console("vman-guest: eth0 address 10.0.2.15", BOOT_DEADLINE);
    guest.wait_console("vman-guest: ready", BOOT_DEADLINE);
    println!(
        "[timing] QEMU start -> 'eth0 address 10.0.2.15': {:.2} s",
        addr.as_secs_f64()
    );
    let mut qmp = guest.qmp();
    guest.power_down(&mut qmp);
}

#[test]
fn alpine_without_reachable_mirror_fails_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out_path = dir.path().join("alpine.qcow2");
    let started = Instant::now();
    let out = run_script(
        &[
            "--flavor",
            "alpine",
            "--output",
            out_path.to_str().expect("utf-8"),
        ],
        &[("ALPINE_MIRROR", "http://127.0.0.1:9/alpine")],
    );
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "alpine build must fail: {stderr}");
    assert!(
        stderr.contains("not reachable") && stderr.contains("tiny"),
        "message must say the mirror is unreachable and name the offline flavors: {stderr}"
    );
    assert!(!out_path.exists(), "no output file may be left");
    let left: Vec<_> = fs::read_dir(dir.path())
        .expect("read output dir")
        .map(|e| e.expect("dir entry").file_name())
        .collect();
    assert!(left.is_empty(), "temp files left behind: {left:?}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the probe must fail fast"
    );
}

#[test]
fn bad_arguments_are_rejected_with_a_clear_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ok_out = dir.path().join("x.qcow2");
    let ok_out = ok_out.to_str().expect("utf-8");
    let cases: [(&[&str], &str); 4] = [
        (
            &["--flavor", "windows", "--output", ok_out],
            "unknown flavor",
        ),
        (
            &["--flavor", "tiny", "--output", "/proc/nope/x.qcow2"],
            "/proc/nope",
        ),
        (
            &["--flavor", "tiny", "--size", "abc", "--output", ok_out],
            "invalid size",
        ),
        (&["--bogus"], "unknown argument"),
    ];
    for (args, expect) in cases {
        let out = run_script(args, &[]);
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{args:?} must fail");
        assert!(
            stderr.contains(expect),
            "{args:?}: stderr should mention {expect:?}: {stderr}"
        );
        assert!(
            stderr.lines().count() <= 2,
            "{args:?}: expected a short message: {stderr}"
        );
    }
    assert!(!Path::new("/proc/nope").exists());
    let left: Vec<_> = fs::read_dir(dir.path())
        .expect("read dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert!(left.is_empty(), "nothing may be left behind: {left:?}");

    let help = run_script(&["--help"], &[]);
    assert!(help.status.success());
    assert!(text(&help.stdout).contains("--flavor"));
}

/// Opt-in (slow, needs root + loop devices + Debian's mirror):
/// `VMAN_TEST_DEBIAN=1 cargo test --test boot_disk_script debian -- --nocapture`
#[test]
fn debian_build_and_boot_to_login_opt_in_vman_test_debian() {
    if std::env::var("VMAN_TEST_DEBIAN").as_deref() != Ok("1") {
        println!("skipped: set VMAN_TEST_DEBIAN=1 to build and boot the debian flavor");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("debian.qcow2");
    let started = Instant::now();
    let out = run_script(
        &[
            "--flavor",
            "debian",
            "--output",
            image.to_str().expect("utf-8"),
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "debian build failed: {}\n{}\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    let size = fs::metadata(&image).expect("debian image").len();
    println!(
        "[timing] debian build: {:.0} s, {} bytes ({:.0} MiB)",
        started.elapsed().as_secs_f64(),
        size,
        size as f64 / 1048576.0
    );
    share_debian_image(&image);
    // vman's slirp metadata layout, served by bench/nocloud.py (a stand-in
    // for vman's metadata channel) on the guestfwd unix socket.
    let seed = NoCloudStub::start(dir.path(), "deb-seeded");
    let ssh_port = free_port();
    let extra = vec![
        "-netdev".to_string(),
        format!(
            "user,id=net0,net=169.254.169.0/24,host=169.254.169.2,dns=169.254.169.3,\
             dhcpstart=169.254.169.15,hostfwd=tcp:127.0.0.1:{ssh_port}-:22,\
             guestfwd=tcp:169.254.169.254:80-cmd:socat STDIO UNIX-CONNECT:{}",
            seed.socket.display()
        ),
        "-device".to_string(),
        "virtio-net-pci,netdev=net0".to_string(),
        "-smbios".to_string(),
        "type=1,serial=ds=nocloud-net;s=http://169.254.169.254/nocloud/".to_string(),
    ];
    let mut guest = Guest::boot(&image, "vman-debian", &[], &extra);
    // With root autologin agetty prints "<host> login: root (automatic login)".
    let login =
        guest.wait_console_line("login:", Duration::from_secs(600), |l| l.contains("login:"));
    println!(
        "[timing] debian QEMU start -> login: {:.1} s",
        login.as_secs_f64()
    );
    // Stock cloud-init took the hostname and root's key from the seed: the
    // regression of `ds=nocloud;s=http://...`, which cloud-init 22.4 fetched
    // and then ignored (DataSourceNone, no key, hostname `debian`).
    let started = Instant::now();
    let got = loop {
        let out = Command::new("ssh")
            .args([
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "BatchMode=yes",
                "-o",
                "ConnectTimeout=10",
                "-o",
                "LogLevel=ERROR",
                "-i",
            ])
            .arg(&seed.key)
            .args(["-p", &ssh_port.to_string(), "root@127.0.0.1", "hostname"])
            .output()
            .expect("run ssh (openssh-client)");
        if out.status.success() {
            break text(&out.stdout).trim().to_owned();
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "no ssh login with the seeded key: {}\nconsole:\n{}\nmetadata requests:\n{}",
            text(&out.stderr),
            guest.console(),
            fs::read_to_string(dir.path().join("nocloud.log")).unwrap_or_default()
        );
        sleep(Duration::from_secs(2));
    };
    assert_eq!(got, "deb-seeded", "console:\n{}", guest.console());
    println!(
        "[timing] debian QEMU start -> ssh prints the seeded hostname: {:.1} s",
        login.as_secs_f64() + started.elapsed().as_secs_f64()
    );
    let mut qmp = guest.qmp();
    let t = Instant::now();
    qmp.execute_ok("system_powerdown", None);
    let st = guest.wait_exit(Duration::from_secs(180));
    assert!(st.success(), "QEMU exit status {st}");
    println!(
        "[timing] debian system_powerdown -> exit: {:.1} s",
        t.elapsed().as_secs_f64()
    );
}

/// Leaves the image this test built where tests/e2e/debian_ssh.rs looks for
/// it (same name rule: FNV-1a of the build script), so one `scripts/test.sh`
/// run builds the debian image once.
fn share_debian_image(image: &Path) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/build_boot_disk.sh");
    let key = fs::read(script)
        .expect("read build script")
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
        });
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("debian-image");
    fs::create_dir_all(&dir).expect("debian image cache folder");
    // images of older build scripts go
    for entry in fs::read_dir(&dir).expect("read the cache folder").flatten() {
        if entry.file_name().to_string_lossy().starts_with("debian-") {
            let _ = fs::remove_file(entry.path());
        }
    }
    let dest = dir.join(format!("debian-{key:016x}.qcow2"));
    let part = dir.join(format!(".debian-{key:016x}.{}.part", std::process::id()));
    fs::copy(image, &part).expect("copy the debian image to the cache");
    fs::rename(&part, &dest).expect("rename the cached debian image");
}

/// bench/nocloud.py on a unix socket (what vman's per-VM metadata channel
/// is to the guest), serving `hostname` and a fresh key's public half.
struct NoCloudStub {
    child: Child,
    socket: PathBuf,
    key: PathBuf,
}

impl NoCloudStub {
    fn start(dir: &Path, hostname: &str) -> NoCloudStub {
        let key = dir.join("id_ed25519");
        let st = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&key)
            .status()
            .expect("run ssh-keygen (openssh-client)");
        assert!(st.success(), "ssh-keygen failed");
        let socket = dir.join("metadata.sock");
        let log = fs::File::create(dir.join("nocloud.log")).expect("nocloud log");
        let child = Command::new("python3")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/nocloud.py"))
            .arg(&socket)
            .arg(hostname)
            .arg(dir.join("id_ed25519.pub"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("run bench/nocloud.py");
        let started = Instant::now();
        while !socket.exists() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "nocloud.py did not start"
            );
            sleep(Duration::from_millis(20));
        }
        NoCloudStub { child, socket, key }
    }
}

impl Drop for NoCloudStub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind a free port")
        .local_addr()
        .expect("local addr")
        .port()
}
