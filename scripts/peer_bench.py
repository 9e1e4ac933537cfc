"""Our training step against pro-gan-pth 3.4's, same architecture, batch and loss, one process.

    .venv/bin/python scripts/peer_bench.py --device cuda --resolution 32 64 128 256 --batch 16
    .venv/bin/python scripts/peer_bench.py --device cpu --resolution 8 16 32 \\
        --fmap-base 256 --fmap-max 64 --latent-size 64 --mode eager compiled

The peer (https://pypi.org/project/pro-gan-pth/3.4/) is never a dependency: its sdist is
fetched with `pip download --no-deps pro-gan-pth==3.4 -d .peer/` (an ignored folder) and
imported from an unpacked copy there. Two things are changed in that copy / at run time:
- its `EqualizedConvTranspose2d.forward` passes the builtin `input` to
  `ConvTranspose2d._output_padding`, which torch >= 2.11 rejects: one line is patched to
  pass the tensor, the spatial dims and the dilation;
- its channel rule `nf(stage)` defaults to fmap_base 16384, one stage wider than the
  paper's 8192 from 64x64 up: its defaults are set to our `--fmap-base/--fmap-max`, so both
  networks have the same channels at every resolution.
`torch.utils.tensorboard` is stubbed if tensorboard is not installed (the peer imports it
for its `train()` loop, which is not used here).

One iteration, as the peer's own `train()` runs it: D step (WGAN-GP, drift 0.001, lambda
10), EMA update, G step; Adam(lr 0.001, betas (0, 0.99)) for both. Ours: GANTrainer.step
(D step, G step, EMA) at the same settings. Prints one JSON line per measurement and a
table with the ratio ours / peer.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import subprocess
import sys
import tarfile
import types
from pathlib import Path

import torch

from progan.bench import bench_config, bench_step, time_calls
from progan.device import configure_device

ROOT = Path(__file__).resolve().parents[1]
PEER_DIR = ROOT / ".peer"
PEER = "pro-gan-pth-3.4"
BROKEN = "            input, output_size, self.stride, self.padding, self.kernel_size\n"
FIXED = (
    "            x, output_size, self.stride, self.padding, self.kernel_size, 2, self.dilation\n"
)


def fetch_peer() -> Path:
    """Download (once), unpack and patch pro-gan-pth 3.4 under .peer/; return its source dir."""
    source = PEER_DIR / PEER
    if not source.is_dir():
        archive = PEER_DIR / f"{PEER}.tar.gz"
        if not archive.is_file():
            pip = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(PEER_DIR)]
            subprocess.run([*pip, "pro-gan-pth==3.4"], check=True)
        with tarfile.open(archive) as tar:
            tar.extractall(PEER_DIR, filter="data")
    layers = source / "pro_gan_pytorch" / "custom_layers.py"
    text = layers.read_text()
    if BROKEN in text:
        layers.write_text(text.replace(BROKEN, FIXED))
    return source


def import_peer(fmap_base: int, fmap_max: int) -> types.SimpleNamespace:
    """The peer's modules, with its channel rule set to our architecture."""
    sys.path.insert(0, str(fetch_peer()))
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        stub = types.ModuleType("torch.utils.tensorboard")
        stub.SummaryWriter = None
        sys.modules["torch.utils.tensorboard"] = stub
    from pro_gan_pytorch import custom_layers, gan, losses, networks

    # nf(stage, fmap_base, fmap_decay, fmap_min, fmap_max)
    networks.nf.__defaults__ = (fmap_base, 1.0, 1, fmap_max)
    return types.SimpleNamespace(gan=gan, losses=losses, networks=networks, layers=custom_layers)


def peer_img_per_s(peer, a: argparse.Namespace, res: int, batch: int) -> float:
    """img/s of the peer's D step + EMA + G step at `res`."""
    device = torch.device(a.device)
    depth = int(math.log2(res))
    gen = peer.networks.Generator(depth=depth, latent_size=a.latent_size)
    # its final 4x4 conv's width: our dense layer's, min(fmap_base, fmap_max)
    dis = peer.networks.Discriminator(depth=depth, latent_size=min(a.fmap_base, a.fmap_max))
    with contextlib.redirect_stdout(io.StringIO()):  # it prints both networks
        model = peer.gan.ProGAN(gen, dis, device=device, ema_beta=0.999)
    g_opt = torch.optim.Adam(model.gen.parameters(), lr=0.001, betas=(0.0, 0.99), eps=1e-8)
    d_opt = torch.optim.Adam(model.dis.parameters(), lr=0.001, betas=(0.0, 0.99), eps=1e-8)
    loss = peer.losses.WganGP(drift=0.001)
    real = torch.rand(batch, 3, res, res, device=device) * 2 - 1

    def iteration() -> None:
        noise = torch.randn(batch, a.latent_size).to(device)
        model.optimize_discriminator(loss, d_opt, noise, real, depth, 1.0)
        peer.layers.update_average(model.gen_shadow, model.gen, beta=0.999)
        model.optimize_generator(loss, g_opt, noise, real, depth, 1.0)

    return batch / time_calls(iteration, device, a.steps, a.warmup)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--resolution", type=int, nargs="+", default=[32, 64, 128, 256])
    p.add_argument("--batch", type=int, nargs="+", default=[16])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--mode", choices=["eager", "compiled"], nargs="+", default=["eager"])
    p.add_argument("--dtype", choices=["fp32", "bf16"], nargs="+", default=["fp32"])
    p.add_argument("--fmap-base", type=int, default=8192)
    p.add_argument("--fmap-max", type=int, default=512)
    p.add_argument("--latent-size", type=int, default=512)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Peer, then ours in every asked mode and dtype, per resolution and batch."""
    a = parse_args(argv)
    configure_device(torch.device(a.device))
    peer = import_peer(a.fmap_base, a.fmap_max)
    rows = []
    for res in a.resolution:
        for batch in a.batch:
            row = {
                "resolution": res,
                "batch": batch,
                "peer_fp32": peer_img_per_s(peer, a, res, batch),
            }
            for dtype in a.dtype:
                for mode in a.mode:
                    cfg = bench_config(
                        res, batch, dtype, mode, a.fmap_base, a.fmap_max, a.latent_size
                    )
                    row[f"ours_{mode}_{dtype}"] = bench_step(cfg, a.device, a.steps, a.warmup)[
                        "img_per_s"
                    ]
            print(
                json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()})
            )
            rows.append(row)
    ours = [k for k in rows[0] if k.startswith("ours_")]
    print("\n| resolution | batch | pro-gan-pth img/s | " + " | ".join(ours) + " |")
    print("| --- " * (3 + len(ours)) + "|")
    for r in rows:
        cells = [f"{r[k]:,.1f} ({r[k] / r['peer_fp32']:.2f}x)" for k in ours]
        print(
            f"| {r['resolution']} | {r['batch']} | {r['peer_fp32']:,.1f} | "
            + " | ".join(cells)
            + " |"
        )


if __name__ == "__main__":
    main()
