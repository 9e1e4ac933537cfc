"""Benchmark of the training step: images/s and peak memory at a resolution, batch, dtype.

    python -m progan.bench --resolution 64 --batch 16 --dtype bf16 --device cuda

Times full iterations (D step + G step + EMA) at the final level of a network built to
`--resolution`, after warm-up, and prints one line per configuration.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from progan.config import GANConfig
from progan.trainer import GANTrainer


def bench_step(
    resolution: int,
    batch: int,
    dtype: str = "fp32",
    device: str = "cpu",
    fmap_base: int = 8192,
    fmap_max: int = 512,
    latent_size: int = 512,
    channels_last: bool = False,
    steps: int = 10,
    warmup: int = 3,
    arch: str = "progan",
) -> dict[str, float | int | str]:
    """Time `steps` training iterations; return images/s and peak memory."""
    cfg = GANConfig.model_validate(
        {
            "model": {
                "arch": arch,
                "resolution": resolution,
                "fmap_base": fmap_base,
                "fmap_max": fmap_max,
                "latent_size": latent_size,
            },
            "train": {"bf16": dtype == "bf16", "channels_last": channels_last},
            "schedule": {
                "start_resolution": resolution,
                "stabilize_kimg": 1e6,
                "batch_base": batch,
            },
        }
    )
    trainer = GANTrainer(cfg, device=device)
    real = torch.randint(0, 256, (batch, 3, resolution, resolution), dtype=torch.uint8)
    real = real.to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        trainer.train_step(real)
    sync()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(real)
    sync()
    elapsed = time.perf_counter() - start
    if device.startswith("cuda"):
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process RSS
    return {
        "arch": arch,
        "resolution": resolution,
        "batch": batch,
        "dtype": dtype,
        "device": device,
        "fmap_base": fmap_base,
        "fmap_max": fmap_max,
        "channels_last": channels_last,
        "img_per_s": round(steps * batch / elapsed, 2),
        "step_ms": round(1000 * elapsed / steps, 1),
        "peak_mem_mb": round(peak_mb, 1),
    }


def main(argv: list[str] | None = None) -> None:
    """Command-line entry: one JSON line per (resolution, dtype) combination."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--resolution", type=int, nargs="+", default=[64])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--dtype", choices=["fp32", "bf16"], nargs="+", default=["fp32"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--fmap-base", type=int, default=8192)
    p.add_argument("--fmap-max", type=int, default=512)
    p.add_argument("--latent-size", type=int, default=512)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--arch", choices=["progan", "dcgan"], default="progan")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    a = p.parse_args(argv)
    for res in a.resolution:
        for dtype in a.dtype:
            result = bench_step(
                res,
                a.batch,
                dtype,
                a.device,
                a.fmap_base,
                a.fmap_max,
                a.latent_size,
                a.channels_last,
                a.steps,
                a.warmup,
                a.arch,
            )
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
