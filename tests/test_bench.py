"""`python -m progan.bench`: what it prints, and the FLOP count its ceiling rests on."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

from progan.bench import CountFlops, bench_config, iteration_flops
from tests.conftest import REPO_ROOT
from tests.helpers import torch_threads


def test_flop_count_of_a_conv_and_of_an_iteration_scales_with_the_batch():
    x, w = torch.randn(2, 3, 8, 8), torch.randn(5, 3, 3, 3)
    with CountFlops() as counter:
        F.conv2d(x, w, padding=1)
    assert counter.total == 2 * (2 * 8 * 8) * 5 * (3 * 3 * 3)  # 2 x outputs x MACs each
    small = {"fmap_base": 32, "fmap_max": 8, "latent_size": 8}
    with torch_threads(1):
        one, two = (
            iteration_flops(bench_config(8, b, **small), torch.device("cpu")) for b in (2, 4)
        )
    assert one > 0 and two == 2 * one


def test_bench_command_prints_throughput_memory_and_share_of_the_ceiling():
    args = ["--device", "cpu", "--resolution", "4", "8", "--batch", "4", "--fmap-base", "32"]
    args += ["--fmap-max", "8", "--latent-size", "8", "--dtype", "fp32", "bf16"]
    out = subprocess.run(
        [sys.executable, "-m", "progan.bench", *args, "--steps", "1", "--warmup", "1"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO_ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    ).stdout
    rows = [json.loads(line) for line in out.splitlines()]
    assert [(r["resolution"], r["dtype"]) for r in rows] == [
        (4, "fp32"), (4, "bf16"), (8, "fp32"), (8, "bf16"),
    ]  # fmt: skip
    for r in rows:
        assert r["img_per_s"] > 0 and r["peak_mem_mb"] > 0 and r["mode"] == "eager"
        # img/s and the ceiling are printed rounded (0.01, 0.1): their ratio agrees within that
        share = r["img_per_s"] / r["ceiling_img_per_s"]
        slack = share * (0.005 / r["img_per_s"] + 0.05 / r["ceiling_img_per_s"]) + 5e-5
        assert abs(r["share_of_ceiling"] - share) <= slack
    assert rows[2]["gflop_per_img"] > rows[0]["gflop_per_img"]  # 8x8 costs more than 4x4
