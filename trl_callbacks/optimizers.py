"""SoRA's optimizer: the gates of each adapter in a param group of their own, built before training.

Modelled on peft's ``create_loraplus_optimizer``: a function from the model to an optimizer with
per-group learning rates, handed to the Trainer as ``optimizers=(optimizer, None)``, or through
``optimizer_cls_and_kwargs`` (transformers' optimizer-factory protocol) when the Trainer wraps the
model itself (TRL's ``SFTTrainer(peft_config=...)``). The Trainer's schedule then scales every group
from its own learning rate, and checkpoints save and resume the groups as they are.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim import Optimizer
from transformers import Trainer, TrainingArguments
from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS
from transformers.trainer_pt_utils import get_parameter_names

from .sora import sora_adapters, trainable_gates


def create_sora_optimizer(
    model: nn.Module, optimizer_cls: type[Optimizer] = torch.optim.AdamW, *, lr: float, weight_decay: float = 0.0,
    **kwargs,
) -> Optimizer:
    """An ``optimizer_cls`` over the trainable parameters of ``model``, each SoRA adapter's gates in their own group.

    Groups: the trainable parameters other than gates with ``weight_decay`` (all but biases and
    LayerNorm weights, as in ``create_loraplus_optimizer``); those without; then, per active SoRA
    adapter, its gates with the config's ``gate_lr`` (``lr`` when None) and no weight decay. Empty
    groups are left out. ``kwargs`` go to ``optimizer_cls`` (betas, eps, ...).

    Example:
        >>> optimizer = create_sora_optimizer(model, torch.optim.AdamW, lr=1e-3, weight_decay=0.01)  # doctest: +SKIP
        >>> trainer = Trainer(model=model, args=args, train_dataset=ds, optimizers=(optimizer, None),
        ...                   callbacks=[SoraCallback()])  # doctest: +SKIP
    """
    gate_groups = [
        {
            "params": trainable_gates(tuner, adapter_name),
            "lr": lr if config.gate_lr is None else config.gate_lr,
            "weight_decay": 0.0,
        }
        for tuner, adapter_name, config in sora_adapters(model)
    ]
    gate_ids = {id(gate) for group in gate_groups for gate in group["params"]}
    decayed = {name for name in get_parameter_names(model, ALL_LAYERNORM_LAYERS) if "bias" not in name}
    others = [(name, p) for name, p in model.named_parameters() if p.requires_grad and id(p) not in gate_ids]
    groups = [
        {"params": [param for name, param in others if name in decayed], "weight_decay": weight_decay},
        {"params": [param for name, param in others if name not in decayed], "weight_decay": 0.0},
        *gate_groups,
    ]
    return optimizer_cls([group for group in groups if group["params"]], lr=lr, **kwargs)


class SoraOptimizerFactory:
    """transformers' optimizer-factory protocol: the Trainer calls ``SoraOptimizerFactory()(model, **kwargs)``."""

    def __call__(self, model: nn.Module, **kwargs) -> Optimizer:
        return create_sora_optimizer(model, **kwargs)


def sora_optimizer_cls_and_kwargs(args: TrainingArguments) -> tuple[type, dict]:
    """For ``Trainer(optimizer_cls_and_kwargs=...)``: the optimizer ``args.optim`` names, with ``args``' learning
    rate, weight decay and betas, built by :func:`create_sora_optimizer` once the Trainer has the model.

    Example:
        >>> trainer = SFTTrainer(model=base, args=args, train_dataset=ds, peft_config=SoraConfig(gate_lr=5e-2),
        ...                      optimizer_cls_and_kwargs=sora_optimizer_cls_and_kwargs(args),
        ...                      callbacks=[SoraCallback()])  # doctest: +SKIP
    """
    optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    return SoraOptimizerFactory, {"optimizer_cls": optimizer_cls, "weight_decay": args.weight_decay, **optimizer_kwargs}

