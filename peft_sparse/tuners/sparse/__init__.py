from .config import SparseConfig
from .model import SparseModel

__all__ = ["SparseConfig", "SparseModel"]
