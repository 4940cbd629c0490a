"""TrainerCallbacks that drive peft_sparse methods inside transformers' Trainer and TRL's SFTTrainer."""

from .schedules import reselection_rate
from .sparse_update import SparseUpdateCallback

__all__ = ["SparseUpdateCallback", "reselection_rate"]
