"""TrainerCallbacks that drive peft_sparse methods inside transformers' Trainer and TRL's SFTTrainer."""

from .optimizers import create_sora_optimizer, sora_optimizer_cls_and_kwargs
from .reporting import log_before_reporting
from .rosa import RosaCallback
from .schedules import reselection_rate
from .snella import SnellAllocationCallback
from .sora import SoraCallback
from .sparse_update import SparseUpdateCallback

__all__ = [
    "SnellAllocationCallback", "SoraCallback", "SparseUpdateCallback", "create_sora_optimizer", "log_before_reporting",
    "reselection_rate", "sora_optimizer_cls_and_kwargs", "RosaCallback",
]
