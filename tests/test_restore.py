"""Restoring training state where it runs: any device, RNG states, storage URIs, configs.

A CPU box has no GPU to load onto, so the non-CPU device is simulated: a trainer built on
the CPU that says its device is `meta`. Code that loads a checkpoint with
`map_location=trainer.device` gets meta tensors (no data, as GPU tensors would be for
`torch.set_rng_state`) and fails; code that loads to CPU and lets `load_state_dict` place
the tensors works on any device.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.driver.state import RunLock, RunLockedError
from pipeline.driver.storage import StorageError, check_free_space, storage_root
from pipeline.phases.checkpoints import STATE_FILE
from pipeline.phases.session import restore_trainer
from progan.checkpoint import load_checkpoint, save_checkpoint
from progan.trainer import GANTrainer
from tests.conftest import REPO_ROOT
from tests.helpers import run_steps, tiny_config
from tests.pipeline_helpers import tiny_pipeline_config


class TrainerOnAnotherDevice(GANTrainer):
    """A CPU trainer that reports a non-CPU device, as a GPU trainer would."""

    def __init__(self, cfg, device=None, **kwargs) -> None:
        super().__init__(cfg, "cpu", **kwargs)
        self.device = torch.device("meta")


@pytest.fixture
def saved(tmp_path) -> tuple[GANTrainer, Path]:
    trainer = GANTrainer(tiny_config(), "cpu")
    run_steps(trainer, 3)
    return trainer, save_checkpoint(trainer.state_dict(), tmp_path / "ckpt" / STATE_FILE)


def assert_same_state(a: GANTrainer, b: GANTrainer) -> None:
    assert a.images_shown == b.images_shown
    for name, tensor in a.G_ema.state_dict().items():
        assert torch.equal(tensor, b.G_ema.state_dict()[name]), name


@pytest.mark.parametrize("form", ["directory", "file-uri", "ray-checkpoint"])
def test_each_host_restores_on_a_non_cpu_device(saved, form):
    """One restore for every host: a checkpoint directory (train-local), a storage URI (the
    Ray workers' previous phase), a Ray/Tune Checkpoint (a restart); all load to CPU first."""
    import ray.train

    trainer, path = saved
    source = {
        "directory": path.parent,
        "file-uri": f"file://{path.parent}",
        "ray-checkpoint": ray.train.Checkpoint(str(path.parent)),
    }[form]
    other = TrainerOnAnotherDevice(tiny_config())
    restored = restore_trainer(other, [("none", None), (form, source)])
    assert restored.origin == form and restored.host == {}
    assert_same_state(trainer, other)
    # Adam's step counters stay on the CPU, as torch's optimizers expect them
    assert other.opt_g.state_dict()["state"][0]["step"].device.type == "cpu"


def test_rng_states_are_restored(saved):
    """The global RNGs continue where the checkpoint left them (Python, NumPy, torch)."""
    trainer, path = saved
    state = load_checkpoint(path)
    trainer.load_state_dict(state)
    expected = (torch.rand(3), random.random(), np.random.rand(3))
    torch.manual_seed(123), random.seed(123), np.random.seed(123)  # elsewhere in between
    GANTrainer(tiny_config(), "cpu").load_state_dict(state)
    got = (torch.rand(3), random.random(), np.random.rand(3))
    assert torch.equal(expected[0], got[0])
    assert expected[1] == got[1]
    assert np.array_equal(expected[2], got[2])


def test_storage_uris_are_kept_as_given_and_paths_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    demo = REPO_ROOT / "conf" / "demo.yaml"
    for given in ("s3://bucket/progan", "gs://b/x", "file:///shared/ray"):
        cfg = load_config(demo, [f"run.storage_path={given}"])
        assert cfg.run.storage_path == given
        assert storage_root(cfg, tmp_path / "runs" / "x") == given
    cfg = load_config(demo, ["run.storage_path=shared/ray"])
    assert cfg.run.storage_path == str(tmp_path / "shared" / "ray")
    assert cfg.data.dataset == str(tmp_path / "runs" / "demo-data")
    assert cfg.data.source == "builtin:sample-faces"
    assert storage_root(load_config(demo), tmp_path / "runs" / "x") == str(
        tmp_path / "runs" / "x" / "ray"
    )


def test_a_phase_refuses_to_start_without_room_for_its_checkpoints(tmp_path, monkeypatch):
    import pipeline.driver.storage

    cfg = tiny_pipeline_config(tmp_path, tmp_path)
    check_free_space(cfg, str(tmp_path))  # plenty here
    monkeypatch.setattr(pipeline.driver.storage, "free_bytes", lambda uri: 10 * 2**20)
    with pytest.raises(StorageError, match=r"10 MiB free.*run.keep_checkpoints"):
        check_free_space(cfg, str(tmp_path))


def test_the_run_lock_is_exclusive_and_released(tmp_path):
    with RunLock(tmp_path / "run"), pytest.raises(RunLockedError, match="being run by pid"):
        RunLock(tmp_path / "run").acquire()
    RunLock(tmp_path / "run").acquire().release()  # free again


def test_a_directory_loads_its_generator_pt_else_its_state_pt(saved, tmp_path):
    """No probing of old layouts: a run or output folder has generator.pt, a checkpoint
    directory state.pt; anything else is one line saying which."""
    from pipeline.tools.generator import GeneratorLoadError, load_generator, resolve_checkpoint

    _, path = saved
    assert resolve_checkpoint(path.parent) == path
    assert load_generator(path.parent).images_shown == 24
    with pytest.raises(GeneratorLoadError, match=r"no generator\.pt .* and no state\.pt"):
        resolve_checkpoint(tmp_path)
