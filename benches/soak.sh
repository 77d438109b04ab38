#!/usr/bin/env bash
# A bounded soak run (see benches/soak.py): `nixery serve` under a small
# --storage-limit and, on the real Kubernetes that KUBECONFIG names (skipped
# without one), `nixery agent`, under steady load with restarts, sampled
# every 10 s. Appends a section to benches/results.md and writes
# benches/soak.svg; fails when a figure grows without bound or a digest does
# not verify.
# Usage: benches/soak.sh [MINUTES]   (default 10), then soak.py options (--restart-every SECS, --storage-limit NMiB)
# NIXERY_RESTART_APISERVER: a command that restarts the cluster's API server, run once mid-soak.
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES="${1:-10}"
WORK=$(mktemp -d /var/tmp/nixery-soak.XXXXXX)
made_crd=0
agent=()
cleanup() {
  set +e
  if [ "${#agent[@]}" -gt 0 ]; then
    kubectl delete namespace nixery-soak --ignore-not-found --timeout=60s >/dev/null 2>&1
    [ "$made_crd" = 1 ] && kubectl delete -f crds/niximage.yaml --ignore-not-found >/dev/null 2>&1
  fi
  # The state directories' GC roots go with them; the logs and samples stay.
  rm -rf "$WORK/serve" "$WORK/agent"
  echo "soak: logs and samples in $WORK"
}
trap cleanup EXIT
# The agent part needs a real cluster: the one KUBECONFIG names.
if [ -n "${KUBECONFIG:-}" ]; then
  agent=(--agent)
  [ -n "${NIXERY_RESTART_APISERVER:-}" ] && agent+=(--restart-apiserver "$NIXERY_RESTART_APISERVER")
  if ! kubectl get crd niximages.k8s.nixos.org >/dev/null 2>&1; then
    kubectl apply -f crds/niximage.yaml >/dev/null
    made_crd=1
    kubectl wait --for=condition=Established crd/niximages.k8s.nixos.org --timeout=60s >/dev/null
  fi
  kubectl create namespace nixery-soak >/dev/null
else
  echo "soak: KUBECONFIG is not set: the agent part (NixImages on a real cluster) is skipped; nixery serve runs alone" >&2
fi
cargo build --release --quiet
python3 benches/soak.py --minutes "$MINUTES" --bin "${CARGO_TARGET_DIR:-$PWD/target}/release/nixery" \
  --work "$WORK" "${agent[@]}" "${@:2}"
