#!/usr/bin/env bash
# Quality check on one GPU: ProGAN against its DCGAN baseline at equal training time, on the
# first 10,000 CelebA faces at 64x64 (conf/celeba-64-quick.yaml, conf/celeba-64-quick-dcgan.yaml).
# Runs `progan train-local` (no Ray, no MLflow); see docs/quality.md.
#
#   scripts/quality_run.sh [STEP ...]      from the project root; STEP is one or more of
#     prepare   make data/celeba-10k-64 if it is missing (MTCNN: needs Ray and facenet-pytorch)
#     progan    train the ProGAN preset (a rerun continues it; stops after PROGAN_BUDGET_MIN)
#     dcgan     train the DCGAN preset for exactly the ProGAN's measured training time
#     compare   print SWD / MS-SSIM / time side by side; write $QUALITY_DIR/comparison.md
#     collect D copy the results, flat, into folder D (7 files)
#     carry D   (on a machine with pip and the project's venv, not on the GPU host) fill folder
#               D with what a bare GPU host lacks: the CelebA zip, and wheels for Python 3.12
#               (lmdb, pydantic, pytorch-fid; Ray and facenet-pytorch for `prepare`) with
#               D/install.sh; on the host: bash D/install.sh && export PYTHONPATH=/tmp/site
#   no STEP: prepare progan dcgan compare
#
# Environment (defaults in brackets):
#   QUALITY_DIR [runs/quality]  outputs: progan/, dcgan/, comparison.md
#   PYTHON [.venv/bin/python if present, else python3]
#   DEVICE [cuda]               --device of train-local
#   PROGAN_BUDGET_MIN [8]       training minutes per invocation of the ProGAN (evaluation not
#                               counted); if it stops early, run `progan` again to continue
#   QUALITY_SOURCE              CelebA zip, if not at the config's ../shared/data/celeba-10k.zip
#   EXTRA                       key=value overrides for both runs (quoted, space-separated)
#   PROGAN_EXTRA, DCGAN_EXTRA   key=value overrides for one of them
#
# Every step resumes: after an interruption, run the same command again.
set -euo pipefail
cd "$(dirname "$0")/.."

QUALITY_DIR=${QUALITY_DIR:-runs/quality}
DEVICE=${DEVICE:-cuda}
PROGAN_BUDGET_MIN=${PROGAN_BUDGET_MIN:-8}
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1
PROGAN_CONF=conf/celeba-64-quick.yaml
DCGAN_CONF=conf/celeba-64-quick-dcgan.yaml
# shellcheck disable=SC2206
OVERRIDES=(${EXTRA:-})
if [[ -n ${QUALITY_SOURCE:-} ]]; then OVERRIDES+=("data.source=$QUALITY_SOURCE"); fi

# train_local CONFIG [key=value ...] [--option ...]: overrides must directly follow CONFIG
train_local() {
  local conf=$1
  shift
  "$PYTHON" -m pipeline.cli train-local "$conf" "${OVERRIDES[@]}" "$@" --device "$DEVICE"
}

# json_get FILE KEY: a top-level value of a JSON file ('' if the file is missing)
json_get() {
  "$PYTHON" -c 'import json, pathlib, sys
p = pathlib.Path(sys.argv[1])
print(json.loads(p.read_text()).get(sys.argv[2], "") if p.is_file() else "")' "$1" "$2"
}

step_prepare() {
  # train-local prepares data.dataset from data.source itself when it is missing; doing it
  # first keeps its minutes out of the training runs.
  "$PYTHON" - "$PROGAN_CONF" "${OVERRIDES[@]}" <<'EOF'
import sys
from pipeline.config import load_config
from pipeline.dataset import ensure_dataset

cfg = load_config(sys.argv[1], sys.argv[2:])
ensure_dataset(cfg, None)
print(f"dataset ready: {cfg.data.dataset}")
EOF
}

step_progan() {
  # shellcheck disable=SC2086
  train_local "$PROGAN_CONF" ${PROGAN_EXTRA:-} --out "$QUALITY_DIR/progan" --final-eval-only \
    --time-budget-min "$PROGAN_BUDGET_MIN"
  if [[ $(json_get "$QUALITY_DIR/progan/summary.json" complete) != True ]]; then
    echo "ProGAN stopped by its ${PROGAN_BUDGET_MIN}-minute budget; run '$0 progan' again to continue"
    exit 3
  fi
}

step_dcgan() {
  local target
  target=$(json_get "$QUALITY_DIR/progan/summary.json" train_seconds)
  if [[ -z $target || $(json_get "$QUALITY_DIR/progan/summary.json" complete) != True ]]; then
    echo "no finished ProGAN run in $QUALITY_DIR/progan: run '$0 progan' first"
    exit 3
  fi
  # the DCGAN gets the ProGAN's training time, minus what earlier invocations already used
  local minutes
  minutes=$("$PYTHON" - "$QUALITY_DIR/dcgan/checkpoint.pt" "$target" <<'EOF'
import pathlib, sys

path, target, done = pathlib.Path(sys.argv[1]), float(sys.argv[2]), 0.0
if path.is_file():  # the training seconds an earlier, interrupted invocation saved
    from progan.checkpoint import load_checkpoint

    done = load_checkpoint(path).get("train_local", {}).get("train_seconds", 0.0)
print(f"{max(target - done, 0.0) / 60:.4f}")
EOF
)
  if [[ $minutes == 0.0000 ]]; then
    echo "DCGAN already trained for the ProGAN's ${target} s"
    return
  fi
  echo "DCGAN: ${minutes} minutes of training (the ProGAN trained ${target} s)"
  # many more images than fit in that time, so that the time budget is what stops it
  # shellcheck disable=SC2086
  train_local "$DCGAN_CONF" ${DCGAN_EXTRA:-} schedule.stabilize_kimg=100000 \
    --out "$QUALITY_DIR/dcgan" \
    --time-budget-min "$minutes"
}

step_compare() {
  "$PYTHON" - "$QUALITY_DIR" <<'EOF'
import json, pathlib, sys

root = pathlib.Path(sys.argv[1])
rows = []
for name in ("progan", "dcgan"):
    path = root / name / "summary.json"
    if not path.is_file():
        sys.exit(f"{path} is missing: run the '{name}' step first")
    s = json.loads(path.read_text())
    m = s["final_metrics"]
    levels = sorted((k for k in m if k.startswith("SWDx1e3_") and k[8:].isdigit()),
                    key=lambda k: -int(k[8:]))
    rows.append(
        f"| {name} | {s['images_shown']:,} | {s['train_seconds']:.0f} | {s['images_per_s']:.0f} "
        f"| {m.get('SWDx1e3_avg', float('nan')):.2f} "
        f"| {' / '.join(f'{m[k]:.2f}' for k in levels)} "
        f"| {m.get('SWDx1e3_avg_real_floor', float('nan')):.2f} "
        f"| {m.get('msssim_fake', float('nan')):.3f} ({m.get('msssim_real', float('nan')):.3f}) "
        f"| {s['eval_seconds']:.0f} | {s['device']} | {name}/samples-final.png |"
    )
table = "\n".join([
    "| model | images shown | training s | images/s | SWD x1e3 avg | SWD per level (64/32/16) "
    "| real floor | MS-SSIM fake (real) | eval s | device | samples |",
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    *rows,
])
swd = {n: json.loads((root / n / "summary.json").read_text())["final_metrics"].get("SWDx1e3_avg")
       for n in ("progan", "dcgan")}
verdict = (
    f"ProGAN {'beats' if swd['progan'] < swd['dcgan'] else 'does not beat'} the DCGAN on SWD "
    f"at equal training time ({swd['progan']:.2f} vs {swd['dcgan']:.2f}; lower is better)"
    if None not in swd.values() else "SWD missing from a run (eval disabled?)"
)
text = f"{table}\n\n{verdict}\n"
(root / "comparison.md").write_text(text)
print(text)
EOF
}

step_collect() {
  local dest=$1
  mkdir -p "$dest"
  cp "$QUALITY_DIR/comparison.md" "$dest/"
  for name in progan dcgan; do
    cp "$QUALITY_DIR/$name/summary.json" "$dest/$name-summary.json"
    cp "$QUALITY_DIR/$name/metrics.jsonl" "$dest/$name-metrics.jsonl"
    cp "$QUALITY_DIR/$name/samples-final.png" "$dest/$name-samples-final.png"
  done
  echo "results copied to $dest"
}

# What a bare GPU host (docs/quality.md) lacks for prepare + train-local, as wheel names.
CARRY_WHEELS="lmdb pydantic pydantic_core annotated_types typing_inspection pytorch_fid
  facenet_pytorch jsonschema jsonschema_specifications referencing rpds_py"

step_carry() {
  local dest=$1 tmp=local/.quality-carry-tmp name source # device_wheels.sh wants a relative path
  local pins=()
  rm -rf "$tmp"
  mkdir -p "$tmp"
  for name in $CARRY_WHEELS; do # the versions this project's venv runs
    pins+=("$name==$("$PYTHON" -c 'import importlib.metadata as m, sys
print(m.version(sys.argv[1]))' "$name")")
  done
  # the shared tool fetches Ray (repacked slim) and the rest; keep only what is needed here
  ../shared/tools/device_wheels.sh "$tmp/wheels" "${pins[@]}" >/dev/null
  mkdir -p "$dest"
  rm -f "$dest"/*.whl
  cp "$tmp/wheels/install.sh" "$dest/"
  for name in $CARRY_WHEELS; do cp "$tmp/wheels/$name"-[0-9]*.whl "$dest/"; done
  # preparing needs neither Ray's dashboard web client nor Serve: 2.5 MB less, so that the
  # folder (about 61 MiB) fits the device tool's 64 MiB with the project
  mkdir "$tmp/ray"
  tar -xJf "$tmp/wheels/ray-slim.tar.xz" -C "$tmp/ray"
  (cd "$tmp/ray" && tar -cf - --exclude=ray/dashboard/client --exclude=ray/serve . | xz -T2 -6) \
    >"$dest/ray-slim.tar.xz"
  rm -rf "$tmp"
  source=$("$PYTHON" -c 'import sys
from pipeline.config import load_config
print(load_config(sys.argv[1], sys.argv[2:]).data.source)' "$PROGAN_CONF" "${OVERRIDES[@]}")
  cp "$source" "$dest/"
  chmod u+w "$dest/$(basename "$source")"
  du -sh --apparent-size "$dest"
  echo "on the GPU host, with $dest carried beside the project:"
  echo "  bash $dest/install.sh && export PYTHONPATH=/tmp/site"
  echo "  QUALITY_SOURCE=$dest/$(basename "$source") $0 prepare progan"
}

steps=("$@")
if [[ ${#steps[@]} -eq 0 ]]; then steps=(prepare progan dcgan compare); fi
i=0
while [[ $i -lt ${#steps[@]} ]]; do
  case ${steps[$i]} in
    prepare | progan | dcgan | compare) "step_${steps[$i]}" ;;
    collect | carry)
      i=$((i + 1))
      "step_${steps[$((i - 1))]}" "${steps[$i]:?${steps[$((i - 1))]} needs a folder}"
      ;;
    *) echo "unknown step ${steps[$i]}; see the top of $0"; exit 2 ;;
  esac
  i=$((i + 1))
done
