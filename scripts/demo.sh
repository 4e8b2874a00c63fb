#!/usr/bin/env bash
# `make demo`: services up, build, a signing key and a file:// registry, two
# workers following it, a quick model trained on phantoms and published, the
# workers hot-reloading it, the sample scans through the fleet, its int8
# variant made and measured, a rollback drill, workers stopped.
#
# Scans come from $PLEURA_DATA or ../shared/data (real NIH images and DICOMs)
# when present, else from the folder in $DEMO_SCANS.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/ensure-services.sh
echo "== building"
make -s libtorch onnxruntime
export PLEURA_ONNXRUNTIME_LIBRARY=${PLEURA_ONNXRUNTIME_LIBRARY:-${PLEURA_CACHE:-$HOME/.cache/pleura}/onnxruntime-1.32.0/libonnxruntime.so}
cargo build --workspace --bins -q
BIN=target/debug
DEMO=target/demo
mkdir -p "$DEMO"
export PLEURA_NAMESPACE=${PLEURA_NAMESPACE:-pleura-demo}

# The registry: a file:// store in the demo folder, a fresh signing key, and
# this namespace's registry state in Redis cleared so every run starts clean.
REG="$DEMO/registry"
rm -rf "$REG" "$DEMO/keys" "$DEMO/init" "$DEMO/phantoms" "$DEMO/models"
if command -v redis-cli >/dev/null; then
  redis-cli --scan --pattern "$PLEURA_NAMESPACE:*" | xargs -r redis-cli del >/dev/null
fi
export PLEURA_REGISTRY_URL="file://$(mkdir -p "$REG" && cd "$REG" && pwd)"
"$BIN/pleura" models keygen --out "$DEMO/keys" --name demo
export PLEURA_SIGNING_KEY_FILE="$DEMO/keys/demo.key"
export PLEURA_TRUSTED_KEYS="$DEMO/keys/demo.pub"
export PLEURA_RECONCILE_INTERVAL_SECS=10

echo "== bring-up: publishing an untrained placeholder (forced past the gate)"
"$BIN/pleura" models init --out "$DEMO/init" --width 16 --image-size 128 --seed 1
"$BIN/pleura" models publish "$DEMO/init" --force --reason "bring-up: untrained placeholder"
INIT=$(sed -n 's/.*"version": "\(.*\)".*/\1/p' "$DEMO/init/model.json")

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

echo "== starting two workers that follow the registry"
pids=()
stop_workers() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap stop_workers EXIT
for i in 1 2; do
  PLEURA_HTTP_ADDR=127.0.0.1:$((9100 + i)) PLEURA_WORKER_ID=demo-worker-$i PLEURA_INFERENCE_THREADS=1 \
    "$BIN/pleura-worker" 2>"$DEMO/worker$i.log" &
  pids+=($!)
done

# Waits until `pleura fleet status` shows both workers ready on version $1.
wait_fleet_on() {
  for _ in $(seq 1 120); do
    if [ "$("$BIN/pleura" fleet status | grep -c " ready .*$1")" -ge 2 ]; then
      "$BIN/pleura" fleet status; return 0
    fi
    sleep 0.5
  done
  echo "error: the workers did not switch to $1; see $DEMO/worker*.log" >&2
  "$BIN/pleura" fleet status; return 1
}
wait_fleet_on "$INIT"

echo "== training a quick model on phantoms, then publishing it (gate, signature, activation)"
# Synthetic phantoms and a small, fast network: this shows the whole loop
# (train -> evaluate -> export -> publish -> hot reload) in a few minutes on
# 2 cores. It is a demo model, not a clinical one: phantoms never stand in
# for real data.
VERSION=demo-$(date +%Y%m%d%H%M%S)
"$BIN/pleura-trainer" synth --out "$DEMO/phantoms" --n 300 --prevalence 0.1 --size 256 --seed 1
"$BIN/pleura-trainer" train --data "$DEMO/phantoms" --out "$DEMO/models" --width 16 --image-size 128 \
  --epochs 25 --batch-size 16 --lr 1e-3 --seed 1 --version "$VERSION" --publish
echo "   report: $DEMO/models/$VERSION/report.md"

echo "== the workers pick the new model up without a restart"
wait_fleet_on "$VERSION"
"$BIN/pleura" models list

echo "== submitting ${scans[*]}"
"$BIN/pleura" submit --wait --timeout 600 "${scans[@]}"

echo "== the int8 variant: calibrated on the training split, measured against its parent"
# It prints what the promotion gate will say of it (for int8 also: AUROC
# loss <= gate_max_int8_auroc_loss, recall at the threshold unchanged), which
# `quantize --publish` applies. It is written here, not published: the demo's
# workers run tract, and int8 is fast on `engine = "onnxruntime"` (see
# "Engines, int8 and speed" in the README).
"$BIN/pleura-trainer" quantize --model "$DEMO/models/$VERSION" --out "$DEMO/models"

echo "== rollback drill: one command takes the fleet back, and forward again"
"$BIN/pleura" models activate "$INIT" --reason "demo: rollback drill"
wait_fleet_on "$INIT"
"$BIN/pleura" models activate "$VERSION" --reason "demo: roll forward"
wait_fleet_on "$VERSION"
"$BIN/pleura" models history --limit 5
echo "== stopping workers (SIGTERM: they finish what they hold and exit 0)"
