#!/usr/bin/env bash
# Makes (once) what the offline package set needs to build for another
# architecture on this machine (nix/offline-pkgs with system = aarch64-linux):
#  - a root of Debian 12's arm64 packages of the programs it wraps, downloaded
#    with their dependencies and unpacked (never installed: the host's dpkg
#    and apt state are not touched), with its host.json (generate-host.py);
#  - qemu-user-static registered with binfmt_misc, so the host's Nix runs the
#    set's aarch64 builders (busybox, patchelf) under emulation.
# Nix must also be told it may build for that system: `extra-platforms =
# aarch64-linux` in nix.conf, or NIX_CONFIG (nixery serve --systems says so).
# Reused while its package list and generate-host.py are unchanged.
# Usage: scripts/offline-root.sh [SYSTEM]   (aarch64-linux, the only one known)
set -euo pipefail
system="${1:-aarch64-linux}"
case "$system" in
  aarch64-linux) arch=arm64 triplet=aarch64-linux-gnu qemu=qemu-aarch64 ;;
  *) echo "offline-root: unknown system '$system' (known: aarch64-linux)" >&2; exit 2 ;;
esac
roots="${NIXERY_OFFLINE_ROOTS:-/var/cache/nixery-offline}"
root="$roots/$system"
packages=(
  busybox-static patchelf                           # the builders
  bash coreutils moreutils nano                     # the shell meta-package
  hello curl jq grep sed findutils less             # other programs of the set
)
here="$(cd "$(dirname "$0")" && pwd)"
generator="$here/../nix/offline-pkgs/generate-host.py"
stamp="$root/.stamp-$( (printf '%s\n' "${packages[@]}"; cat "$generator") | sha256sum | cut -c1-12)"

# Emulation first: a kept root is of no use without it (binfmt_misc is not
# kept across boots).
export DEBIAN_FRONTEND=noninteractive
if ! dpkg -s qemu-user-static binfmt-support >/dev/null 2>&1; then
  echo "offline-root: installing qemu-user-static and binfmt-support"
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends qemu-user-static binfmt-support >/dev/null
fi
if [ ! -e /proc/sys/fs/binfmt_misc/status ]; then
  mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
if [ ! -e "/proc/sys/fs/binfmt_misc/$qemu" ]; then
  update-binfmts --enable "$qemu" >/dev/null 2>&1 || update-binfmts --import "$qemu"
fi
grep -q '^enabled' "/proc/sys/fs/binfmt_misc/$qemu" || {
  echo "offline-root: binfmt_misc has no enabled $qemu handler; $system builders cannot run here" >&2
  exit 1
}

if [ -e "$stamp" ]; then
  echo "offline-root: reusing $root"
  exit 0
fi
echo "offline-root: downloading Debian's $arch packages into $root"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/archives/partial" "$work/cache"
: >"$work/status"
# apt with a state of its own: the host's architectures, package lists and
# dpkg status stay as they are. An empty status makes apt fetch every
# dependency, as for a new system.
apt_opts=(
  -o "APT::Architecture=$arch" -o "APT::Architectures::=$arch"
  -o "Dir::State::Lists=$work/lists" -o "Dir::State::status=$work/status"
  -o "Dir::Cache=$work/cache" -o "Dir::Cache::archives=$work/archives" -o Debug::NoLocking=1
)
apt-get "${apt_opts[@]}" update -q >"$work/apt.log" 2>&1 || { tail "$work/apt.log"; exit 1; }
apt-get "${apt_opts[@]}" install -y -q --download-only --no-install-recommends "${packages[@]}" \
  >>"$work/apt.log" 2>&1 || { tail "$work/apt.log"; exit 1; }

new="$root.new"
rm -rf "$new"
mkdir -p "$new/.debs"
for deb in "$work"/archives/*.deb; do
  name="$(dpkg-deb -f "$deb" Package)"
  dpkg-deb -x "$deb" "$new"
  # generate-host.py reads a package's files from here (there is no dpkg -L).
  dpkg-deb -c "$deb" | awk '{ print $NF }' >"$new/.debs/$name.list"
done
rm -rf "$new"/usr/share/{doc,man,info,locale}
# Merged /usr, as an installed Debian 12 has it: bin, sbin and lib are links.
for d in bin sbin lib; do
  if [ -d "$new/$d" ] && [ ! -L "$new/$d" ]; then
    mkdir -p "$new/usr/$d"
    cp -a "$new/$d/." "$new/usr/$d/"
    rm -rf "${new:?}/$d"
    ln -s "usr/$d" "$new/$d"
  fi
done
python3 "$generator" --root "$new" --triplet "$triplet" >"$new/host.json.tmp"
# host.json names files under the final root (generate-host.py keeps paths
# root-relative), so the root can move into place as it is.
mv "$new/host.json.tmp" "$new/host.json"
rm -rf "$root"
mv "$new" "$root"
touch "$stamp"
"$root/usr/bin/busybox" true || { echo "offline-root: $root/usr/bin/busybox does not run" >&2; exit 1; }
echo "offline-root: $root ready ($(du -sh "$root" | cut -f1))"
