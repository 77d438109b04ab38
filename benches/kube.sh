#!/usr/bin/env bash
# On a real Kubernetes node (the cluster KUBECONFIG names; skipped without
# one), side by side in one run:
#   1. `kubectl apply` of a Pod that names a Ready NixImage until the Pod is
#      Ready, against the same image pushed to the CNCF reference registry
#      (Debian's docker-registry) on the same node; each pull a real one
#      (imagePullPolicy Always, the image removed from the node's containerd
#      before each round); rounds alternate, medians compared;
#   2. `kubectl apply` of a NixImage until it is Ready: a package set new to
#      the node (store paths present, layers not packed) and one it served
#      already under another object.
# Appends a section to benches/results.md.
# Usage: benches/kube.sh [ROUNDS]   (default 7)
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/reference-registry.sh
ROUNDS="${1:-7}"
WORK=$(mktemp -d)
REF=127.0.0.1:5001
NS=nixery-bench
pids=()
cleanup() {
  set +e
  kubectl delete namespace "$NS" --ignore-not-found --timeout=60s >/dev/null 2>&1
  kubectl delete -k deploy/offline --ignore-not-found --timeout=90s >/dev/null 2>&1
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  for i in $(ctr -n k8s.io images ls -q 2>/dev/null); do
    grep -qx "$i" "$WORK/images-before" || ctr -n k8s.io images rm "$i" >/dev/null 2>&1
  done
  [ -L /opt/nixery/offline-pkgs ] && [ -e "$WORK/made-link" ] && rm -f /opt/nixery/offline-pkgs && rmdir /opt/nixery 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT
if [ -z "${KUBECONFIG:-}" ]; then
  echo "kube bench: KUBECONFIG is not set; this benchmark needs a real cluster (none is provided here): skipped" >&2
  exit 0
fi
export CONTAINERD_NAMESPACE=k8s.io
ctr images ls -q >"$WORK/images-before"
if kubectl get namespace nixery-system >/dev/null 2>&1; then
  echo "kube bench: nixery is installed on this cluster already; run it on one without" >&2
  exit 1
fi

# The install, as in tests/e2e_kube.rs: the agent image (this checkout's
# release binary) imported into the node's containerd, deploy/offline.
cargo build --release --quiet
export NIXERY_AGENT_BINARY="${CARGO_TARGET_DIR:-$PWD/target}/release/nixery"
NIXERY_STATE_DIR="$WORK/pack" RUST_LOG=warn bash scripts/agent-image.sh "$WORK/agent.tar" >/dev/null
ctr images import "$WORK/agent.tar" >/dev/null
if [ ! -e /opt/nixery/offline-pkgs ]; then
  mkdir -p /opt/nixery && ln -s "$PWD/nix/offline-pkgs" /opt/nixery/offline-pkgs && touch "$WORK/made-link"
fi
kubectl apply -k deploy/offline >/dev/null
kubectl -n nixery-system rollout status daemonset/nixery-agent --timeout=180s >/dev/null
kubectl create namespace "$NS" >/dev/null

now() { date +%s.%N; }
since() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.3f}')" "$1" "$(now)"; }
median() { python3 -c "import statistics, sys; print(f'{statistics.median(map(float, sys.argv[1:])):.3f}')" "$@"; }
ratio() { python3 -c "import sys; print(f'{float(sys.argv[1])/float(sys.argv[2]):.2f}')" "$1" "$2"; }
niximage() { # name contents...
  local name=$1; shift
  local list; list=$(printf '"%s",' "$@"); list="[${list%,}]"
  printf '{"apiVersion":"k8s.nixos.org/v1alpha1","kind":"NixImage","metadata":{"name":"%s","namespace":"%s"},"spec":{"contents":%s,"tag":"v1"}}' "$name" "$NS" "$list"
}
ready_after_apply() { # name contents...  -> seconds from apply to Ready
  local t; t=$(now)
  niximage "$@" | kubectl apply -f - >/dev/null
  kubectl -n "$NS" wait --for=jsonpath='{.status.phase}'=Ready "nimg/$1" --timeout=300s >/dev/null
  since "$t"
}

# 2. NixImage to Ready. New to the node: its store paths are there, its
# layers are not (deleting the object before drops its image and blobs);
# already served: the same contents under another object's name.
new=(); again=()
for i in $(seq "$ROUNDS"); do
  new+=("$(ready_after_apply "new-$i" curl jq shell)")
  kubectl -n "$NS" delete nimg "new-$i" --wait=true >/dev/null
done
ready_after_apply first curl jq shell >/dev/null
for i in $(seq "$ROUNDS"); do
  again+=("$(ready_after_apply "again-$i" curl jq shell)")
done

# 1. Pod to Ready: from the node's agent, and from docker-registry on the node.
reference_registry
OURS_IMAGE="127.0.0.1:5000/niximage/$NS/first:v1"
REF_IMAGE="$REF/niximage/$NS/first:v1"
skopeo copy -q --preserve-digests --src-tls-verify=false --dest-tls-verify=false \
  "docker://$OURS_IMAGE" "docker://$REF_IMAGE"
pod() { # name image
  printf '{"apiVersion":"v1","kind":"Pod","metadata":{"name":"%s","namespace":"%s"},"spec":{"hostNetwork":true,"terminationGracePeriodSeconds":0,"containers":[{"name":"c","image":"%s","imagePullPolicy":"Always","command":["sleep","3600"]}]}}' "$1" "$NS" "$2"
}
forget_image() { # image reference: off the node, so the next Pod pulls it
  for i in $(ctr images ls -q | grep -F "${1%:*}"); do ctr images rm --sync "$i" >/dev/null; done
}
running_after_apply() { # name image -> seconds from apply to Ready
  forget_image "$2"
  local t; t=$(now)
  pod "$1" "$2" | kubectl apply -f - >/dev/null
  kubectl -n "$NS" wait --for=condition=Ready "pod/$1" --timeout=120s >/dev/null
  local s; s=$(since "$t")
  kubectl -n "$NS" delete pod "$1" --wait=true >/dev/null
  echo "$s"
}
ours=(); ref=()
for i in $(seq "$ROUNDS"); do
  ours+=("$(running_after_apply "ours-$i" "$OURS_IMAGE")")
  ref+=("$(running_after_apply "ref-$i" "$REF_IMAGE")")
done

m_ours=$(median "${ours[@]}"); m_ref=$(median "${ref[@]}")
m_new=$(median "${new[@]}"); m_again=$(median "${again[@]}")
layers=$(curl -s -H "Accept: application/vnd.oci.image.manifest.v1+json" "http://127.0.0.1:5000/v2/niximage/$NS/first/manifests/v1" | python3 -c "import json,sys; m=json.load(sys.stdin); print(len(m['layers']), 'layers,', sum(l['size'] for l in m['layers']), 'bytes')")
{
  echo
  echo "## On a real Kubernetes node (benches/kube.sh)"
  echo
  echo "Run $(date -u +%Y-%m-%dT%H:%MZ) on $(nproc) cores; Kubernetes $(kubectl version -o json 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["serverVersion"]["gitVersion"])'), containerd $(containerd --version | awk '{print $3}'); the agent from deploy/offline; $ROUNDS alternating rounds, medians, s. Image: curl, jq, shell ($layers)."
  echo
  echo "| measure | nixery | reference | ratio (ours/ref) |"
  echo "|---|---|---|---|"
  echo "| kubectl apply of a Pod naming a Ready NixImage until the Pod is Ready (a real pull each time) | $m_ours | $m_ref (the same image on docker-registry, same node) | $(ratio "$m_ours" "$m_ref") |"
  echo "| kubectl apply of a NixImage until Ready, a package set new to the node (paths in the store, layers packed) | $m_new | | |"
  echo "| kubectl apply of a NixImage until Ready, a package set the node served already | $m_again | | |"
  echo
  echo "Each, Pod: ours ${ours[*]} / reference ${ref[*]}; NixImage: new ${new[*]} / again ${again[*]}"
} | tee -a benches/results.md
