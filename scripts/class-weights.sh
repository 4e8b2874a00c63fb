#!/usr/bin/env bash
# Does the class-weighted loss matter? Trains the same phantom data (400 at
# prevalence 0.1) with `--class-weights auto` and `--class-weights none` over
# several seeds and reports effusion recall at the default threshold 0.5,
# per run and pooled over every validation effusion.
#
#   scripts/class-weights.sh            # seeds 1..5, 15 epochs, width 16 at 128
#   SEEDS="1 2" EPOCHS=10 scripts/class-weights.sh
#
# Phantoms are for this kind of mechanism check only, never for judging a
# model: see the trainer's report on real data for that.
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${SEEDS:-1 2 3 4 5}
EPOCHS=${EPOCHS:-15}
OUT=${OUT:-target/class-weights}
make -s libtorch
cargo build -q --workspace --bins
T=target/debug/pleura-trainer
mkdir -p "$OUT"
[ -d "$OUT/phantoms" ] || "$T" synth --out "$OUT/phantoms" --n 400 --prevalence 0.1 --size 256 --seed 3 >/dev/null

for seed in $SEEDS; do
  for cw in auto none; do
    run="$OUT/$cw-$seed"
    rm -rf "$run"
    "$T" train --data "$OUT/phantoms" --out "$run" --width 16 --image-size 128 --epochs "$EPOCHS" \
      --seed "$seed" --class-weights "$cw" --version v >"$run.log" 2>&1
  done
done

python3 - "$OUT" $SEEDS <<'PY'
import json, sys
out, seeds = sys.argv[1], sys.argv[2:]
pooled = {}
print(f"{'weights':8} {'seed':>4} {'AUROC':>6} {'recall@0.5':>10} {'precision@0.5':>13}  tp/fn/fp")
for seed in seeds:
    for cw in ("auto", "none"):
        r = json.load(open(f"{out}/{cw}-{seed}/v/report.json"))
        v = r["validation"]; d = v["at_default"]; c = d["confusion"]
        tp, fn, fp = c["tp"], c["fn"], c["fp"]
        p = pooled.setdefault(cw, [0, 0, 0]); p[0] += tp; p[1] += fn; p[2] += fp
        print(f"{cw:8} {seed:>4} {v['auroc']:6.3f} {d['recall']:10.3f} {d['precision']:13.3f}  {tp}/{fn}/{fp}")
for cw, (tp, fn, fp) in pooled.items():
    prec = tp / (tp + fp) if tp + fp else float("nan")
    print(f"pooled {cw}: recall@0.5 {tp}/{tp + fn} = {tp / (tp + fn):.3f}, precision@0.5 {prec:.3f}")
PY
