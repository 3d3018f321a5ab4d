# Shared set-up of the QEMU benchmarks (sourced, not run): a release build,
# a work folder, the tiny boot disk as default, a free port, and `vman serve`
# on it. On exit the server and every QEMU started from the work folder are
# killed and the folder removed (KEEP_LOG=FILE keeps vman's output).
#
#   bench_init NAME   sets $work, $image, $port, $api
#   bench_serve       starts vman (again) and waits for /health; sets $server

bench_init() {
    cargo build --release -q
    work=$(mktemp -d "/tmp/vman-bench-$1.XXXXXX")
    server=""
    trap bench_cleanup EXIT
    image="$work/tiny.qcow2"
    ./scripts/build_boot_disk.sh --flavor tiny --output "$image" >/dev/null
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    api="http://127.0.0.1:$port"
}

bench_serve() {
    VMAN_STORAGE_PATH="$work/storage" VMAN_LOG_DIR="$work/logs" VMAN_ACCEL=tcg \
    VMAN_DEFAULT_BOOT_DISK="$image" VMAN_PORT=$port \
        ./target/release/vman serve >>"$work/vman.out" 2>&1 &
    server=$!
    for _ in $(seq 1000); do curl -sf "$api/health" >/dev/null && return 0; sleep 0.01; done
    echo "vman did not start; its output:" >&2
    cat "$work/vman.out" >&2
    return 1
}

bench_cleanup() {
    if [ -n "$server" ]; then kill -9 "$server" 2>/dev/null; wait "$server" 2>/dev/null; fi || true
    pkill -9 -f "$work/storage/vms" 2>/dev/null || true
    if [ -n "${KEEP_LOG:-}" ]; then cp "$work/vman.out" "$KEEP_LOG"; fi
    rm -rf "$work"
}
