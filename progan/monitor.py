"""Step statistics and finite checks that stay on the device until they are read.

A training step must not wait for the GPU: reading a loss (`.item()`, `.tolist()`, `if
loss:`) blocks the host until every queued kernel has run. `StepMonitor` keeps the last
step's statistics as device tensors and, for the checked losses, where each first became
NaN/inf (images shown) and its value. `read()` moves all of it to the host in one transfer,
raising `NonFiniteLossError` if a checked loss went non-finite since the last read; under
DDP that decision is collective (an all-reduce of the first bad position), so every rank
stops at the same read.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

NEVER = torch.iinfo(torch.int64).max  # "no non-finite value seen" in the first-bad vector


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or inf; raised at the next read, before any checkpoint is written."""


class StepMonitor:
    """Last-step stats and first-non-finite positions of `checked` losses, on `device`."""

    def __init__(self, checked: tuple[str, ...], device: torch.device, enabled: bool = True):
        self.checked, self.enabled = checked, enabled
        self.first_bad = torch.full((len(checked),), NEVER, dtype=torch.int64, device=device)
        self.bad_value = torch.zeros(len(checked), dtype=torch.float64, device=device)
        self.last: dict[str, torch.Tensor] = {}

    def observe(self, name: str, value: torch.Tensor, images_shown: int) -> None:
        """Remember `value` as the latest `name`; if checked and the first non-finite, where."""
        self.last[name] = value.detach()
        if not self.enabled or name not in self.checked:
            return
        i = self.checked.index(name)
        value = value.detach().to(torch.float64)
        new = ~torch.isfinite(value) & (self.first_bad[i] == NEVER)
        self.first_bad[i] = torch.where(new, images_shown, self.first_bad[i])
        self.bad_value[i] = torch.where(new, value, self.bad_value[i])

    def _global_first_bad(self, world_size: int) -> torch.Tensor:
        if world_size > 1 and dist.is_available() and dist.is_initialized():
            everywhere = self.first_bad.clone()
            dist.all_reduce(everywhere, op=dist.ReduceOp.MIN)
            return everywhere
        return self.first_bad

    def read(self, world_size: int = 1, where: str = "") -> dict[str, float]:
        """The last stats as floats (one host transfer); raise if a checked loss went bad.

        Collective under DDP when enabled: every rank must call it at the same step.
        """
        names = list(self.last)
        parts = [torch.stack([self.last[k].double() for k in names])] if names else []
        if self.enabled:
            everywhere = self._global_first_bad(world_size)
            parts += [everywhere.double(), self.first_bad.double(), self.bad_value]
        if not parts:
            return {}
        host = torch.cat(parts).tolist()  # the one synchronisation of a log interval
        stats = dict(zip(names, host[: len(names)], strict=True))
        if self.enabled:
            self._raise_if_bad(host[len(names) :], where)
        return stats

    def check_local(self, where: str = "") -> None:
        """Raise if a checked loss of this rank went bad (no collective; checkpoint writers)."""
        if self.enabled:
            host = torch.cat([self.first_bad.double()] * 2 + [self.bad_value]).tolist()
            self._raise_if_bad(host, where)

    def _raise_if_bad(self, host: list[float], where: str) -> None:
        k = len(self.checked)
        everywhere, here, values = host[:k], host[k : 2 * k], host[2 * k :]
        first = min(everywhere)
        if first >= NEVER:
            return
        i = everywhere.index(first)
        seen = f"here {values[i]}" if here[i] == first else "on another rank"
        raise NonFiniteLossError(
            f"{self.checked[i]} is not finite ({seen}) at images_shown={int(first)}{where}; "
            "the phase stops before any checkpoint of it is written. Lower the learning rate "
            "or check the data."
        )
