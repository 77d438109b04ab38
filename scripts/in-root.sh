#!/usr/bin/env bash
# Runs a command inside another Debian root (scripts/debian13-root.sh) in a
# private mount namespace: /proc, /sys, /dev, this repository at the same path,
# the directories in IN_ROOT_BINDS, and the Docker and containerd sockets are
# visible; the root keeps its own /nix. Everything is unmounted when the command exits.
# Usage: scripts/in-root.sh ROOT COMMAND [ARGS...]
set -euo pipefail
root="$1"; shift
repo="$(cd "$(dirname "$0")/.." && pwd)"
exec unshare --mount --propagation private -- bash -euo pipefail -c '
root="$1"; repo="$2"; shift 2
# The root a mount point of its own, as / is: podman applies layers in a
# helper that makes / private, which fails (EINVAL) on a plain directory.
mount --bind "$root" "$root"
mount -t proc proc "$root/proc"
mount --rbind /sys "$root/sys"
mount --rbind /dev "$root/dev"
mkdir -p "$root/$repo" "$root/run/docker/containerd" "$root/run/containerd" "$root/tmp"
mount --bind "$repo" "$root/$repo"
# The generated host.json of this root, over the checked-in one (this view only).
if [ -f "$root/etc/nixery/host.json" ]; then
  mount --bind "$root/etc/nixery/host.json" "$root/$repo/nix/offline-pkgs/host.json"
fi
# Directories a caller names in IN_ROOT_BINDS (colon-separated; the test
# temporary directories), at the same path.
for d in $(printf %s "${IN_ROOT_BINDS:-}" | tr ":" " "); do
  if [ -d "$d" ]; then mkdir -p "$root/$d"; mount --bind "$d" "$root/$d"; fi
done
# Cargo target dirs outside the repo (CARGO_TARGET_DIR) at the same path too.
if [ -n "${CARGO_TARGET_DIR:-}" ] && [ -d "$CARGO_TARGET_DIR" ]; then
  mkdir -p "$root/$CARGO_TARGET_DIR"; mount --bind "$CARGO_TARGET_DIR" "$root/$CARGO_TARGET_DIR"
fi
for s in /run/docker.sock /var/run/docker.sock; do
  if [ -S "$s" ]; then touch "$root/run/docker.sock"; mount --bind "$s" "$root/run/docker.sock"; break; fi
done
[ -d /run/containerd ] && mount --bind /run/containerd "$root/run/containerd"
[ -d /run/docker/containerd ] && mount --bind /run/docker/containerd "$root/run/docker/containerd"
# ctr mounts snapshots on the client side: containerd'"'"'s state at the same path.
for d in /var/lib/docker/containerd /var/lib/containerd; do
  if [ -d "$d" ]; then mkdir -p "$root/$d"; mount --rbind "$d" "$root/$d"; fi
done
cd "$root/$repo"
exec chroot "$root" /usr/bin/env -C "$repo" PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root "$@"
' in-root "$root" "$repo" "$@"
