"""Models: built-in trunks, user trunk factories, and heads per source."""

from auxilia.models.model import AuxModel, build_model, build_trunk
from auxilia.models.trunks import cnn, mlp

__all__ = ["AuxModel", "build_model", "build_trunk", "cnn", "mlp"]
