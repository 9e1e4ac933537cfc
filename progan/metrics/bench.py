"""Time SWD and MS-SSIM on CPU: ``python -m progan.metrics.bench [--images N] [--target T]``.

Images are synthetic but structured (smooth colour fields + edges + fine noise, uint8), which
costs the same as real faces: the metrics' cost depends only on sizes. ``--images`` images are
measured and the time is extrapolated to ``--target`` images (descriptor extraction and
MS-SSIM linearly, the sorting SWD distance as N log N), and put against a training phase of
``--phase-kimg`` thousand images at ``--train-ips`` images/s. Generating the fake images is
not included (that is the generator's forward pass).
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch
import torch.nn.functional as F

from progan.metrics.msssim import MSSSIMDiversity
from progan.metrics.swd import SWDDescriptors, swd


def structured_images(n: int, res: int, seed: int) -> torch.Tensor:
    """Smooth random colour fields with edges and a little noise, uint8 ``[n, 3, res, res]``."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, max(res // 8, 2), max(res // 8, 2), generator=g)
    img = F.interpolate(coarse, size=(res, res), mode="bicubic", align_corners=False)
    img = img + 0.3 * (torch.rand(n, 1, res, res, generator=g) > 0.8).float()
    img = img + 0.05 * torch.randn(n, 3, res, res, generator=g)
    return (img.clamp(0, 1) * 200 + 25).round().to(torch.uint8)


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def bench_resolution(res: int, n: int, batch: int) -> dict[str, float]:
    """Seconds for the fake descriptors, the SWD distance and MS-SSIM (n/2 pairs)."""
    real = SWDDescriptors(res, seed=0)
    for start in range(0, n, batch):
        real.update(structured_images(min(batch, n - start), res, seed=start))
    images = [structured_images(min(batch, n - s), res, 10**6 + s) for s in range(0, n, batch)]
    fake = SWDDescriptors(res, seed=1)
    t_desc, _ = _timed(lambda: [fake.update(b) for b in images])
    t_swd, values = _timed(lambda: swd(real, fake))
    div = MSSSIMDiversity()
    t_ms, _ = _timed(lambda: [div.update(b) for b in images])
    return {
        "descriptors_s": t_desc,
        "swd_s": t_swd,
        "msssim_s": t_ms,
        "swd_avg": values["SWDx1e3_avg"],
        "msssim": div.compute()["mean"],
    }


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000, help="images measured")
    parser.add_argument("--target", type=int, default=10000, help="images extrapolated to")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--phase-kimg", type=float, default=600.0)
    parser.add_argument("--train-ips", type=float, default=40.0, help="training images/s")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    phase_s = args.phase_kimg * 1000 / args.train_ips
    scale = args.target / args.images
    sort_scale = scale * math.log(args.target * 128) / math.log(args.images * 128)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
        f"{os.getloadavg()[0]:.1f}; measured {args.images} images, extrapolated to "
        f"{args.target}; phase = {args.phase_kimg:g} kimg at {args.train_ips:g} img/s "
        f"= {phase_s:.0f} s\n"
    )
    print("| res | measured: descriptors / SWD / MS-SSIM (s) | "
          f"{args.target} images: SWD (s) | MS-SSIM, {args.target // 2} pairs (s) | "
          "share of phase (SWD + MS-SSIM) |")  # fmt: skip
    print("| --- | --- | --- | --- | --- |")
    for res in args.resolutions:
        r = bench_resolution(res, args.images, args.batch)
        swd_total = r["descriptors_s"] * scale + r["swd_s"] * sort_scale
        ms_total = r["msssim_s"] * scale
        share = (swd_total + ms_total) / (phase_s + swd_total + ms_total)
        print(
            f"| {res} | {r['descriptors_s']:.1f} / {r['swd_s']:.1f} / {r['msssim_s']:.1f} | "
            f"{swd_total:.0f} | {ms_total:.0f} | {100 * share:.1f} % |"
        )


if __name__ == "__main__":
    main()
