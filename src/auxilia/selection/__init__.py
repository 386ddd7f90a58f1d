"""Sample selection: rank the samples of auxiliary pools by what they would do for the target.

``auxilia select CONFIG.yaml`` (or :func:`select` from Python) warms a model up, scores every
pool sample with a method (``gradient``, ``color-filter``, ``tawt``, ``embedding``, ``loss``,
``random``), keeps a budget of the best and writes them as files ``auxilia run`` trains on.
Causal language models (:mod:`~auxilia.selection.language`) select text from text pools
(:mod:`~auxilia.selection.text`) the same way.
"""

from auxilia.selection.language import CausalLMSpec, LanguageModelLearner
from auxilia.selection.learner import ClassifierLearner, Learner
from auxilia.selection.methods import METHODS, Method
from auxilia.selection.methods import get as get_method
from auxilia.selection.pools import Pool, PoolBatch
from auxilia.selection.select import Selection, SelectSettings, select, write_selection
from auxilia.selection.text import TextPool, TextTarget, load_text_target
from auxilia.selection.tokens import ByteTokenizer

__all__ = [
    "METHODS",
    "ByteTokenizer",
    "CausalLMSpec",
    "ClassifierLearner",
    "LanguageModelLearner",
    "Learner",
    "Method",
    "Pool",
    "PoolBatch",
    "SelectSettings",
    "Selection",
    "TextPool",
    "TextTarget",
    "get_method",
    "load_text_target",
    "select",
    "write_selection",
]
