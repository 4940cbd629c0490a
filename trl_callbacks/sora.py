"""TrainerCallback that runs SoRA's proximal gate step and sparsifying schedule (SoraConfig)."""

from __future__ import annotations

from typing import Iterator

from torch import nn

from peft_sparse.tuners.sora import SoraConfig, SoraModel

from .param_groups import isolate_param_group
from .reporting import LoggingCallback


def sora_adapters(model: nn.Module) -> Iterator[tuple[SoraModel, str, SoraConfig]]:
    """(tuner, adapter name, config) of every active SoRA adapter inside ``model``."""
    for module in model.modules():
        if isinstance(module, SoraModel):
            for adapter_name, config in module.peft_config.items():
                if adapter_name in module.active_adapters:
                    yield module, adapter_name, config


class SoraCallback(LoggingCallback):
    """Drives SoRA inside the Trainer (and TRL's SFTTrainer).

    - At train begin, moves each adapter's gates into their own optimizer param group without
      weight decay, with ``gate_lr`` (default: the Trainer's learning rate) on the Trainer's LR
      schedule. An optimizer you built with the gates already alone in a group is left as it is.
      Checkpoints list the optimizer's groups as the Trainer built them, so resuming works either way.
    - Before each optimizer step, adds the gradient of the optional L1 term (``l1_weight``).
    - After each optimizer step, soft-thresholds every gate by ``lr_t * xi_t``
      (``xi_t`` with ``scale_xi_by_lr=False``), ``xi_t`` from the config's schedule.
    - Logs (ahead of TensorBoard / W&B) ``sora/live_rank`` (sum over layers), ``sora/live_rank_fraction``, ``sora/xi``,
      ``sora/threshold`` and, with ``log_layer_ranks``, ``sora/live_rank/<layer>``
      (``sora/<adapter>/...`` for adapters other than "default").

    Example:
        >>> trainer = SFTTrainer(model=peft_model, args=args, train_dataset=ds,
        ...                      callbacks=[SoraCallback()])  # doctest: +SKIP
    """

    def __init__(self, log_layer_ranks: bool = True) -> None:
        self.log_layer_ranks = log_layer_ranks
        self._gate_groups: dict[str, dict] = {}
        self._thresholds: dict[str, tuple[float, float]] = {}

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        self._gate_groups, self._thresholds = {}, {}
        if optimizer is None:
            return
        for tuner, adapter_name, config in sora_adapters(model):
            gate_lr = args.learning_rate if config.gate_lr is None else config.gate_lr
            self._gate_groups[adapter_name] = isolate_param_group(
                optimizer, lr_scheduler, tuner.gates(adapter_name), lr=gate_lr
            )

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
            if config.scale_xi_by_lr:
                group = self._gate_groups.get(adapter_name)
                threshold = xi * (group["lr"] if group is not None else args.learning_rate)
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
