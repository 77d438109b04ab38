#!/usr/bin/env bash
# Blob throughput by size, nixery against the CNCF reference registry
# (Debian's docker-registry, logging off), side by side in one run: the same
# blobs (copied into the reference with skopeo, digests preserved) under wrk
# on loopback: shell/curl's config, its layer nearest 3 MB, and the 64 MiB
# layer of `big`. Appends its table to benches/results.md.
# Usage: benches/blobs.sh [seconds per load run]
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/reference-registry.sh
DURATION="${1:-10}"
cargo build --release --quiet
BIN=$PWD/target/release/nixery
WORK=$(mktemp -d)
OURS=127.0.0.1:5140
REF=127.0.0.1:5141
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT
"$BIN" serve --listen "$OURS" --state-dir "$WORK/ours" --pkgs-path nix/offline-pkgs \
  --nix-option substituters= >/dev/null 2>"$WORK/ours.log" &
pids+=($!)
reference_registry
for a in $OURS $REF; do
  for _ in $(seq 100); do curl -sf "http://$a/v2/" >/dev/null && break; sleep 0.1; done
done
ACCEPT="Accept: application/vnd.oci.image.manifest.v1+json"
for img in shell/curl big; do
  curl -sf -o "$WORK/$(basename $img).json" -H "$ACCEPT" "http://$OURS/v2/$img/manifests/latest"
  skopeo copy -q --preserve-digests --src-tls-verify=false --dest-tls-verify=false \
    "docker://$OURS/$img:latest" "docker://$REF/$img:latest"
done
pick() { python3 -c "
import json, sys
m = json.load(open(sys.argv[1]))
if sys.argv[2] == 'config':
    d = m['config']
else:
    d = min(m['layers'], key=lambda l: abs(l['size'] - int(sys.argv[2])))
print(d['digest'], d['size'])" "$@"; }
wrk_mbs() { awk '/Transfer\/sec/ {v=$2; if (v ~ /GB/) {sub("GB","",v); v*=1024} else if (v ~ /MB/) {sub("MB","",v)} else if (v ~ /KB/) {sub("KB","",v); v/=1024}; print v}' "$1"; }
wrk_ok() { ! grep -qE "Non-2xx|Socket errors" "$1"; }
ratio() { python3 -c "import sys; print(f'{float(sys.argv[1])/float(sys.argv[2]):.2f}')" "$1" "$2"; }
rows=()
for spec in "config:shell/curl:curl.json:config:8" "layer:shell/curl:curl.json:3000000:8" "64 MiB layer:big:big.json:67108864:8"; do
  IFS=: read -r label img file target conns <<<"$spec"
  read -r digest size < <(pick "$WORK/$file" "$target")
  declare -A mb=()
  for who in ours ref; do
    addr=$OURS; [ $who = ref ] && addr=$REF
    wrk -t2 -c"$conns" -d"${DURATION}s" --timeout 30s "http://$addr/v2/$img/blobs/$digest" >"$WORK/$who.txt"
    wrk_ok "$WORK/$who.txt" || { echo "blobs: a wrk run against $who failed" >&2; cat "$WORK/$who.txt" >&2; exit 1; }
    mb[$who]=$(wrk_mbs "$WORK/$who.txt")
  done
  rows+=("| $label ($size B) | ${mb[ours]} | ${mb[ref]} | $(ratio "${mb[ours]}" "${mb[ref]}") |")
done
{
  echo
  echo "## Blob throughput by size (benches/blobs.sh)"
  echo
  echo "Run $(date -u +%Y-%m-%dT%H:%MZ) on $(nproc) cores; wrk -t2 -c8, ${DURATION}s each, loopback; the reference is docker-registry $(docker-registry --version 2>/dev/null | awk '{print $3}') serving the same blobs."
  echo
  echo "| blob | nixery MB/s | reference MB/s | ours/ref |"
  echo "|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
} | tee -a benches/results.md
