"""`models:/NAME/VERSION` and `models:/NAME@ALIAS`: registered generators for the tools."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

GENERATOR_FILE = "generator.pt"  # in every registered version (pipeline.tools.registry)
WHERE = ("artifacts", "extra_files")  # the pyfunc's artifact; older versions' PyTorch model


def is_model_uri(text: str | os.PathLike) -> bool:
    """True for `models:/NAME/VERSION` and `models:/NAME@ALIAS`."""
    return str(text).startswith("models:/")


def registered_version(client: Any, model_uri: str) -> tuple[str, Any]:
    """(name, MLflow ModelVersion) that `models:/NAME/VERSION` or `models:/NAME@ALIAS`
    names; MLflow's error when there is none."""
    ref = model_uri.removeprefix("models:/")
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return name, client.get_model_version_by_alias(name, alias)
    name, _, number = ref.partition("/")
    return name, client.get_model_version(name, number)


@contextmanager
def downloaded_generator(model_uri: str, tracking_uri: str) -> Iterator[Path]:
    """generator.pt of a registered version (`models:/NAME/VERSION` or `models:/NAME@ALIAS`),
    downloaded to a temporary folder for the block."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    from pipeline.tools.generator import GeneratorLoadError
    from pipeline.tracking.tracker import tracking_uri_set

    with tempfile.TemporaryDirectory(prefix="progan-model-") as tmp, tracking_uri_set(tracking_uri):
        error: Exception | None = None
        for folder in WHERE:  # the pyfunc's artifact, else the PyTorch model's extra file
            try:
                path = mlflow.artifacts.download_artifacts(
                    artifact_uri=f"{model_uri.rstrip('/')}/{folder}/{GENERATOR_FILE}",
                    dst_path=tmp,
                )
                break
            except (MlflowException, OSError) as err:
                error = err
        else:
            first = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise GeneratorLoadError(
                f"cannot load {model_uri} from MLflow at {tracking_uri}: {first[:300]}"
            ) from error
        yield Path(path)
