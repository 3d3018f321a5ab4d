#!/usr/bin/env python3
"""Raw-QEMU driver of the bench/net.sh and bench/debian_ssh.sh figures (not
vman's code path: the same QEMU/passt arguments vman uses, started directly,
so the network backends can be measured before and apart from vman).

  netguest.py net IMAGE WORK ROUNDS MIB
      The tiny guest (scripts/build_boot_disk.sh --flavor tiny) booted
      ROUNDS times per backend, slirp and passt alternating, same image, same
      run. Each boot measures start -> DHCP address marker on the console,
      then TCP throughput through a forwarded host port (MIB MiB each way,
      busybox nc + dd in the guest). slirp runs with vman's metadata layout
      (net 169.254.169.0/24 + guestfwd to a unix socket served by
      bench/nocloud.py): each slirp boot also checks that the guest reads
      its meta-data at http://169.254.169.254/nocloud/meta-data and measures
      start -> that answer.

  netguest.py ssh IMAGE WORK ROUNDS
      The debian guest (--flavor debian) under slirp with vman's metadata
      layout and SMBIOS serial ds=nocloud-net;s=http://169.254.169.254/nocloud/:
      start -> first metadata request, start -> `ssh root@127.0.0.1 hostname`
      prints the hostname served by bench/nocloud.py.

All QEMUs run under TCG. Everything started is killed on exit.
"""
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PROCS = []
MARK_IP = re.compile(rb"vman-guest: (?:eth0 address|ip) (\d+\.\d+\.\d+\.\d+)")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def spawn(argv, log):
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                         start_new_session=True)
    PROCS.append(p)
    return p


def kill_all():
    for p in PROCS:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
    PROCS.clear()


class Guest:
    """One QEMU (plus passt or the metadata server) in its own folder."""

    def __init__(self, image, work, tag, backend, forwards, smbios_serial=None, ram=256,
                 hostname="bench-guest", pubkey=None):
        self.dir = os.path.join(work, tag)
        os.makedirs(self.dir)
        self.backend = backend
        self.buf = b""
        self.lock = threading.Lock()
        overlay = os.path.join(self.dir, "boot.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", image,
                        overlay], check=True)
        ser = os.path.join(self.dir, "serial.sock")
        log = open(os.path.join(self.dir, "procs.log"), "wb")
        self.t0 = time.monotonic()
        if backend == "slirp":
            meta = os.path.join(self.dir, "metadata.sock")
            self.meta_log = os.path.join(self.dir, "nocloud.log")
            key = pubkey or os.path.join(self.dir, "nokey.pub")
            if not pubkey:
                open(key, "w").write("ssh-ed25519 AAAA bench\n")
            spawn([sys.executable, os.path.join(HERE, "nocloud.py"), meta, hostname, key],
                  open(self.meta_log, "wb"))
            while not os.path.exists(meta):
                time.sleep(0.01)
            fw = "".join(f",hostfwd=tcp:127.0.0.1:{h}-:{g}" for h, g in forwards)
            netdev = ("user,id=n0,net=169.254.169.0/24,host=169.254.169.2,dns=169.254.169.3,"
                      f"dhcpstart=169.254.169.15{fw},"
                      f"guestfwd=tcp:169.254.169.254:80-cmd:socat STDIO UNIX-CONNECT:{meta}")
        else:
            # passt started as root drops to `nobody` BEFORE it creates its
            # socket: the folder must be writable (and its parents
            # traversable) by that user
            os.chmod(self.dir, 0o777)
            for d in (work, os.path.dirname(work)):
                os.chmod(d, os.stat(d).st_mode | 0o005)
            sock = os.path.join(self.dir, "passt.sock")
            argv = ["passt", "-f", "-q", "--socket", sock, "--no-map-gw", "-a", "10.0.2.15",
                    "-n", "24", "-g", "10.0.2.2"]
            for h, g in forwards:
                argv += ["-t", f"127.0.0.1/{h}:{g}"]
            p = spawn(argv, log)
            while not os.path.exists(sock):
                if p.poll() is not None:
                    raise SystemExit(f"passt exited ({p.returncode}); see {self.dir}/procs.log")
                time.sleep(0.002)
            netdev = f"stream,id=n0,server=off,addr.type=unix,addr.path={sock}"
        args = ["qemu-system-x86_64", "-accel", "tcg", "-machine", "q35", "-m", str(ram),
                "-display", "none", "-nodefaults", "-no-user-config",
                "-chardev", f"socket,id=ser0,path={ser},server=on,wait=off",
                "-serial", "chardev:ser0",
                "-drive", f"file={overlay},format=qcow2,if=virtio",
                "-netdev", netdev, "-device", "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56"]
        if smbios_serial:
            args += ["-smbios", f"type=1,serial={smbios_serial}"]
        spawn(args, log)
        while True:
            try:
                self.ser = socket.socket(socket.AF_UNIX)
                self.ser.connect(ser)
                break
            except OSError:
                time.sleep(0.005)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        with open(os.path.join(self.dir, "console.txt"), "wb") as f:
            while True:
                try:
                    b = self.ser.recv(65536)
                except OSError:
                    return
                if not b:
                    return
                f.write(b)
                f.flush()
                with self.lock:
                    self.buf += b

    def wait(self, pattern, timeout=300, start=0):
        """Seconds since start until `pattern` (bytes regex) shows on the
        console at or after offset `start`; returns (seconds, match)."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                m = rx.search(self.buf, start)
            if m:
                return time.monotonic() - self.t0, m
            time.sleep(0.01)
        raise SystemExit(f"timeout waiting for {pattern!r} on {self.dir}/console.txt:\n"
                         + self.buf[-2000:].decode(errors="replace"))

    def run(self, cmd, timeout=120):
        """Types `cmd` into the root shell, waits for its end marker; returns output."""
        tag = f"END{time.monotonic_ns()}"
        with self.lock:
            start = len(self.buf)
        sep = " " if cmd.rstrip().endswith("&") else "; "
        self.ser.sendall(f"{cmd}{sep}echo {tag[:3]}''{tag[3:]}\n".encode())
        _, m = self.wait(re.escape(tag.encode()), timeout, start)
        with self.lock:
            return self.buf[start:m.start()].decode(errors="replace")


def host_to_guest(port, mib):
    """Host sends mib MiB into the forwarded port; done when the guest has
    read all of it (it answers `ok` after EOF)."""
    chunk = b"\0" * (1 << 20)
    s = socket.create_connection(("127.0.0.1", port), timeout=300)
    t = time.monotonic()
    for _ in range(mib):
        s.sendall(chunk)
    s.shutdown(socket.SHUT_WR)
    reply = b""
    while b"ok" not in reply:
        b = s.recv(100)
        if not b:
            break
        reply += b
    dt = time.monotonic() - t
    s.close()
    if b"ok" not in reply:
        raise RuntimeError("guest did not confirm the transfer")
    return mib / dt


def guest_to_host(port, mib):
    """The guest sends mib MiB once the host has sent one byte (passt of
    Debian 12 forwards nothing from the guest before the host spoke, see
    server_first); the guest reads that byte so it closes with FIN, not RST."""
    s = socket.create_connection(("127.0.0.1", port), timeout=300)
    t = time.monotonic()
    s.sendall(b"x")
    n = 0
    while True:
        b = s.recv(1 << 20)
        if not b:
            break
        n += len(b)
    dt = time.monotonic() - t
    s.close()
    if n != mib << 20:
        raise RuntimeError(f"received {n} bytes, expected {mib << 20}")
    return mib / dt


def server_first(g, port):
    """Does a guest service that speaks first (SSH banners, SMTP...) reach
    the host through the forward before the host sends anything?"""
    g.run("nc -l -p 5003 -e sh -c 'echo hello-from-guest; sleep 5' &")
    time.sleep(1)
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    got = b""
    try:
        while b"hello-from-guest" not in got:
            b = s.recv(100)
            if not b:
                break
            got += b
    except socket.timeout:
        pass
    s.close()
    return b"hello-from-guest" in got


def retry(f, *a):
    # slirp accepts the host's connection before the guest listener may be up
    for i in range(20):
        try:
            return f(*a)
        except (RuntimeError, OSError):
            if i == 19:
                raise
            time.sleep(0.5)


def net(image, work, rounds, mib):
    res = {b: {"ip": [], "h2g": [], "g2h": []} for b in ("slirp", "passt")}
    meta_t = []
    first = {}
    for r in range(rounds):
        for backend in ("slirp", "passt"):
            hp1, hp2, hp3 = free_port(), free_port(), free_port()
            g = Guest(image, work, f"{backend}-{r}", backend,
                      [(hp1, 5001), (hp2, 5002), (hp3, 5003)],
                      hostname=f"bench-{backend}-{r}")
            t_ip, m = g.wait(MARK_IP)
            res[backend]["ip"].append(t_ip)
            g.wait(rb"vman-guest: ready")
            if backend == "slirp":
                out = g.run("wget -q -O - http://169.254.169.254/nocloud/meta-data")
                if f"local-hostname: bench-{backend}-{r}" not in out:
                    raise SystemExit(f"slirp metadata relay failed: {out!r}")
                meta_t.append(time.monotonic() - g.t0)
            g.run("nc -l -p 5001 -e sh -c 'cat >/dev/null; echo ok' &")
            time.sleep(0.3)
            res[backend]["h2g"].append(retry(host_to_guest, hp1, mib))
            g.run("nc -l -p 5002 -e sh -c 'head -c 1 >/dev/null; "
                  f"dd if=/dev/zero bs=64k count={mib * 16} 2>/dev/null' &")
            time.sleep(0.3)
            res[backend]["g2h"].append(retry(guest_to_host, hp2, mib))
            if r == 0:
                first[backend] = server_first(g, hp3)
            print(f"  round {r + 1} {backend:5}: ip {m.group(1).decode()} after {t_ip:.2f} s, "
                  f"host->guest {res[backend]['h2g'][-1]:.0f} MiB/s, "
                  f"guest->host {res[backend]['g2h'][-1]:.0f} MiB/s", flush=True)
            kill_all()
    med = {b: {k: statistics.median(v) for k, v in d.items()} for b, d in res.items()}
    s, p = med["slirp"], med["passt"]
    print(f"network figures, tiny guest, TCG, {rounds} boots per backend, {mib} MiB per transfer, medians")
    print(f"  start -> DHCP address     slirp {s['ip']:6.2f} s   passt {p['ip']:6.2f} s   passt/slirp {p['ip'] / s['ip']:.2f}x")
    print(f"  host -> guest TCP         slirp {s['h2g']:6.1f} MiB/s passt {p['h2g']:6.1f} MiB/s passt/slirp {p['h2g'] / s['h2g']:.2f}x")
    print(f"  guest -> host TCP         slirp {s['g2h']:6.1f} MiB/s passt {p['g2h']:6.1f} MiB/s passt/slirp {p['g2h'] / s['g2h']:.2f}x")
    for b in ("slirp", "passt"):
        print(f"  {b}: data of a guest service that speaks first reaches the host "
              f"before the host sends: {'yes' if first[b] else 'NO (nothing in 10 s)'}")
    print(f"  slirp: guest read its meta-data via 169.254.169.254 (guestfwd) in every boot; "
          f"start -> shell ready + that answer {statistics.median(meta_t):.2f} s (typed after 'ready', "
          f"not an unattended fetch)")


def ssh(image, work, rounds):
    os.makedirs(work, exist_ok=True)
    key = os.path.join(work, "id_ed25519")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key], check=True)
    first, ssh_t = [], []
    for r in range(rounds):
        name = f"deb-bench-{r}"
        hp = free_port()
        g = Guest(image, work, f"debian-{r}", "slirp", [(hp, 22)],
                  smbios_serial="ds=nocloud-net;s=http://169.254.169.254/nocloud/", ram=512,
                  hostname=name, pubkey=key + ".pub")
        t_first = None
        while True:
            now = time.monotonic() - g.t0
            if t_first is None and "GET /nocloud/meta-data" in open(g.meta_log).read():
                t_first = now
            out = subprocess.run(
                ["ssh", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                 "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", "-o", "LogLevel=ERROR",
                 "-i", key, "-p", str(hp), "root@127.0.0.1", "hostname"],
                capture_output=True, text=True)
            if out.returncode == 0:
                got = out.stdout.strip()
                t = time.monotonic() - g.t0
                if got != name:
                    raise SystemExit(f"ssh answered hostname {got!r}, expected {name!r}")
                break
            if now > 900:
                raise SystemExit(f"no ssh after 900 s; console in {g.dir}/console.txt; last: {out.stderr}")
            time.sleep(1)
        first.append(t_first if t_first is not None else float("nan"))
        ssh_t.append(t)
        print(f"  round {r + 1}: first metadata request {first[-1]:.1f} s, "
              f"ssh root@127.0.0.1 hostname -> {got} after {t:.1f} s", flush=True)
        if r == rounds - 1:
            print("  requests served:\n" + "".join("    " + l for l in open(g.meta_log)))
        kill_all()
    print(f"debian guest, slirp + NoCloud over guestfwd, TCG, {rounds} boots, medians")
    print(f"  start -> first metadata request : {statistics.median(first):6.1f} s")
    print(f"  start -> ssh prints the hostname: {statistics.median(ssh_t):6.1f} s")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        if sys.argv[1] == "net":
            net(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
        elif sys.argv[1] == "ssh":
            ssh(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        else:
            raise SystemExit(__doc__)
    finally:
        kill_all()
