#!/usr/bin/env bash
# Layer compression on loopback, where an agent's pulls travel: the same
# image (shell/curl/jq) from three nixery registries that differ only in
# --layer-compression (gzip, zstd, none), pulled into an empty engine by
# docker (gzip and none: Docker before 23 reads no zstd) and by containerd's
# ctr (all three). Pulls alternate between the registries, five rounds; the
# median is reported, with the ratio to gzip (the default). Warm registries
# (layers packed before timing).
# Appends its table to benches/results.md. Usage: benches/compression.sh [rounds]
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${1:-5}"
cargo build --release --quiet
BIN=$PWD/target/release/nixery
WORK=$(mktemp -d)
pids=()
NS="nixery-bench-$$"
SOCK=$(for s in /run/docker/containerd/containerd.sock /run/containerd/containerd.sock; do [ -S "$s" ] && echo "$s" && break; done)
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
ctr_() { ctr -a "$SOCK" -n "$NS" "$@"; }

declare -A ADDR=([gzip]=127.0.0.1:5120 [zstd]=127.0.0.1:5121 [none]=127.0.0.1:5122)
for c in gzip zstd none; do
  "$BIN" serve --listen "${ADDR[$c]}" --state-dir "$WORK/$c" --layer-compression "$c" \
    --pkgs-path nix/offline-pkgs --nix-option substituters= 2>"$WORK/$c.log" &
  pids+=($!)
  for _ in $(seq 100); do curl -sf "http://${ADDR[$c]}/v2/" >/dev/null && break; sleep 0.1; done
  curl -sf -o /dev/null -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
    "http://${ADDR[$c]}/v2/shell/curl/jq/manifests/latest"
done

seconds() { python3 -c "import sys,time,subprocess; t=time.time(); subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); print(f'{time.time()-t:.3f}')" "$@"; }
median() { python3 -c "import sys,statistics; print(f'{statistics.median(float(x) for x in sys.argv[1:]):.3f}')" "$@"; }
ratio() { python3 -c "import sys; print(f'{float(sys.argv[1])/float(sys.argv[2]):.2f}')" "$1" "$2"; }
bytes_of() { curl -sf -H 'Accept: application/vnd.oci.image.manifest.v1+json' "http://$1/v2/shell/curl/jq/manifests/latest" |
  python3 -c "import json,sys; print(sum(l['size'] for l in json.load(sys.stdin)['layers']))"; }
clear_docker() { docker rmi -f "$1" >/dev/null 2>&1 || true; }
# --sync: content and snapshots go with the image now, not at the next GC.
clear_ctr() { ctr_ images rm --sync "$1" >/dev/null 2>&1 || true; }

declare -A DOCKER CTR
for _ in $(seq "$ROUNDS"); do
  for c in gzip none; do
    img="${ADDR[$c]}/shell/curl/jq:latest"
    clear_docker "$img"
    DOCKER[$c]+="$(seconds docker pull -q "$img") "
    clear_docker "$img"
  done
  if [ -n "$SOCK" ]; then
    for c in gzip zstd none; do
      img="${ADDR[$c]}/shell/curl/jq:latest"
      clear_ctr "$img"
      CTR[$c]+="$(seconds ctr -a "$SOCK" -n "$NS" images pull --plain-http "$img") "
      clear_ctr "$img"
    done
  fi
done
[ -n "$SOCK" ] && ctr -a "$SOCK" namespaces rm "$NS" >/dev/null 2>&1 || true

dg=$(median ${DOCKER[gzip]}); dn=$(median ${DOCKER[none]})
{
  echo
  echo "## Layer compression on loopback (benches/compression.sh)"
  echo
  echo "Run $(date -u +%Y-%m-%dT%H:%MZ) on $(nproc) cores; shell/curl/jq, warm registries, empty client each time; median of $ROUNDS alternating pulls, s."
  echo
  echo "| client | gzip (default) | zstd | none | none/gzip |"
  echo "|---|---|---|---|---|"
  echo "| layer bytes | $(bytes_of "${ADDR[gzip]}") | $(bytes_of "${ADDR[zstd]}") | $(bytes_of "${ADDR[none]}") | |"
  echo "| docker pull (Docker $(docker version --format '{{.Server.Version}}')) | $dg | (reads no zstd) | $dn | $(ratio "$dn" "$dg") |"
  if [ -n "$SOCK" ]; then
    cg=$(median ${CTR[gzip]}); cz=$(median ${CTR[zstd]}); cn=$(median ${CTR[none]})
    echo "| ctr images pull (pull and unpack) | $cg | $cz | $cn | $(ratio "$cn" "$cg") |"
  fi
} | tee -a benches/results.md
