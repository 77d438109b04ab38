#!/usr/bin/env bash
# The Nix version matrix: runs the tests that drive real Nix (registry, real
# clients, controller) with another Nix than the host's, in a Debian 13 root
# with its Nix 2.26 (scripts/debian13-root.sh makes it once, then reuses it).
# The test binaries are built on the host and run inside the root, where Nix,
# /nix/store, the offline package set's host binaries and the clients are the
# root's own; Docker and containerd are the host's, through their sockets.
# Usage: scripts/nix-matrix.sh [ROOT] [-- TEST-BINARY-ARGS...]
set -euo pipefail
cd "$(dirname "$0")/.."
root="${NIXERY_TRIXIE_ROOT:-/var/cache/nixery-ci/trixie}"
if [ $# -gt 0 ] && [ "$1" != "--" ]; then root="$1"; shift; fi
[ "${1:-}" = "--" ] && shift
bash scripts/debian13-root.sh "$root"
nix_version=$(bash scripts/in-root.sh "$root" nix --version)
# Open the root's store once before tests run Nix in parallel: on a fresh
# /nix, Nix 2.26 creates /nix/var/nix/gcroots/profiles on first use, and
# processes starting together race on it ("creating symlink ... File exists").
bash scripts/in-root.sh "$root" nix-instantiate --eval -E 1 >/dev/null
tests=(nix_contract clients clients_controller controller flake)
mapfile -t bins < <(
  cargo test --no-run --message-format=json $(printf -- '--test %s ' "${tests[@]}") 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["executable"])'
)
[ "${#bins[@]}" -eq "${#tests[@]}" ] || { echo "nix-matrix: expected ${#tests[@]} test binaries, got ${#bins[@]}" >&2; exit 1; }
status=0
# The offline set's arm64 root (scripts/offline-root.sh), where it exists:
# the root's Nix evaluates the set for aarch64-linux as the host's does.
offline_roots="${NIXERY_OFFLINE_ROOTS:-/var/cache/nixery-offline}"
if [ -d "$offline_roots" ]; then
  export IN_ROOT_BINDS="${IN_ROOT_BINDS:+$IN_ROOT_BINDS:}$offline_roots"
fi
for bin in "${bins[@]}"; do
  # Cargo's own wording, so .ci/run counts this binary (and notices a crash).
  echo "     Running $(basename "$bin") in Debian 13 with $nix_version"
  bash scripts/in-root.sh "$root" env ${CI:+CI=$CI} RUST_BACKTRACE=1 "$bin" "$@" || status=1
done
exit "$status"
