#!/usr/bin/env bash
# Cold image, side by side with a baseline build of nixery: the first manifest
# GET of shell/curl/jq on a fresh state directory (store paths already in
# /nix/store, nothing packed), for this checkout and for BASE (a git revision,
# built in a worktree with its own copy of target/release), alternating which
# goes first, median of ROUNDS. Appends its table to benches/results.md.
# IMAGE (default shell/curl/jq) is the image asked for; `big` is one 64 MiB
# store path, a layer that one core would pack alone.
# Usage: [IMAGE=name] benches/cold.sh BASE [rounds]
set -euo pipefail
cd "$(dirname "$0")/.."
BASE_REV=${1:?usage: benches/cold.sh BASE-REVISION [rounds]}
ROUNDS=${2:-7}
IMAGE=${IMAGE:-shell/curl/jq}
cargo build --release --quiet
NEW=$PWD/target/release/nixery
BASE_DIR=/tmp/nixery-cold-base
BASE_TARGET=/tmp/nixery-cold-base-target
if [ ! -x "$BASE_TARGET/release/nixery" ] || [ "$(cat "$BASE_TARGET/rev" 2>/dev/null)" != "$(git rev-parse "$BASE_REV")" ]; then
  rm -rf "$BASE_DIR"; git worktree prune
  git worktree add -f "$BASE_DIR" "$BASE_REV" -q
  mkdir -p "$BASE_TARGET"; [ -d "$BASE_TARGET/release" ] || cp -a target/release "$BASE_TARGET/"
  (cd "$BASE_DIR" && CARGO_TARGET_DIR=$BASE_TARGET cargo build --release --quiet)
  git rev-parse "$BASE_REV" >"$BASE_TARGET/rev"
fi
BASE=$BASE_TARGET/release/nixery
WORK=$(mktemp -d)
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT
seconds() { python3 -c "import sys,time,subprocess; t=time.time(); subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); print(f'{time.time()-t:.3f}')" "$@"; }
median() { python3 -c "import sys,statistics; print(f'{statistics.median(float(x) for x in sys.argv[1:]):.3f}')" "$@"; }
cold() { # cold BINARY NAME -> seconds to the first manifest
  local state=$WORK/$2-$RANDOM
  "$1" serve --listen 127.0.0.1:5150 --state-dir "$state" --pkgs-path nix/offline-pkgs \
    --nix-option substituters= >/dev/null 2>"$state.log" &
  pid=$!
  for _ in $(seq 100); do curl -sf http://127.0.0.1:5150/v2/ >/dev/null && break; sleep 0.1; done
  seconds curl -sf -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
    "http://127.0.0.1:5150/v2/$IMAGE/manifests/latest"
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
  rm -rf "$state"
}
# Store paths present for both: one build first, not timed.
cold "$NEW" warmup >/dev/null
N="" B=""
for r in $(seq "$ROUNDS"); do
  if [ $((r % 2)) = 0 ]; then N+="$(cold "$NEW" new) "; B+="$(cold "$BASE" base) ";
  else B+="$(cold "$BASE" base) "; N+="$(cold "$NEW" new) "; fi
done
mn=$(median $N); mb=$(median $B)
{
  echo
  echo "## Cold image against a baseline build (benches/cold.sh)"
  echo
  echo "Run $(date -u +%Y-%m-%dT%H:%MZ) on $(nproc) cores; $IMAGE, store paths present, fresh state directory; median of $ROUNDS alternating rounds, s."
  echo
  echo "| this checkout ($(git rev-parse --short HEAD)) | baseline ($(git rev-parse --short "$BASE_REV")) | ratio |"
  echo "|---|---|---|"
  echo "| $mn | $mb | $(python3 -c "print(f'{$mn/$mb:.2f}')") |"
  echo
  echo "Each: $N / baseline: $B"
} | tee -a benches/results.md
