"""How the step runs fast on the hardware: compiled networks, fused optimizers.

`train.compile` compiles G and D with `torch.compile` once per phase (a phase is one
(resolution, fading) pair): shapes are static inside it (`dynamic=False`), the level is a
Python int (specialised), and a fading phase passes alpha as a 0-dim device tensor that the
trainer refills in place, so a moving alpha never recompiles. `train.cuda_graphs` adds CUDA
graphs (`mode="reduce-overhead"`) on CUDA devices only.

What is not compiled: the gradient penalty's pass through D, which needs a double backward
that AOTAutograd does not support (pytorch/pytorch#91469): it runs D eagerly.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from progan.config import TrainConfig


def uses_cuda_graphs(cfg: TrainConfig, device: torch.device) -> bool:
    """CUDA graphs only where asked, compiled, and on a CUDA device."""
    return cfg.compile and cfg.cuda_graphs and device.type == "cuda"


def compile_network(module: nn.Module, cfg: TrainConfig, device: torch.device) -> nn.Module:
    """`torch.compile` of `module` for one phase: static shapes, CUDA graphs where asked."""
    mode = "reduce-overhead" if uses_cuda_graphs(cfg, device) else None
    return torch.compile(module, dynamic=False, mode=mode)


def forget_compiled_phases() -> None:
    """Drop the compiled code of earlier phases (it is never used again), so that the
    per-function recompile limit counts only the current phase's few graphs."""
    torch._dynamo.reset()


def make_optimizer(
    params: Iterable[nn.Parameter], cfg: TrainConfig, lr: float, device: torch.device
) -> torch.optim.Optimizer:
    """Adam (fused into one kernel on CUDA) or RMSprop, as `cfg` says."""
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, alpha=cfg.rmsprop_alpha, eps=cfg.eps)
    fused = True if device.type == "cuda" else None
    return torch.optim.Adam(params, lr=lr, betas=cfg.betas, eps=cfg.eps, fused=fused)
