"""LT-SFT's lottery ticket ("Composable Sparse Fine-Tuning", Ansell et al., 2022).

A dense phase fine-tunes the target matrices themselves; the ``K`` entries that moved most,
``|theta_1 - theta_0|`` ranked over all target matrices together, become the adapter's indices;
every matrix goes back to ``theta_0`` exactly, and the sparse phase trains only those entries.

The dense phase costs what full fine-tuning of the target matrices costs (their gradients and
optimizer state), plus a copy of ``theta_0`` kept on the CPU. To bound it, run the dense phase on a
group of matrices at a time (``dense_phase(modules=...)``, e.g. one block per run): each group then
moves with the rest of the model at ``theta_0``, an approximation of the joint dense run, and only the
group's best ``K`` entries are kept between runs.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator, Optional

import torch
from torch import nn

from .layer import SparseDeltaLayer


class LotteryTicket:
    """Draw the indices of a ``SparseConfig(selection="lt-sft")`` adapter from dense phases.

    Example:
        >>> model = get_peft_model(base, SparseConfig(selection="lt-sft", density=0.01))  # doctest: +SKIP
        >>> ticket = LotteryTicket(model)  # doctest: +SKIP
        >>> with ticket.dense_phase():  # the target matrices train densely, the adapter is out
        ...     SFTTrainer(model=model, args=dense_args, train_dataset=data).train()  # doctest: +SKIP
        >>> ticket.draw()  # indices = the K largest |theta_1 - theta_0|, weights back at theta_0  # doctest: +SKIP
        >>> SFTTrainer(model=model, args=sparse_args, train_dataset=data).train()  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, adapter_name: str = "default") -> None:
        tuner = model.base_model if hasattr(model, "base_model") else model
        config = tuner.peft_config[adapter_name]
        if getattr(config, "selection", None) != "lt-sft":
            raise ValueError(
                f"LotteryTicket needs a SparseConfig with selection='lt-sft', got adapter '{adapter_name}' with "
                f"{type(config).__name__}(selection={getattr(config, 'selection', None)!r})"
            )
        self.tuner, self.adapter_name, self.config = tuner, adapter_name, config
        self.layers: dict[str, SparseDeltaLayer] = {
            name: layer for name, layer in tuner.sparse_delta_layers() if adapter_name in layer.delta_values
        }
        self.budget = sum(layer.num_values(adapter_name) for layer in self.layers.values())
        # per measured matrix: its best `budget` flat indices and their |theta_1 - theta_0| (CPU, fp32)
        self.movements: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @contextmanager
    def dense_phase(self, modules: Optional[Iterable[str]] = None) -> Iterator[None]:
        """Inside: the ``modules`` (names of the adapter's layers; default all) are plain trainable base layers.

        On exit their movement is recorded and each weight is put back to ``theta_0`` bit-exactly.
        """
        names = list(self.layers) if modules is None else list(modules)
        unknown = sorted(set(names) - set(self.layers))
        if unknown:
            raise ValueError(
                f"modules must name layers of adapter '{self.adapter_name}' (e.g. {list(self.layers)[:2]}), "
                f"got unknown {unknown[:3]}"
            )
        theta_0, swapped = {}, {}
        trainable = {name: p.requires_grad for name, p in self.tuner.model.named_parameters()}
        self.tuner.model.requires_grad_(False)
        try:
            for name in names:
                layer = self.layers[name]
                base = layer.get_base_layer()
                theta_0[name] = layer.pristine_weight().cpu()
                with torch.no_grad():
                    base.weight.copy_(theta_0[name])  # nothing written: the dense phase starts at W0
                    layer.delta_values[self.adapter_name].zero_()
                parent_name, _, child = name.rpartition(".")
                parent = self.tuner.model.get_submodule(parent_name)
                swapped[name] = (parent, child, getattr(parent, child))
                setattr(parent, child, base)
                base.weight.requires_grad_(True)
            yield
        finally:
            with torch.no_grad():
                for name, (parent, child, layer) in swapped.items():
                    weight = layer.get_base_layer().weight
                    movement = (weight.detach().float().cpu() - theta_0[name].float()).abs().view(-1)
                    top = torch.topk(movement, min(self.budget, movement.numel()), sorted=False)
                    self.movements[name] = (top.indices, top.values)
                    weight.copy_(theta_0[name])
                    setattr(parent, child, layer)
            for name, parameter in self.tuner.model.named_parameters():
                parameter.requires_grad_(trainable.get(name, False))

    def draw(self) -> dict[str, int]:
        """Set the adapter's indices to the ``K`` largest movements over all matrices; returns the count per matrix.

        ``K`` is the adapter's budget (``density`` or ``num_tunable_weights``). Every matrix keeps at least
        its own largest movement (an adapter layer holds at least one entry); the rest are ranked together.
        The counts go to ``config.values_per_module``, so the saved adapter loads with them.
        """
        missing = sorted(set(self.layers) - set(self.movements))
        if missing:
            raise ValueError(f"draw needs a dense phase over every layer of the adapter first; not yet: {missing[:3]}")
        names = list(self.layers)
        first = {name: torch.argmax(self.movements[name][1]).item() for name in names}
        pool_scores, pool_owner, pool_position = [], [], []
        for owner, name in enumerate(names):
            scores = self.movements[name][1].clone()
            scores[first[name]] = -1.0  # already kept
            pool_scores.append(scores)
            pool_owner.append(torch.full_like(scores, owner, dtype=torch.long))
            pool_position.append(torch.arange(scores.numel()))
        scores = torch.cat(pool_scores)
        best = torch.topk(scores, max(0, self.budget - len(names)), sorted=False).indices
        owners, positions = torch.cat(pool_owner)[best], torch.cat(pool_position)[best]
        counts = {}
        for owner, name in enumerate(names):
            chosen = torch.cat([torch.tensor([first[name]]), positions[owners == owner]])
            indices = self.movements[name][0][chosen].sort().values
            layer = self.layers[name]
            dtype, device = layer.delta_indices[self.adapter_name].dtype, layer.delta_indices[self.adapter_name].device
            layer.update_layer(self.adapter_name, indices.to(device, dtype), init_weights=True)
            counts[name] = indices.numel()
        self.config.values_per_module = counts
        return counts
