"""`progan tune`: spec validation before Ray starts, and a real sweep killed and resumed."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipeline.cli import main
from pipeline.config import ConfigError, load_config
from tests.conftest import REPO_ROOT
from tests.pipeline_helpers import make_tiny_dataset

TINY_BASE = {
    "model": {"resolution": 16, "latent_size": 16, "fmap_base": 64, "fmap_max": 16},
    "schedule": {"transition_kimg": 0.096, "stabilize_kimg": 0.096, "batch_base": 8},
    "run": {"checkpoint_every_kimg": 0.096, "log_every_kimg": 0.048, "sample_grid": 4},
    "eval": {"metrics": ["swd"], "num_images": 32},
}


def tiny_spec(tmp_path: Path, dataset: Path, **sections) -> dict:
    """4 trials of 2 phases (8x8, 16x16 stabilizations), 2 at a time, ASHA after phase 1.

    G_ema is what is measured: ema_beta 0 shows the trained G, 0.5..1 (nearly) the initial
    one, so the 0.99 and 1.0 trials always score worse than the first ones and ASHA stops
    them whatever the order in which results arrive."""
    base = json.loads(json.dumps(TINY_BASE))
    base["data"] = {"dataset": str(dataset)}
    base["run"]["root"] = str(tmp_path / "runs")
    spec = {
        "base": base,
        "trial": {
            "schedule": {"start_resolution": 8, "transition_kimg": 0},
            "tracking": {"log_checkpoints": False},
        },
        "search_space": {"train.ema_beta": {"grid": [0.0, 0.5, 0.99, 1.0]}},
        "search": {"algorithm": "grid", "max_concurrent_trials": 2},
        "scheduler": {"type": "asha", "reduction_factor": 2},
    }
    for key, value in sections.items():
        spec[key] = value
    return spec


def write_spec(tmp_path: Path, spec: dict, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize(
    ("section", "value", "message"),
    [
        (
            "search_space",
            {"train.lrr": {"choice": [1]}},
            "search_space.train.lrr: unknown config key 'lrr' in 'train'; allowed there: "
            "ada_interval, ada_kimg",
        ),
        (
            "search_space",
            {"nope.x": {"choice": [1]}},
            "search_space.nope.x: unknown config key 'nope' in the top level",
        ),
        (
            "search_space",
            {"train": {"choice": ["adam"]}},
            "search_space.train: is a section, not a value",
        ),
        (
            "search_space",
            {"train.loss": {"normal": [0, 1]}},
            "search_space.train.loss: {'normal': [0, 1]} is not a distribution; use one of "
            "choice: [...], grid: [...], uniform: [a, b], loguniform: [a, b], randint",
        ),
        (
            "search_space",
            {"schedule.lr_base": {"loguniform": [0, 0.01]}},
            "search_space.schedule.lr_base: loguniform needs 0 < low < high",
        ),
        (
            "search_space",
            {"train.loss": {"choice": ["wgan-gp", "hinge"]}},
            "search_space.train.loss: value 'hinge' fails validation in the trial config: "
            "train.loss: Input should be 'wgan-gp'",
        ),
        (
            "search_space",
            {"schedule.batch_base": {"uniform": [8, 32]}},
            "(use randint for integer keys)",
        ),
        (
            "search_space",
            {"train.n_critic": {"randint": [0, 3]}},
            "search_space.train.n_critic: value 0 fails validation",
        ),
        ("search_space", {"run.root": {"choice": ["/tmp"]}}, "search_space.run.root: set by"),
        (
            "search",
            {"algorithm": "grid"},
            "search_space.schedule.lr_base: uniform has no grid; search.algorithm grid needs",
        ),
        ("search", {"algorithm": "bayes"}, "search.algorithm: Input should be 'random', 'grid'"),
        ("search", {"metric": "d_loss"}, "search.metric: 'd_loss' is not an end-of-phase metric"),
        (
            "scheduler",
            {"grace_period": 5},
            "scheduler.grace_period: 5 kimg exceeds max_t 0.192 kimg",
        ),
        ("trial", {"model": {"resolution": 48}}, "trial: model.resolution: must be a power"),
        ("bogus", 1, "bogus: unknown key; allowed here: base, name, scheduler, search"),
    ],
)
def test_bad_spec_fails_before_ray_in_one_line(
    section, value, message, tmp_path, monkeypatch, capsys
):
    import pipeline.driver.ray_session

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a bad spec")

    monkeypatch.setattr(pipeline.driver.ray_session, "ensure_ray", no_ray)
    spec = tiny_spec(tmp_path, tmp_path / "dataset")
    spec["search_space"] = {"schedule.lr_base": {"uniform": [0.0005, 0.002]}}
    spec["search"] = {"algorithm": "random"}
    spec[section] = value
    code = main(["tune", str(write_spec(tmp_path, spec))])
    out = capsys.readouterr().out.strip()
    assert code == 2
    assert out.startswith("config error: ") and "\n" not in out, out
    assert message in out


def test_spec_overrides_dry_run_and_missing_searcher(tmp_path, capsys):
    import importlib.util

    from pipeline.search.sweep import load_sweep

    spec = write_spec(tmp_path, tiny_spec(tmp_path, tmp_path / "dataset"))
    args = ["search.num_samples=3", "search_space.train.loss={choice: [bce, lsgan]}"]
    sweep = load_sweep(spec, args, name="x")
    assert sweep.spec.search.num_samples == 3
    assert [d.key for d in sweep.dimensions] == ["train.ema_beta", "train.loss"]
    assert sweep.sweep_dir == (tmp_path / "runs" / "tune" / "x").resolve()
    assert sweep.trial_phases == 2
    assert main(["tune", str(spec), "--dry-run", "--name", "x"]) == 0
    out = capsys.readouterr().out
    assert "train.ema_beta: grid [0.0, 0.5, 0.99, 1.0]" in out and "nothing was run" in out
    if importlib.util.find_spec("optuna") is None:
        with pytest.raises(ConfigError, match="'optuna' needs the optuna package"):
            load_sweep(
                spec, ["search.algorithm=optuna", "search_space.train.ema_beta={choice: [0]}"]
            )


@pytest.mark.parametrize(
    "spec", sorted((REPO_ROOT / "conf" / "tune").glob("*.yaml")), ids=lambda path: path.stem
)
def test_every_shipped_spec_loads(spec, tmp_path, monkeypatch):
    from pipeline.search.sweep import load_sweep

    monkeypatch.chdir(tmp_path)  # run.root is relative: nothing is made in the project
    sweep = load_sweep(spec, [], name="x")
    assert sweep.dimensions and sweep.trial_phases >= 2
    if spec.stem == "small-data":  # the recipe's knobs, over the small-data preset
        assert {d.key for d in sweep.dimensions} == {
            "schedule.lr_base",
            "train.gp_every",
            "train.augment",
            "train.augment_policy",
        }
        train = sweep.trial_cfg.train
        assert (train.loss, train.augment, train.gp_every) == ("wgan-gp", "none", 1)
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("data"))


def results_of(sweep_dir: Path) -> dict[str, list[dict]]:
    """Each trial's results as Tune wrote them (ray/<trial id>/result.json)."""
    out = {}
    for path in (sweep_dir / "ray").glob("*/result.json"):
        rows = []
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # being written
        out[path.parent.name] = rows
    return out


def tune_cli(*args: str, log: Path, env: dict | None = None, **popen) -> subprocess.Popen:
    """`progan tune ...` as a user types it, in its own process group (`env`: extra
    variables)."""
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "tune", *args],
        cwd=REPO_ROOT,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "RAY_AUTH_MODE": "disabled", **(env or {})},
        **popen,
    )


def trial_runs(uri: str, sweep_run_id: str) -> dict[str, Any]:
    """trial id -> its MLflow run, for the trials nested under the sweep run."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("progan")
    runs = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{sweep_run_id}'")
    return {r.data.tags["tune.trial_id"]: r for r in runs}


@pytest.mark.slow
def test_tune_killed_with_kill_9_then_resume_continues_unfinished_trials_only(dataset, tmp_path):
    """Trials one at a time: kill -9 while the second is mid-phase; `progan tune --resume`
    must not rerun the first and must continue the second from its checkpoint; ASHA (its
    rungs restored) still stops the bad trials and the best config is the good one."""
    spec = tiny_spec(
        tmp_path,
        dataset,
        search={"algorithm": "grid", "max_concurrent_trials": 1},
    )
    spec["trial"]["schedule"]["stabilize_kimg"] = 0.768
    spec["trial"]["run"] = {"checkpoint_every_kimg": 0.048}
    path = write_spec(tmp_path, spec)
    sweep_dir = tmp_path / "runs" / "tune" / "t"
    total = 1.536
    proc = tune_cli(str(path), "--name", "t", log=tmp_path / "sweep.log")
    deadline, killed_at = time.time() + 300, None
    while time.time() < deadline:
        assert proc.poll() is None, (tmp_path / "sweep.log").read_text()[-3000:]
        results = results_of(sweep_dir)
        done = [t for t, rows in results.items() if rows and rows[-1]["kimg"] >= total]
        # mid-way through its first phase: before ASHA's first rung (0.768), with a checkpoint
        # (every result has one, and each forces Tune's experiment snapshot)
        midway = [t for t, rows in results.items() if rows and 0.096 <= rows[-1]["kimg"] < 0.5]
        if done and midway:
            os.killpg(proc.pid, signal.SIGKILL)
            killed_at = results
            break
        time.sleep(0.1)
    assert killed_at is not None, "no moment with one trial done and one mid-phase"
    proc.wait()
    assert not (sweep_dir / "summary.md").exists()
    finished = {t for t, rows in killed_at.items() if rows and rows[-1]["kimg"] >= total}
    unfinished = {t for t, rows in killed_at.items() if rows and rows[-1]["kimg"] < total}
    assert finished and unfinished

    resumed = tune_cli("--resume", str(sweep_dir), log=tmp_path / "resume.log")
    assert resumed.wait(timeout=400) == 0, (tmp_path / "resume.log").read_text()[-3000:]
    said = (tmp_path / "resume.log").read_text()  # a line per trial result, not Tune's table
    assert re.search(r"trial \w+ \| [\d.]+/1.536 kimg \(\d+%\) \| phases \d/\d \| ", said), said
    assert "Trial status" not in said  # Tune's own table: only with -v
    assert "Started a local Ray instance" in (sweep_dir / "logs" / "driver.log").read_text()

    after = results_of(sweep_dir)
    for t in finished:  # not run again: no result added
        assert after[t] == killed_at[t]
    for t in unfinished:  # continued from a checkpoint it had reported, not from scratch
        new = after[t][len(killed_at[t]) :]
        assert new, f"trial {t} reported nothing after the resume"
        start = new[0]["start_kimg"]
        assert start > 0 and start in {r["kimg"] for r in killed_at[t]}
        assert all(r["kimg"] > start for r in new)
    info = json.loads((sweep_dir / "sweep.json").read_text())
    runs = trial_runs(info["tracking_uri"], info["mlflow_run_id"])
    assert len(runs) == 4
    by_beta = {float(r.data.params["train.ema_beta"]): r.data.tags["status"] for r in runs.values()}
    for run in runs.values():  # MLflow's compare view of the trials: searched key + metric
        assert "SWDx1e3_avg" in run.data.metrics and "train.ema_beta" in run.data.params
    assert by_beta[0.0] == "completed" and "early_stopped" in (by_beta[0.99], by_beta[1.0])
    summary = (sweep_dir / "summary.md").read_text()
    assert "early_stopped" in summary and "(train.ema_beta=0)" in summary
    best = load_config(sweep_dir / "best.yaml")
    assert best.train.ema_beta == 0.0 and best.schedule.start_resolution == 4


@pytest.mark.slow
def test_pbt_demo_sweep_exploits_and_shows_the_lineage_in_mlflow(dataset, tmp_path):
    """conf/tune/pbt-demo.yaml at a tiny size: at each phase end the worse trial copies the
    better one's checkpoint; the copy shows in its MLflow run's tags and in its results."""
    tiny = {
        "base.run.root": str(tmp_path / "runs"),
        "base.data.dataset": str(dataset),
        "base.data.source": "null",
        "base.model.resolution": 16,
        "trial.model.latent_size": 16,
        "trial.model.fmap_base": 64,
        "trial.model.fmap_max": 16,
        "trial.schedule.transition_kimg": 0.096,
        "trial.schedule.stabilize_kimg": 0.096,
        "trial.schedule.batch_base": 8,
        "trial.run.checkpoint_every_kimg": 0.096,
        "trial.run.log_every_kimg": 0.048,
        "trial.run.sample_grid": 4,
        "trial.eval.num_images": 32,
        "scheduler.perturbation_interval": 0.096,
    }
    overrides = [f"{k}={v}" for k, v in tiny.items()]
    spec = REPO_ROOT / "conf" / "tune" / "pbt-demo.yaml"
    proc = tune_cli(str(spec), *overrides, "--name", "pbt", log=tmp_path / "pbt.log")
    assert proc.wait(timeout=400) == 0, (tmp_path / "pbt.log").read_text()[-3000:]
    sweep_dir = tmp_path / "runs" / "tune" / "pbt"
    results = results_of(sweep_dir)
    assert len(results) == 2
    exploited = {t for t, rows in results.items() if rows[-1]["pbt_exploits"] >= 1}
    assert exploited, "no trial copied the other's checkpoint"
    info = json.loads((sweep_dir / "sweep.json").read_text())
    runs = trial_runs(info["tracking_uri"], info["mlflow_run_id"])
    for t in exploited:
        tags = runs[t].data.tags
        other = (set(results) - {t}).pop()
        assert tags["pbt.exploited_from"] == other
        assert tags["pbt.lineage"].split(" -> ")[-1].startswith(f"{other}@")  # the last copy
        assert all(r["kimg"] >= 0.096 for r in results[t] if r.get("pbt_exploits"))
    assert (sweep_dir / "best.yaml").is_file()


@pytest.mark.slow
def test_pbt_copies_the_better_trial_when_its_metric_arrives_last(local_ray, tmp_path, monkeypatch):
    """A trial reports a phase end as a checkpoint, then the metric at the same clock. When
    the better trial's metric comes last it completes the synchronous step: Ray's PBT took
    that trial's save (its last report, no checkpoint) and skipped the copy; the sweep's PBT
    hands over the checkpoint registered at that clock."""
    import tempfile

    from ray import tune

    from pipeline.search.schedulers import PhaseEndPBT

    monkeypatch.setenv("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # checkpoints: no metric
    worse_reported = tmp_path / "worse-reported"

    def trainable(config: dict) -> None:
        state = {"t": 0, "trained_by": config["score"]}  # whose state it is: their score
        if restored := tune.get_checkpoint():
            with restored.as_directory() as d:
                state = json.loads((Path(d) / "state.json").read_text())
        for t in [t for t in (1.0, 1.5) if t > state["t"]]:  # one PBT step, at t=1
            with tempfile.TemporaryDirectory() as d:
                (Path(d) / "state.json").write_text(json.dumps({**state, "t": t}))
                tune.report({"t": t}, checkpoint=tune.Checkpoint.from_directory(d))
            if config["score"] == 1.0:  # the better one: its metric after the worse one's
                deadline = time.monotonic() + 60
                while not worse_reported.exists() and time.monotonic() < deadline:
                    time.sleep(0.1)
                time.sleep(2)
            else:
                worse_reported.touch()
            tune.report({"t": t, "score": config["score"], "trained_by": state["trained_by"]})

    pbt = PhaseEndPBT(
        time_attr="t",
        perturbation_interval=1,
        hyperparam_mutations={"lr": [0.1, 0.2]},
        quantile_fraction=0.5,
        require_attrs=False,
        synch=True,
        end=1.5,
    )
    tuner = tune.Tuner(
        trainable,
        param_space={"score": tune.grid_search([1.0, 2.0]), "lr": 0.1},
        tune_config=tune.TuneConfig(metric="score", mode="min", scheduler=pbt, reuse_actors=True),
        run_config=tune.RunConfig(
            storage_path=str(tmp_path / "ray"),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=4),
            verbose=0,
        ),
    )
    results = [r.metrics for r in tuner.fit()]
    assert len(results) == 2 and all(r["t"] == 1.5 for r in results), results
    assert [r["trained_by"] for r in results] == [1.0, 1.0], "the worse trial copied nothing"


def test_pbt_decides_nothing_at_a_trials_last_clock():
    """At the end of its budget a trial keeps its own generator: no step is even considered
    (Ray's PBT would pause it and let it copy another's final checkpoint)."""
    from types import SimpleNamespace

    from pipeline.search.schedulers import PhaseEndPBT

    pbt = PhaseEndPBT(
        time_attr="kimg", perturbation_interval=1.5, hyperparam_mutations={"lr": [1, 2]}, end=4.5
    )
    pbt.set_search_properties("swd", "min")
    trial = SimpleNamespace(trial_id="a", config={"lr": 1})  # no controller: nothing may act
    assert pbt.on_trial_result(None, trial, {"kimg": 4.5, "swd": 9.0}) == "CONTINUE"
    assert not pbt._trial_state  # never seen by PBT's own bookkeeping


def test_asha_decisions_after_a_restart_still_compare_with_earlier_trials(tmp_path):
    """The sweep's ASHA saves its rungs after each decision and a new instance (what a
    resumed sweep builds) restores them: a worse trial arriving after the restart is
    stopped; without the saved rungs it would be the first arrival and continue."""
    from types import SimpleNamespace

    from pipeline.search.schedulers import PersistentASHA

    def scheduler() -> PersistentASHA:
        asha = PersistentASHA(
            str(tmp_path / "scheduler.pkl"), time_attr="kimg", grace_period=1.0, max_t=4.0
        )
        asha.set_search_properties("swd", "min")
        return asha

    first, good, bad = scheduler(), SimpleNamespace(trial_id="a"), SimpleNamespace(trial_id="b")
    first.on_trial_add(None, good)
    assert first.on_trial_result(None, good, {"kimg": 1.0, "swd": 10.0}) == "CONTINUE"
    restarted = scheduler()
    restarted.on_trial_add(None, bad)
    assert restarted.on_trial_result(None, bad, {"kimg": 1.0, "swd": 50.0}) == "STOP"
    fresh = PersistentASHA(str(tmp_path / "none.pkl"), time_attr="kimg", grace_period=1.0, max_t=4)
    fresh.set_search_properties("swd", "min")
    fresh.on_trial_add(None, bad)
    assert fresh.on_trial_result(None, bad, {"kimg": 1.0, "swd": 50.0}) == "CONTINUE"


def test_pbt_explores_choices_as_lists_and_keeps_ranges():
    """PBT scales a tune.choice like a number (EMA beta 0.9 x 1.2 = 1.08 failed a trial):
    listed values go to PBT as lists, perturbed ranges are clamped back."""
    from pipeline.search.schedulers import keep_in_range
    from pipeline.search.space import parse_dimension

    dims = [
        parse_dimension("schedule.lr_base", {"loguniform": [0.001, 0.01]}),
        parse_dimension("train.n_critic", {"randint": [1, 3]}),
        parse_dimension("train.ema_beta", {"choice": [0.9, 0.99]}),
    ]
    assert dims[2].pbt_mutation() == [0.9, 0.99]
    perturbed = {"schedule.lr_base": 0.012, "train.n_critic": 3.6, "train.ema_beta": 0.99}
    assert keep_in_range(dims, perturbed) == {
        "schedule.lr_base": 0.01,
        "train.n_critic": 3,
        "train.ema_beta": 0.99,
    }


@pytest.mark.slow
def test_a_sweep_stored_in_a_bucket_keeps_its_trials_there_and_resumes_from_it(dataset, tmp_path):
    """`storage_path: s3://...` (moto's S3 server on 127.0.0.1): the trials' checkpoints and
    Tune's experiment state are in the bucket, nothing of them in the sweep folder, and
    `progan tune --resume` restores the sweep from the bucket."""
    from tests.s3_harness import s3_server

    spec = tiny_spec(tmp_path, dataset, search={"algorithm": "grid", "max_concurrent_trials": 1})
    spec["search_space"] = {"train.ema_beta": {"grid": [0.0]}}
    spec["scheduler"] = {"type": "fifo"}
    with s3_server(tmp_path / "s3") as s3:
        spec["storage_path"] = s3.uri("tune")
        path = write_spec(tmp_path, spec)
        sweep = tune_cli(str(path), "--name", "s3", log=tmp_path / "sweep.log", env=s3.env)
        assert sweep.wait(timeout=400) == 0, (tmp_path / "sweep.log").read_text()[-3000:]
        sweep_dir = tmp_path / "runs" / "tune" / "s3"
        keys = s3.objects("tune/s3/")
        assert any(k.endswith(".json") and "experiment_state" in k for k in keys), keys
        assert [k for k in keys if "/checkpoint_" in k and k.endswith("state.pt")], keys
        assert not (sweep_dir / "ray").exists()
        assert "completed" in (sweep_dir / "summary.md").read_text()
        resumed = tune_cli("--resume", str(sweep_dir), log=tmp_path / "resume.log", env=s3.env)
        assert resumed.wait(timeout=300) == 0, (tmp_path / "resume.log").read_text()[-3000:]
