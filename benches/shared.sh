#!/usr/bin/env bash
# Shared storage (issue 14): two nixery instances on one Garage bucket
# against two independent instances (own disks), side by side in one run.
#  1. Builds done and time to the first pull on the second instance, after the
#     first instance built the image (shell/curl/jq): with a shared bucket the
#     second one reads the index and serves; independent, it builds and packs
#     it itself (from a warm /nix/store: the host's, which both share here).
#  2. Blob throughput of the image's largest layer: from local disk (the
#     builder's own copy) and through the bucket (an instance whose local
#     cache is kept at 1 byte, so each GET streams from Garage).
# Appends its table to benches/results.md. Usage: benches/shared.sh [rounds]
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${1:-5}"
cargo build --release --quiet
bash scripts/garage.sh
BIN=$PWD/target/release/nixery
GARAGE=/var/cache/nixery-ci/garage/bin/garage
WORK=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

# One Garage node, one bucket, one key.
S3=3920
cat >"$WORK/garage.toml" <<EOF
metadata_dir = "$WORK/garage/meta"
data_dir = "$WORK/garage/data"
db_engine = "lmdb"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:3921"
rpc_public_addr = "127.0.0.1:3921"
rpc_secret = "6a4b5f8c2d1e0f3a9b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a"
[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$S3"
root_domain = ".s3.garage.localhost"
EOF
g() { "$GARAGE" -c "$WORK/garage.toml" "$@"; }
"$GARAGE" -c "$WORK/garage.toml" server >/dev/null 2>"$WORK/garage.log" &
pids+=($!)
for _ in $(seq 100); do g status >/dev/null 2>&1 && break; sleep 0.2; done
g layout assign -z dc1 -c 1G "$(g node id -q | cut -d@ -f1)" >/dev/null
g layout apply --version 1 >/dev/null
export AWS_ACCESS_KEY_ID=GK31c2f218a2e44f485b94239e
export AWS_SECRET_ACCESS_KEY=b892c0665f0ada8a4755dae98baa3b133590e3b61b7ee6a5e96466e6a9fc19c4
export AWS_REGION=garage
for _ in $(seq 50); do g key import --yes -n bench "$AWS_ACCESS_KEY_ID" "$AWS_SECRET_ACCESS_KEY" >/dev/null 2>&1 && break; sleep 0.3; done
g bucket create bench >/dev/null
g bucket allow --read --write --owner bench --key "$AWS_ACCESS_KEY_ID" >/dev/null

IMAGE=shell/curl/jq
ACCEPT='Accept: application/vnd.oci.image.manifest.v1+json'
port=5300
start() { # name, extra flags...: starts an instance; its address in $ADDR
  local name=$1; shift
  port=$((port + 1))
  "$BIN" serve --listen "127.0.0.1:$port" --state-dir "$WORK/$name" \
    --pkgs-path nix/offline-pkgs --nix-option substituters= "$@" >/dev/null 2>"$WORK/$name.log" &
  pids+=($!)
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/v2/" >/dev/null && break; sleep 0.1; done
  ADDR="127.0.0.1:$port"
}
s3flags() { echo --storage-backend s3 --s3-endpoint "http://127.0.0.1:$S3" --s3-bucket bench --s3-prefix "$1"; }
seconds() { python3 -c "import sys,time,subprocess; t=time.time(); subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); print(f'{time.time()-t:.3f}')" "$@"; }
median() { python3 -c "import sys,statistics; print(f'{statistics.median(float(x) for x in sys.argv[1:]):.3f}')" "$@"; }
ratio() { python3 -c "import sys; print(f'{float(sys.argv[1])/float(sys.argv[2]):.2f}')" "$1" "$2"; }
builds() { curl -sf "http://$1/metrics" | awk '$1 == "nixery_builds_total" { print $2 }'; }
pull() { seconds curl -sf -o /dev/null -H "$ACCEPT" "http://$1/v2/$IMAGE/manifests/latest"; }

# 1. The second instance's first pull, each round with fresh instances.
SHARED="" INDEP="" SB=0 IB=0
for r in $(seq "$ROUNDS"); do
  start "sa$r" $(s3flags "round$r"); a=$ADDR
  start "sb$r" $(s3flags "round$r"); b=$ADDR
  pull "$a" >/dev/null
  SHARED+="$(pull "$b") "
  SB=$((SB + $(builds "$a") + $(builds "$b")))
  start "ia$r"; c=$ADDR
  start "ib$r"; d=$ADDR
  pull "$c" >/dev/null
  INDEP+="$(pull "$d") "
  IB=$((IB + $(builds "$c") + $(builds "$d")))
  for p in "${pids[@]:1}"; do kill "$p" 2>/dev/null || true; done
  pids=("${pids[0]}")
done

# 2. Blob throughput: the largest layer, from local disk and through the bucket.
start tl $(s3flags thr); a=$ADDR
curl -sf -o /dev/null -H "$ACCEPT" "http://$a/v2/$IMAGE/manifests/latest"
start tb $(s3flags thr) --storage-limit 1; b=$ADDR
curl -sf -o /dev/null -H "$ACCEPT" "http://$b/v2/$IMAGE/manifests/latest"
read -r layer size < <(curl -sf -H "$ACCEPT" "http://$a/v2/$IMAGE/manifests/latest" |
  python3 -c "import json,sys; l=max(json.load(sys.stdin)['layers'], key=lambda l: l['size']); print(l['digest'], l['size'])")
LOCAL="" BUCKET=""
for _ in $(seq $((ROUNDS * 2))); do
  LOCAL+="$(seconds curl -sf -o /dev/null "http://$a/v2/$IMAGE/blobs/$layer") "
  BUCKET+="$(seconds curl -sf -o /dev/null "http://$b/v2/$IMAGE/blobs/$layer") "
done
mbps() { python3 -c "import sys; print(f'{int(sys.argv[1])/float(sys.argv[2])/1e6:.0f}')" "$1" "$2"; }

ms=$(median $SHARED); mi=$(median $INDEP); bl=$(median $LOCAL); bb=$(median $BUCKET)
{
  echo
  echo "## Shared storage (benches/shared.sh)"
  echo
  echo "Run $(date -u +%Y-%m-%dT%H:%MZ) on $(nproc) cores; Garage $("$GARAGE" --version 2>/dev/null | head -1 | awk '{print $2}' | sed s/cargo://) single node on loopback; $IMAGE; median of $ROUNDS rounds, fresh instances each round."
  echo
  echo "| | shared bucket | independent disks | shared/independent |"
  echo "|---|---|---|---|"
  echo "| builds for $ROUNDS rounds of 2 instances | $SB | $IB | |"
  echo "| second instance's first manifest GET, s | $ms | $mi | $(ratio "$ms" "$mi") |"
  echo
  echo "| largest layer ($size bytes), GET | local disk | through the bucket | bucket/local time |"
  echo "|---|---|---|---|"
  echo "| median s (MB/s) | $bl ($(mbps "$size" "$bl")) | $bb ($(mbps "$size" "$bb")) | $(ratio "$bb" "$bl") |"
} | tee -a benches/results.md
