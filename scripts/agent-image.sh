#!/usr/bin/env bash
# Makes the agent's container image on a machine without nixpkgs: nixery
# packs nix/agent-pkgs (the offline package set, this checkout's nixery
# binary and the host's Nix) into a tar that Docker, containerd and podman load:
#
#   scripts/agent-image.sh [OUT.tar] [NAME:TAG]
#   docker load -i OUT.tar                       # Docker
#   ctr -n k8s.io images import OUT.tar          # a kubelet's containerd
#
# then `kubectl apply -k deploy/` (the DaemonSet's image is `nixery-agent`,
# pulled IfNotPresent). With real nixpkgs, `nix-build nix/agent-image.nix`
# gives the same layout.
#
# NIXERY_AGENT_BINARY: the binary to put in the image [default: builds
# target/release/nixery]. NIXERY_BIN: the nixery that packs [default: that one].
# The package source the agent builds from is the DaemonSet's business
# (NIXERY_CHANNEL or NIXERY_PKGS_REPO there); this image carries none.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-nixery-agent.tar}"
ref="${2:-nixery-agent:latest}"
if [ -z "${NIXERY_AGENT_BINARY:-}" ]; then
  cargo build --release
  NIXERY_AGENT_BINARY="$PWD/target/release/nixery"
fi
export NIXERY_AGENT_BINARY
nixery="${NIXERY_BIN:-$NIXERY_AGENT_BINARY}"
state="${NIXERY_STATE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/nixery-agent-image}"
mkdir -p "$state"
# The packing nixery's own settings stay out of it (a NIXERY_LISTEN of a
# running registry, say): only what is given here counts.
env -u NIXERY_LISTEN -u NIXERY_PKGS_REPO -u NIXERY_CHANNEL \
"$nixery" build --state-dir "$state" --pkgs-path nix/agent-pkgs --nix-option substituters= --cache-ttl 0 \
  nixery-agent/nixery-agent-install \
  --entrypoint /bin/nixery --cmd agent \
  --env PATH=/bin \
  --env SSL_CERT_FILE=/etc/ssl/certs/ca-bundle.crt \
  --env NIX_SSL_CERT_FILE=/etc/ssl/certs/ca-bundle.crt \
  --env XDG_CACHE_HOME=/var/lib/nixery/cache \
  --expose 5000/tcp \
  --output "$out" --reference "$ref"
