#!/usr/bin/env bash
# A Pod start through the CRI, side by side in one run, reported as ratios:
# the offline set's largeApp (512 MiB in about 20,000 files, 34 store paths)
# on a private containerd, driven as a kubelet drives it (benches/cri_start.rs):
#   - pre-pulled from nixery (what the agent does when a NixImage is Ready);
#   - an ordinary pull from nixery, with gzip, zstd and uncompressed layers;
#   - an ordinary pull of the same image from the CNCF reference registry
#     (Debian's docker-registry, the gzip image copied with skopeo).
# Also how long the pre-pull takes and the disk it adds, and how long the
# image takes to be ready in each registry (store paths present).
# Appends its section to benches/results.md. Usage: benches/cri.sh [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/reference-registry.sh
ROUNDS="${1:-5}"
IMAGE=largeapp:latest
bash scripts/install-deps.sh >/dev/null
cargo build --release --quiet
BIN=$PWD/target/release/nixery
WORK=$(mktemp -d -p /var/tmp)
REF=127.0.0.1:5139
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

export NIX_CONFIG="substituters ="
echo "cri bench: building largeApp with Nix (once; about a minute)" >&2
nix-build --no-out-link -E '(import ./nix/offline-pkgs {}).largeApp' >/dev/null

declare -A ADDR=([gzip]=127.0.0.1:5136 [zstd]=127.0.0.1:5137 [none]=127.0.0.1:5138)
declare -A READY
ACCEPT="Accept: application/vnd.oci.image.manifest.v1+json"
for c in gzip zstd none; do
  "$BIN" serve --listen "${ADDR[$c]}" --state-dir "$WORK/$c" --layer-compression "$c" \
    --pkgs-path nix/offline-pkgs --nix-option substituters= 2>"$WORK/$c.log" &
  pids+=($!)
  for _ in $(seq 100); do curl -sf "http://${ADDR[$c]}/v2/" >/dev/null && break; sleep 0.1; done
  start=$(date +%s.%N)
  curl -sf -o /dev/null -H "$ACCEPT" "http://${ADDR[$c]}/v2/${IMAGE%:*}/manifests/latest"
  READY[$c]=$(python3 -c "import sys,time; print(f'{time.time()-float(sys.argv[1]):.1f}')" "$start")
  curl -sf -o /dev/null "http://${ADDR[$c]}/v2/pause/manifests/latest"
done
bytes_of() { curl -sf -H "$ACCEPT" "http://$1/v2/${IMAGE%:*}/manifests/latest" |
  python3 -c "import json,sys; print(round(sum(l['size'] for l in json.load(sys.stdin)['layers'])/1048576))"; }

reference_registry
skopeo copy -q --preserve-digests --src-tls-verify=false --dest-tls-verify=false \
  "docker://${ADDR[gzip]}/$IMAGE" "docker://$REF/$IMAGE"

cargo bench --quiet --bench cri_start --no-run 2>/dev/null
out=$(NIXERY_BENCH_IMAGE=$IMAGE NIXERY_BENCH_ROUNDS=$ROUNDS NIXERY_BENCH_COMMAND=large-app \
  NIXERY_BENCH_OURS="gzip=${ADDR[gzip]},zstd=${ADDR[zstd]},none=${ADDR[none]}" \
  NIXERY_BENCH_REF=$REF NIXERY_BENCH_PAUSE="${ADDR[gzip]}/pause:latest" \
  cargo bench --quiet --bench cri_start)
{
  echo
  echo "## Pod start through the CRI: pre-pulled, and pulled (benches/cri.sh)"
  echo
  echo "Run $(date -u +%Y-%m-%dT%H:%MZ) on $(nproc) cores. largeApp: 512 MiB in about 20,000 files over 34 store paths; layers of $(bytes_of "${ADDR[gzip]}") MiB with gzip, $(bytes_of "${ADDR[zstd]}") MiB with zstd, $(bytes_of "${ADDR[none]}") MiB uncompressed. Ready in each registry (store paths present, layers packed on the first request): gzip ${READY[gzip]} s, zstd ${READY[zstd]} s, none ${READY[none]} s."
  echo
  echo "$out"
} | tee -a benches/results.md
