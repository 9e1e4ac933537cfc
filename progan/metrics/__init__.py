"""Evaluation metrics for generated images: the ProGAN paper's SWD, MS-SSIM diversity, FID
and KID. Plain PyTorch (GPU when the tensors are on a GPU), batch-wise; see docs/metrics.md.

Images are ``[N, 3, H, W]`` tensors, uint8 0..255 or float in [-1, 1] (`images.to_pixels`).
"""

from progan.metrics.fid import (
    extract_features,
    feature_statistics,
    fid_from_features,
    frechet_distance,
    kid_from_features,
    load_or_compute_real_features,
)
from progan.metrics.images import to_pixels
from progan.metrics.inception import (
    FID_WEIGHTS_FILENAME,
    FID_WEIGHTS_URL,
    FIDInceptionFeatures,
    build_fid_inception,
    load_fid_inception,
)
from progan.metrics.msssim import MSSSIMDiversity, ms_ssim, msssim_betas
from progan.metrics.swd import (
    SWDCacheKey,
    SWDDescriptors,
    laplacian_pyramid,
    load_or_compute_real_descriptors,
    sliced_wasserstein,
    swd,
    swd_real_floor,
)

__all__ = [
    "FID_WEIGHTS_FILENAME",
    "FID_WEIGHTS_URL",
    "FIDInceptionFeatures",
    "MSSSIMDiversity",
    "SWDCacheKey",
    "SWDDescriptors",
    "build_fid_inception",
    "extract_features",
    "feature_statistics",
    "fid_from_features",
    "frechet_distance",
    "kid_from_features",
    "laplacian_pyramid",
    "load_fid_inception",
    "load_or_compute_real_descriptors",
    "load_or_compute_real_features",
    "ms_ssim",
    "msssim_betas",
    "sliced_wasserstein",
    "swd",
    "swd_real_floor",
    "to_pixels",
]
