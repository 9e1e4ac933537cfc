"""Plain-PyTorch Progressive-Growing GAN (Karras et al. 2018) and a DCGAN baseline.

Nothing here imports Ray or MLflow: the networks, losses, schedule, training step,
checkpoints and sampling tools are usable from a notebook. `pipeline/` drives them.
"""

from progan.config import GANConfig, ModelConfig, ScheduleConfig, TrainConfig
from progan.schedule import Phase, SchedulePoint, phase_plan, schedule_at

__all__ = [
    "GANConfig",
    "ModelConfig",
    "Phase",
    "ScheduleConfig",
    "SchedulePoint",
    "TrainConfig",
    "phase_plan",
    "schedule_at",
]
