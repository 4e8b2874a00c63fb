#!/usr/bin/env bash
# The image checks of `make test`, against a real Docker engine and this
# machine's RabbitMQ and Redis. Offline: the runtime base is built with
# debootstrap, and the images pack the binaries `make build` made.
#
# 1. The worker image (`--target prebuilt`): runs read-only, as non-root,
#    with every capability dropped; /readyz turns 200; a real scan submitted
#    with `pleura submit --wait` comes back ok; `docker stop` ends it with
#    exit 0 inside the grace period.
# 2. The CPU trainer image: `pleura-trainer synth` and a tiny `train` in it.
# 3. The CUDA trainer image: `ldd` on libtorch_cuda.so inside it finds every
#    library but the driver's.
#
# A Docker engine that cannot start is a failure, never a skip.
# Usage: scripts/images.sh [BIN_DIR]   (default target/debug)
set -euo pipefail
cd "$(dirname "$0")/.."

BIN_DIR=${1:-target/debug}
CACHE=${PLEURA_CACHE:-$HOME/.cache/pleura}
TORCH_SITE=$CACHE/torch-venv/lib/python3.11/site-packages
CUDA_SITE=$TORCH_SITE
ORT_LIB=${PLEURA_ONNXRUNTIME_LIBRARY:-$CACHE/onnxruntime-1.32.0/libonnxruntime.so}
DATA=${PLEURA_DATA:-../shared/data}
BASE=local/debian:bookworm-minbase
TAG=pleura-test
passed=0
failed=0

pass() { passed=$((passed + 1)); echo "ok    $*"; }
fail() { failed=$((failed + 1)); echo "FAIL  $*"; }

# An engine this script starts, it stops again; one already running stays.
started_engine=1
eval "$(scripts/dockerd.sh env)"
docker version >/dev/null 2>&1 && started_engine=0 || true
# `eval "$(cmd)"` would hide cmd's failure: capture first, then eval.
engine_env=$(scripts/dockerd.sh start) || { echo "FAIL  the Docker engine could not start (see above)"; echo "images: 0 passed, 1 failed"; exit 1; }
eval "$engine_env"
scripts/dockerd.sh base-image

work=$(mktemp -d)
# Build contexts live at fixed paths in the cache: BuildKit keys its copy of
# a context by path, so a fixed path sends only what changed (the CUDA
# context is 4 GB) and keeps one copy instead of one per run.
contexts=$CACHE/image-contexts
container=""
namespaces=()
cleanup() {
  [ -n "$container" ] && docker rm -f "$container" >/dev/null 2>&1 || true
  for n in "${namespaces[@]}"; do
    PLEURA_NAMESPACE=$n "$BIN_DIR/pleura" fleet teardown --confirm "$n" >/dev/null 2>&1 || true
  done
  rm -rf "$work"
  # Keep the cache bounded: no dangling images, no stale build cache.
  docker image prune -f >/dev/null 2>&1 || true
  docker builder prune -f --keep-storage 6GB >/dev/null 2>&1 || true
  [ "$started_engine" = 1 ] && scripts/dockerd.sh stop || true
}
trap cleanup EXIT

# stage NAME FILE...: the build context NAME, with stripped copies of the
# binaries in bin/ (and nothing else yet).
stage() {
  local dir=$contexts/$1
  shift
  rm -rf "$dir"
  mkdir -p "$dir/bin"
  for f in "$@"; do
    objcopy --strip-debug "$BIN_DIR/$f" "$dir/bin/$f"
  done
  echo "$dir"
}

image_size() { docker image inspect -f '{{.Size}}' "$1" | awk '{printf "%.0f MB", $1 / 1e6}'; }

# --- 1. the worker image ------------------------------------------------------
ctx=$(stage worker pleura pleura-worker)
mkdir -p "$ctx/lib"
cp "$ORT_LIB" "$ctx/lib/libonnxruntime.so"
if docker build -q --network none -f docker/worker.Dockerfile --target prebuilt \
     --build-arg RUNTIME_IMAGE=$BASE --build-arg BIN_DIR=bin --build-arg ORT_LIB=lib/libonnxruntime.so \
     -t "$TAG/worker" "$ctx" >/dev/null; then
  pass "worker image builds ($(image_size "$TAG/worker"))"
else
  fail "worker image build"
fi

ns=images-$$
namespaces=("$ns" "$ns-ort")
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
model=$work/model
"$BIN_DIR/pleura" models init --out "$model" --width 16 --image-size 128 >/dev/null
chmod -R a+rX "$work"
export PLEURA_NAMESPACE=$ns
amqp=${PLEURA_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
redis=${PLEURA_REDIS_URL:-redis://127.0.0.1:6379/0}
container=pleura-images-$$
docker run -d --name "$container" --network host --read-only --cap-drop ALL \
  --security-opt no-new-privileges --tmpfs /tmp \
  -e PLEURA_NAMESPACE="$ns" -e PLEURA_HTTP_ADDR="127.0.0.1:$port" \
  -e PLEURA_AMQP_URL="$amqp" -e PLEURA_REDIS_URL="$redis" \
  -e PLEURA_MODEL_DIR=/model -e PLEURA_SHUTDOWN_GRACE_SECS=20 \
  -v "$model:/model:ro" "$TAG/worker" >/dev/null

user=$(docker inspect -f '{{.Config.User}}' "$container")
[ "$user" = "10001:10001" ] && pass "worker runs as $user (non-root)" || fail "worker user is '$user'"

ready=0
for _ in $(seq 1 240); do
  if curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1; then ready=1; break; fi
  sleep 0.25
done
if [ $ready = 1 ]; then pass "worker /readyz is 200 (read-only root, no capabilities)"; else
  fail "worker never became ready"; docker logs "$container" 2>&1 | tail -20; fi

scan=$(find "$DATA/cxr/effusion" -name '*.png' 2>/dev/null | sort | head -1)
if [ -z "$scan" ]; then
  scan=$work/phantom
  mkdir -p "$scan"
  "$BIN_DIR/pleura-trainer" synth --out "$scan" --n 2 --size 256 >/dev/null
  echo "      (no real scans in $DATA; submitting phantoms)"
fi
if out=$(PLEURA_AMQP_URL=$amqp PLEURA_REDIS_URL=$redis timeout 120 "$BIN_DIR/pleura" submit --wait --json --timeout 90 "$scan") \
   && [[ $out == *'"status":"ok"'* ]]; then
  pass "a real scan through the container comes back ok"
else
  fail "submit through the container: $out"
fi

# The same image serves with ONNX Runtime: engine = "onnxruntime".
ort_container=pleura-images-ort-$$
ort_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
docker run -d --name "$ort_container" --network host --read-only --cap-drop ALL --tmpfs /tmp \
  -e PLEURA_NAMESPACE="$ns-ort" -e PLEURA_HTTP_ADDR="127.0.0.1:$ort_port" -e PLEURA_ENGINE=onnxruntime \
  -e PLEURA_AMQP_URL="$amqp" -e PLEURA_REDIS_URL="$redis" -e PLEURA_MODEL_DIR=/model \
  -v "$model:/model:ro" "$TAG/worker" >/dev/null
if out=$(PLEURA_NAMESPACE=$ns-ort PLEURA_AMQP_URL=$amqp PLEURA_REDIS_URL=$redis timeout 120 "$BIN_DIR/pleura" submit --wait --json --timeout 90 "$scan") \
   && [[ $out == *'"status":"ok"'* ]]; then
  pass "the image serves with the onnxruntime engine too (its libonnxruntime.so)"
else
  fail "onnxruntime engine in the container: $out"; docker logs "$ort_container" 2>&1 | tail -5
fi
docker rm -f "$ort_container" >/dev/null
redis-cli -u "$redis" --scan --pattern "$ns-ort:*" 2>/dev/null | xargs -r redis-cli -u "$redis" del >/dev/null 2>&1 || true

t0=$(date +%s)
docker stop -t 30 "$container" >/dev/null
took=$(( $(date +%s) - t0 ))
code=$(docker inspect -f '{{.State.ExitCode}}' "$container")
if [ "$code" = 0 ] && [ "$took" -lt 30 ]; then
  pass "docker stop: exit 0 after ${took}s, inside the grace period"
else
  fail "docker stop: exit $code after ${took}s"; docker logs "$container" 2>&1 | tail -20
fi
logs=$(docker logs "$container" 2>&1)
# (Not `docker logs | grep -q`: grep's early exit would fail the pipe.)
if [[ $logs == *'draining jobs in flight'* ]]; then
  pass "the worker drained on SIGTERM (its JSON log says so)"
else
  fail "no drain in the worker's log: $logs"
fi
docker rm "$container" >/dev/null
container=""
redis-cli -u "$redis" --scan --pattern "$ns:*" 2>/dev/null | xargs -r redis-cli -u "$redis" del >/dev/null 2>&1 || true

# --- 2. the CPU trainer image ---------------------------------------------------
ctx=$(stage trainer-cpu pleura-trainer)
mkdir -p "$ctx/torch-site/torch/lib" "$ctx/torch-site/nvidia/cu13/lib"
for lib in libtorch_cpu.so libc10.so libgomp.so.1; do
  cp -l "$TORCH_SITE/torch/lib/$lib" "$ctx/torch-site/torch/lib/" 2>/dev/null || cp "$TORCH_SITE/torch/lib/$lib" "$ctx/torch-site/torch/lib/"
done
for lib in libcudart.so.13 libcupti.so.13; do
  cp -l "$TORCH_SITE/nvidia/cu13/lib/$lib" "$ctx/torch-site/nvidia/cu13/lib/" 2>/dev/null || cp "$TORCH_SITE/nvidia/cu13/lib/$lib" "$ctx/torch-site/nvidia/cu13/lib/"
done
if docker build -q --network none -f docker/trainer.Dockerfile --target prebuilt \
     --build-arg RUNTIME_IMAGE=$BASE --build-arg VARIANT=cpu -t "$TAG/trainer:cpu" "$ctx" >/dev/null; then
  pass "CPU trainer image builds ($(image_size "$TAG/trainer:cpu"))"
else
  fail "CPU trainer image build"
fi
if out=$(docker run --rm --network none --read-only --cap-drop ALL --tmpfs /tmp --entrypoint /bin/sh "$TAG/trainer:cpu" -c \
     'pleura-trainer synth --out /tmp/ph --n 24 --prevalence 0.25 --size 64 --seed 1 &&
      pleura-trainer train --data /tmp/ph --out /tmp/models --epochs 1 --width 4 --image-size 32 --batch-size 8 --loader-threads 1' 2>&1) \
   && [[ $out == *exported* ]]; then
  pass "pleura-trainer synth and a tiny train run in the CPU image ($(echo "$out" | grep -o 'training time [0-9.]* s on [A-Za-z]*'))"
else
  fail "training in the CPU image: $out"
fi

# --- 3. the CUDA trainer image --------------------------------------------------
make -s cuda-libs >/dev/null
ctx=$(stage trainer-cuda pleura-trainer)
mkdir -p "$ctx/torch-site"
cp -al "$CUDA_SITE/nvidia" "$ctx/torch-site/nvidia"
cp -al "$TORCH_SITE/torch" "$ctx/torch-site/torch"
if docker build -q --network none -f docker/trainer.Dockerfile --target prebuilt \
     --build-arg RUNTIME_IMAGE=$BASE --build-arg VARIANT=cuda -t "$TAG/trainer:cuda" "$ctx" >/dev/null; then
  pass "CUDA trainer image builds ($(image_size "$TAG/trainer:cuda"))"
else
  fail "CUDA trainer image build"
fi
missing=$(docker run --rm --network none --entrypoint /usr/bin/ldd "$TAG/trainer:cuda" \
  /opt/pleura/torch-site/torch/lib/libtorch_cuda.so | grep 'not found' | grep -v 'libcuda\.so' || true)
resolved=$(docker run --rm --network none --entrypoint /usr/bin/ldd "$TAG/trainer:cuda" \
  /opt/pleura/torch-site/torch/lib/libtorch_cuda.so | grep -c '=> /' || true)
if [ -z "$missing" ] && [ "$resolved" -gt 10 ]; then
  pass "ldd libtorch_cuda.so in the CUDA image: all $resolved libraries found (the driver's libcuda comes from the node)"
else
  fail "libtorch_cuda.so in the CUDA image lacks: $missing"
fi
# 4 GB is not worth keeping between runs; its context is.
docker rmi "$TAG/trainer:cuda" >/dev/null 2>&1 || true

echo "images: $passed passed, $failed failed"
[ "$failed" = 0 ]
