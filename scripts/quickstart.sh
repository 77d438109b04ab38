#!/usr/bin/env bash
# Quick start: installs what is missing, builds nixery, serves images built by
# Nix from the offline package set, then pulls and runs one with Docker.
# The registry keeps running afterwards (Ctrl-C stops it); set
# QUICKSTART_EXIT=1 to stop it after the demo instead.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
# NIXERY_BIN: a nixery built elsewhere (say, on the host of a chroot), else
# this checkout's release build.
bin="${NIXERY_BIN:-$PWD/target/release/nixery}"
if [ -z "${NIXERY_BIN:-}" ]; then
  echo "quickstart: building nixery (release; the first build takes 4 to 6 minutes on two idle cores)"
  cargo build --release
fi
[ -x "$bin" ] || { echo "quickstart: no nixery at $bin" >&2; exit 1; }
# The README's examples call `nixery`: put it on the PATH.
ln -sf "$bin" /usr/local/bin/nixery
echo "quickstart: nixery is $(command -v nixery)"
listen="${NIXERY_LISTEN:-127.0.0.1:5000}"
state="${NIXERY_STATE_DIR:-$PWD/state}"
"$bin" serve --listen "$listen" --state-dir "$state" \
  --pkgs-path nix/offline-pkgs --nix-option substituters= &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 50); do curl -sf "http://$listen/v2/" >/dev/null && break; sleep 0.2; done
curl -sf "http://$listen/v2/" >/dev/null || { echo "quickstart: nixery did not start on $listen (its log is above)" >&2; exit 1; }
set -x
docker pull "$listen/shell/hello"
docker run --rm "$listen/shell/hello" hello
docker run --rm "$listen/shell/curl/jq" sh -c 'curl --version | head -1; echo "{\"built\":\"by nix\"}" | jq .built'
set +x
if [ "${QUICKSTART_EXIT:-0}" = 1 ]; then exit 0; fi
echo "nixery is serving on http://$listen (Ctrl-C to stop); try: docker run --rm -it $listen/shell/jq"
wait $server
