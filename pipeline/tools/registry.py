"""The trained EMA generator as a registered MLflow model that serves.

At the end of a run the driver logs the generator into the parent run twice: as the
servable pyfunc `generator` (pipeline.tools.pyfunc_model: seeds, count, truncation in, PNG
images out; its artifacts are a generator bundle, pipeline.tools.bundle, whose loader needs
torch and safetensors only; the requirements are recorded, so `mlflow models serve` loads
it in a fresh environment) and, for programs, as the latent-in PyTorch model
`generator-latents` (z -> images in [-1, 1]). The pyfunc is registered
(`tracking.registered_model`, default the experiment's name): each finished run adds a
version, tagged with its final metrics and the checkpoint it came from, with the alias
`candidate`; `progan promote` points `champion` at a version after review. The tools read
the version's tensors-only `artifacts/generator.pt` (pipeline.tools.model_uri) without
unpickling code.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODEL_NAME = "generator"  # the servable pyfunc's name inside the run (the registered one)
LATENT_MODEL_NAME = "generator-latents"  # the latent-in PyTorch model, for programs
CANDIDATE, CHAMPION = "candidate", "champion"  # a run's new version; the reviewed one
# what the pyfunc needs besides MLflow (pipeline.tools.pyfunc_model + the bundle's loader)
SERVING_PACKAGES = ("torch", "safetensors", "numpy", "pillow", "pandas")


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
    """Log generator.pt's EMA generator in `run_id` (which this leaves FINISHED) as the
    servable pyfunc (pipeline.tools.pyfunc_model, over a bundle) and, for programs, as the
    latent-in PyTorch model; register the pyfunc as `registered_name` (unless empty), tag
    the new version and give it the `candidate` alias. A generator the bundle cannot hold
    (DCGAN, fused_scale) registers its PyTorch model instead."""
    import tempfile

    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.tools.bundle import provenance_of, write_bundle
    from pipeline.tools.generator import ToolError, load_generator
    from pipeline.tracking.tracker import tracking_uri_set

    gen = load_generator(generator_file)
    name = registered_name or None
    with tempfile.TemporaryDirectory(prefix="progan-model-") as tmp:
        try:
            bundle = write_bundle(
                gen, Path(tmp) / "bundle", provenance_of(str(generator_file), uri, None)
            )
        except ToolError:
            bundle = None
        with tracking_uri_set(uri), mlflow.start_run(run_id=run_id):
            latent = log_latent_model(gen, generator_file, None if bundle else name)
            info = log_pyfunc(gen, bundle, generator_file, name) if bundle else latent
    if not name:
        return RegisteredVersion(info.model_uri, "", "")
    version = str(info.registered_model_version)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    for key, value in version_tags.items():
        client.set_model_version_tag(name, version, key, str(value))
    client.set_registered_model_alias(name, CANDIDATE, version)
    return RegisteredVersion(info.model_uri, name, version)


def log_latent_model(gen: Any, generator_file: Path, registered_name: str | None) -> Any:
    """The latent-in form (z [N, latent] -> images in [-1, 1]) as an MLflow PyTorch model."""
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature

    from pipeline.tools.generator import sample_latents

    module = gen.fixed_module()
    example = sample_latents(0, 2, gen.latent_size)
    with torch.no_grad():
        images = module(example)
    return mlflow.pytorch.log_model(
        module,
        name=LATENT_MODEL_NAME,
        signature=infer_signature(example.numpy(), images.numpy()),
        input_example=example.numpy(),
        pip_requirements=mlflow.pytorch.get_default_pip_requirements(),
        extra_files=[str(generator_file)],
        registered_model_name=registered_name,
        metadata=model_metadata(gen),
    )


def log_pyfunc(gen: Any, bundle: Path, generator_file: Path, registered_name: str | None) -> Any:
    """The servable form: seeds in, images out (pipeline.tools.pyfunc_model), with the
    bundle as its artifact and the requirements to load it anywhere."""
    import importlib.metadata

    import mlflow.pyfunc
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    import pipeline.tools.pyfunc_model as pyfunc_model

    inputs = Schema(
        [
            ColSpec("long", "seed"),
            ColSpec("long", "count", required=False),
            ColSpec("double", "truncation", required=False),
        ]
    )
    outputs = Schema([ColSpec("long", "seed"), ColSpec("long", "index"), ColSpec("string", "png")])
    params = ParamSchema([ParamSpec("format", "string", "png")])
    versions = {p: importlib.metadata.version(p) for p in SERVING_PACKAGES}
    return mlflow.pyfunc.log_model(
        name=MODEL_NAME,
        python_model=pyfunc_model.__file__,
        artifacts={"bundle": str(bundle), "generator": str(generator_file)},
        signature=ModelSignature(inputs, outputs, params),
        input_example=pd.DataFrame([{"seed": 0, "count": 2, "truncation": 1.0}]),
        pip_requirements=[f"{p}=={v.split('+')[0]}" for p, v in versions.items()],
        registered_model_name=registered_name,
        metadata=model_metadata(gen),
    )


def model_metadata(gen: Any) -> dict[str, Any]:
    return {
        "resolution": gen.resolution,
        "level": gen.level,
        "alpha": gen.alpha,
        "latent_size": gen.latent_size,
        "images_shown": gen.images_shown,
    }


def promote(uri: str, model: str, alias: str = CHAMPION) -> tuple[RegisteredVersion, str | None]:
    """Point `alias` (default champion) at the version `model` names (`models:/NAME/N` or
    `models:/NAME@ALIAS`); returns it and the version the alias pointed at before."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from pipeline.tools.generator import ToolError
    from pipeline.tools.model_uri import registered_version

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        name, version = registered_version(client, model)
        try:
            before = client.get_model_version_by_alias(name, alias).version
        except MlflowException:
            before = None
        client.set_registered_model_alias(name, alias, version.version)
    except MlflowException as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ToolError(f"cannot promote {model} at {uri}: {first[:300]}") from err
    return RegisteredVersion(f"models:/{name}/{version.version}", name, version.version), before


def publish_generator(cfg: Any, tracker: Any, state: Any, generator: Path, console: Any) -> None:
    """End of a run: log and register its generator in the parent run, the version tagged
    with the run's final metrics and checkpoint. A failure here is told, not raised: the
    training is done and generator.pt is in the run directory."""
    name = cfg.tracking.registered_model
    name = cfg.tracking.experiment if name is None else name
    phases = state.in_order()
    tags = {
        "run_id": state.run_id,
        "checkpoint": phases[-1].checkpoint if phases else "",
        **{f"metric.{k}": f"{v:.6g}" for k, v in state.final_metrics().items()},
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
        console.print(
            f"MLflow model: models:/{done.name}/{done.version}, alias {CANDIDATE} "
            f"(after review: progan promote models:/{done.name}@{CANDIDATE})"
        )
    else:
        console.print(f"MLflow model: {done.model_uri} (not registered)")
