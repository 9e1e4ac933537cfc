"""Benchmark of the training step: img/s, ms/step, peak memory and the share of a bf16 ceiling.

    python -m progan.bench --device cuda --resolution 32 64 128 256 --batch 16 \\
        --dtype fp32 bf16 --mode eager compiled

One iteration = WGAN-GP D step + G step + EMA at the final level of networks built to the
resolution (a stable phase), after warm-up (compilation included in warm-up). The ceiling
is what the device's measured bf16 matmul rate would give if the step were nothing but its
matmul/conv FLOPs: FLOPs of one iteration counted from the networks (torch's FLOP
formulas over every op of an eager step: forward, backward and the gradient penalty's
double backward) divided into the peak measured with a large bf16 matmul.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from progan.config import GANConfig
from progan.device import configure_device
from progan.trainer import GANTrainer


def bench_config(
    resolution: int,
    batch: int,
    dtype: str = "fp32",
    mode: str = "eager",
    fmap_base: int = 8192,
    fmap_max: int = 512,
    latent_size: int = 512,
    channels_last: bool = False,
    fused_scale: bool = False,
    arch: str = "progan",
) -> GANConfig:
    """A config whose whole plan is one long stable phase at `resolution`."""
    return GANConfig.model_validate(
        {
            "model": {
                "arch": arch,
                "resolution": resolution,
                "fmap_base": fmap_base,
                "fmap_max": fmap_max,
                "latent_size": latent_size,
                "fused_scale": fused_scale,
            },
            "train": {
                "bf16": dtype == "bf16",
                "channels_last": channels_last,
                "compile": mode == "compiled",
            },
            "schedule": {
                "start_resolution": resolution,
                "stabilize_kimg": 1e6,
                "batch_base": batch,
            },
        }
    )


def synchronizer(device: torch.device) -> Callable[[], None]:
    """Wait for the device's queued work (a no-op on CPU)."""
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def time_calls(fn: Callable[[], None], device: torch.device, steps: int, warmup: int) -> float:
    """Seconds per call of `fn`, after `warmup` calls, device work included."""
    sync = synchronizer(device)
    for _ in range(warmup):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return (time.perf_counter() - start) / steps


def matmul_peak_flops(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> float:
    """FLOP/s of a large square matmul in `dtype` on `device` (the practical peak)."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = time_calls(lambda: torch.mm(a, b), device, steps=10, warmup=2)
    return 2 * n**3 / seconds


class CountFlops(TorchDispatchMode):
    """Sums torch's FLOP formulas (matmuls, convolutions and their backward) of every op run.

    torch's FlopCounterMode is not used: its module tracker breaks autograd.grad, which
    the gradient penalty calls (pytorch/pytorch#131753).
    """

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def iteration_flops(cfg: GANConfig, device: torch.device) -> int:
    """Matmul/conv FLOPs of one eager training iteration of `cfg` (batch included)."""
    eager = cfg.model_copy(deep=True)
    eager.train.compile = False
    trainer = GANTrainer(eager, device=device)
    real = random_batch(cfg, device)
    trainer.step(real)  # set-up outside the count
    with CountFlops() as counter:
        trainer.step(real)
    return counter.total


def random_batch(cfg: GANConfig, device: torch.device) -> torch.Tensor:
    """A uint8 batch of the config's stable phase (content does not change the cost)."""
    res, batch = cfg.model.resolution, cfg.schedule.batch_base
    real = torch.randint(0, 256, (batch, cfg.model.num_channels, res, res), dtype=torch.uint8)
    return real.to(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated GPU memory since the last reset, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_step(
    cfg: GANConfig,
    device: str | torch.device,
    steps: int = 10,
    warmup: int = 3,
    profile: Path | None = None,
) -> dict[str, float | int | str]:
    """Time `steps` iterations of `cfg` after `warmup`; img/s, ms/step, peak memory.

    With `profile`, the timed steps also run under torch.profiler: a Chrome trace is
    written there and the top operators are printed (to see where a target is missed).
    """
    device = configure_device(torch.device(device))
    trainer = GANTrainer(cfg, device=device)
    real = random_batch(cfg, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with profiled(profile, cfg, device) if profile else contextlib.nullcontext():
        seconds = time_calls(lambda: trainer.step(real), device, steps, warmup)
    trainer.read_stats()  # the run was finite
    batch = cfg.schedule.batch_base
    t = cfg.train
    return {
        "arch": cfg.model.arch,
        "resolution": cfg.model.resolution,
        "batch": batch,
        "dtype": "bf16" if t.bf16 else "fp32",
        "mode": "compiled" if t.compile else "eager",
        "device": str(device),
        "fmap_base": cfg.model.fmap_base,
        "fmap_max": cfg.model.fmap_max,
        "img_per_s": round(batch / seconds, 2),
        "step_ms": round(1000 * seconds, 2),
        "peak_mem_mb": round(peak_memory_mb(device), 1),
    }


@contextlib.contextmanager
def profiled(folder: Path, cfg: GANConfig, device: torch.device) -> Iterator[None]:
    """torch.profiler around the block; a Chrome trace in `folder`, top ops printed."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        yield
    t = cfg.train
    name = f"res{cfg.model.resolution}-b{cfg.schedule.batch_base}-{'bf16' if t.bf16 else 'fp32'}"
    name += "-compiled" if t.compile else "-eager"
    folder.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(folder / f"{name}.json"))
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=15), file=sys.stderr, flush=True)


def with_ceiling(result: dict, flops: int, peak_flops: float) -> dict:
    """Add FLOPs per image, the bf16 ceiling in img/s and the measured share of it."""
    per_image = flops / result["batch"]
    ceiling = peak_flops / per_image
    return {
        **result,
        "gflop_per_img": round(per_image / 1e9, 3),
        "bf16_peak_tflops": round(peak_flops / 1e12, 2),
        "ceiling_img_per_s": round(ceiling, 1),
        "share_of_ceiling": round(result["img_per_s"] / ceiling, 4),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--resolution", type=int, nargs="+", default=[64])
    p.add_argument("--batch", type=int, nargs="+", default=[16])
    p.add_argument("--dtype", choices=["fp32", "bf16"], nargs="+", default=["fp32", "bf16"])
    p.add_argument("--mode", choices=["eager", "compiled"], nargs="+", default=["eager"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--fmap-base", type=int, default=8192)
    p.add_argument("--fmap-max", type=int, default=512)
    p.add_argument("--latent-size", type=int, default=512)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--fused-scale", action="store_true")
    p.add_argument("--arch", choices=["progan", "dcgan"], default="progan")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--profile", type=Path, help="write torch.profiler traces to this folder")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """One JSON line per (resolution, batch, dtype, mode)."""
    a = parse_args(argv)
    device = torch.device(a.device)
    peak = matmul_peak_flops(device)
    for res in a.resolution:
        for batch in a.batch:
            flops = None
            for dtype in a.dtype:
                for mode in a.mode:
                    cfg = bench_config(
                        res, batch, dtype, mode, a.fmap_base, a.fmap_max, a.latent_size,
                        a.channels_last, a.fused_scale, a.arch,
                    )  # fmt: skip
                    flops = flops or iteration_flops(cfg, device)
                    result = bench_step(cfg, device, a.steps, a.warmup, a.profile)
                    print(json.dumps(with_ceiling(result, flops, peak)), flush=True)


if __name__ == "__main__":
    main()
