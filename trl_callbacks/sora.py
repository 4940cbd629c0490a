"""TrainerCallback that runs SoRA's proximal gate step and sparsifying schedule (SoraConfig)."""

from __future__ import annotations

from typing import Iterator, Optional, Sequence

from torch import nn
from torch.optim import Optimizer

from peft_sparse.tuners.sora import SoraConfig, SoraModel

from .model_check import active_adapters_of, check_model_has_method
from .reporting import LoggingCallback


def sora_adapters(model: nn.Module) -> Iterator[tuple[SoraModel, str, SoraConfig]]:
    """(tuner, adapter name, config) of every active SoRA adapter inside ``model``."""
    return active_adapters_of(model, SoraModel)


def trainable_gates(tuner: SoraModel, adapter_name: str) -> list[nn.Parameter]:
    """The gates of ``adapter_name`` that the optimizer steps (all of them unless frozen by hand)."""
    return [gate for gate in tuner.gates(adapter_name) if gate.requires_grad]


def gate_group(optimizer: Optimizer, gates: Sequence[nn.Parameter]) -> Optional[dict]:
    """The param group that holds every one of ``gates``; None when they are spread over groups or missing."""
    wanted = {id(gate) for gate in gates}
    return next((group for group in optimizer.param_groups if wanted <= {id(p) for p in group["params"]}), None)


def check_gate_group(optimizer: Optimizer, tuner: SoraModel, adapter_name: str, config: SoraConfig) -> None:
    """Raise ``ValueError`` unless the adapter's gates share one param group without weight decay, whose
    learning rate (the schedule's base, ``initial_lr``) is ``config.gate_lr`` when that is set."""
    group = gate_group(optimizer, trainable_gates(tuner, adapter_name))
    if group is None:
        found = "gates spread over several param groups"
    else:
        lr = group.get("initial_lr", group["lr"])
        if group["weight_decay"] == 0 and config.gate_lr in (None, lr):
            return
        found = f"lr {lr:g} and weight_decay {group['weight_decay']:g}"
    wanted = "one param group with weight_decay 0"
    if config.gate_lr is not None:
        wanted += f" and lr {config.gate_lr:g} (SoraConfig.gate_lr)"
    raise ValueError(
        f"SoraCallback: the gates of adapter '{adapter_name}' must be in {wanted}, got {found}; build the optimizer "
        "with trl_callbacks.create_sora_optimizer(model, ...) and pass Trainer(optimizers=(optimizer, None)), or "
        "pass Trainer(optimizer_cls_and_kwargs=trl_callbacks.sora_optimizer_cls_and_kwargs(args))"
    )


class SoraCallback(LoggingCallback):
    """Drives SoRA inside the Trainer (and TRL's SFTTrainer).

    - At train begin, checks that the model has SoRA adapters and that each adapter's gates share one
      optimizer param group without weight decay, with the config's ``gate_lr`` when set: build the
      optimizer with ``create_sora_optimizer`` or ``sora_optimizer_cls_and_kwargs`` (trl_callbacks.optimizers).
    - Before each optimizer step, adds the gradient of the optional L1 term (``l1_weight``).
    - After each optimizer step, soft-thresholds every gate by ``lr_t * xi_t``
      (``xi_t`` with ``scale_xi_by_lr=False``), ``xi_t`` from the config's schedule.
    - Logs ``sora/live_rank`` (sum over layers), ``sora/live_rank_fraction``, ``sora/xi``,
      ``sora/threshold`` and, with ``log_layer_ranks``, ``sora/live_rank/<layer>``
      (``sora/<adapter>/...`` for adapters other than "default").

    Example:
        >>> trainer = SFTTrainer(model=peft_model, args=args, train_dataset=ds,
        ...                      optimizer_cls_and_kwargs=sora_optimizer_cls_and_kwargs(args),
        ...                      callbacks=[SoraCallback()])  # doctest: +SKIP
    """

    def __init__(self, log_layer_ranks: bool = False) -> None:
        self.log_layer_ranks = log_layer_ranks
        self._thresholds: dict[str, tuple[float, float]] = {}

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        check_model_has_method(self, model, any(sora_adapters(model)), "SoraConfig")
        for tuner, adapter_name, config in sora_adapters(model):
            check_gate_group(optimizer, tuner, adapter_name, config)
        self._thresholds = {}
        return super().on_train_begin(args, state, control, model=model, optimizer=optimizer, **kwargs)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        for tuner, adapter_name, config in sora_adapters(model):
            if config.l1_weight > 0:
                tuner.add_gate_l1_gradient(adapter_name, config.l1_weight)

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if getattr(optimizer, "step_was_skipped", False):  # accelerate skips steps on fp16 overflow
            return
        for tuner, adapter_name, config in sora_adapters(model):
            xi = config.xi_at(state.global_step, state.max_steps)  # global_step: this step's 0-based index
            threshold = xi
            if config.scale_xi_by_lr:  # the gates' learning rate at this step
                threshold = xi * gate_group(optimizer, trainable_gates(tuner, adapter_name))["lr"]
            tuner.soft_threshold_gates(adapter_name, threshold)
            self._thresholds[adapter_name] = (xi, threshold)

    def metrics(self, model):
        values = {}
        for tuner, adapter_name, config in sora_adapters(model):
            prefix = "sora" if adapter_name == "default" else f"sora/{adapter_name}"
            ranks = tuner.live_ranks(adapter_name)
            values[f"{prefix}/live_rank"] = sum(ranks.values())
            values[f"{prefix}/live_rank_fraction"] = sum(ranks.values()) / max(config.r * len(ranks), 1)
            if adapter_name in self._thresholds:
                values[f"{prefix}/xi"], values[f"{prefix}/threshold"] = self._thresholds[adapter_name]
            if self.log_layer_ranks:
                values.update({f"{prefix}/live_rank/{name}": rank for name, rank in ranks.items()})
        return values
