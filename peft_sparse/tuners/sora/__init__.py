from .config import SoraConfig
from .layer import SoraLayer, SoraLinear
from .model import SoraModel

__all__ = ["SoraConfig", "SoraLayer", "SoraLinear", "SoraModel"]
