#!/usr/bin/env bash
# Installs what nixery, its offline package set and its tests need on Debian 12:
# Nix (single-user, no daemon), the host programs that nix/offline-pkgs wraps,
# and the real registry clients the tests drive. Idempotent; run as root.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
packages=(
  nix-bin nix-setup-systemd                # Nix; the second makes its build users and nix.conf
  busybox-static patchelf                  # the offline set's build tools
  hello curl jq less moreutils nano        # programs the offline set wraps
  ca-certificates netbase                  # data the offline set wraps
  debootstrap                              # the Debian 13 root of the Nix version matrix
  skopeo umoci git containerd podman       # real clients used by the tests (ctr)
  docker-registry wrk pigz hyperfine       # benchmarks (benches/registry.sh)
  chromium chromium-driver fonts-dejavu-core  # the page in a real browser, over WebDriver (tests/browser.rs)
  runc openssl xz-utils iptables           # a node's runtime: tests/cri.rs's private containerd
  protobuf-compiler                        # protoc, for the CRI's protobuf types (k8s-cri)
)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing: ${missing[*]}"
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi
# kubectl comes with this kind of machine (Debian has no package of it); the
# real-cluster tests and docs/kubernetes.md's install need it.
command -v kubectl >/dev/null || echo "warning: kubectl is not installed; the real-cluster tests need it" >&2
if ! command -v docker >/dev/null || ! docker info >/dev/null 2>&1; then
  echo "warning: no Docker engine is reachable; the docker tests need one" >&2
fi
