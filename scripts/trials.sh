#!/usr/bin/env bash
# The trials behind the recommended recipe (README, "Training the recommended
# model"): each row is one 5-fold cross-validation on the real data with one
# setting changed from the base, and the same lockbox held out of every one of
# them, so that choosing among the trials never looks at the lockbox.
#
#   scripts/trials.sh                 # every trial (about 5 minutes each on 2 cores)
#   scripts/trials.sh base flip w32   # some of them
#   scripts/trials.sh --table         # only rebuild the table from earlier runs
#
# Writes target/trials/<trial>/ (report.md, cv.json, oof.csv) and
# target/trials/trials.md: setting, pooled OOF AUROC (all images and the
# full-size scans) with 95% intervals, ECE, and training time.
set -euo pipefail
cd "$(dirname "$0")/.."
# The lockbox line of the trainer's summary is dropped from the logs, and the
# table leaves it out: the trials must not be chosen on it.
DATA=${PLEURA_DATA:-../shared/data}
OUT=${OUT:-target/trials}
FOLDS=${FOLDS:-5}
FULL="$DATA/cxr"
THUMBS="$DATA/cxr-thumbs-64"
if [ ! -d "$FULL" ] || [ ! -d "$THUMBS" ]; then
  echo "trials: $FULL and $THUMBS are needed (set PLEURA_DATA)" >&2
  exit 1
fi

# What make train-real trains, for its own rows (and seed checks).
RECIPE="--class-weights 1.6,1 --mixup 0.2 --tta-flip"

# name | flags changed from the base (base: width 16 at 128 px, 15 epochs,
# class weights auto, augmentation 1, both datasets)
TRIALS=(
  "base|"
  "full-only|ONLY_FULL"
  "px64|--image-size 64"
  "w32|--width 32"
  "flip|--tta-flip"
  "cw-none|--class-weights none"
  "cw-sqrt|--class-weights 1.6,1"
  "aug-2|--augment-strength 2"
  "aug-0.5|--augment-strength 0.5"
  "ema|--ema 0.995"
  "mixup|--mixup 0.2"
  "smooth|--label-smoothing 0.1"
  "dropout|--dropout 0.3"
  "ep25|--epochs 25"
  "ep8|--epochs 8"
  "w8|--width 8"
  "px192|--image-size 192"
  "lr3e-3|--lr 3e-3 --warmup-epochs 1"
  "wd1e-3|--weight-decay 1e-3"
  "base-s1|--seed 1"
  "base-s2|--seed 2"
  "recipe|$RECIPE"
  "recipe-s1|$RECIPE --seed 1"
  "recipe-s2|$RECIPE --seed 2"
)

table_only=false
selected=()
for a in "$@"; do
  if [ "$a" = "--table" ]; then table_only=true; else selected+=("$a"); fi
done

# PLEURA_TRAINER: a pleura-trainer binary to use instead of building one.
T=${PLEURA_TRAINER:-target/debug/pleura-trainer}
if ! $table_only && [ -z "${PLEURA_TRAINER:-}" ]; then
  make -s libtorch
  cargo build -q -p pleura-trainer --bin pleura-trainer
fi
mkdir -p "$OUT"

for row in "${TRIALS[@]}"; do
  name=${row%%|*}
  flags=${row#*|}
  $table_only && break
  if [ ${#selected[@]} -gt 0 ] && [[ ! " ${selected[*]} " =~ " $name " ]]; then continue; fi
  data=(--data "$FULL" --data "$THUMBS")
  if [ "$flags" = ONLY_FULL ]; then data=(--data "$FULL"); flags=""; fi
  # The base's settings, unless the trial changes them.
  base=()
  for kv in "--width 16" "--image-size 128" "--epochs 15" "--seed 0"; do
    [[ " $flags " == *" ${kv%% *} "* ]] || base+=($kv)
  done
  rm -rf "${OUT:?}/$name"
  echo "trial $name: $flags" >&2
  # shellcheck disable=SC2086 # flags are words on purpose
  "$T" train "${data[@]}" --out "$OUT/$name" --folds "$FOLDS" --lockbox 0.3 \
    "${base[@]}" --calibration platt --bootstrap 1000 $flags 2>&1 |
    grep -v '^  LOCKBOX' >"$OUT/$name.log" || { echo "trial $name failed: $OUT/$name.log" >&2; continue; }
  # The lockbox figures are not read here: choosing among trials must not see them.
  jq -r '"  OOF AUROC all \(.overall.auroc.value*1000|round/1000), \(.per_dataset[0].name) \(.per_dataset[0].auroc.value*1000|round/1000)"' "$OUT/$name/cv.json" >&2
done

{
  echo "| Trial | Changed from the base | OOF AUROC, all images | OOF AUROC, full-size (cxr) | Fold AUROC mean ± SD | ECE (Platt) | Training time |"
  echo "|---|---|---|---|---|---|---:|"
  for row in "${TRIALS[@]}"; do
    name=${row%%|*}
    flags=${row#*|}
    [ "$flags" = ONLY_FULL ] && flags="only the 110 full-size scans (no thumbnails)"
    f="$OUT/$name/cv.json"
    [ -f "$f" ] || continue
    jq -r --arg name "$name" --arg flags "${flags:-(base)}" '
      def est(e): if e.value == null then "n/a"
        else "\(e.value*1000|round/1000) [\(e.lo*1000|round/1000), \(e.hi*1000|round/1000)]" end;
      def full: (.per_dataset | map(select(.name == "cxr")) | first);
      "| \($name) | \($flags) | \(if (.per_dataset|length) > 1 then est(.overall.auroc) else "(one dataset)" end) | \(est(full.auroc)) | \(.fold_auroc.mean*1000|round/1000) ± \(.fold_auroc.sd*1000|round/1000) | \(.calibration.ece_platt*1000|round/1000) | \(.training_seconds/60*10|round/10) min |"' "$f"
  done
} >"$OUT/trials.md"
cat "$OUT/trials.md"
