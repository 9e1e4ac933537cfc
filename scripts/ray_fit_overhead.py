"""Ray Train's fixed cost per phase: time empty TorchTrainer fits on a local Ray.

Each fit runs a train function that only records when it started and reports once, so
the fit's wall time is the cost every pipeline phase pays before and after its training:
controller actor, worker group start (with the torch process group), and teardown. Uses
the pipeline's own Ray settings (`pipeline.driver.ray_session.RAY_ENV`). The controller's
breakdown is in Ray's logs (`/tmp/ray/session_latest/logs/train/ray-train-sys-controller-*.log`).

    .venv/bin/python scripts/ray_fit_overhead.py --workers 1 --fits 3
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def empty_train_fn(config: dict) -> None:
    """Record the start time in a file and report once."""
    import ray.train

    started = time.time()
    if ray.train.get_context().get_world_rank() == 0:
        Path(config["times"]).write_text(json.dumps({"started": started, "ended": time.time()}))
    ray.train.report({"started": started})


def main() -> None:
    """Time `--fits` empty fits with `--workers` CPU workers; print one JSON line each."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--fits", type=int, default=3)
    args = parser.parse_args()

    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline.driver.ray_session import start_ray

    start_ray(None)
    with tempfile.TemporaryDirectory() as tmp:
        times = Path(tmp) / "times.json"
        for i in range(args.fits):
            began = time.time()
            TorchTrainer(
                empty_train_fn,
                train_loop_config={"times": str(times)},
                scaling_config=ray.train.ScalingConfig(num_workers=args.workers),
                run_config=ray.train.RunConfig(name=f"empty-{i}", storage_path=f"{tmp}/ray"),
            ).fit()
            done = time.time()
            worker = json.loads(times.read_text())
            print(
                json.dumps(
                    {
                        "fit": i,
                        "workers": args.workers,
                        "fit_s": round(done - began, 2),
                        "until_train_fn_s": round(worker["started"] - began, 2),
                        "after_report_s": round(done - worker["ended"], 2),
                    }
                ),
                flush=True,
            )
    ray.shutdown()


if __name__ == "__main__":
    main()
