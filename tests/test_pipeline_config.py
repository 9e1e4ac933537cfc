"""Bad configs fail before Ray starts, in one line naming the key and what is allowed."""

import pytest

from pipeline.cli import main
from pipeline.config import ConfigError, load_config, parse_overrides
from pipeline.dataset import ensure_dataset
from tests.conftest import REPO_ROOT

PRESETS = ["demo", "small-data-32", "celeba-64", "celeba-128", "celebahq-1024"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.bogus=1"], "train.bogus: unknown key; allowed here: ada_interval, ada_kimg"),
        (
            ["train.augment_policy=color,rotate"],
            "train.augment_policy: must be distinct names from color, translation, cutout",
        ),
        (["train.augment=adaptive"], "train.augment: Input should be 'none', 'diffaugment'"),
        (["train.r1_every=0"], "train.r1_every: Input should be greater than or equal to 1"),
        (["nope.x=1"], "nope: unknown key; allowed here: data, eval, model"),
        (["scaling.num_workers=two"], "scaling.num_workers: Input should be a valid integer"),
        (["model.resolution=48"], "model.resolution: must be a power of two in 4..1024"),
        (["train.loss=hinge"], "train.loss: Input should be 'wgan-gp', 'wgan', 'logistic'"),
        (["scaling.num_workers=3"], "batch 16 is not divisible by scaling.num_workers=3"),
        (["schedule.start_resolution=64"], "exceeds model.resolution"),
    ],
)
def test_bad_values_are_one_line_errors_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(REPO_ROOT / "conf" / "demo.yaml", overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_override_syntax_and_missing_file():
    assert parse_overrides(["a.b=3", "a.c=[1, 2]", "d=x"]) == {"a": {"b": 3, "c": [1, 2]}, "d": "x"}
    with pytest.raises(ConfigError, match=r"expected dotted\.key=value"):
        parse_overrides(["a.b"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("conf/missing.yaml")


def test_missing_lmdb_for_a_planned_resolution(tmp_path):
    from tests.pipeline_helpers import make_tiny_dataset, tiny_pipeline_config

    dataset = make_tiny_dataset(tmp_path, n=8, resolution=8)
    cfg = tiny_pipeline_config(dataset, tmp_path, model={"resolution": 16})
    with pytest.raises(ConfigError, match=r"no LMDB for resolution\(s\) \[16\]"):
        ensure_dataset(cfg, console=None)


def test_unprepared_dataset_without_source(tmp_path):
    from tests.pipeline_helpers import tiny_pipeline_config

    cfg = tiny_pipeline_config(tmp_path / "none", tmp_path)
    with pytest.raises(ConfigError, match="not a prepared dataset"):
        ensure_dataset(cfg, console=None)


@pytest.mark.parametrize("preset", PRESETS)
def test_dry_run_of_every_preset(preset, tmp_path, capsys):
    code = main(
        ["run", str(REPO_ROOT / "conf" / f"{preset}.yaml"), f"run.root={tmp_path}", "--dry-run"]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "phase plan" in out and "nothing was run" in out
    assert list(tmp_path.glob("*/config.resolved.yaml"))


def test_cli_reports_config_errors_with_exit_2(capsys):
    code = main(["run", str(REPO_ROOT / "conf" / "demo.yaml"), "train.optimizer=sgd", "--dry-run"])
    assert code == 2
    out = capsys.readouterr().out
    assert "config error: train.optimizer: Input should be 'adam' or 'rmsprop'" in out


def test_overrides_may_follow_options(tmp_path, capsys):
    """`progan run conf.yaml --dry-run k=v` takes k=v (argparse alone would refuse it)."""
    demo = str(REPO_ROOT / "conf" / "demo.yaml")
    code = main(["run", demo, "--dry-run", f"run.root={tmp_path}", "train.loss=wgan"])
    assert code == 0, capsys.readouterr().out
    (resolved,) = tmp_path.glob("*/config.resolved.yaml")
    assert "loss: wgan" in resolved.read_text()
    with pytest.raises(SystemExit):
        main(["run", demo, "--dry-run", "stray"])
    assert "unrecognized arguments: stray" in capsys.readouterr().err


def test_rerun_under_a_changed_config_is_refused(tmp_path):
    """A run id continues only under its own config; resumable keys (eval, tracking) may
    change. No dataset or Ray is needed to open a run directory."""
    from pipeline.driver.run_dir import open_run_dir, run_dir_of
    from tests.pipeline_helpers import tiny_pipeline_config

    cfg = tiny_pipeline_config(tmp_path / "data", tmp_path)
    run_dir = run_dir_of(cfg, "r1")
    assert open_run_dir(cfg, run_dir).run_id == "r1"
    assert (run_dir / "state.json").is_file()
    eval_changed = tiny_pipeline_config(tmp_path / "data", tmp_path, eval={"num_images": 64})
    assert open_run_dir(eval_changed, run_dir).run_id == "r1"
    gp_changed = tiny_pipeline_config(tmp_path / "data", tmp_path, train={"gp_lambda": 5.0})
    with pytest.raises(ConfigError, match=r"different config \(train\.gp_lambda\)"):
        open_run_dir(gp_changed, run_dir)


def test_a_run_saved_with_relative_paths_reopens_from_any_directory(tmp_path, monkeypatch):
    """Runs saved before paths were made absolute kept them relative to where `progan run`
    was typed; reopening one from elsewhere resolves them there, not in the new cwd."""
    import yaml

    from pipeline.config import absolute_paths, validate_config
    from pipeline.driver.run_dir import CONFIG_FILE, open_run_dir, origin_of, run_dir_of
    from tests.pipeline_helpers import tiny_pipeline_config

    project = tmp_path / "project"
    cfg = tiny_pipeline_config(project / "data", project, run={"root": "runs"})
    raw = cfg.model_dump(mode="json")
    raw["data"]["dataset"] = "data"  # as the old code saved it: relative to `project`
    run_dir = project / "runs" / "old"
    run_dir.mkdir(parents=True)
    (run_dir / CONFIG_FILE).write_text(yaml.safe_dump(raw))
    (run_dir / "state.json").write_text('{"run_id": "old"}')
    monkeypatch.chdir(tmp_path)  # somewhere else
    assert origin_of(run_dir) == project
    reopened = validate_config(absolute_paths(raw, project))
    assert run_dir_of(reopened, "old") == run_dir
    assert open_run_dir(reopened, run_dir).run_id == "old"
