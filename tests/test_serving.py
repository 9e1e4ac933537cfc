"""The registered generator serves: `mlflow models serve` of models:/progan@candidate takes
seeds and answers with `progan generate`'s images; `progan promote` moves champion."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from pipeline.cli import main
from pipeline.phases.checkpoints import export_generator
from pipeline.tools.registry import log_generator
from progan.trainer import GANTrainer
from tests.cluster_harness import free_port
from tests.helpers import run_steps, tiny_config

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A SQLite store with version 1 of `progan`: a tiny 16x16 generator, as a run ends."""
    root = tmp_path_factory.mktemp("registry")
    trainer = GANTrainer(tiny_config(model={"resolution": 16}))
    run_steps(trainer, 3)
    trainer.images_shown = trainer.plan[-1].end_images
    generator = root / "generator.pt"
    export_generator(trainer.state_dict(), trainer.plan[-1], generator)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("progan", artifact_location=str(root / "artifacts"))
    run = client.create_run(experiment, run_name="tiny").info.run_id
    done = log_generator(uri, run, generator, "progan", {"run_id": "tiny"})
    assert (done.name, done.version) == ("progan", "1")
    return uri, generator, root


def generated(uri: str, model: str, folder: Path, seed: int, n: int) -> np.ndarray:
    args = ["generate", model, "--tracking-uri", uri, "--seed", str(seed), "--n", str(n)]
    assert main([*args, "--individual", str(folder)]) == 0
    return np.stack([np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))])


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as answer:
        return json.loads(answer.read())


@pytest.mark.slow  # `mlflow models serve`
def test_the_candidate_serves_seeds_as_progan_generates_images(registry, tmp_path):
    uri, _, _ = registry
    expected = generated(uri, "models:/progan/1", tmp_path / "faces", seed=7, n=6)
    port = free_port()
    # as from an activated venv: the scoring server's `uvicorn` is found on PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{BIN}:{os.environ['PATH']}"}
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115
    started = time.perf_counter()
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "models", "serve", "-m", "models:/progan@candidate",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError):
                assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                assert time.time() < deadline, "mlflow models serve did not answer"
                time.sleep(0.5)
        ready = time.perf_counter() - started
        print(f"mlflow models serve --env-manager local: ready in {ready:.1f} s")
        url = f"http://127.0.0.1:{port}/invocations"
        answer = post(url, {"dataframe_records": [{"seed": 7, "count": 6}]})
        rows = answer["predictions"]
        assert [(r["seed"], r["index"]) for r in rows] == [(7, i) for i in range(6)]
        served = np.stack(
            [np.asarray(Image.open(io.BytesIO(base64.b64decode(r["png"])))) for r in rows]
        )
        assert np.array_equal(served, expected)
        # the pixels form, and truncation, for programs
        body = {"dataframe_records": [{"seed": 7, "count": 2, "truncation": 0.5}]}
        pixels = post(url, {**body, "params": {"format": "pixels"}})["predictions"]
        assert np.asarray(pixels[0]["pixels"], dtype=np.uint8).shape == expected.shape[1:]
        assert not np.array_equal(np.asarray(pixels[0]["pixels"], dtype=np.uint8), expected[0])
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()


def test_a_version_loads_as_a_pyfunc_and_keeps_its_latent_form(registry):
    import mlflow.pyfunc
    import pandas as pd

    uri, _, _ = registry
    mlflow.set_tracking_uri(uri)
    try:
        model = mlflow.pyfunc.load_model("models:/progan@candidate")
        out = model.predict(pd.DataFrame([{"seed": 3, "count": 2}]))
        assert list(out.columns) == ["seed", "index", "png"] and len(out) == 2
        client = MlflowClient(uri)
        info = client.get_model_version("progan", "1")
        experiment = client.get_run(info.run_id).info.experiment_id
        logged = {m.name: m.model_id for m in client.search_logged_models([experiment])}
        assert sorted(logged) == ["generator", "generator-latents"]  # both forms logged
        assert info.source == f"models:/{logged['generator']}"  # the servable one registered
    finally:
        mlflow.set_tracking_uri(None)


def test_promote_moves_champion_and_the_tools_accept_it(registry, tmp_path, capsys):
    uri, generator, _ = registry
    assert main(["promote", "models:/progan@candidate", "--tracking-uri", uri]) == 0
    assert "champion: models:/progan/1;" in capsys.readouterr().out
    champion = generated(uri, "models:/progan@champion", tmp_path / "a", seed=1, n=2)
    assert np.array_equal(champion, generated(uri, "models:/progan/1", tmp_path / "b", 1, 2))

    client = MlflowClient(uri)
    run = client.create_run(client.get_experiment_by_name("progan").experiment_id).info.run_id
    assert log_generator(uri, run, generator, "progan", {}).version == "2"
    assert str(client.get_model_version_by_alias("progan", "candidate").version) == "2"
    assert str(client.get_model_version_by_alias("progan", "champion").version) == "1"
    assert main(["promote", "models:/progan/2", "--tracking-uri", uri]) == 0
    assert "champion: models:/progan/2 (was version 1)" in capsys.readouterr().out
    assert main(["promote", "models:/progan/9", "--tracking-uri", uri]) == 2
    assert capsys.readouterr().err.startswith("error: cannot promote models:/progan/9")
