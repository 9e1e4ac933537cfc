"""The metric catalogue: every evaluation metric's name, what it needs and what it reports.

One table that the config (which names are allowed, which need Inception weights), the
evaluation (which resolutions a metric is measured at) and Tune (which result keys are
metrics, from which phase on) all read.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MetricInfo:
    """One metric as the rest of the project sees it."""

    name: str  # as written in eval.metrics
    result_prefixes: tuple[str, ...]  # the keys it reports start with one of these
    min_resolution: int  # measured from this resolution up; skipped below it
    needs_inception: bool  # needs eval.fid_weights (the pt_inception-2015-12-05 file)
    about: str


CATALOGUE: dict[str, MetricInfo] = {
    m.name: m
    for m in (
        MetricInfo(
            "swd",
            ("SWDx1e3",),
            8,  # 7x7 neighbourhoods need a little room
            False,
            "sliced Wasserstein distance per Laplacian level, x1e3 (SWDx1e3_<res>, _avg)",
        ),
        MetricInfo(
            "msssim",
            ("msssim",),
            16,  # torchmetrics' MS-SSIM needs 2 scales of an 11x11 window
            False,
            "MS-SSIM of random pairs (msssim_fake, msssim_real; lower = more diverse)",
        ),
        MetricInfo("fid", ("fid",), 4, True, "Frechet Inception distance"),
        MetricInfo("kid", ("kid",), 4, True, "kernel Inception distance (kid, kid_std)"),
    )
}
METRIC_NAMES = tuple(CATALOGUE)


def metric_of_key(key: str) -> MetricInfo | None:
    """The metric that reports result key `key` (e.g. SWDx1e3_avg -> swd), if any."""
    for info in CATALOGUE.values():
        if key.startswith(info.result_prefixes):
            return info
    return None


def measured_at(name: str, resolution: int) -> bool:
    """Whether metric `name` is computed at `resolution`."""
    return resolution >= CATALOGUE[name].min_resolution
