"""auxilia: target-aware auxiliary learning.

``import auxilia as ax``; the public namespace is small: the data classes ``Target`` and
``Source``, the gradient ``Engine``, the ``Trainer`` and its ``TrainSettings``, and the
``strategies`` and ``samplers`` modules.
"""

__version__ = "0.1.0"

from auxilia import samplers, strategies
from auxilia.data.sources import Source, Target
from auxilia.engine import Engine
from auxilia.errors import AuxiliaError
from auxilia.statistics import Need, Statistics
from auxilia.train import Trainer, TrainSettings

__all__ = [
    "AuxiliaError",
    "Engine",
    "Need",
    "Source",
    "Statistics",
    "Target",
    "TrainSettings",
    "Trainer",
    "__version__",
    "samplers",
    "strategies",
]
