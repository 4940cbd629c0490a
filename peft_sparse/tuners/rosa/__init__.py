from .config import RosaConfig
from .layer import QuantizedRosaLinear, RosaLinear
from .model import RosaModel

__all__ = ["QuantizedRosaLinear", "RosaConfig", "RosaLinear", "RosaModel"]
