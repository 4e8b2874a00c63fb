#!/usr/bin/env bash
# `make bench`: throughput of one worker and latency of `pleura classify`, on
# the real NIH images (release build, default ResNet-18 at 256x256).
# Speed figures live here, never in timed tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-services.sh >/dev/null
data=${PLEURA_DATA:-../shared/data}
[ -d "$data/cxr" ] || { echo "bench needs the real images: set PLEURA_DATA" >&2; exit 2; }
ROUNDS=${BENCH_ROUNDS:-3}

cargo build --release -q -p pleura -p pleura-worker --bins
BIN=target/release
B=target/bench
rm -rf "$B" && mkdir -p "$B/scans"
"$BIN/pleura" models init --out "$B/model" >/dev/null
for r in $(seq 1 "$ROUNDS"); do ln -s "$(realpath "$data/cxr")" "$B/scans/round$r"; done
n=$(find -L "$B/scans" -name '*.png' | wc -l)

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

echo "== classify (in-process, one thread): $(find "$data/cxr" -name '*.png' | wc -l) images"
"$BIN/pleura" classify --json --model "$B/model" "$data/cxr" > "$B/classify.jsonl"
p50=$(python3 -c 'import json,sys; print("\n".join(str(json.loads(l)["ms"]) for l in open(sys.argv[1])))' "$B/classify.jsonl" | median)
echo "classify p50 latency: ${p50} ms per scan (read + decode + preprocess + infer)"

echo "== one worker ($(nproc) inference threads): $n scans"
export PLEURA_NAMESPACE=bench-$$ PLEURA_HTTP_ADDR=127.0.0.1:0
"$BIN/pleura-worker" --model "$B/model" 2>"$B/worker.log" &
wpid=$!
trap 'kill -TERM $wpid 2>/dev/null; wait $wpid 2>/dev/null || true' EXIT
until grep -q consuming "$B/worker.log"; do sleep 0.2; done
start=$(date +%s.%N)
"$BIN/pleura" submit --wait --json --timeout 900 "$B/scans" > "$B/submit.jsonl"
end=$(date +%s.%N)
ok=$(grep -c '"status":"ok"' "$B/submit.jsonl" || true)
python3 - "$B/submit.jsonl" "$start" "$end" "$ok" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
start, end, ok = float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
print(f"worker throughput: {ok / (end - start):.1f} scans/s ({ok} ok of {len(rows)} in {end - start:.1f} s, submit to last result)")
PY
