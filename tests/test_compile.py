"""`train.compile`: the compiled step equals the eager one and never recompiles as alpha moves.

Inductor on CPU compiles C++ with the system compiler: one short run of the 8x8 fade-in
(alpha moves every step), G and D compiled once each for training, once each for the
no-grad / frozen passes.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from progan.trainer import GANTrainer
from tests.helpers import run_steps, tiny_config, torch_threads

pytestmark = pytest.mark.slow  # 1-3 min of C++ compilation on the 2-core box

# Inductor fuses and reorders float arithmetic. Measured on this test's 3 steps: stats
# differ from eager by at most 4.5e-7 absolute (2.4e-5 relative), weights by 3.9e-7
# absolute; the tolerance is > 20x that.
TOL = {"rtol": 1e-4, "atol": 1e-5}


def fade_in_trainer(**train) -> GANTrainer:
    trainer = GANTrainer(tiny_config(train={"mirror": True, **train}))
    trainer.images_shown = trainer.plan[1].start_images  # the 8x8 transition
    return trainer


def test_compiled_step_equals_eager_and_alpha_moving_does_not_recompile():
    with torch_threads(1):
        eager = fade_in_trainer()
        expected = run_steps(eager, 3)
        compiled = fade_in_trainer(compile=True)
        torch._dynamo.reset()
        first = run_steps(compiled, 1)
        torch._dynamo.config.error_on_recompile = True  # a recompile now raises
        try:
            rest = run_steps(compiled, 2)
        finally:
            torch._dynamo.config.error_on_recompile = False
    got = first + rest
    assert [s["alpha"] for s in got] == [0.0, 0.125, 0.25]  # alpha really moved
    for mine, ref in zip(got, expected, strict=True):
        torch.testing.assert_close(
            torch.tensor([mine[k] for k in sorted(ref)]),
            torch.tensor([ref[k] for k in sorted(ref)]),
            **TOL,
        )
    for net in ("G", "D", "G_ema"):
        for a, b in zip(
            getattr(compiled, net).parameters(), getattr(eager, net).parameters(), strict=True
        ):
            torch.testing.assert_close(a, b, **TOL)
