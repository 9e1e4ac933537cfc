"""One phase host: `progan train-local`, `progan run` (Ray Train, one worker) and a one-trial
`progan tune` train the same config into the same generator, bit for bit.

All three run pipeline.phases.session.PhaseSession; only where its reports go differs. Each
is the installed CLI in a subprocess on one torch thread (as Ray's workers run).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.config import dump_config
from pipeline.phases.checkpoints import GENERATOR_FILE, SAMPLES_DIR, STATE_FILE
from progan.checkpoint import load_checkpoint
from tests.conftest import REPO_ROOT
from tests.pipeline_helpers import make_tiny_dataset, tiny_pipeline_config

pytestmark = pytest.mark.slow


def progan(*args: str, log: Path) -> None:
    """`progan ARGS` as a user types it; fails the test with the end of its output."""
    exe = Path(sys.executable).parent / "progan"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}
    with log.open("w") as out:
        code = subprocess.run(
            [str(exe), *args], cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, env=env
        ).returncode
    assert code == 0, log.read_text()[-4000:]


def final_checkpoint(folder: Path) -> Path:
    """The checkpoint directory holding the plan's last generator.pt under `folder`."""
    found = sorted(folder.rglob(GENERATOR_FILE), key=lambda p: load_checkpoint(p)["images_shown"])
    return found[-1].parent


def test_three_hosts_train_the_same_generator(tmp_path):
    dataset = make_tiny_dataset(tmp_path / "data")
    cfg = tiny_pipeline_config(
        dataset,
        tmp_path,
        eval={"enabled": True, "metrics": ["swd"], "num_images": 32},
        run={"root": str(tmp_path / "runs"), "checkpoint_every_kimg": 0.064},
    )
    assert [p.name for p in cfg.plan] == [
        "00-0004-stabilize",
        "01-0008-transition",
        "02-0008-stabilize",
    ]
    config = dump_config(cfg, tmp_path / "tiny.yaml")
    spec = tmp_path / "one-trial.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "one",
                "base": str(config),
                "search_space": {"train.seed": {"grid": [cfg.train.seed]}},
                "search": {"algorithm": "grid", "metric": "SWDx1e3_avg"},
                "scheduler": {"type": "fifo"},
            }
        )
    )

    progan("train-local", str(config), "--out", str(tmp_path / "local"), log=tmp_path / "l.log")
    progan("run", str(config), "--run-id", "ray", log=tmp_path / "ray.log")
    progan("tune", str(spec), log=tmp_path / "tune.log")

    hosts = {
        "train-local": tmp_path / "local" / "checkpoints",
        "progan run": tmp_path / "runs" / "ray" / "ray",
        "progan tune": tmp_path / "runs" / "tune" / "one" / "ray",
    }
    finals = {host: final_checkpoint(folder) for host, folder in hosts.items()}
    generators = {host: load_checkpoint(d / GENERATOR_FILE) for host, d in finals.items()}
    states = {host: load_checkpoint(d / STATE_FILE) for host, d in finals.items()}
    grids = {host: next((d / SAMPLES_DIR).glob("*.png")).read_bytes() for host, d in finals.items()}
    ref = "train-local"
    for host in hosts:
        mine, theirs = generators[host], generators[ref]
        assert mine["images_shown"] == 288 and (mine["resolution"], mine["alpha"]) == (8, 1.0)
        assert {k: v for k, v in mine.items() if k != "G_ema"} == {
            k: v for k, v in theirs.items() if k != "G_ema"
        }, host
        for net in ("G", "D", "G_ema"):
            for name, tensor in states[ref][net].items():
                assert torch.equal(states[host][net][name], tensor), (host, net, name)
        for name, tensor in theirs["G_ema"].items():
            assert torch.equal(mine["G_ema"][name], tensor), (host, name)
        assert grids[host] == grids[ref], host  # the same sample grid, drawn the same way
    # the run directory's and the output folder's generator.pt are that file
    for copy in (tmp_path / "local" / GENERATOR_FILE, tmp_path / "runs" / "ray" / GENERATOR_FILE):
        assert copy.read_bytes() == (finals["train-local"] / GENERATOR_FILE).read_bytes()
