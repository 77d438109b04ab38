#!/usr/bin/env bash
# The registry under abuse, on loopback: the latency of a cached manifest
# fetch (by digest, wrk --latency, p50 and p99) while, in turn,
#   1. nothing else happens (the baseline);
#   2. 500 slow clients open connections and never finish their headers
#      (each is closed after --header-timeout and comes back at once);
#   3. an unknown-name flood: wrk asks for a new random package name on every
#      request (every one needs an evaluation until the queue is full: 429);
#   4. a connection storm: 3,000 connections at once, past the cap (503).
# Appends its table to benches/results.md. Usage: benches/abuse.sh [seconds]
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION="${1:-10}"
bash scripts/install-deps.sh >/dev/null
cargo build --release --quiet
BIN=$PWD/target/release/nixery
WORK=$(mktemp -d)
ADDR=127.0.0.1:5110
ulimit -n "$(ulimit -Hn)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

"$BIN" serve --listen "$ADDR" --state-dir "$WORK/state" --pkgs-path nix/offline-pkgs \
  --nix-option substituters= --max-connections 2048 2>"$WORK/server.log" &
server=$!; pids+=("$server")
for _ in $(seq 100); do curl -sf "http://$ADDR/v2/" >/dev/null && break; sleep 0.1; done
ACCEPT="Accept: application/vnd.oci.image.manifest.v1+json"
digest=$(curl -sf -H "$ACCEPT" -D - -o /dev/null "http://$ADDR/v2/shell/curl/manifests/latest" \
  | awk -F': ' 'tolower($1)=="docker-content-digest" {print $2}' | tr -d '\r')
[ -n "$digest" ] || { echo "abuse: no image" >&2; exit 1; }
URL="http://$ADDR/v2/shell/curl/manifests/$digest"

# measure NAME: cached-manifest latency under whatever runs now -> "p50 p99" (ms)
measure() {
  wrk -t1 -c4 -d"${DURATION}s" --latency -H "$ACCEPT" "$URL" >"$WORK/$1.txt"
  if grep -qE "Non-2xx or 3xx responses|Socket errors" "$WORK/$1.txt"; then
    echo "abuse: the measured fetches failed during $1:" >&2
    grep -E "Non-2xx or 3xx responses|Socket errors" "$WORK/$1.txt" >&2
    exit 1
  fi
  python3 - "$WORK/$1.txt" <<'PY'
import sys
ms = {'us': 0.001, 'ms': 1, 's': 1000}
out = {}
for line in open(sys.argv[1]):
    f = line.split()
    if len(f) == 2 and f[0] in ('50%', '99%'):
        v = f[1]; u = ''.join(c for c in v if c.isalpha())
        out[f[0]] = float(v[:len(v) - len(u)]) * ms[u]
if len(out) != 2:
    sys.exit('abuse: no latency figures in ' + sys.argv[1])
print(f"{out['50%']:.2f} {out['99%']:.2f}")
PY
}

echo "== baseline"
base=$(measure baseline)

echo "== 500 slow clients"
python3 - "$ADDR" 500 "$((DURATION + 3))" <<'PY' &
import socket, sys, time, selectors
host, port = sys.argv[1].split(':'); n = int(sys.argv[2]); end = time.time() + float(sys.argv[3])
sel = selectors.DefaultSelector()
def open_one():
    s = socket.create_connection((host, int(port)))
    s.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
    sel.register(s, selectors.EVENT_READ)
for _ in range(n):
    open_one()
while time.time() < end:
    for key, _ in sel.select(timeout=0.5):
        s = key.fileobj
        try:
            data = s.recv(4096)
        except OSError:
            data = b""
        if not data:  # closed by the server: come back
            sel.unregister(s); s.close(); open_one()
PY
slow=$!; pids+=("$slow")
sleep 1
slow_lat=$(measure slow)
wait "$slow" || true

echo "== unknown-name flood"
cat >"$WORK/flood.lua" <<'LUA'
math.randomseed(os.time())
request = function()
  return wrk.format("GET", "/v2/nosuchpkg" .. math.random(1, 1000000000) .. "/manifests/latest")
end
LUA
wrk -t1 -c64 -d"$((DURATION + 3))s" -s "$WORK/flood.lua" "http://$ADDR" >"$WORK/flood-attacker.txt" 2>&1 &
flood=$!; pids+=("$flood")
sleep 1
flood_lat=$(measure flood)
wait "$flood" || true
flood_reqs=$(awk '/requests in/ {print $1}' "$WORK/flood-attacker.txt")

echo "== connection storm"
wrk -t2 -c3000 -d"$((DURATION + 3))s" "http://$ADDR/v2/" >"$WORK/storm-attacker.txt" 2>&1 &
storm=$!; pids+=("$storm")
sleep 1
storm_lat=$(measure storm)
wait "$storm" || true

curl -sf "http://$ADDR/metrics" >"$WORK/metrics.txt"
m() { awk -v n="$1" '$1==n {print $2}' "$WORK/metrics.txt"; }
refused=$(m nixery_connections_refused_total); queue_full=$(m nixery_builds_refused_total)
rss=$(awk '/VmHWM/ {print int($2/1024)}' /proc/$server/status)
{
  echo
  echo "## Under abuse (benches/abuse.sh)"
  echo
  echo "Run $(date -u +%Y-%m-%dT%H:%MZ); a cached manifest fetched by digest (wrk -c4, ${DURATION}s) while each attack runs; latency in ms."
  echo
  echo "| while | p50 ms | p99 ms |"
  echo "|---|---|---|"
  set -- $base;      echo "| nothing else (baseline) | $1 | $2 |"
  set -- $slow_lat;  echo "| 500 clients that never finish their headers | $1 | $2 |"
  set -- $flood_lat; echo "| unknown-name flood, 64 connections ($flood_reqs requests; $queue_full refused with 429) | $1 | $2 |"
  set -- $storm_lat; echo "| connection storm, 3,000 connections ($refused refused with 503 past --max-connections 2048) | $1 | $2 |"
  echo
  echo "Server peak RSS over the whole run: $rss MiB."
} | tee -a benches/results.md
