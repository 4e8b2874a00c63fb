#!/usr/bin/env bash
# `make train-real`: trains the model Pleura recommends serving, from the real
# labelled data in ../shared/data (or $PLEURA_DATA), and writes it with its
# report. README, "Training the recommended model", says what it does and
# what it measured; scripts/trials.sh holds the trials that chose the recipe.
#
#   make train-real                        # models/recommended/
#   OUT=/tmp/rec make train-real           # elsewhere
#   PLEURA_DEVICE=cpu make train-real      # CPU even where a GPU is present
#
# The recipe, fixed with its seed:
# - both datasets: the 110 full-size NIH scans (cxr/) and the 667 NIH
#   thumbnails (cxr-thumbs-64/), patients namespaced, every image through the
#   fleet's preprocessing;
# - a lockbox: 30% of the full-size patients (a fixed split) held out of
#   everything and scored once at the end, by the served ensemble;
# - ResNet-18 of width 16 at 128 px, 15 epochs, Adam with cosine decay,
#   class weights 1.6:1 (effusion:nofinding; weighted cross-entropy, softer
#   than inverse frequency), mixup 0.2, the CXR-safe augmentation, and flip
#   TTA at evaluation and in the served graph;
# - 5-fold patient-grouped cross-validation of the rest: 5 models; the
#   out-of-fold predictions of the full-size scans (what the fleet serves;
#   their effusion share is not the thumbnails') choose the threshold (recall
#   0.90) and fit Platt calibration;
# - a calibration holdout: half of the other full-size patients, also out of
#   every fold, scored by the ensemble; the served calibration and threshold
#   are fitted on those predictions (averaging 5 models' probabilities pulls
#   them towards the middle, so the single models' out-of-fold threshold does
#   not carry over to the ensemble);
# - the 5 fold models exported as one ONNX graph (probabilities averaged),
#   with that calibration and threshold, checked against tch in tract.
#
# Output: $OUT/report.md (cross-validation, lockbox, calibration, plots),
# $OUT/cv.json, $OUT/oof.csv, $OUT/lockbox.csv, $OUT/folds/, and the servable
# model in $OUT/model/<version>/ (serve it with `pleura-worker --model DIR`,
# or publish it with `pleura models publish DIR`).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${PLEURA_DATA:-../shared/data}
OUT=${OUT:-models/recommended}
DEVICE=${PLEURA_DEVICE:-auto}
FULL="$DATA/cxr"
THUMBS="$DATA/cxr-thumbs-64"
for d in "$FULL" "$THUMBS"; do
  if [ ! -f "$d/labels.csv" ]; then
    echo "train-real: $d/labels.csv not found; set PLEURA_DATA to the folder holding cxr/ and cxr-thumbs-64/" >&2
    exit 1
  fi
done

make -s libtorch
if [ "$DEVICE" != cpu ] && command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  # libtorch_cuda.so's own libraries (2.7 GB, cached): only where a GPU is.
  make -s cuda-libs
fi
cargo build -q -p pleura-trainer --bin pleura-trainer

if [ -e "$OUT" ]; then
  echo "train-real: $OUT exists; move it away or set OUT" >&2
  exit 1
fi
start=$(date +%s)
target/debug/pleura-trainer train \
  --data "$FULL" --data "$THUMBS" --out "$OUT" \
  --folds 5 --lockbox 0.3 --lockbox-dataset cxr --calibration platt --calibrate-on cxr --calibration-holdout 0.5 --export \
  --seed 0 --device "$DEVICE" \
  --width 16 --image-size 128 --epochs 15 \
  --class-weights 1.6,1 --mixup 0.2 --tta-flip
echo "train-real: $(( ($(date +%s) - start) / 60 )) min $(( ($(date +%s) - start) % 60 )) s; report: $OUT/report.md"
ls -d "$OUT"/model/*/
