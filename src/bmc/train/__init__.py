"""Training: TrainConfig in, a saved Run out."""

from bmc.train.config import TrainConfig
from bmc.train.loop import Run, TrainProgress, train

__all__ = ["Run", "TrainConfig", "TrainProgress", "train"]
