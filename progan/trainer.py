"""The training step for one phase, framework-free: D step(s), G step(s), EMA update.

`GANTrainer` owns G, D, the EMA generator and both optimizers, knows where it is in the
schedule (images shown), and turns real batches into optimizer steps. It runs the same in a
notebook, in a plain loop (`pipeline.phases.local`), or inside a Ray Train worker, where the
pipeline passes a `wrap` function (DDP) applied to what is trained in each phase.

All randomness of a step (latents, GP mixing, mirroring, noise, augmentation) is drawn from
a generator seeded by (seed, rank, images shown): the run is a pure function of its position,
so a resumed run continues the same curve bit-for-bit on CPU, and ranks draw different latents.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from progan.acceleration import (
    compile_network,
    forget_compiled_phases,
    make_optimizer,
    uses_cuda_graphs,
)
from progan.augment import Augmentation
from progan.checkpoint import rng_state, set_rng_state
from progan.config import GANConfig, ModelConfig
from progan.ema import ema_beta_at, make_ema, update_ema
from progan.layers import shared_scaled_weights
from progan.losses import (
    BCE_LOSSES,
    DiscriminatorObjective,
    generator_loss,
    gp_weight,
    r1_weight,
)
from progan.models import build_networks
from progan.monitor import NonFiniteLossError, StepMonitor
from progan.networks import Alpha, fade_in_real, is_fading
from progan.schedule import Phase, SchedulePoint, phase_plan, point_in_plan

Wrap = Callable[[nn.Module], nn.Module]
CHECKED_LOSSES = ("d_loss", "g_loss")

__all__ = ["GANTrainer", "NonFiniteLossError"]


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]; float input is taken as already in [-1, 1]."""
    if images.dtype == torch.uint8:
        return images.float().div_(127.5).sub_(1.0)
    return images.float()


class GANTrainer:
    """G, D, G_ema, optimizers and the schedule position; `train_step` advances them."""

    def __init__(
        self,
        cfg: GANConfig,
        device: str | torch.device = "cpu",
        rank: int = 0,
        world_size: int = 1,
        wrap: Wrap | None = None,
        plan: list[Phase] | None = None,
    ) -> None:
        """`plan`: the phase plan of `cfg`, if the caller has it already (else computed)."""
        self.cfg = cfg
        self.device = torch.device(device)
        self.rank, self.world_size = rank, world_size
        self.wrap = wrap or (lambda module: module)
        self.plan: list[Phase] = plan or phase_plan(cfg.schedule, cfg.model.resolution)
        with torch.random.fork_rng(devices=[]):  # same initial weights for the same seed
            torch.manual_seed(cfg.train.seed)
            self.G, self.D = build_networks(cfg.model)
        self.G.to(self.device)
        self.D.to(self.device)
        if cfg.train.channels_last:
            self.G.to(memory_format=torch.channels_last)
            self.D.to(memory_format=torch.channels_last)
        self.G_ema = make_ema(self.G)
        self.opt_g, self.opt_d = self._make_optimizers()
        self.images_shown = 0
        self.optimizer_phase = -1  # index of the phase the optimizer state belongs to
        self.phase: Phase | None = None  # phase the modules are currently set up for
        self.generator = torch.Generator(self.device)
        self.monitor = StepMonitor(CHECKED_LOSSES, self.device, cfg.train.check_finite)
        self.augment = Augmentation(cfg.train, self.device, world_size)  # identity for 'none'
        self.host_stats: dict[str, float] = {}  # known on the host: alpha, lr, resolution
        # a fading phase's alpha for compiled networks: refilled in place, never recompiled
        self.alpha_tensor = torch.zeros((), device=self.device)

    # -- set-up -----------------------------------------------------------------------
    def _make_optimizers(self) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
        t, lr = self.cfg.train, self.plan[0].lr
        return (
            make_optimizer(self.G.parameters(), t, lr, self.device),
            make_optimizer(self.D.parameters(), t, lr, self.device),
        )

    def _needs_optimizer_reset(self, phase: Phase) -> bool:
        if self.optimizer_phase in (-1, phase.index):
            return False
        mode = self.cfg.train.reset_optimizer
        previous = self.plan[self.optimizer_phase]
        return mode == "phase" or (mode == "resolution" and previous.resolution != phase.resolution)

    def begin_phase(self, phase: Phase) -> None:
        """Freeze unused layers, set lr, reset optimizer state if configured, (re)wrap."""
        fading = phase.kind == "transition"
        self.G.set_trainable(phase.level, fading)
        self.D.set_trainable(phase.level, fading)
        if self._needs_optimizer_reset(phase):
            self.opt_g, self.opt_d = self._make_optimizers()
        self.optimizer_phase = phase.index
        for opt in (self.opt_g, self.opt_d):
            for group in opt.param_groups:
                group["lr"] = phase.lr
        self.G_train, self.G_fast, self.D_fast = self.wrap(self.G), self.G, self.D
        t = self.cfg.train
        if t.compile:
            forget_compiled_phases()
            self.G_train = compile_network(self.G_train, t, self.device)
            self.G_fast = compile_network(self.G, t, self.device)
            self.D_fast = compile_network(self.D, t, self.device)
        objective = DiscriminatorObjective(self.D, t, self.D_fast)
        self.D_train = self.wrap(objective.to(self.device))
        self.d_active = [p for p in self.D.parameters() if p.requires_grad]
        self.phase = phase

    @property
    def point(self) -> SchedulePoint:
        """Where training is in the schedule now."""
        return point_in_plan(self.plan, self.images_shown)

    # -- the step -----------------------------------------------------------------------
    def _seed_step(self) -> torch.Generator:
        seed = (self.cfg.train.seed * 1_000_003 + self.rank) * 2**32 + self.images_shown
        return self.generator.manual_seed(seed % 2**63)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.train.bf16)

    def _randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator, device=self.device)

    def _rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=self.generator, device=self.device)

    def _prepare_real(self, real: torch.Tensor, alpha: Alpha, fading: bool) -> torch.Tensor:
        real = to_model_range(real.to(self.device, non_blocking=True))
        if self.cfg.train.mirror:
            flip = self._rand(real.shape[0]) < 0.5
            real = torch.where(flip.view(-1, 1, 1, 1), real.flip(3), real)
        if fading:
            real = fade_in_real(real, alpha)
        return self._to_memory_format(real)

    def _to_memory_format(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.train.channels_last:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def _noisy(self, images: torch.Tensor) -> torch.Tensor:
        sigma = self.cfg.train.instance_noise
        return images + sigma * self._randn(*images.shape) if sigma > 0 else images

    def _seen_by_d(self, images: torch.Tensor) -> torch.Tensor:
        """What D is shown of `images`: augmented (`train.augment`), then instance noise."""
        return self._noisy(self._to_memory_format(self.augment(images, self.generator)))

    def _label_targets(self, n: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.cfg.train.label_noise != "beta" or self.cfg.train.loss not in BCE_LOSSES:
            return None, None
        # Beta(1, 5) by inverse CDF (x = 1 - u**(1/5)), so it uses the step's generator.
        real_b = 1.0 - self._rand(n).pow(0.2)
        fake_b = 1.0 - self._rand(n).pow(0.2)
        return 1.0 - real_b, fake_b

    @contextmanager
    def _d_frozen(self):
        for p in self.d_active:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in self.d_active:
                p.requires_grad_(True)

    def train_step(self, reals: torch.Tensor | Sequence[torch.Tensor]) -> dict[str, float]:
        """`step(reals)`, then `read_stats()`: simple, but waits for the device every step."""
        self.step(reals)
        return self.read_stats()

    def read_stats(self) -> dict[str, float]:
        """The last step's stats as floats: the one host sync of a log interval.

        Raises NonFiniteLossError if a loss became NaN/inf since the last read (where it
        first did, collectively under DDP: every rank must read at the same steps).
        """
        stats = self.monitor.read(self.world_size, self._where())
        return {**stats, **self.host_stats}

    def _where(self) -> str:
        return f" (phase {self.phase.name if self.phase else '?'})"

    def step(self, reals: torch.Tensor | Sequence[torch.Tensor]) -> None:
        """One iteration: `n_critic` D steps (one real batch each), `g_steps` G steps, EMA.

        `reals` are this rank's share of the global batch: uint8 [N, C, R, R] or floats in
        [-1, 1], at the current phase's resolution. Nothing here waits for the device:
        stats and finite checks stay there until `read_stats`.
        """
        batches = [reals] if isinstance(reals, torch.Tensor) else list(reals)
        t = self.cfg.train
        if len(batches) != t.n_critic:
            raise ValueError(
                f"train_step needs n_critic={t.n_critic} real batches, got {len(batches)}"
            )
        point = self.point
        if point.done:
            raise RuntimeError(f"the schedule is finished at {self.images_shown} images shown")
        if self.phase is not point.phase:
            self.begin_phase(point.phase)
        level, alpha, fading = point.level, point.alpha, is_fading(point.level, point.alpha)
        alpha = alpha if fading else 1.0
        net_alpha: Alpha = alpha  # what the networks get: a tensor when compiled and fading
        if t.compile and fading:
            net_alpha = self.alpha_tensor.fill_(alpha)
        if uses_cuda_graphs(t, self.device):
            torch.compiler.cudagraph_mark_step_begin()
        global_batch = batches[0].shape[0] * self.world_size
        if global_batch != point.batch_size:
            raise ValueError(
                f"phase {point.phase.name} expects a global batch of {point.batch_size}, got "
                f"{batches[0].shape[0]} per rank x {self.world_size} ranks"
            )
        self._seed_step()
        monitor = self.monitor
        self.G.train()
        self.D.train()

        for real in batches:
            d_index = (self.images_shown - point.phase.start_images) // point.batch_size
            real = self._prepare_real(real, alpha, fading)
            n = real.shape[0]
            with torch.no_grad(), self._autocast():
                fake = self.G_fast(self._randn(n, self.cfg.model.latent_size), level, net_alpha)
            fake = self._to_memory_format(fake.float())
            mix = self._rand(n)
            real_target, fake_target = self._label_targets(n)
            with self._autocast(), shared_scaled_weights():  # D runs 3 times in this graph
                d_loss, d_stats = self.D_train(
                    self._seen_by_d(real),
                    self._seen_by_d(fake),
                    level,
                    net_alpha,
                    mix,
                    real_target,
                    fake_target,
                    r1_weight(t, d_index),
                    gp_weight(t, d_index),
                )
            monitor.observe("d_loss", d_loss, self.images_shown)
            for name, value in {**d_stats, **self.augment.stats()}.items():
                monitor.observe(name, value, self.images_shown)
            if self.augment.ada is not None:
                self.augment.ada.observe(d_stats["d_real_sign"], n)
                self.augment.ada.step_done(d_index)
            self.opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            self.opt_d.step()
            if t.loss == "wgan" and t.wgan_clip:
                with torch.no_grad():
                    torch._foreach_clamp_min_(self.d_active, -t.wgan_clip)
                    torch._foreach_clamp_max_(self.d_active, t.wgan_clip)
            self.images_shown += point.batch_size

        with self._d_frozen():
            for _ in range(t.g_steps):
                with self._autocast():
                    z = self._randn(n, self.cfg.model.latent_size)
                    fake = self._to_memory_format(self.G_train(z, level, net_alpha))
                    d_fake = self.D_fast(self._seen_by_d(fake), level, net_alpha)
                    g_loss = generator_loss(t, d_fake).mean()
                monitor.observe("g_loss", g_loss, self.images_shown)
                self.opt_g.zero_grad(set_to_none=True)
                g_loss.backward()
                self.opt_g.step()
        step_images = t.n_critic * point.batch_size
        beta = ema_beta_at(t.ema_beta, t.ema_kimg, t.ema_rampup, self.images_shown, step_images)
        update_ema(self.G_ema, self.G, beta)
        self.host_stats = {
            "alpha": float(alpha),
            "lr": point.lr,
            "resolution": float(point.resolution),
            "images_shown": float(self.images_shown),
        }

    # -- state --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the same curve (see progan.checkpoint).

        Refuses (NonFiniteLossError) when a loss of this rank went non-finite since the
        last `read_stats`: such weights are never checkpointed.
        """
        self.monitor.check_local(self._where())
        point = self.point
        return {
            "config": self.cfg.model_dump(mode="json"),
            "G": self.G.state_dict(),
            "D": self.D.state_dict(),
            "G_ema": self.G_ema.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "images_shown": self.images_shown,
            "optimizer_phase": self.optimizer_phase,
            "phase_index": point.phase.index,
            "phase_name": point.phase.name,
            "resolution": point.resolution,
            "alpha": point.alpha,
            "rng": rng_state(),
            **({"ada": self.augment.ada.state_dict()} if self.augment.ada is not None else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict`; the model section of the config must match."""
        mine = self.cfg.model.model_dump(mode="json")
        # validated: keys added since the checkpoint was written take their defaults
        theirs = ModelConfig.model_validate(state["config"]["model"]).model_dump(mode="json")
        diff = sorted(k for k in mine if mine[k] != theirs.get(k))
        if diff:
            detail = ", ".join(
                f"{k}: checkpoint {theirs.get(k)!r} vs config {mine[k]!r}" for k in diff
            )
            raise ValueError(f"checkpoint was made with a different model config ({detail})")
        self.G.load_state_dict(state["G"])
        self.D.load_state_dict(state["D"])
        self.G_ema.load_state_dict(state["G_ema"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.images_shown = int(state["images_shown"])
        self.optimizer_phase = int(state["optimizer_phase"])
        if self.augment.ada is not None and "ada" in state:  # else p starts at 0
            self.augment.ada.load_state_dict(state["ada"])
        self.phase = None
        set_rng_state(state["rng"])

    @classmethod
    def from_state(
        cls, state: dict[str, Any], device: str | torch.device = "cpu", **kwargs
    ) -> GANTrainer:
        """A trainer rebuilt from a checkpoint's own config and state."""
        trainer = cls(GANConfig.model_validate(state["config"]), device=device, **kwargs)
        trainer.load_state_dict(state)
        return trainer
