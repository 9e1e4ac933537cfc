#!/usr/bin/env bash
# The pipeline on a GPU, in under 5 minutes: a 3-phase tiny run (4x4 stabilize, 8x8
# transition, 8x8 stabilize) through
#   1. `progan train-local --device cuda`, killed mid-run and continued;
#   2. `progan run` with scaling.use_gpu=true on a local Ray (one worker, NCCL backend),
#      its process group killed with SIGKILL mid-phase, then `progan resume`;
# and prints each step's wall time and the final generators' images shown and max
# difference (GPU kernels are not bit-deterministic, so the two paths are compared, not
# asserted equal). Exit status 0 only if every step did what it should.
#
# On a bare GPU host with torch but no Ray/MLflow/lmdb (the project's device machine):
#   ../shared/tools/device_wheels.sh .devwheels      # here, once (53 MB, git-ignored)
#   carry .devwheels; on the host: bash scripts/gpu_check.sh
# It installs .devwheels into /tmp/site when Ray, MLflow or lmdb cannot be imported.
# GPU_CHECK_DEVICE=cpu runs the same steps on a CPU (to check the script itself).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
USE_GPU=$([ "$DEVICE" = cuda ] && echo true || echo false)
if ! $PY -c "import ray, mlflow, lmdb" 2>/dev/null; then
  [ -d .devwheels ] || { echo "Ray/MLflow/lmdb missing and no .devwheels folder" >&2; exit 2; }
  bash .devwheels/install.sh
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
if [ "$DEVICE" = cuda ]; then
  $PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('device:', torch.cuda.get_device_name(0), 'torch', torch.__version__)"
fi
work=$(mktemp -d /tmp/gpu-check-XXXX)
export RAY_USAGE_STATS_ENABLED=0 MLFLOW_TRACKING_URI=sqlite:///$work/mlflow.db
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }

$PY - "$work" "$USE_GPU" <<'EOF'
import sys
from pathlib import Path

import yaml

from tests.pipeline_helpers import make_tiny_dataset

work = Path(sys.argv[1])
dataset = make_tiny_dataset(work, n=64, resolution=8)
cfg = {
    "data": {"dataset": str(dataset)},
    "model": {"resolution": 8, "latent_size": 32, "fmap_base": 128, "fmap_max": 32},
    "schedule": {"transition_kimg": 2, "stabilize_kimg": 2, "batch_base": 16},
    "train": {"bf16": True},
    "scaling": {"num_workers": 1, "use_gpu": sys.argv[2] == "true", "gpus_per_worker": 1},
    "run": {"root": str(work / "runs"), "checkpoint_every_kimg": 0.256,
            "log_every_kimg": 0.128, "sample_grid": 4},
    "eval": {"metrics": ["swd"], "num_images": 64},
}
(work / "gpu.yaml").write_text(yaml.safe_dump(cfg))
EOF
stamp "tiny dataset and config in $work"

# 1. train-local on cuda: a time budget stops it mid-run, a rerun finishes it
$PY -m pipeline.cli train-local "$work/gpu.yaml" --device "$DEVICE" --out "$work/local" \
  --time-budget-min 0.05 | tail -3
$PY -m pipeline.cli train-local "$work/gpu.yaml" --device "$DEVICE" --out "$work/local" | tail -3
stamp "train-local --device $DEVICE: interrupted by its budget and continued"

# 2. progan run on a local Ray with the GPU; kill -9 its process group mid-phase; resume
setsid $PY -m pipeline.cli run "$work/gpu.yaml" --run-id gpu > "$work/run.log" 2>&1 &
pid=$!
for _ in $(seq 600); do
  ls -d "$work"/runs/gpu/ray/gpu-01-*/images-* >/dev/null 2>&1 && break
  kill -0 $pid 2>/dev/null || { tail -30 "$work/run.log"; echo "run ended early" >&2; exit 1; }
  sleep 0.2
done
kill -9 -- -$pid 2>/dev/null || true
wait $pid 2>/dev/null || true
stamp "progan run killed (kill -9 of its process group) in phase 01"
$PY -m pipeline.cli resume "$work/runs/gpu" | tail -8
stamp "progan resume finished the run"

$PY - "$work" <<'EOF'
import json
import sys
from pathlib import Path

import torch

from progan.checkpoint import load_checkpoint

work = Path(sys.argv[1])
state = json.loads((work / "runs/gpu/state.json").read_text())
starts = {k: v["starts"] for k, v in state["phases"].items()}
print("worker starts per phase:", starts)
assert state["finished"], "run not finished"
assert any(s["origin"] == "ray-checkpoint" for s in starts["1"]), "phase 1 did not resume"
a = load_checkpoint(work / "runs/gpu/generator.pt")
b = load_checkpoint(work / "local/generator.pt")
diff = max((a["G_ema"][k] - b["G_ema"][k]).abs().max().item() for k in a["G_ema"])
print(f"images shown: progan run {a['images_shown']}, train-local {b['images_shown']}; "
      f"max |G_ema difference| {diff:.3g}")
assert a["images_shown"] == b["images_shown"]
assert torch.isfinite(torch.tensor(diff))
EOF
stamp "gpu_check: ok"
