#!/usr/bin/env bash
# Side-by-side benchmark, in one run on one machine, reported as ratios:
#   1. nixery vs the CNCF reference registry (Debian's docker-registry, logging
#      off) serving the same image (shell/curl, copied with skopeo):
#      warm manifest by digest (requests/s, p99) and the largest layer (MB/s);
#   2. packing the same closure: nixery (fresh state dir) vs tar|gzip -6 and
#      tar|pigz -6 (MB/s of input, output size);
#   3. cold-to-ready (store paths present, layers not packed), and 20
#      concurrent cold pulls against one;
#   4. the server's peak RSS.
# Writes the head of benches/results.md (the other benchmarks' sections stay). Usage: benches/registry.sh [seconds per load run]
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/reference-registry.sh
DURATION="${1:-10}"
bash scripts/install-deps.sh >/dev/null
cargo build --release --quiet
BIN=$PWD/target/release/nixery
WORK=$(mktemp -d)
OURS=127.0.0.1:5100
REF=127.0.0.1:5101
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

serve() { # serve STATE_DIR ADDR [FLAGS...] -> pid in $server
  "$BIN" serve --listen "$2" --state-dir "$1" --pkgs-path nix/offline-pkgs --nix-option substituters= "${@:3}" 2>"$1.log" &
  server=$!
  pids+=("$server")
  for _ in $(seq 100); do
    # Answered, and by this process (not by one left on the port).
    curl -sf "http://$2/v2/" >/dev/null && kill -0 "$server" 2>/dev/null && return
    sleep 0.1
  done
  echo "server on $2 did not start" >&2; exit 1
}
seconds() { python3 -c "import sys,time; t=time.time(); import subprocess; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); print(f'{time.time()-t:.3f}')" "$@"; }
wrk_rps() { awk '/Requests\/sec/ {print $2}' "$1"; }
wrk_p99() { awk '$1=="99%" {print $2}' "$1"; }
wrk_mbs() { awk '/Transfer\/sec/ {v=$2; if (v ~ /GB/) {sub("GB","",v); v*=1024} else if (v ~ /MB/) {sub("MB","",v)} else if (v ~ /KB/) {sub("KB","",v); v/=1024}; print v}' "$1"; }
to_ms() { python3 -c "import sys; v=sys.argv[1]; u=''.join(c for c in v if c.isalpha()); n=float(v[:len(v)-len(u)]); print(n*{'us':0.001,'ms':1,'s':1000,'m':60000}[u])" "$1"; }
# A ratio of two figures; a blank or zero figure is a failed measurement, and
# fails the run (never a blank cell or a ratio over zero).
ratio() {
  python3 -c "
import sys
a, b = sys.argv[1], sys.argv[2]
try:
    a, b = float(a), float(b)
except ValueError:
    sys.exit(f'benchmark: not a number: {sys.argv[1]!r} / {sys.argv[2]!r}')
if a <= 0 or b <= 0:
    sys.exit(f'benchmark: a figure is zero: {a} / {b}')
print(f'{a/b:.2f}')" "$1" "$2"
}
# A wrk run counts only if every answer was a success and no socket failed.
wrk_check() {
  if grep -qE "Non-2xx or 3xx responses|Socket errors" "$1"; then
    echo "benchmark: $1 had failed requests, so its throughput is not a result:" >&2
    grep -E "Non-2xx or 3xx responses|Socket errors" "$1" >&2
    exit 1
  fi
}

echo "== starting nixery and the reference registry"
serve "$WORK/ours" "$OURS"
ours_pid=$server
curl -sf -o /dev/null "http://$OURS/v2/shell/curl/manifests/latest"
reference_registry
skopeo copy -q --preserve-digests --src-tls-verify=false --dest-tls-verify=false \
  "docker://$OURS/shell/curl:latest" "docker://$REF/shell/curl:latest"

ACCEPT="Accept: application/vnd.oci.image.manifest.v1+json"
digest=$(curl -sf -H "$ACCEPT" -D - -o "$WORK/manifest.json" "http://$OURS/v2/shell/curl/manifests/latest" | awk -F': ' 'tolower($1)=="docker-content-digest" {print $2}' | tr -d '\r')
layer=$(python3 -c "import json,sys; m=json.load(open(sys.argv[1])); l=max(m['layers'], key=lambda l: l['size']); print(l['digest'], l['size'])" "$WORK/manifest.json")
layer_digest=${layer% *}; layer_size=${layer#* }
echo "manifest $digest, largest layer $layer_digest ($layer_size bytes)"

echo "== 1. warm manifest by digest and largest blob, ${DURATION}s each"
for who in ours ref; do
  addr=$OURS; [ $who = ref ] && addr=$REF
  wrk -t2 -c32 -d"${DURATION}s" --latency -H "$ACCEPT" "http://$addr/v2/shell/curl/manifests/$digest" >"$WORK/$who-manifest.txt"
  wrk -t2 -c8 -d"${DURATION}s" "http://$addr/v2/shell/curl/blobs/$layer_digest" >"$WORK/$who-blob.txt"
done
for f in "$WORK"/{ours,ref}-{manifest,blob}.txt; do wrk_check "$f"; done
m_ours=$(wrk_rps "$WORK/ours-manifest.txt"); m_ref=$(wrk_rps "$WORK/ref-manifest.txt")
p_ours=$(to_ms "$(wrk_p99 "$WORK/ours-manifest.txt")"); p_ref=$(to_ms "$(wrk_p99 "$WORK/ref-manifest.txt")")
b_ours=$(wrk_mbs "$WORK/ours-blob.txt"); b_ref=$(wrk_mbs "$WORK/ref-blob.txt")

echo "== 2. packing the closure of shell/curl/jq"
outs=$(nix-instantiate --eval --strict --json --read-write-mode nix/prepare-image.nix --option substituters "" \
  --argstr srcType path --argstr srcArgs "{\"path\":\"$PWD/nix/offline-pkgs\"}" \
  --argstr packages '["bashInteractive","cacert","coreutils","curl","iana-etc","jq","moreutils","nano"]' \
  --argstr system x86_64-linux | python3 -c "import json,sys; print(' '.join(json.load(sys.stdin)['outs']))")
# Our packing time is the build's own "packed" stage (Nix's evaluation of the
# package set is not packing); the best of three fresh state directories.
pack_ours=$(for i in 1 2 3; do
  rm -rf "$WORK/pack"
  RUST_LOG=info "$BIN" build --state-dir "$WORK/pack" --pkgs-path nix/offline-pkgs --nix-option substituters= shell/curl/jq 2>&1 >/dev/null \
    | sed 's/\x1b\[[0-9;]*m//g' | grep -oE 'packed seconds=[0-9.]+' | cut -d= -f2
done | sort -n | head -1)
size_ours=$(du -sbc "$WORK"/pack/blobs/sha256/* | tail -1 | cut -f1)
# The closure (realised by the builds above), as the reference tools get it.
nix-store -qR $outs >"$WORK/paths.txt"
input=$(du -sbc $(cat "$WORK/paths.txt") | tail -1 | cut -f1)
pack_gzip=$(for i in 1 2 3; do seconds sh -c "tar -cf - -T $WORK/paths.txt 2>/dev/null | gzip -6 > $WORK/gz.out"; done | sort -n | head -1)
size_gzip=$(stat -c %s "$WORK/gz.out")
pack_pigz=$(for i in 1 2 3; do seconds sh -c "tar -cf - -T $WORK/paths.txt 2>/dev/null | pigz -6 > $WORK/pigz.out"; done | sort -n | head -1)
size_pigz=$(stat -c %s "$WORK/pigz.out")
mbs() { python3 -c "import sys; print(f'{int(sys.argv[1])/float(sys.argv[2])/1e6:.1f}')" "$1" "$2"; }
echo "-- gzip levels (benches/pack.rs, one core)"
cargo bench --quiet --bench pack -- "$WORK/paths.txt" 2>/dev/null | tee "$WORK/levels.txt"

echo "== 3. cold to ready, and 20 concurrent cold pulls"
serve "$WORK/cold1" 127.0.0.1:5102
cold_one=$(seconds curl -sf -o /dev/null "http://127.0.0.1:5102/v2/shell/curl/jq/manifests/latest")
serve "$WORK/cold20" 127.0.0.1:5103
cold_twenty=$(python3 - <<EOF
import concurrent.futures, subprocess, time
def pull(_):
    t = time.time()
    subprocess.run(["curl", "-sf", "-o", "/dev/null", "http://127.0.0.1:5103/v2/shell/curl/jq/manifests/latest"], check=True)
    return time.time() - t
with concurrent.futures.ThreadPoolExecutor(20) as ex:
    print(f"{max(ex.map(pull, range(20))):.3f}")
EOF
)
builds20=$(curl -s http://127.0.0.1:5103/metrics | awk '$1=="nixery_builds_total" {print $2}')

echo "== 4. peak RSS: after 1-3, then under 64 concurrent downloads of a 64 MiB layer"
rss_ours=$(awk '/VmHWM/ {print $2}' /proc/$ours_pid/status)
curl -sf -o "$WORK/big.json" -H "$ACCEPT" "http://$OURS/v2/big/manifests/latest"
big=$(python3 -c "import json,sys; m=json.load(open(sys.argv[1])); print(max(m['layers'], key=lambda l: l['size'])['digest'])" "$WORK/big.json")
# Peak RSS counts the blob's page-cache pages the server maps to send it
# (file-backed, the kernel's to reclaim); its own memory is RssAnon, sampled.
(peak=0; while kill -0 "$ours_pid" 2>/dev/null && [ ! -e "$WORK/big.done" ]; do
   a=$(awk '/RssAnon/ {print $2}' /proc/$ours_pid/status); [ "$a" -gt "$peak" ] && peak=$a
   echo "$peak" >"$WORK/anon.kb"; sleep 0.1; done) &
sampler=$!
wrk -t2 -c64 -d"${DURATION}s" --timeout 60s "http://$OURS/v2/big/blobs/$big" >"$WORK/big-blob.txt"
touch "$WORK/big.done"; wait "$sampler"
rss_big=$(awk '/VmHWM/ {print $2}' /proc/$ours_pid/status)
anon_big=$(cat "$WORK/anon.kb")
wrk_check "$WORK/big-blob.txt"
b_big=$(wrk_mbs "$WORK/big-blob.txt")

cpu=$(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)
r_manifest=$(ratio "$m_ours" "$m_ref")
r_p99=$(ratio "$p_ours" "$p_ref")
r_blob=$(ratio "$b_ours" "$b_ref")
mbs_ours=$(mbs "$input" "$pack_ours"); mbs_gzip=$(mbs "$input" "$pack_gzip"); mbs_pigz=$(mbs "$input" "$pack_pigz")
r_gzip=$(ratio "$pack_gzip" "$pack_ours")
r_pigz=$(ratio "$pack_pigz" "$pack_ours")
r_size=$(ratio "$size_ours" "$size_gzip")
r_cold=$(ratio "$cold_one" "$pack_gzip")
r_twenty=$(ratio "$cold_twenty" "$cold_one")

echo "== docker pull of shell/curl/jq into an empty engine: default layers vs --max-layers 40"
MANY=127.0.0.1:5104
serve "$WORK/many" "$MANY" --max-layers 40
# The engine starts without any image from a loopback registry (ours, the
# tests'), so no layer is already there; other images are left alone.
clear_loopback_images() {
  docker images --format '{{.Repository}}:{{.Tag}}' | grep '^127\.0\.0\.1:' | xargs -r docker rmi -f >/dev/null 2>&1 || true
}
pull_once() { # pull_once IMAGE -> seconds
  clear_loopback_images
  local t; t=$(seconds docker pull -q "$1")
  clear_loopback_images
  echo "$t"
}
best() { python3 -c "import sys; print(min(float(x) for x in sys.argv[1:]))" "$@"; }
layers_of() { curl -sf -H "$ACCEPT" "http://$1/v2/$2/manifests/latest" | python3 -c "import json,sys; print(' '.join(l['digest'] for l in json.load(sys.stdin)['layers']))"; }
n_default=$(layers_of "$OURS" shell/curl/jq | wc -w); n_many=$(layers_of "$MANY" shell/curl/jq | wc -w)
d=(); m=()
for _ in 1 2 3; do
  d+=("$(pull_once "$OURS/shell/curl/jq")"); m+=("$(pull_once "$MANY/shell/curl/jq")")
done
pull_default=$(best "${d[@]}"); pull_many=$(best "${m[@]}")
r_pull=$(ratio "$pull_default" "$pull_many")
shared=$(python3 -c "
import sys
a, b = sys.argv[1].split(), sys.argv[2].split()
n = 0
while n < min(len(a), len(b)) and a[n] == b[n]: n += 1
print(n)" "$(layers_of "$OURS" shell/curl)" "$(layers_of "$OURS" shell/jq)")
[ "$shared" -ge 1 ] || { echo "benchmark: shell/curl and shell/jq share no layers" >&2; exit 1; }
# The other benchmarks append their sections ("## ..."): they stay.
others=$(awk '/^## /{p=1} p' benches/results.md 2>/dev/null || true)
{
  echo "# Benchmark results"
  echo
  echo "Run $(date -u +%Y-%m-%dT%H:%MZ) on $(nproc) cores ($cpu), $(free -g | awk '/Mem:/ {print $2}') GiB; ${DURATION}s per load run; image shell/curl; load from wrk on loopback."
  echo
  echo "| measure | nixery | reference | ratio (ours/ref) |"
  echo "|---|---|---|---|"
  echo "| warm manifest by digest, requests/s (wrk -c32) | $m_ours | $m_ref (docker-registry) | $r_manifest |"
  echo "| warm manifest by digest, p99 latency ms | $p_ours | $p_ref (docker-registry) | $r_p99 |"
  echo "| largest layer ($layer_size B), MB/s (wrk -c8) | $b_ours | $b_ref (docker-registry) | $r_blob |"
  echo "| packing shell/curl/jq ($input B in), MB/s | $mbs_ours | $mbs_gzip (tar, gzip -6) | $r_gzip |"
  echo "| packing, MB/s vs pigz | $mbs_ours | $mbs_pigz (tar, pigz -6) | $r_pigz |"
  echo "| packed size, bytes | $size_ours | $size_gzip (gzip -6) | $r_size |"
  echo "| cold to ready (paths in store, nothing packed), s | $cold_one | $pack_gzip (tar, gzip -6 alone) | $r_cold |"
  echo "| 20 concurrent cold pulls: slowest, s (builds: $builds20) | $cold_twenty | $cold_one (one cold pull) | $r_twenty |"
  echo "| docker pull shell/curl/jq, empty engine, best of 3, s | $pull_default ($n_default layers, default) | $pull_many ($n_many layers, --max-layers 40) | $r_pull |"
  echo "| layers shell/curl and shell/jq begin with in common (default) | $shared | | |"
  echo "| server peak RSS after 1-3, MiB | $((rss_ours / 1024)) | | |"
  echo "| server peak RSS after 64 concurrent downloads of a 64 MiB layer ($b_big MB/s), MiB | $((rss_big / 1024)) (anonymous, sampled: $((anon_big / 1024)); the rest is the mapped blob) | | |"
  echo
  echo "Packing: the build's own packing stage (tar, gzip, SHA-256 of both sides,"
  echo "blobs written and fsynced), best of three fresh state directories; cold to"
  echo "ready: a manifest GET on a fresh state directory (Nix evaluation included)."
  echo
  echo "gzip level, from benches/pack.rs on the same closure (one core, one layer per path):"
  echo
  echo '```'
  cat "$WORK/levels.txt"
  echo '```'
  if [ -n "$others" ]; then echo; echo "$others"; fi
} | tee benches/results.md
