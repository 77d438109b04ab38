#!/usr/bin/env bash
# Installs Garage, the S3-compatible object store the shared-storage tests run
# against (tests/s3.rs), from crates.io into /var/cache/nixery-ci/garage, once:
# a machine that has it already reuses it. Only the features a test needs
# (LMDB metadata, bundled C libraries) are compiled, to keep a fresh CI run short.
set -euo pipefail
root=${GARAGE_ROOT:-/var/cache/nixery-ci/garage}
version=2.5.0
if [ -x "$root/bin/garage" ] && "$root/bin/garage" --version 2>/dev/null | grep -q "$version"; then
  exit 0
fi
echo "installing garage $version into $root (cargo install, several minutes on a fresh machine)"
cargo install garage --version "$version" --locked --quiet \
  --no-default-features --features bundled-libs,lmdb --root "$root"
"$root/bin/garage" --version
