#!/usr/bin/env bash
# What a flake source costs a new image: `nixery build hello` from the offline
# set as a path source, against the same package through a local git flake
# whose nixpkgs input is that set (examples/flake, as tests/flake.rs makes
# it), and the lock alone (`nix flake metadata`). Store paths are present, the
# state directory is fresh each run: evaluation, lock, packing. hyperfine, the
# two builds interleaved by its runs; appends its table to benches/results.md.
# The offline set reads host files, so the flake is evaluated with
# pure-eval=false (as in tests/flake.rs); users' flakes are evaluated pure.
# Usage: benches/flake.sh [runs]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-15}
cargo build --release --quiet
BIN=${CARGO_TARGET_DIR:-$PWD/target}/release/nixery
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
FEATURES=(--extra-experimental-features 'nix-command flakes')
app=$WORK/hello-app
mkdir -p "$app"
cp examples/flake/hello-app.sh "$app/"
sed "s|inputs.nixpkgs.url = \"github:NixOS/nixpkgs/nixos-24.11\";|inputs.nixpkgs.url = \"path:$PWD/nix/offline-pkgs\";|" \
  examples/flake/flake.nix >"$app/flake.nix"
grep -q "path:$PWD/nix/offline-pkgs" "$app/flake.nix" || { echo "flake.sh: examples/flake/flake.nix's nixpkgs input changed" >&2; exit 1; }
git -C "$app" init -q -b main
git -C "$app" add -A
(cd "$app" && nix "${FEATURES[@]}" --option substituters '' flake lock 2>/dev/null)
git -C "$app" add -A
git -C "$app" -c user.email=bench@nixery -c user.name=bench commit -qm bench
flake="git+file://$app?ref=main"
common=(--nix-option substituters= --state-dir "$WORK/state")
path_cmd="$BIN build hello --pkgs-path nix/offline-pkgs ${common[*]}"
flake_cmd="$BIN build hello --pkgs-flake $flake --nix-option pure-eval=false ${common[*]}"
lock_cmd="nix --extra-experimental-features nix-command\\ flakes flake metadata --json --no-write-lock-file $flake"
# Same package, same image: the flake reaches the set's hello through its
# legacyPackages.
d_path=$($path_cmd 2>/dev/null | tail -1 | sed 's/.*@//')
rm -rf "$WORK/state"
d_flake=$($flake_cmd 2>/dev/null | tail -1 | sed 's/.*@//')
hyperfine -N --warmup 2 --runs "$RUNS" --prepare "rm -rf $WORK/state" \
  --export-json "$WORK/h.json" -n path "$path_cmd" -n flake "$flake_cmd" -n lock "$lock_cmd" >&2
read -r p f l < <(python3 -c "import json,sys; r={x['command']:x for x in json.load(open(sys.argv[1]))['results']}; print(*(f\"{r[k]['median']*1000:.1f}\" for k in ('path','flake','lock')))" "$WORK/h.json")
{
  echo
  echo "## A flake as the package source (benches/flake.sh)"
  echo
  echo "Run $(date -u +%Y-%m-%dT%H:%MZ) on $(nproc) cores, $(git rev-parse --short HEAD), $(nix --version); \`nixery build hello\`, store paths present, fresh state directory; median of $RUNS runs (hyperfine), ms."
  echo
  echo "| path source | git flake | ratio | of which the lock (\`nix flake metadata\`) |"
  echo "|---|---|---|---|"
  echo "| $p | $f | $(python3 -c "print(f'{$f/$p:.2f}')")× | $l |"
  echo
  if [ "$d_path" = "$d_flake" ]; then
    echo "Both give the same image: $d_path."
  else
    echo "The images differ: path $d_path, flake $d_flake."
  fi
} | tee -a benches/results.md
