"""`models:/NAME/VERSION` and `models:/NAME@ALIAS`: registered generators for the tools."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

GENERATOR_FILE = "generator.pt"  # the registered model's extra file (pipeline.tools.registry)


def is_model_uri(text: str | os.PathLike) -> bool:
    """True for `models:/NAME/VERSION` and `models:/NAME@ALIAS`."""
    return str(text).startswith("models:/")


@contextmanager
def downloaded_generator(model_uri: str, tracking_uri: str) -> Iterator[Path]:
    """generator.pt of a registered version (`models:/NAME/VERSION` or `models:/NAME@ALIAS`),
    downloaded to a temporary folder for the block."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    from pipeline.tools.generator import GeneratorLoadError
    from pipeline.tracking.tracker import tracking_uri_set

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
