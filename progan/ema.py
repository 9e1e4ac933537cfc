"""Exponential moving average of the generator's weights (what samples and metrics use)."""

from __future__ import annotations

import copy

import torch
from torch import nn


def make_ema(model: nn.Module) -> nn.Module:
    """A frozen copy of `model` in eval mode to hold the running average."""
    ema = copy.deepcopy(model).eval()
    ema.requires_grad_(False)
    return ema


def ema_beta_at(
    beta: float,
    half_life_kimg: float | None,
    rampup: float | None,
    images_shown: int,
    batch_size: int,
) -> float:
    """The EMA's beta for a step of `batch_size` images after `images_shown` images.

    `beta` as it is unless a half-life in kimg is given: then beta = 0.5 ** (batch / half-life
    in images), the half-life capped at `rampup` x images shown when `rampup` is set.
    """
    if half_life_kimg is None:
        return beta
    half_life = half_life_kimg * 1000.0
    if rampup is not None:
        half_life = min(half_life, images_shown * rampup)
    return 0.5 ** (batch_size / max(half_life, 1e-8))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, beta: float) -> None:
    """ema = beta * ema + (1 - beta) * model for parameters; buffers are copied."""
    ema_params = list(ema.parameters())
    params = [p.detach() for p in model.parameters()]
    if beta <= 0.0:
        torch._foreach_copy_(ema_params, params)
    else:
        torch._foreach_lerp_(ema_params, params, 1.0 - beta)
    for b_ema, b in zip(ema.buffers(), model.buffers(), strict=True):
        b_ema.copy_(b)
