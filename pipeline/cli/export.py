"""`progan export CKPT --format torchscript|onnx --out FILE`: a standalone z -> image model.

The exported model is the EMA generator at the level and alpha where training stopped,
with both baked in: input `z` float32 [N, latent_size] (any N), output `image` float32
[N, 3, R, R] in [-1, 1] (clamped; RGB; (x + 1) / 2 gives [0, 1]). After writing, the file
is loaded back and compared with the eager generator on seeded latents; the command fails
if the largest difference exceeds 1e-4.

Loading:  TorchScript `torch.jit.load("g.pt")(z)` (no progan code needed; metadata in the
archive's extra file `progan.json`);  ONNX `onnxruntime.InferenceSession("g.onnx")
.run(["image"], {"z": z})` (metadata in the model's metadata_props). ONNX export needs
`onnx` and `onnxscript` (torch's exporter), verification needs `onnxruntime`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.tools.args import add_generator_args, positive_int, reports_errors
from pipeline.tools.generator import LoadedGenerator, ToolError, load_generator

TOLERANCE = 1e-4
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")

if TYPE_CHECKING:
    import torch
    from torch import nn

    Runner = Callable[[torch.Tensor], torch.Tensor]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `export` subcommand."""
    p = subparsers.add_parser(
        "export",
        help="export the EMA generator as TorchScript or ONNX (z -> image), verified",
        description="Write the generator at its final level/alpha as a standalone model file.",
    )
    add_generator_args(p, sampling=False)
    p.add_argument(
        "--format",
        choices=["torchscript", "onnx", "bundle"],
        required=True,
        help="file format; bundle: a folder with safetensors weights and a model card",
    )
    p.add_argument("--out", type=Path, required=True, help="file (.pt / .onnx) or bundle folder")
    p.add_argument(
        "--data-licence", default=None, help="bundle: the training data's licence, for the card"
    )
    p.add_argument("--verify-n", type=positive_int, default=8, help="latents compared after export")
    p.set_defaults(func=run)


def metadata(gen: LoadedGenerator) -> dict[str, str]:
    """What a user of the exported file needs to know, as strings."""
    return {
        "producer": "progan-pipeline",
        "arch": gen.config.arch,
        "latent_size": str(gen.latent_size),
        "resolution": str(gen.resolution),
        "level": str(gen.level),
        "alpha": str(gen.alpha),
        "phase_name": gen.phase_name,
        "images_shown": str(gen.images_shown),
        "source": str(gen.source),
        "input": "z float32 [N, latent_size], N(0, I)",
        "output": "image float32 [N, C, resolution, resolution] in [-1, 1]",
    }


def export_torchscript(module: nn.Module, example: torch.Tensor, path: Path, meta: dict) -> None:
    """Trace `module` and save it with the metadata as the extra file progan.json."""
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.*deprecated")
        traced = torch.jit.trace(module, example)
        torch.jit.save(traced, str(path), _extra_files={"progan.json": json.dumps(meta)})


def load_torchscript(path: Path) -> Runner:
    """The saved TorchScript module as a function (what a user would do)."""
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.*deprecated")
        loaded = torch.jit.load(str(path), map_location="cpu")
    return lambda z: loaded(z)


def require_onnx() -> None:
    """A ToolError naming exactly what to install if an ONNX package is missing."""
    missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ToolError(
            f"ONNX export needs {', '.join(missing)} (not installed): "
            "`pip install 'progan-pipeline[export]'`, or use --format torchscript"
        )


def export_onnx(module: nn.Module, example: torch.Tensor, path: Path, meta: dict) -> None:
    """torch.onnx.export (torch.export based), dynamic batch, one self-contained file."""
    import onnx
    import torch

    torch.onnx.export(
        module,
        (example,),
        str(path),
        input_names=["z"],
        output_names=["image"],
        dynamic_shapes={"z": {0: torch.export.Dim("batch")}},
        external_data=False,
        verbose=False,
    )
    model = onnx.load(str(path))
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))


def load_onnx(path: Path) -> Runner:
    """The saved ONNX model under onnxruntime (CPU) as a function."""
    import onnxruntime
    import torch

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda z: torch.from_numpy(session.run(["image"], {"z": z.numpy()})[0])


FORMATS = {
    "torchscript": (export_torchscript, load_torchscript),
    "onnx": (export_onnx, load_onnx),
}


def max_difference(module: nn.Module, runner: Runner, z: torch.Tensor) -> float:
    """Largest |eager - exported| over the images of latents z."""
    import torch

    with torch.no_grad():
        eager = module(z)
        exported = runner(z)
    if exported.shape != eager.shape:
        raise ToolError(f"exported model gives shape {tuple(exported.shape)}, eager {eager.shape}")
    return (eager - exported).abs().max().item()


@reports_errors
def run(args: argparse.Namespace) -> int:
    """Export, load back, compare on --verify-n latents (batch size unlike the traced one)."""
    if args.format == "bundle":
        return export_bundle(args)
    if args.format == "onnx":
        require_onnx()
    save, load = FORMATS[args.format]
    gen = load_generator(args.ckpt, args.device, args.tracking_uri)
    print(gen.describe())
    module = gen.fixed_module()
    example = gen.latents(0, 2).to(gen.device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save(module, example, args.out, metadata(gen))
    module.cpu()
    diff = max_difference(module, load(args.out), gen.latents(1, args.verify_n))
    print(f"exported {args.format}: {args.out} (max |eager - exported| = {diff:.3g})")
    if not diff <= TOLERANCE:
        raise ToolError(f"{args.out} differs from the eager generator by {diff:.3g} > {TOLERANCE}")
    return 0


def export_bundle(args: argparse.Namespace) -> int:
    """`--format bundle`: write the folder (pipeline.tools.bundle), then load it back with its
    own stand-alone loader and compare with the eager generator: they must be equal."""
    import sys

    import torch

    from pipeline.tools.bundle import provenance_of, write_bundle

    gen = load_generator(args.ckpt, args.device, args.tracking_uri)
    print(gen.describe())
    found = provenance_of(args.ckpt, args.tracking_uri, args.data_licence)
    out = write_bundle(gen, args.out, found)
    sys.path.insert(0, str(out))
    try:
        from progan_bundle import load_bundle  # the bundle's own loader file
    finally:
        sys.path.remove(str(out))
        sys.modules.pop("progan_bundle", None)
    generate, _ = load_bundle(out)
    z = gen.latents(1, args.verify_n)
    diff = (generate(z) - gen.render(z)).abs().max().item()
    card = out / "README.md"
    print(f"exported bundle: {out} (model card {card}; max |eager - bundle| = {diff:.3g})")
    if not torch.isfinite(torch.tensor(diff)) or diff > 0:
        raise ToolError(f"{out}: its loader differs from the eager generator by {diff:.3g}")
    return 0
