#!/usr/bin/env bash
# `make demo`: services up, build, train a quick model on phantoms, two workers, the sample scans
# through the fleet, the results table, workers stopped.
#
# Scans come from $PLEURA_DATA or ../shared/data (real NIH images and DICOMs)
# when present, else from the folder in $DEMO_SCANS.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/ensure-services.sh
echo "== building"
make -s libtorch
cargo build --workspace --bins -q
BIN=target/debug
DEMO=target/demo
mkdir -p "$DEMO"
export PLEURA_NAMESPACE=${PLEURA_NAMESPACE:-pleura-demo}

echo "== training a quick model on phantoms"
# Synthetic phantoms and a small, fast network: this shows the whole loop
# (train -> evaluate -> export -> serve) in a few minutes on 2 cores. It is a
# demo model, not a clinical one: phantoms never stand in for real data.
rm -rf "$DEMO/phantoms" "$DEMO/models"
"$BIN/pleura-trainer" synth --out "$DEMO/phantoms" --n 300 --prevalence 0.1 --size 256 --seed 1
"$BIN/pleura-trainer" train --data "$DEMO/phantoms" --out "$DEMO/models" --width 16 --image-size 128 \
  --epochs 25 --batch-size 16 --lr 1e-3 --seed 1 --version demo-$(date +%Y%m%d%H%M%S)
MODEL=$(ls -d "$DEMO"/models/*/ | head -1)
echo "   model: $MODEL (report: $MODEL/report.md)"

scans=()
data=${PLEURA_DATA:-../shared/data}
if [ -d "$data/cxr" ]; then
  scans=("$data/cxr" "$data/dicom")
elif [ -n "${DEMO_SCANS:-}" ] && [ -d "$DEMO_SCANS" ]; then
  scans=("$DEMO_SCANS")
else
  echo "error: no sample scans. Set PLEURA_DATA to the shared data folder, or DEMO_SCANS=/path/to/folder of .png/.jpg/.dcm" >&2
  exit 2
fi

echo "== starting two workers"
pids=()
stop_workers() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap stop_workers EXIT
for i in 1 2; do
  PLEURA_HTTP_ADDR=127.0.0.1:$((9100 + i)) PLEURA_WORKER_ID=demo-worker-$i PLEURA_INFERENCE_THREADS=1 \
    "$BIN/pleura-worker" --model "$MODEL" 2>"$DEMO/worker$i.log" &
  pids+=($!)
done
for i in 1 2; do
  for _ in $(seq 1 120); do
    if (exec 3<>/dev/tcp/127.0.0.1/$((9100 + i))) 2>/dev/null && \
       { exec 3<>/dev/tcp/127.0.0.1/$((9100 + i)); printf 'GET /readyz HTTP/1.0\r\n\r\n' >&3; head -1 <&3 | grep -q 200; }; then
      echo "   worker $i ready (http://127.0.0.1:$((9100 + i))/metrics)"; break
    fi
    sleep 0.5
  done
done

echo "== submitting ${scans[*]}"
"$BIN/pleura" submit --wait --timeout 600 "${scans[@]}"
echo "== stopping workers (SIGTERM: they finish what they hold and exit 0)"
