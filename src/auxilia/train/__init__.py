"""Training: the Trainer that wires the layers below, checkpoints and progress."""

from auxilia.train.trainer import Trainer, TrainSettings

__all__ = ["TrainSettings", "Trainer"]
