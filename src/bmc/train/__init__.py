"""Training: TrainConfig in, a saved Run out (save_run: a given model saved as a run, untrained)."""

from bmc.train.config import TrainConfig
from bmc.train.loop import Run, TrainProgress, save_run, train

__all__ = ["Run", "TrainConfig", "TrainProgress", "save_run", "train"]
