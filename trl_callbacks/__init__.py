"""TrainerCallbacks that drive peft_sparse methods inside transformers' Trainer and TRL's SFTTrainer."""

from .param_groups import isolate_param_group
from .schedules import reselection_rate
from .snella import SnellAllocationCallback
from .sora import SoraCallback
from .sparse_update import SparseUpdateCallback

__all__ = ["SnellAllocationCallback", "SoraCallback", "SparseUpdateCallback", "isolate_param_group", "reselection_rate"]
