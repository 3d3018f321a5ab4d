#!/usr/bin/env bash
# Fuzzes the API from its own OpenAPI document: schemathesis (pinned, in a
# venv under target/) against a release build of vman on a free port with a
# temporary storage, real SQLite and real QEMU (TCG). Checks that no answer
# is a 5xx, that every answer matches the documented status codes and
# schemas, and that vman never panicked. Prints the number of requests vman
# answered and the failures found; exits non-zero on any failure.
#
#   VMAN_FUZZ_SECONDS  time budget of schemathesis (default 150)
#   VMAN_FUZZ_SEED     hypothesis seed (default: random, printed)
set -euo pipefail
cd "$(dirname "$0")/.."

SCHEMATHESIS_VERSION=4.32.5
venv=target/fuzz-venv
budget="${VMAN_FUZZ_SECONDS:-150}"
seed="${VMAN_FUZZ_SEED:-$((RANDOM * 32768 + RANDOM))}"

# Installs once; offline runs work when the venv is there.
if ! "$venv/bin/schemathesis" --version 2>/dev/null | grep -qx "schemathesis, version $SCHEMATHESIS_VERSION"; then
    echo "fuzz: installing schemathesis $SCHEMATHESIS_VERSION into $venv"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi

cargo build --release --bin vman
bin=target/release/vman

tmp=$(mktemp -d)
storage="$tmp/storage"
mkdir -p "$storage"
out="$tmp/vman.out"
: >"$out"
pid=""
base=""

# Stops every VM the fuzzer started, then vman, then any QEMU still using
# the temporary storage (by pid), and removes the storage.
cleanup() {
    if [ -n "$base" ] && [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        for id in $(curl -s "$base/vms" | python3 -c 'import json,sys
try:
    print(" ".join(v["id"] for v in json.load(sys.stdin) if v.get("state") != "stopped"))
except Exception:
    pass'); do
            curl -s -o /dev/null -X POST -H 'Content-Type: application/json' \
                -d '{"force": true}' "$base/vms/$id/actions/stop" || true
        done
    fi
    if [ -n "$pid" ]; then
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    fi
    for p in /proc/[0-9]*; do
        if { tr '\0' ' ' <"$p/cmdline"; } 2>/dev/null | grep -qF -- "$storage/"; then
            kill -9 "${p#/proc/}" 2>/dev/null || true
        fi
    done
    rm -rf "$tmp"
}
trap cleanup EXIT

VMAN_STORAGE_PATH="$storage" VMAN_LOG_DIR="$storage/logs" VMAN_ACCEL="${VMAN_ACCEL:-tcg}" \
    VMAN_STOP_TIMEOUT=2 VMAN_DETACH_TIMEOUT=2 VMAN_MEMORY_OVERCOMMIT=0.2 \
    "$bin" serve --host 127.0.0.1 --port 0 >"$out" 2>&1 &
pid=$!
port=""
for _ in $(seq 600); do
    port=$(sed -n 's#.*listening on http://127\.0\.0\.1:\([0-9]*\).*#\1#p' "$out" | head -n1)
    [ -n "$port" ] && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
done
if [ -z "$port" ]; then
    echo "fuzz: vman did not start:" >&2
    cat "$out" >&2
    exit 1
fi
base="http://127.0.0.1:$port"
echo "fuzz: vman on $base, storage $storage, budget ${budget}s, seed $seed"

# Known resources, so that generated requests reach more than 404s: the
# fuzzer uses these ids for about half of its path parameters and references
# (and may stop, restart, delete them as it likes). One VM runs.
json_post() {
    curl -s -o /dev/null -w '%{http_code}' -X POST -H 'Content-Type: application/json' \
        -d "$2" "$base$1"
}
seeded="$(json_post /templates '{"name": "fuzz", "cpu_count": 1, "ram_mib": 128}')"
seeded="$seeded $(json_post /vms '{"template_name": "fuzz", "name": "fuzz-vm"}')"
seeded="$seeded $(json_post /vms '{"template_name": "fuzz", "name": "fuzz-run"}')"
seeded="$seeded $(json_post /disks '{"name": "fuzz-disk", "size": 1}')"
seeded="$seeded $(json_post /vms/fuzz-run/actions/start '{}')"
if [ "$seeded" != "201 201 201 201 202" ]; then
    echo "fuzz: seeding failed (statuses $seeded)" >&2
    exit 1
fi
cat >"$tmp/schemathesis.toml" <<'TOML'
[dictionaries.vms]
values = ["fuzz-vm", "fuzz-run"]
[dictionaries.disks]
values = ["fuzz-disk"]
[dictionaries.templates]
values = ["fuzz"]

[parameters]
"path.vm_id" = { dictionary = "vms", probability = 0.5 }
"path.id" = { dictionary = "disks", probability = 0.5 }
"path.name" = { dictionary = "templates", probability = 0.5 }
"body.template_name" = { dictionary = "templates", probability = 0.5 }
"body.vm_id" = { dictionary = "vms", probability = 0.5 }
TOML

status=0
# From the temporary folder: schemathesis keeps a cache in its working directory.
schemathesis="$PWD/$venv/bin/schemathesis"
(cd "$tmp" && "$schemathesis" --config-file "$tmp/schemathesis.toml" run "$base/openapi.json" \
    --checks not_a_server_error,status_code_conformance,response_schema_conformance,content_type_conformance \
    --phases examples,coverage,fuzzing,stateful \
    --max-time "$budget" \
    --seed "$seed" \
    --workers 2 \
    --request-timeout 60 \
    --exclude-path /events \
    --generation-database none \
    --suppress-health-check all \
    --no-color \
    --report junit --report-junit-path "$tmp/junit.xml") \
    2>&1 | tee "$tmp/schemathesis.out" || status=$?

requests=$(grep -c 'vman::http' "$storage/logs/vman.log" || true)
server_errors=$(grep -cE 'vman::http \| [A-Z]+ \S+ 5[0-9][0-9] ' "$storage/logs/vman.log" || true)
panics=$(cat "$out" "$storage/logs/vman.log" | grep -ciE 'panicked|RUST_BACKTRACE' || true)
failures=$(python3 - "$tmp/junit.xml" <<'PY'
import sys, xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except Exception:
    print(-1); sys.exit()
suites = [root] if root.tag == "testsuite" else root.iter("testsuite")
print(sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites))
PY
)
if [ "$panics" -gt 0 ]; then
    echo "fuzz: vman panicked:" >&2
    grep -iE -A5 'panicked' "$out" "$storage/logs/vman.log" >&2 || true
fi
if [ "$server_errors" -gt 0 ]; then
    grep -E 'vman::http \| [A-Z]+ \S+ 5[0-9][0-9] ' "$storage/logs/vman.log" | head -n 20 >&2
fi
kill -0 "$pid" 2>/dev/null || { echo "fuzz: vman is no longer running" >&2; panics=$((panics + 1)); }
echo "fuzz: statuses $(sed -n 's/.*vman::http | [A-Z]* [^ ]* \([0-9][0-9][0-9]\) .*/\1/p' "$storage/logs/vman.log" \
    | sort | uniq -c | awk '{printf "%s%s=%s", sep, $2, $1; sep=" "}')"
echo "fuzz: $requests requests answered, $failures schemathesis failures, $server_errors 5xx, $panics panics (seed $seed)"
if [ "$status" -ne 0 ] || [ "$failures" -ne 0 ] || [ "$server_errors" -ne 0 ] || [ "$panics" -ne 0 ]; then
    echo "fuzz: FAILED" >&2
    exit 1
fi
