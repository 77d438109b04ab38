#!/usr/bin/env bash
# Fuzzes, for a bounded time, the parsers that read what others send: the
# HTTP path parser (fuzz/src/bin/route.rs) and the closure-graph reader
# (fuzz/src/bin/registration.rs), with cargo-afl (AFL++ on stable Rust).
# Each target runs SECONDS (default 60) from the seeds in fuzz/seeds/; a crash
# or a hang is copied to fuzz/found/ and makes the script fail (each one then
# becomes a regression test). Appends its figures to benches/results.md.
# Usage: benches/fuzz.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH=${1:-60}
command -v cargo-afl >/dev/null || cargo install cargo-afl --locked
(cd fuzz && cargo afl build --release --quiet)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
rows=""
found=0
for t in route registration; do
  AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_UI=1 \
    cargo afl fuzz -i "fuzz/seeds/$t" -o "$out/$t" -V "$SECONDS_EACH" "fuzz/target/release/$t" >"$out/$t.log" 2>&1 ||
    { tail -20 "$out/$t.log"; exit 1; }
  stat() { awk -v k="$1" '$1 == k { print $3 }' "$out/$t/default/fuzzer_stats"; }
  crashes=$(stat saved_crashes); hangs=$(stat saved_hangs)
  rows+="| $t | $(stat run_time) | $(stat execs_done) | $(stat execs_per_sec) | $(stat corpus_count) | $crashes | $hangs |"$'\n'
  if [ "$crashes" != 0 ] || [ "$hangs" != 0 ]; then
    mkdir -p "fuzz/found/$t"
    cp "$out/$t"/default/crashes/id* "$out/$t"/default/hangs/id* "fuzz/found/$t/" 2>/dev/null || true
    found=1
  fi
done
{
  echo
  echo "## Fuzzing (benches/fuzz.sh)"
  echo
  echo "Run $(date -u +%Y-%m-%dT%H:%MZ) on $(nproc) cores at $(git rev-parse --short HEAD); $(cargo afl --version 2>/dev/null | head -1), ${SECONDS_EACH} s per target from fuzz/seeds/."
  echo
  echo "| target | seconds | executions | per second | corpus | crashes | hangs |"
  echo "|---|---|---|---|---|---|---|"
  printf '%s' "$rows"
} | tee -a benches/results.md
if [ "$found" = 1 ]; then
  echo "fuzzing found crashes or hangs: see fuzz/found/" >&2
  exit 1
fi
