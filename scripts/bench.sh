#!/usr/bin/env bash
# `make bench`: Pleura and the Python peer fleet side by side, in one run, on
# the real NIH scans (scripts/bench.py says what is measured). Release build.
#
#   scripts/bench.sh [bench.py options]   the full benchmark (about 20 min)
#   scripts/bench.sh quick                the CI's run: 50 scans, debug build,
#                                         only to keep the benchmark working
#
# Speed figures live here, never in timed tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-services.sh >/dev/null
PY=${PLEURA_PYTHON:-${PLEURA_CACHE:-$HOME/.cache/pleura}/venv/bin/python}
if [ "${1:-}" = quick ]; then
  shift
  cargo build -q --workspace --bins
  exec "$PY" scripts/bench.py --quick --bin target/debug --trainer target/debug/pleura-trainer \
    --out target/bench-quick "$@"
fi
cargo build -q --release -p pleura -p pleura-worker --bins
cargo build -q -p pleura-trainer
exec "$PY" scripts/bench.py --bin target/release --trainer target/debug/pleura-trainer "$@"
