"""A generator bundle: what someone outside MLflow and this project can load and trust.

`progan export CKPT --format bundle --out DIR` writes

    DIR/model.safetensors   the EMA generator's parameters (safetensors: no code, no pickle)
    DIR/config.json         the model config, level and alpha, each layer's weight scale,
                            and where it came from (run, checkpoint, images shown)
    DIR/progan_bundle.py    the stand-alone loader (progan/standalone.py: torch + safetensors)
    DIR/samples.png         16 faces of seed 0
    DIR/README.md           the model card: what it is, its numbers, the data, how to load it

`load_bundle_generator` reads it back for the tools (`progan generate DIR`, ...) without
unpickling anything. Only ProGAN generators without `fused_scale` are bundled: that is what
the stand-alone loader reproduces op for op.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.tools.generator import LoadedGenerator

BUNDLE_FORMAT = "progan-bundle/1"
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
LOADER = "progan_bundle.py"
SAMPLES = "samples.png"
CARD = "README.md"


def is_bundle(path: str | Path) -> bool:
    """A folder with a bundle's config.json."""
    config = Path(path) / CONFIG
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("format") == BUNDLE_FORMAT
    except (ValueError, OSError):
        return False


def write_bundle(gen: LoadedGenerator, out: Path, provenance: dict[str, Any]) -> Path:
    """Write the bundle of `gen` into `out` (see the module doc); returns `out`."""
    from safetensors.torch import save_file

    import progan.standalone
    from pipeline.tools.generator import ToolError
    from progan.files import current_umask
    from progan.sampling import save_grid

    if gen.config.arch != "progan" or gen.config.fused_scale:
        raise ToolError(
            "--format bundle: only ProGAN generators without model.fused_scale are bundled "
            "(use --format torchscript or onnx for this one)"
        )
    out.mkdir(parents=True, exist_ok=True)
    module = gen.module.cpu()
    weights = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    save_file(weights, str(out / WEIGHTS), metadata={"format": BUNDLE_FORMAT})
    (out / WEIGHTS).chmod(0o666 & ~current_umask())  # safetensors writes it 0600
    scales = {name: m.scale for name, m in module.named_modules() if hasattr(m, "scale")}
    config = {
        "format": BUNDLE_FORMAT,
        "resolution": gen.resolution,
        "level": gen.level,
        "alpha": gen.alpha,
        "latent_size": gen.latent_size,
        "images_shown": gen.images_shown,
        "phase": gen.phase_name,
        "model": gen.config.model_dump(mode="json"),
        "scales": scales,  # exact floats: json keeps a float's repr
        "provenance": provenance,
    }
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    shutil.copyfile(progan.standalone.__file__, out / LOADER)
    save_grid(gen.render(gen.latents(0, 16)), out / SAMPLES, 4)
    (out / CARD).write_text(model_card(config))
    return out


def load_bundle_generator(folder: Path, device: str = "cpu") -> LoadedGenerator:
    """The bundle's generator for the tools (safetensors + JSON: nothing unpickled)."""
    from safetensors.torch import load_file

    from pipeline.tools.generator import GeneratorLoadError, LoadedGenerator, resolve_device
    from progan.config import ModelConfig
    from progan.models import build_generator

    config = json.loads((folder / CONFIG).read_text())
    cfg = ModelConfig.model_validate(config["model"])
    module = build_generator(cfg)
    try:
        module.load_state_dict(load_file(str(folder / WEIGHTS)))
    except (RuntimeError, OSError) as exc:
        first = str(exc).splitlines()[0]
        raise GeneratorLoadError(f"{folder}: the weights do not fit its config ({first})") from exc
    module.to(resolve_device(device)).eval().requires_grad_(False)
    return LoadedGenerator(
        module=module,
        level=int(config["level"]),
        alpha=float(config["alpha"]),
        resolution=int(config["resolution"]),
        latent_size=cfg.latent_size,
        config=cfg,
        source=folder,
        phase_name=str(config.get("phase", "unknown")),
        images_shown=int(config.get("images_shown", 0)),
    )


def provenance_of(ckpt: str, tracking_uri: str | None, data_licence: str | None) -> dict:
    """Where a generator came from, for its card: the run, checkpoint, dataset and final
    metrics, read from a run directory (state.json, config.yaml, the dataset's manifest) or
    from a registered version's tags; what cannot be found stays out."""
    found: dict[str, Any] = {"source": str(ckpt), "data_licence": data_licence}
    from pipeline.tools.model_uri import is_model_uri

    if is_model_uri(ckpt):
        found.update(_from_registry(str(ckpt), tracking_uri))
        return found
    from pipeline.driver.run_dir import STATE_FILE

    path = Path(ckpt)
    run_dir = path if path.is_dir() else path.parent
    if (run_dir / STATE_FILE).is_file():
        found.update(_from_run_dir(run_dir))
    return found


def _from_run_dir(run_dir: Path) -> dict[str, Any]:
    from pipeline.config import load_config_dict
    from pipeline.driver.run_dir import CONFIG_FILE, STATE_FILE
    from pipeline.driver.state import RunState
    from preprocessing.lmdb_store import read_manifest

    state = RunState.load(run_dir / STATE_FILE)
    phases = state.in_order()
    out: dict[str, Any] = {
        "run": f"{state.run_id} (MLflow run {state.parent_run_id})",
        "checkpoint": phases[-1].checkpoint if phases else None,
        "metrics": state.final_metrics(),
    }
    if (run_dir / CONFIG_FILE).is_file():
        dataset = (load_config_dict(run_dir / CONFIG_FILE).get("data") or {}).get("dataset")
        out["dataset"] = str(dataset)
        try:
            m = read_manifest(str(dataset))
        except FileNotFoundError:
            return out
        source = m.get("source") or {}
        where = source.get("path", "?") if isinstance(source, dict) else source
        out["dataset"] = f"{dataset} ({m.get('records')} faces prepared from {where})"
    return out


def _from_registry(model_uri: str, tracking_uri: str | None) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    from pipeline.tools.model_uri import registered_version
    from pipeline.tracking.tracker import resolve_uri

    uri = resolve_uri(tracking_uri, "runs")
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    name, version = registered_version(client, model_uri)
    tags = version.tags or {}
    metrics = {
        k.removeprefix("metric."): float(v) for k, v in tags.items() if k.startswith("metric.")
    }
    return {
        "run": f"{tags.get('run_id')} (MLflow run {version.run_id})",
        "checkpoint": tags.get("checkpoint"),
        "metrics": metrics,
        "model": f"models:/{name}/{version.version}",
    }


LOADER_EXAMPLE = """\
import sys
sys.path.insert(0, "BUNDLE")              # this folder: progan_bundle.py needs torch + safetensors
from progan_bundle import load_bundle, latents, to_uint8
from PIL import Image                     # only to write the PNG

generate, cfg = load_bundle("BUNDLE")
z = latents(seed=0, count=16, latent_size=cfg["latent_size"])
images = to_uint8(generate(z, psi=1.0))   # uint8 [16, H, W, 3]
for i, image in enumerate(images.numpy()):
    Image.fromarray(image).save(f"face-{i:02d}.png")
"""


def model_card(config: dict[str, Any]) -> str:
    """README.md of a bundle: the generator, its numbers, its data, how to load it."""
    p = config.get("provenance", {})
    metrics = p.get("metrics") or {}
    rows = "\n".join(f"| {k} | {v:.4g} |" for k, v in sorted(metrics.items())) or "| - | - |"
    res = config["resolution"]
    import progan.standalone

    loader = Path(progan.standalone.__file__).read_text()
    return f"""---
library_name: pytorch
tags: [gan, progressive-gan, faces, image-generation]
license: other
---

# ProGAN face generator, {res}x{res}

A Progressive-Growing GAN generator (Karras et al. 2018) trained with progan-pipeline:
latent z ({config["latent_size"]} numbers from N(0, I)) -> an RGB image of {res}x{res} pixels.

![16 faces of seed 0](samples.png)

| | |
| --- | --- |
| resolution | {res}x{res} (level {config["level"]}, fade-in alpha {config["alpha"]:g}) |
| images shown in training | {config["images_shown"]:,} (phase {config["phase"]}) |
| run | {p.get("run", "unknown")} |
| checkpoint | {p.get("checkpoint", "unknown")} |
| training data | {p.get("dataset", "unknown")} |
| licence of the data | {p.get("data_licence") or "not stated: set it with --data-licence"} |

Final metrics (the run's last evaluation; SWD x1e3 lower is better):

| metric | value |
| --- | --- |
{rows}

## Files

- `model.safetensors`: the EMA generator's parameters (no code, nothing to unpickle)
- `config.json`: architecture, level and alpha, each layer's equalized-lr scale, provenance
- `progan_bundle.py`: the loader below (torch, safetensors, numpy)
- `samples.png`: 16 faces of seed 0

## Loading it

With progan-pipeline installed: `progan generate THIS_FOLDER --n 64 --out faces.png`.
Without it, with only torch and safetensors:

```python
{LOADER_EXAMPLE}```

`latents(seed, count, ...)` gives the latents `progan generate --seed SEED` uses, so the
images are the same, pixel for pixel. The loader, for reading:

```python
{loader}```
"""
