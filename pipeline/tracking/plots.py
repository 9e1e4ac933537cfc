"""Loss-curve plots for MLflow artifacts (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def plot_phase_curves(history: list[dict[str, float]], path: str | Path) -> Path:
    """D/G losses, GP/R1 penalties and D outputs (ADA's p) against images shown."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = [h["images_shown"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for key in ("d_loss", "g_loss", "gp", "r1"):
        if key in history[0]:
            axes[0].plot(x, [h.get(key) for h in history], label=key)
    for key in ("d_real", "d_fake", "augment_p"):
        if key in history[0]:
            axes[1].plot(x, [h.get(key) for h in history], label=key)
    for ax in axes:
        ax.set_xlabel("images shown")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
