"""The trained EMA generator as a registered MLflow model.

At the end of a run the driver logs the generator with `mlflow.pytorch.log_model` (latent
-> image signature, an input example, torch's requirements) into the parent run and
registers it (`tracking.registered_model`, default the experiment's name): each finished
run adds a version, tagged with its final metrics and the checkpoint it came from. The
model's `extra_files/generator.pt` is the same tensors-only file as the run directory's,
so `progan generate models:/NAME/VERSION` (or `@ALIAS`) loads it without unpickling code
(pipeline.tools.model_uri); `mlflow.pytorch.load_model` gives the module itself (which
needs this project installed, as any pickled PyTorch model needs its classes).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODEL_NAME = "generator"  # the model's name inside the run (its LoggedModel name)


@dataclass
class RegisteredVersion:
    """Where a logged generator went: its model URI and registered name/version."""

    model_uri: str
    name: str
    version: str


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

    from pipeline.tools.generator import load_generator, sample_latents
    from pipeline.tracking.tracker import tracking_uri_set

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
