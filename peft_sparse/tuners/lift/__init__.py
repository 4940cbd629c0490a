from .config import LiftConfig
from .layer import LiftDeltaLinear
from .model import LiftModel

__all__ = ["LiftConfig", "LiftDeltaLinear", "LiftModel"]
