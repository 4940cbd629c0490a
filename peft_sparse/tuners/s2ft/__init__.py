from .config import S2ftConfig
from .layer import QuantizedS2ftLinear, S2ftLinear
from .model import S2ftModel

__all__ = ["QuantizedS2ftLinear", "S2ftConfig", "S2ftLinear", "S2ftModel"]
