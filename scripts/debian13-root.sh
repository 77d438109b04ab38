#!/usr/bin/env bash
# Makes (once) a Debian 13 (trixie) root with its own Nix (2.26) and the host
# programs the offline package set wraps, for the Nix version matrix in .ci/run
# (scripts/nix-matrix.sh), and Debian 13's cosign and oras for tests/attest.rs.
# Reused while its package list is unchanged.
# Usage: scripts/debian13-root.sh [DIR]   (default /var/cache/nixery-ci/trixie)
set -euo pipefail
root="${1:-${NIXERY_TRIXIE_ROOT:-/var/cache/nixery-ci/trixie}}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
packages=(
  nix-bin nix-setup-systemd busybox-static patchelf   # Nix and the offline set's tools
  hello curl jq less moreutils nano ca-certificates netbase # what the offline set wraps
  python3 binutils dpkg                                # generate-host.py (readelf, dpkg -L)
  skopeo umoci git containerd docker-cli podman        # the clients the tests drive
  cosign oras                                           # signatures and referrers (tests/attest.rs)
)
generator="$(dirname "$0")/../nix/offline-pkgs/generate-host.py"
stamp="$root/.nixery-root-$(printf '%s\n' "${packages[@]}" | sha256sum | cut -c1-12)"
# host.json is written again whenever the generator changes.
host_stamp="$root/etc/nixery/.host-json-$(sha256sum <"$generator" | cut -c1-12)"
write_host_json() {
  # The offline package set wraps this root's own binaries and libraries.
  mkdir -p "$root/etc/nixery"
  rm -f "$root"/etc/nixery/.host-json-*
  chroot "$root" python3 - <"$generator" >"$root/etc/nixery/host.json.new"
  mv "$root/etc/nixery/host.json.new" "$root/etc/nixery/host.json"
  touch "$host_stamp"
}
if [ -e "$stamp" ]; then
  [ -e "$host_stamp" ] || { echo "debian13-root: writing host.json again (generate-host.py changed)"; write_host_json; }
  echo "debian13-root: reusing $root"
  exit 0
fi
command -v debootstrap >/dev/null || {
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends debootstrap >/dev/null
}
if [ ! -x "$root/usr/bin/apt-get" ]; then
  echo "debian13-root: debootstrap trixie into $root (a few minutes, once)"
  rm -rf "$root"
  mkdir -p "$(dirname "$root")"
  debootstrap --variant=minbase trixie "$root" "$mirror" >/tmp/debootstrap.log 2>&1 ||
    { tail -20 /tmp/debootstrap.log; exit 1; }
fi
echo "debian13-root: installing ${packages[*]}"
chroot "$root" /usr/bin/env DEBIAN_FRONTEND=noninteractive PATH=/usr/sbin:/usr/bin:/sbin:/bin \
  sh -c "apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends ${packages[*]} >/dev/null 2>&1"
write_host_json
bash "$(dirname "$0")/in-root.sh" "$root" nix --version
touch "$stamp"
