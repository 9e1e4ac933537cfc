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
# the Markdown table of docs/quality.md (mean and spread of the seeds; EVAL=FILE.json reads
# another evaluation of the same runs). A rerun skips finished runs and evaluates trained ones;
# TRAIN_ONLY=1 trains without evaluating (to evaluate later, while nothing timed runs).
#
# Regime B ("small set": equal images instead of equal time): KIMG=200 runs every row, the
# paper's included, to 200k images without a time budget, e.g. on a 2,000-photo subset
# (`progan prepare ../shared/data/celeba-10k.zip runs/bench/celeba-2k-32 --resolution 32
# --detector none --limit 2000`): KIMG=200 OUT=runs/recipes-b scripts/recipes_regime_a.sh
# runs/bench/celeba-2k-32 paper best. Evaluation uses as many samples as there are reals.
# Rows run side by side there (OMP_NUM_THREADS=1 each) compare fairly: equal images, not time.
# What SWD can show on such a set: scripts/swd_data_bounds.py.
set -euo pipefail
cd "$(dirname "$0")/.."
DATASET=$1
shift
OUT=${OUT:-runs/recipes-a}
KIMG=${KIMG:-}
SEEDS=${SEEDS:-0 1}
PY=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} PYTHONUNBUFFERED=1

# lr 0.002, with 0.003 for the short phases below 32x32
LOW3="schedule.lr_base=0.002 schedule.lr.4=0.003 schedule.lr.8=0.003 schedule.lr.16=0.003"
R1="train.loss=logistic train.r1_gamma=0.05 train.r1_every=1"  # R1 on reals every D step
FAST="train.channels_last=true train.bf16=true"  # speed: memory format, bf16 autocast
declare -A ROWS=(
  [paper]=""
  [diffaugment]="train.augment=diffaugment"
  [ada]="train.augment=ada train.ada_kimg=100"
  [r1]="$R1"
  [lazy-r1]="train.loss=logistic train.r1_gamma=0.05 train.r1_every=16"
  [lazy-gp]="train.gp_every=16"
  [lr2]="schedule.lr_base=0.002"
  [lr3]="schedule.lr_base=0.003"
  [fast]="train.gp_every=16 schedule.lr_base=0.002"
  [lr2-ema]="schedule.lr_base=0.002 train.ema_beta=0.995"
  [lr2-gp4]="schedule.lr_base=0.002 train.gp_every=4"
  [lr2-b8]="schedule.lr_base=0.002 schedule.batch_base=8"
  [lr2-b32]="schedule.lr_base=0.002 schedule.batch_base=32"
  [lr2-ramp]="schedule.lr_base=0.002 train.ema_kimg=10 train.ema_rampup=0.05"
  [lr2-short]="schedule.lr_base=0.002 schedule.transition_kimg=3 schedule.stabilize_kimg=3"
  [lr2-low3]="$LOW3"
  [paper-bf16]="$FAST"
  [lr2-low3-cl]="$LOW3 train.channels_last=true"
  [lr2-low3-bf16]="$LOW3 $FAST"
  [ema999-bf16]="train.ema_beta=0.999 $FAST"
  [lr05-bf16]="schedule.lr_base=0.0005 $FAST"
  [low15-bf16]="schedule.transition_kimg=15 schedule.stabilize_kimg=15 $FAST"
  [r1-ada-bf16]="$R1 train.augment=ada train.ada_kimg=100 $FAST"
  [best]="train.loss=logistic train.r1_gamma=0.05 train.r1_every=16 train.augment=ada train.ada_kimg=100"
)
ORDER=(paper paper-bf16 diffaugment ada r1 lazy-r1 lazy-gp lr2 lr3 fast lr2-gp4 lr2-b8 lr2-b32 lr2-ema lr2-ramp lr2-short lr2-low3 lr2-low3-cl lr2-low3-bf16
  ema999-bf16 lr05-bf16 low15-bf16 r1-ada-bf16 best)

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
  if [[ ! -f $dir/generator.pt ]]; then
    "$PY" -m pipeline.cli train-local conf/demo.yaml data.dataset="$DATASET" data.source=null \
      train.seed="$seed" eval.enabled=false "${extra[@]}" --out "$dir" "${limits[@]}"
  fi
  [[ -n ${TRAIN_ONLY:-} ]] && return
  "$PY" -m pipeline.cli evaluate "$dir" --data "$DATASET" --metrics swd \
    --num-images "$(reals)" --json "$dir/eval.json"
}

table() {  # $EVAL: the evaluation file to read (default eval.json)
  "$PY" - "$OUT" "${EVAL:-eval.json}" "${ORDER[@]}" <<'EOF'
import json, re, statistics, sys
from pathlib import Path
out, name, rows = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
header = None
for row in rows:
    runs = [r for r in sorted(out.glob(f"{row}-s*"))  # lr2-s0, not lr2-short-s0
            if re.fullmatch(rf"{re.escape(row)}-s\d+", r.name) and (r / name).is_file()]
    if not runs:
        continue
    got = [(json.loads((r / "summary.json").read_text()), json.loads((r / name).read_text()))
           for r in runs]
    mean = lambda key: statistics.mean(e[key] for _, e in got)  # noqa: E731
    levels = sorted(k for k in got[0][1] if k.startswith("SWDx1e3_") and k[8:].isdigit())
    if header is None:
        header = ["recipe", "seeds", "train s", "images", "img/s", "SWD x1e3 avg"]
        header += [f"{k[8:]}x{k[8:]}" for k in levels] + ["floor"]
        print("| " + " | ".join(header) + " |")
        print("|" + " --- |" * len(header))
    swd = [e["SWDx1e3_avg"] for _, e in got]
    spread = f" ± {(max(swd) - min(swd)) / 2:.1f}" if len(got) > 1 else ""
    secs = statistics.mean(s["train_seconds"] for s, _ in got)
    imgs = statistics.mean(s["images_shown"] for s, _ in got)
    seeds = ", ".join(r.name.rsplit("-s", 1)[1] for r in runs)
    cells = [row, seeds, f"{secs:.0f}", f"{imgs:,.0f}", f"{imgs / secs:.0f}",
             f"{statistics.mean(swd):.1f}{spread}"]
    cells += [f"{mean(k):.1f}" for k in levels] + [f"{mean('SWDx1e3_avg_real_floor'):.1f}"]
    print("| " + " | ".join(cells) + " |")
EOF
}

if [[ ${1:-} == table ]]; then table; exit 0; fi
for row in "${@:-${ORDER[@]}}"; do
  for seed in $SEEDS; do run_row "$row" "$seed"; done
done
table
