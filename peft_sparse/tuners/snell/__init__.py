from .config import SnellConfig
from .layer import SnellLayer, SnellLinear
from .model import SnellModel

__all__ = ["SnellConfig", "SnellLayer", "SnellLinear", "SnellModel"]
