"""Typed, validated configuration of the model, the training step and the growth schedule."""

from __future__ import annotations

from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    field_validator,
    model_validator,
)

MIN_RESOLUTION = 4
MAX_RESOLUTION = 1024
# DiffAugment's transform groups, in the order they are applied (progan/augment.py)
AUGMENT_TRANSFORMS = ("color", "translation", "cutout")
# Marks a field that may change when a run or output folder is continued: it changes how
# training runs or is watched, never what is trained (pipeline.config reads the marks).
RESUMABLE = {"resumable": True}


def check_resolution(value: int) -> int:
    """Raise ValueError unless `value` is a power of two in 4..1024."""
    if value < MIN_RESOLUTION or value > MAX_RESOLUTION or value & (value - 1):
        raise ValueError(
            f"must be a power of two in {MIN_RESOLUTION}..{MAX_RESOLUTION}, got {value}"
        )
    return value


class StrictModel(BaseModel):
    """Base for config sections: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(StrictModel):
    """Network architecture. Defaults are the paper's (23.1M parameters per network at 1024)."""

    arch: Literal["progan", "dcgan"] = "progan"
    resolution: int = Field(1024, description="final (largest) resolution the networks grow to")
    latent_size: int = Field(512, gt=0)
    num_channels: int = Field(3, gt=0)
    fmap_base: int = Field(8192, gt=0, description="channels = min(fmap_base / 2**stage, fmap_max)")
    fmap_max: int = Field(512, gt=0)
    fmap_min: int = Field(1, gt=0)
    mbstd_group_size: int = Field(4, ge=0, description="0 disables the minibatch-stddev layer")
    dcgan_width: int = Field(64, gt=0, description="DCGAN: channels of the largest layer / 8")
    fused_scale: bool = Field(
        False,
        description="official fused_scale: G's upsample+conv as one transposed conv (same "
        "function), D's conv+pool as one stride-2 conv with the leaky ReLU after the pooling",
    )

    @field_validator("resolution")
    @classmethod
    def _check_resolution(cls, value: int) -> int:
        return check_resolution(value)


class TrainConfig(StrictModel):
    """The training step: loss, optimizer, EMA, stabilisers, numerics."""

    loss: Literal["wgan-gp", "wgan", "logistic", "bce", "lsgan"] = Field(
        "wgan-gp",
        description="wgan-gp (the paper's, with drift), wgan (weight clipping), logistic = bce "
        "(the non-saturating logistic loss; pair it with train.r1_gamma), lsgan",
    )
    gp_lambda: float = Field(10.0, ge=0)
    gp_every: int = Field(
        1,
        ge=1,
        description="lazy gradient penalty (wgan-gp): the GP on every k-th D step of a phase "
        "(the first included), scaled by k; 1: every step, the paper's",
    )
    gp_target: float = Field(1.0, gt=0)
    drift: float = Field(0.001, ge=0, description="epsilon * D(real)^2 (WGAN losses)")
    wgan_clip: float | None = Field(0.01, gt=0, description="weight clipping for plain 'wgan'")
    r1_gamma: float = Field(
        0.0,
        ge=0,
        description="R1 penalty on reals, r1_gamma/2 * |grad D(real)|^2 (StyleGAN's; any "
        "loss, usually logistic); 0: off",
    )
    r1_every: int = Field(
        1,
        ge=1,
        description="lazy regularisation: R1 on every k-th D step of a phase (the first "
        "included), scaled by k",
    )
    augment: Literal["none", "diffaugment", "ada"] = Field(
        "none",
        description="augment every image D sees (reals, fakes, the GP/R1 inputs; "
        "differentiable, so G learns through it): diffaugment (each transform with fixed "
        "probability augment_p) or ada (that probability adapted to D's overfitting)",
    )
    augment_policy: str = Field(
        ",".join(AUGMENT_TRANSFORMS),
        description=f"comma-separated DiffAugment transforms: {', '.join(AUGMENT_TRANSFORMS)}",
    )
    augment_p: float = Field(
        1.0,
        ge=0,
        le=1,
        description="diffaugment: probability of each transform per image (1: always, as "
        "DiffAugment); ada starts at 0 and adapts",
    )
    ada_target: float = Field(
        0.6,
        gt=0,
        lt=1,
        description="ada: target of r_t = E[sign(D(augmented real))]; above it p rises",
    )
    ada_interval: int = Field(4, ge=1, description="ada: D steps between adjustments of p")
    ada_kimg: float = Field(
        500.0, gt=0, description="ada: kimg for p to move by 1 at a constant overfitting sign"
    )
    optimizer: Literal["adam", "rmsprop"] = "adam"
    betas: tuple[float, float] = (0.0, 0.99)
    eps: float = Field(1e-8, gt=0)
    rmsprop_alpha: float = Field(0.99, gt=0, lt=1)
    reset_optimizer: Literal["never", "resolution", "phase"] = Field(
        "phase",
        description="reset optimizer state at each phase (official: whenever lod changes), "
        "at each new resolution, or never",
    )
    check_finite: bool = Field(True, description="refuse a NaN/inf loss before stepping")
    n_critic: int = Field(1, ge=1, description="D steps (each on its own real batch) per G step")
    g_steps: int = Field(1, ge=1, description="G steps per iteration (seed 003 used 2)")
    ema_beta: float = Field(0.999, ge=0, le=1)
    ema_kimg: float | None = Field(
        None,
        gt=0,
        description="EMA half-life in kimg shown (StyleGAN2's ema_kimg); replaces ema_beta, "
        "so the average spans the same images at any batch size; null: ema_beta",
    )
    ema_rampup: float | None = Field(
        None,
        gt=0,
        description="with ema_kimg: the half-life is at most this fraction of the images "
        "shown so far (StyleGAN2-ADA's 0.05), so a short run is not averaged with its start",
    )
    mirror: bool = True
    instance_noise: float = Field(0.0, ge=0, description="std of Gaussian noise on D's inputs")
    label_noise: Literal["none", "beta"] = Field(
        "none", description="'beta': soft BCE labels, real=1-b, fake=b with b~Beta(1,5)"
    )
    bf16: bool = Field(
        False,
        description="bfloat16 autocast for G and D (weights and optimizers stay fp32): faster "
        "on GPUs and on CPUs with bf16 instructions (lscpu: avx512_bf16 or amx_bf16), slower "
        "on others",
    )
    channels_last: bool = Field(
        False, description="channels-last memory format for images and conv weights (speed only)"
    )
    compile: bool = Field(
        False,
        description="torch.compile G and D once per phase (progan/acceleration.py)",
        json_schema_extra=RESUMABLE,
    )
    cuda_graphs: bool = Field(
        False,
        description="with compile, on CUDA devices: CUDA graphs (mode reduce-overhead)",
        json_schema_extra=RESUMABLE,
    )
    seed: int = 0

    @model_validator(mode="after")
    def _check_ema_rampup(self) -> TrainConfig:
        if self.ema_rampup is not None and self.ema_kimg is None:
            raise ValueError("train.ema_rampup needs train.ema_kimg (the half-life it caps)")
        return self

    @field_validator("augment_policy")
    @classmethod
    def _check_policy(cls, value: str) -> str:
        names = [n.strip() for n in value.split(",")]
        unknown = [n for n in names if n not in AUGMENT_TRANSFORMS]
        if unknown or len(set(names)) != len(names):
            raise ValueError(
                f"must be distinct names from {', '.join(AUGMENT_TRANSFORMS)} separated by "
                f"commas, got {value!r}"
            )
        return ",".join(names)


class ScheduleConfig(StrictModel):
    """Progressive growth: images per phase and per-resolution batch size and learning rate."""

    start_resolution: int = 4
    transition_kimg: float = Field(600.0, ge=0)
    stabilize_kimg: float = Field(600.0, gt=0)
    total_kimg: float | None = Field(
        None, gt=0, description="if set, the final stabilization runs until this many kimg"
    )
    batch_base: int = Field(16, ge=1)
    batch_size: dict[int, PositiveInt] = Field(default_factory=dict, description="per resolution")
    lr_base: float = Field(0.001, gt=0)
    lr: dict[int, PositiveFloat] = Field(default_factory=dict, description="per resolution")

    @field_validator("start_resolution")
    @classmethod
    def _check_start(cls, value: int) -> int:
        return check_resolution(value)

    @field_validator("batch_size", "lr")
    @classmethod
    def _check_keys(cls, value: dict) -> dict:
        for res in value:
            check_resolution(res)
        return value

    def batch_for(self, resolution: int) -> int:
        """Global minibatch size at `resolution`."""
        return self.batch_size.get(resolution, self.batch_base)

    def lr_for(self, resolution: int) -> float:
        """Learning rate at `resolution`."""
        return self.lr.get(resolution, self.lr_base)


class GANConfig(StrictModel):
    """Everything `progan/` needs to build and train a GAN."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)

    @model_validator(mode="after")
    def _check_consistency(self) -> GANConfig:
        if self.schedule.start_resolution > self.model.resolution:
            raise ValueError(
                f"schedule.start_resolution ({self.schedule.start_resolution}) exceeds "
                f"model.resolution ({self.model.resolution})"
            )
        return self
