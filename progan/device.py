"""Backend settings for the device training runs on, the same in every driver.

`progan train-local` and the Ray Train worker both call `configure_device`, so a phase on
a GPU runs with the same cuDNN and TF32 settings whichever way it was started.
"""

from __future__ import annotations

import torch


def configure_device(device: torch.device) -> torch.device:
    """Set the backend flags training wants on `device`; returns it.

    On CUDA: shapes are fixed within a phase, so cuDNN may benchmark and pick kernels once,
    and fp32 matmuls/convolutions may use TF32 (bf16 autocast is `train.bf16`'s business).
    """
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device
