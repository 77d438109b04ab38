#!/usr/bin/env bash
# A bounded soak run (see benches/soak.py): `nixery serve` under a small
# --storage-limit and `nixery agent` on a real Kubernetes (../shared/kube-lab,
# started here if no cluster is up), under steady load with restarts, sampled
# every 10 s. Appends a section to benches/results.md and writes
# benches/soak.svg; fails when a figure grows without bound or a digest does
# not verify.
# Usage: benches/soak.sh [MINUTES]   (default 10), then soak.py options (--restart-every SECS, --storage-limit NMiB)
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES="${1:-10}"
LAB="${NIXERY_KUBE_LAB:-$(cd .. && pwd)/shared/kube-lab}"
WORK=$(mktemp -d /var/tmp/nixery-soak.XXXXXX)
started_lab=0
made_crd=0
cleanup() {
  set +e
  kubectl delete namespace nixery-soak --ignore-not-found --timeout=60s >/dev/null 2>&1
  [ "$made_crd" = 1 ] && kubectl delete -f crds/niximage.yaml --ignore-not-found >/dev/null 2>&1
  [ "$started_lab" = 1 ] && "$LAB/down.sh" >/dev/null 2>&1
  # The state directories' GC roots go with them; the logs and samples stay.
  rm -rf "$WORK/serve" "$WORK/agent"
  echo "soak: logs and samples in $WORK"
}
trap cleanup EXIT
if [ -z "${KUBECONFIG:-}" ]; then
  eval "$("$LAB/up.sh" --node)"
  export KUBECONFIG CONTAINERD_ADDRESS CONTAINERD_NAMESPACE
  started_lab=1
fi
export KUBE_LAB_DIR="${KUBE_LAB_DIR:-/var/tmp/kube-lab}"
if ! kubectl get crd niximages.k8s.nixos.org >/dev/null 2>&1; then
  kubectl apply -f crds/niximage.yaml >/dev/null
  made_crd=1
  kubectl wait --for=condition=Established crd/niximages.k8s.nixos.org --timeout=60s >/dev/null
fi
kubectl create namespace nixery-soak >/dev/null
cargo build --release --quiet
python3 benches/soak.py --minutes "$MINUTES" --bin "${CARGO_TARGET_DIR:-$PWD/target}/release/nixery" \
  --work "$WORK" --lab "$LAB" "${@:2}"
