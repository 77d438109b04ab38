#!/usr/bin/env bash
# Makes (once) a Python virtualenv with the SBOM validators tests/attest.rs
# runs: CycloneDX's own library (its JSON schema validation) and SPDX's
# tools (pyspdxtools), from PyPI. Prints the venv's bin directory.
# Usage: scripts/sbom-validators.sh [DIR]   (default /var/cache/nixery-ci/sbom-venv)
set -euo pipefail
venv="${1:-/var/cache/nixery-ci/sbom-venv}"
stamp="$venv/.nixery-validators-1"
if [ ! -e "$stamp" ]; then
  if ! /usr/bin/python3 -m venv --help >/dev/null 2>&1 || ! /usr/bin/python3 -c 'import ensurepip' 2>/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3-venv >/dev/null
  fi
  rm -rf "$venv"
  /usr/bin/python3 -m venv "$venv" >&2
  "$venv/bin/pip" install -q 'cyclonedx-python-lib[json-validation]>=8,<12' 'spdx-tools>=0.8,<0.9' >&2
  touch "$stamp"
fi
echo "$venv/bin"
