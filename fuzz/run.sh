#!/usr/bin/env bash
# Runs fuzz targets one after the other: run.sh MODE SECONDS TARGET...
#   MODE smoke:  a fresh corpus each time and a fixed seed (repeatable, for make test)
#   MODE corpus: the corpus kept in the cache grows from run to run (make fuzz)
# Seeds ($FUZZ_DIR/seeds/<target>, from `make fuzz-seeds`) and the kept crash
# inputs (fuzz/regressions/<target>) are read-only corpora. Any crash, timeout
# or out-of-memory fails the run and leaves its input in
# $FUZZ_DIR/artifacts/<target>/; copy it into fuzz/regressions/<target>/.
set -euo pipefail
mode=$1 seconds=$2
shift 2
: "${CARGO_FUZZ:?}" "${FUZZ_DIR:?}" "${FUZZ_FLAGS:?}"
cd "$(dirname "$0")"
mkdir -p "$FUZZ_DIR/logs"
for t in "$@"; do
  corpus=$FUZZ_DIR/$mode/$t
  extra=()
  if [ "$mode" = smoke ]; then
    rm -rf "$corpus"
    extra=(-seed=1)
  fi
  mkdir -p "$corpus" "$FUZZ_DIR/artifacts/$t" "$FUZZ_DIR/seeds/$t" "regressions/$t"
  log=$FUZZ_DIR/logs/$t-$mode.log
  # shellcheck disable=SC2086 # FUZZ_FLAGS is a list of flags
  if ! "$CARGO_FUZZ" run $FUZZ_FLAGS "$t" "$corpus" "$FUZZ_DIR/seeds/$t" "regressions/$t" -- \
      -max_total_time="$seconds" -max_len=65536 -timeout=10 -rss_limit_mb=2048 \
      -print_final_stats=1 "${extra[@]}" -artifact_prefix="$FUZZ_DIR/artifacts/$t/" \
      >"$log" 2>&1; then
    tail -n 40 "$log"
    echo "fuzz $t: FAILED; the input is in $FUZZ_DIR/artifacts/$t/" >&2
    exit 1
  fi
  runs=$(grep -o 'number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')
  echo "fuzz $t: ${seconds} s, $runs runs, nothing found"
done
