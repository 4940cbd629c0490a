"""TrainerCallbacks that drive peft_sparse methods inside transformers' Trainer and TRL's SFTTrainer."""

from .param_groups import isolate_param_group
from .schedules import reselection_rate
from .sora import SoraCallback
from .sparse_update import SparseUpdateCallback

__all__ = ["SoraCallback", "SparseUpdateCallback", "isolate_param_group", "reselection_rate"]
