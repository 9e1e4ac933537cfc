"""The FID Inception-v3 network (pool3, 2048 features), loaded from a local weights file.

The architecture is pytorch-fid's: torchvision's ``Inception3`` (1008 classes, no auxiliary
head) with the blocks replaced by pytorch-fid's ``FIDInceptionA/C/E_1/E_2``, which reproduce
the TensorFlow graph of ``inception-2015-12-05`` used for the published FID numbers. Inputs
are resized to 299x299 (bilinear, ``align_corners=False``) and scaled to [-1, 1], as in
pytorch-fid. Nothing is downloaded: the network is built with ``weights=None`` and the
weights come from a file you provide.

Accepted file: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (a plain state dict,
~95 MB, from `FID_WEIGHTS_URL`), or any state dict with exactly the same keys and shapes.
It is read with ``torch.load(weights_only=True)`` and loaded strictly.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from pytorch_fid.inception import FIDInceptionA, FIDInceptionC, FIDInceptionE_1, FIDInceptionE_2
from torch import Tensor, nn

from progan.metrics.images import to_pixels

FID_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + FID_WEIGHTS_FILENAME
)
_HOW_TO_GET = (
    f"FID needs pytorch-fid's Inception weights file {FID_WEIGHTS_FILENAME}. On a machine "
    f"with internet access run:\n    curl -LO {FID_WEIGHTS_URL}\n"
    "copy it here and pass its path (e.g. --fid-weights /path/to/" + FID_WEIGHTS_FILENAME + ")."
)


def build_fid_inception() -> nn.Module:
    """The FID Inception-v3 graph (torchvision ``Inception3`` + pytorch-fid blocks), with
    untrained weights. Use `load_fid_inception` for the real thing."""
    net = torchvision.models.inception_v3(
        weights=None, aux_logits=False, num_classes=1008, init_weights=False
    )
    net.Mixed_5b = FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = FIDInceptionE_1(1280)
    net.Mixed_7c = FIDInceptionE_2(2048)
    return net


class FIDInceptionFeatures(nn.Module):
    """Image batches (uint8 0..255 or float [-1, 1]) -> pool3 features ``[N, 2048]``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        n = net.eval().requires_grad_(False)
        self.layers = nn.Sequential(
            n.Conv2d_1a_3x3, n.Conv2d_2a_3x3, n.Conv2d_2b_3x3, n.maxpool1,
            n.Conv2d_3b_1x1, n.Conv2d_4a_3x3, n.maxpool2,
            n.Mixed_5b, n.Mixed_5c, n.Mixed_5d, n.Mixed_6a, n.Mixed_6b, n.Mixed_6c, n.Mixed_6d,
            n.Mixed_6e, n.Mixed_7a, n.Mixed_7b, n.Mixed_7c, n.avgpool,
        )  # fmt: skip
        self.eval()

    def forward(self, images: Tensor) -> Tensor:
        """Features of a batch, in float32."""
        x = to_pixels(images) / 255.0
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.layers(2.0 * x - 1.0).flatten(1)


def load_fid_inception(weights_path: str | Path | None) -> FIDInceptionFeatures:
    """The FID feature extractor with the weights in ``weights_path`` (see module docstring).

    Raises FileNotFoundError, naming the file to get and where, when there is none.
    """
    if weights_path is None or not Path(weights_path).is_file():
        raise FileNotFoundError(f"no FID weights file at {weights_path!r}. {_HOW_TO_GET}")
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as err:  # TorchScript archives, pickled modules, corrupt downloads
        raise ValueError(f"{weights_path} is not a plain state dict. {_HOW_TO_GET}") from err
    net = build_fid_inception()
    try:
        net.load_state_dict(state, strict=True)
    except (RuntimeError, AttributeError) as err:
        raise ValueError(
            f"{weights_path} does not match the FID Inception architecture "
            f"(is it torch-fidelity's or NVIDIA's TorchScript file?). {_HOW_TO_GET}"
        ) from err
    return FIDInceptionFeatures(net)
