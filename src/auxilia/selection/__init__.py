"""Sample selection: rank the samples of auxiliary pools by what they would do for the target.

``auxilia select CONFIG.yaml`` (or :func:`select` from Python) warms a model up, scores every
pool sample with a method (``gradient``, ``color-filter``, ``tawt``, ``embedding``, ``loss``,
``random``), keeps a budget of the best and writes them as files ``auxilia run`` trains on.
"""

from auxilia.selection.learner import ClassifierLearner, Learner
from auxilia.selection.methods import METHODS, Method
from auxilia.selection.methods import get as get_method
from auxilia.selection.pools import Pool, PoolBatch
from auxilia.selection.select import Selection, SelectSettings, select, write_selection

__all__ = [
    "METHODS",
    "ClassifierLearner",
    "Learner",
    "Method",
    "Pool",
    "PoolBatch",
    "SelectSettings",
    "Selection",
    "get_method",
    "select",
    "write_selection",
]
