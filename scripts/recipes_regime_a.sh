#!/usr/bin/env bash
# Issue 26, regime A ("short budget"): recipes at equal wall time on CelebA-10k at 32x32 with
# the demo's network, `progan train-local` on this machine, scored by `progan evaluate`.
#
#   scripts/recipes_regime_a.sh DATASET [ROW ...]
#
# DATASET: a prepared CelebA-10k with 32x32 (e.g. `progan prepare ../shared/data/celeba-10k.zip
# runs/bench/celeba-10k-64 --resolution 64 --detector none`). ROW is one of the rows below
# (default: all); each row runs seeds $SEEDS (default "0 1"). The `paper` row is
# conf/demo.yaml as it is: 60k images; its measured training seconds (summary.json, seed 0)
# are every other row's time budget, with the images uncapped (schedule.total_kimg=10000), so
# a cheaper step shows more images. Every run is evaluated with SWD on as many generated
# images as there are reals (10,000) against the 32x32 level, with the real-vs-real floor.
# Results: $OUT/<row>-s<seed>/eval.json; `scripts/recipes_regime_a.sh DATASET table` prints
# the Markdown table (mean and spread of the seeds). A rerun skips finished runs.
#
# Regime B ("small set": equal images instead of equal time): KIMG=200 runs every row, the
# paper's included, to 200k images without a time budget, e.g. on a 2,000-photo subset
# (`progan prepare ../shared/data/celeba-10k.zip runs/bench/celeba-2k-32 --resolution 32
# --detector none --limit 2000`): KIMG=200 OUT=runs/recipes-b scripts/recipes_regime_a.sh
# runs/bench/celeba-2k-32 paper best. Evaluation uses as many samples as there are reals.
set -euo pipefail
cd "$(dirname "$0")/.."
DATASET=$1
shift
OUT=${OUT:-runs/recipes-a}
KIMG=${KIMG:-}
SEEDS=${SEEDS:-0 1}
PY=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} PYTHONUNBUFFERED=1

declare -A ROWS=(
  [paper]=""
  [diffaugment]="train.augment=diffaugment"
  [ada]="train.augment=ada train.ada_kimg=100"
  [r1]="train.loss=logistic train.r1_gamma=0.05 train.r1_every=1"
  [lazy-r1]="train.loss=logistic train.r1_gamma=0.05 train.r1_every=16"
  [lazy-gp]="train.gp_every=16"
  [lr2]="schedule.lr_base=0.002"
  [lr3]="schedule.lr_base=0.003"
  [fast]="train.gp_every=16 schedule.lr_base=0.002"
  [best]="train.loss=logistic train.r1_gamma=0.05 train.r1_every=16 train.augment=ada train.ada_kimg=100"
)
ORDER=(paper diffaugment ada r1 lazy-r1 lazy-gp lr2 lr3 fast best)

reals() {  # the dataset's number of images (its manifest)
  "$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["counts"]["32"])' \
    "$DATASET/manifest.json"
}

budget_min() {
  "$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["train_seconds"] / 60)' \
    "$OUT/paper-s0/summary.json"
}

run_row() {
  local row=$1 seed=$2 dir="$OUT/$1-s$2"
  [[ -f $dir/eval.json ]] && return
  # shellcheck disable=SC2206
  local extra=(${ROWS[$row]})
  local limits=()
  if [[ -n $KIMG ]]; then
    extra+=(schedule.total_kimg="$KIMG")
  elif [[ $row != paper ]]; then
    limits=(--time-budget-min "$(budget_min)")
    extra+=(schedule.total_kimg=10000)
  fi
  "$PY" -m pipeline.cli train-local conf/demo.yaml data.dataset="$DATASET" data.source=null \
    train.seed="$seed" eval.enabled=false "${extra[@]}" --out "$dir" "${limits[@]}"
  "$PY" -m pipeline.cli evaluate "$dir" --data "$DATASET" --metrics swd \
    --num-images "$(reals)" --json "$dir/eval.json"
}

table() {
  "$PY" - "$OUT" "${ORDER[@]}" <<'EOF'
import json, statistics, sys
from pathlib import Path
out, rows = Path(sys.argv[1]), sys.argv[2:]
print("| recipe | seconds | images | SWD x1e3 avg (mean ± spread) | per level | floor |")
print("| --- | --- | --- | --- | --- | --- |")
for row in rows:
    runs = sorted(out.glob(f"{row}-s*"))
    got = [(json.loads((r / "summary.json").read_text()), json.loads((r / "eval.json").read_text()))
           for r in runs if (r / "eval.json").is_file()]
    if not got:
        continue
    swd = [e["SWDx1e3_avg"] for _, e in got]
    levels = sorted(k for k in got[0][1] if k.startswith("SWDx1e3_") and k[8:].isdigit())
    per = ", ".join(f"{k[8:]}: {statistics.mean(e[k] for _, e in got):.1f}" for k in levels)
    floor = statistics.mean(e["SWDx1e3_avg_real_floor"] for _, e in got)
    secs = statistics.mean(s["train_seconds"] for s, _ in got)
    imgs = statistics.mean(s["images_shown"] for s, _ in got)
    spread = (max(swd) - min(swd)) / 2
    print(f"| {row} | {secs:.0f} | {imgs:,.0f} | {statistics.mean(swd):.1f} ± {spread:.1f} "
          f"| {per} | {floor:.1f} |")
EOF
}

if [[ ${1:-} == table ]]; then table; exit 0; fi
for row in "${@:-${ORDER[@]}}"; do
  for seed in $SEEDS; do run_row "$row" "$seed"; done
done
table
