"""The trained EMA generator as a registered MLflow model, and `models:/` URIs for the tools.

At the end of a run the driver logs the generator with `mlflow.pytorch.log_model` (latent
-> image signature, an input example, torch's requirements) into the parent run and
registers it (`tracking.registered_model`, default the experiment's name): each finished
run adds a version, tagged with its final metrics and the checkpoint it came from. The
model's `extra_files/generator.pt` is the same tensors-only file as the run directory's,
so `progan generate models:/NAME/VERSION` (or `@ALIAS`) loads it without unpickling code;
`mlflow.pytorch.load_model` gives the module itself (which needs this project installed,
as any pickled PyTorch model needs its classes).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterator

MODEL_NAME = "generator"  # the model's name inside the run (its LoggedModel name)
GENERATOR_FILE = "generator.pt"


@dataclass
class RegisteredVersion:
    """Where a logged generator went: its model URI and registered name/version."""

    model_uri: str
    name: str
    version: str


def is_model_uri(text: str | os.PathLike) -> bool:
    """True for `models:/NAME/VERSION` and `models:/NAME@ALIAS`."""
    return str(text).startswith("models:/")


@contextmanager
def tracking_uri_set(uri: str) -> Iterator[None]:
    """MLflow's fluent API (log_model, artifact downloads) on `uri` for the block. MLflow
    keeps the URIs in globals and in MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI (for
    subprocesses); both are put back as they were."""
    import mlflow

    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"])
        mlflow.set_registry_uri(saved["MLFLOW_REGISTRY_URI"])
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def log_generator(
    uri: str,
    run_id: str,
    generator_file: Path,
    registered_name: str | None,
    version_tags: dict[str, Any],
) -> RegisteredVersion:
    """Log generator.pt's EMA generator as an MLflow PyTorch model in `run_id` (which this
    leaves FINISHED), register it as `registered_name` (unless empty), tag the new version."""
    import mlflow
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature
    from mlflow.tracking import MlflowClient

    from pipeline.generator_io import load_generator, sample_latents

    gen = load_generator(generator_file)
    module = gen.fixed_module()
    example = sample_latents(0, 2, gen.latent_size)
    with torch.no_grad():
        images = module(example)
    with tracking_uri_set(uri), mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(
            module,
            name=MODEL_NAME,
            signature=infer_signature(example.numpy(), images.numpy()),
            input_example=example.numpy(),
            pip_requirements=mlflow.pytorch.get_default_pip_requirements(),
            extra_files=[str(generator_file)],
            registered_model_name=registered_name or None,
            metadata={
                "resolution": gen.resolution,
                "level": gen.level,
                "alpha": gen.alpha,
                "latent_size": gen.latent_size,
                "images_shown": gen.images_shown,
            },
        )
    if not registered_name:
        return RegisteredVersion(info.model_uri, "", "")
    version = str(info.registered_model_version)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    for key, value in version_tags.items():
        client.set_model_version_tag(registered_name, version, key, str(value))
    return RegisteredVersion(info.model_uri, registered_name, version)


@contextmanager
def downloaded_generator(model_uri: str, tracking_uri: str) -> Iterator[Path]:
    """generator.pt of a registered version (`models:/NAME/VERSION` or `models:/NAME@ALIAS`),
    downloaded to a temporary folder for the block."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    from pipeline.generator_io import GeneratorLoadError

    with tempfile.TemporaryDirectory(prefix="progan-model-") as tmp, tracking_uri_set(tracking_uri):
        try:
            path = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{model_uri.rstrip('/')}/extra_files/{GENERATOR_FILE}", dst_path=tmp
            )
        except (MlflowException, OSError) as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise GeneratorLoadError(
                f"cannot load {model_uri} from MLflow at {tracking_uri}: {first[:300]}"
            ) from err
        yield Path(path)


def publish_generator(cfg: Any, tracker: Any, state: Any, generator: Path, console: Any) -> None:
    """End of a run: log and register its generator in the parent run, the version tagged
    with the run's final metrics and checkpoint. A failure here is told, not raised: the
    training is done and generator.pt is in the run directory."""
    name = cfg.tracking.registered_model
    name = cfg.tracking.experiment if name is None else name
    phases = [state.phases[k] for k in sorted(state.phases, key=int)]
    metrics: dict[str, float] = {}
    for phase in phases:  # the latest value of each metric
        metrics.update(phase.evaluation)
    tags = {
        "run_id": state.run_id,
        "checkpoint": phases[-1].checkpoint if phases else "",
        **{f"metric.{k}": f"{v:.6g}" for k, v in metrics.items()},
    }
    try:
        done = log_generator(tracker.uri, state.parent_run_id, generator, name, tags)
    except Exception as err:
        message = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
        console.print(f"[yellow]MLflow: the generator was not logged as a model ({message})")
        with contextlib.suppress(Exception):
            tracker.client.set_tag(state.parent_run_id, "model.error", message)
        return
    if done.version:
        console.print(f"MLflow model: models:/{done.name}/{done.version} ({done.model_uri})")
    else:
        console.print(f"MLflow model: {done.model_uri} (not registered)")
