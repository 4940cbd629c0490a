"""Delta tools from the seed papers: ComPEFT compression and Model Breadcrumbs merging, into sparse adapters.

Both read each adapter layer's dense delta (``get_delta_weight``, shaped like the stored weight) and
write the result as a new adapter of a sparse-delta method (SparseConfig or LiftConfig) on the same
model, so it trains, merges, saves and loads like any other. The source adapters are left untouched.

- :func:`compress_adapter` (ComPEFT, Yadav et al. 2023): per layer keep the ``density`` fraction of
  entries largest in magnitude and replace each by ``sign x scale``, one scale per layer.
- :func:`breadcrumbs_merge_adapters` (Model Breadcrumbs, Davari & Belilovsky 2023): per layer and
  task delta, drop the smallest-magnitude fraction ``beta`` and the largest-magnitude fraction
  ``gamma`` of its non-zero entries, then add the masked deltas with ``weights``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterator, Optional, Sequence

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer

from .config_base import check_fraction, check_type
from .sparse import SparseDeltaLayer
from .sparse.tuner import SparseDeltaTuner


def adapter_layers(model: PeftModel, adapter_name: str) -> Iterator[tuple[str, BaseTunerLayer]]:
    """(module name, layer) of every adapter layer of ``model`` that holds ``adapter_name``, in module order."""
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, BaseTunerLayer) and any(
            adapter_name in getattr(module, attribute, {}) for attribute in module.adapter_layer_names
        ):
            yield name, module


# --- the math, on one dense delta --------------------------------------------------------------


@torch.no_grad()
def ternary_compress(
    delta: torch.Tensor, count: int, alpha: Optional[float] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """ComPEFT on one delta: the ``count`` entries largest in magnitude, each as ``sign x scale``.

    ``delta`` any shape; returns sorted flat ``indices`` [count] (int64) and fp32 ``values`` [count].
    The scale: with ``alpha=None`` the mean magnitude of the kept non-zero entries (the least-squares
    scale for the kept signs, no tuning); with a number, ``alpha`` times the standard deviation of all
    of ``delta``'s entries, as in the ComPEFT paper (which tunes ``alpha`` per task).

    Example:
        >>> ternary_compress(torch.tensor([[0.5, -2.0], [0.1, 1.0]]), count=2)
        (tensor([1, 3]), tensor([-1.5000,  1.5000]))
    """
    flat = delta.detach().reshape(-1).float()
    indices = torch.topk(flat.abs(), count, sorted=False).indices.sort().values
    kept = flat[indices]
    if alpha is None:
        non_zero = kept[kept != 0]
        scale = non_zero.abs().mean() if non_zero.numel() else kept.new_zeros(())
    else:
        scale = alpha * flat.std()
    return indices, torch.sign(kept) * scale


@torch.no_grad()
def breadcrumbs_mask(delta: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs' mask of one delta: True except at zeros, the smallest ``beta`` and largest ``gamma``.

    The fractions count ``delta``'s non-zero entries (a sparse delta's zeros are not perturbations):
    of ``n`` non-zero entries, the ``floor(beta * n)`` smallest and ``floor(gamma * n)`` largest in
    magnitude are dropped (ties broken by position). Returns a bool tensor shaped like ``delta``.
    """
    flat = delta.detach().reshape(-1)
    non_zero = torch.nonzero(flat).flatten()
    order = non_zero[torch.sort(flat[non_zero].abs(), stable=True).indices]  # ascending magnitude
    num_small, num_large = math.floor(beta * order.numel()), math.floor(gamma * order.numel())
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    mask[order[num_small : order.numel() - num_large]] = True
    return mask.view(delta.shape)


@torch.no_grad()
def breadcrumbs_merge(
    deltas: Sequence[torch.Tensor], weights: Sequence[float], beta: float, gamma: float
) -> torch.Tensor:
    """``sum(weight * delta * breadcrumbs_mask(delta, beta, gamma))`` over the task deltas, in fp32."""
    merged = torch.zeros(deltas[0].shape, dtype=torch.float32, device=deltas[0].device)
    for delta, weight in zip(deltas, weights):
        merged += weight * torch.where(breadcrumbs_mask(delta, beta, gamma), delta.float(), 0.0)
    return merged


# --- adapters ------------------------------------------------------------------------------------


def compress_adapter(
    model: PeftModel,
    density: float,
    alpha: Optional[float] = None,
    adapter_name: str = "default",
    compressed_name: str = "compressed",
) -> None:
    """Add adapter ``compressed_name``: ComPEFT of ``adapter_name`` at ``density`` (see :func:`ternary_compress`).

    The new adapter has the source's method and ``round(density * entries)`` values per layer, all
    ``+-scale`` (or 0 where the source had fewer non-zero entries); ``modules_to_save`` are not carried.

    Example:
        >>> compress_adapter(model, density=0.002)  # doctest: +SKIP
        >>> model.save_pretrained("compressed", selected_adapters=["compressed"])  # doctest: +SKIP
    """
    _check_sparse_delta_model(model, [adapter_name], "adapter_name")
    _check_new_name(model, "compressed_name", compressed_name)
    check_fraction("density", density)
    if alpha is not None:
        check_type("alpha", alpha, (int, float), "a positive number or None")
        if not alpha > 0:
            raise ValueError(f"alpha must be a positive number or None, got {alpha!r}")
    layers = dict(adapter_layers(model, adapter_name))
    _add_sparse_adapter(model, adapter_name, compressed_name, density, layers)
    for layer in layers.values():
        indices, values = ternary_compress(
            layer.get_delta_weight(adapter_name), layer.num_values(compressed_name), alpha
        )
        _set_entries(layer, compressed_name, indices, values)


def breadcrumbs_merge_adapters(
    model: PeftModel,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    beta: float = 0.1,
    gamma: float = 0.01,
) -> None:
    """Add adapter ``adapter_name``: the Model Breadcrumbs merge of ``adapters`` (see :func:`breadcrumbs_merge`).

    Every adapter must cover the same layers. The merged support of a layer is the union of the
    masked supports; every layer gets as many values as the fullest one needs (the config's single
    ``density``), the spare ones at zero.

    Example:
        >>> breadcrumbs_merge_adapters(model, ["arithmetic", "dates"], [1.0, 1.0], "merged")  # doctest: +SKIP
    """
    adapters = list(adapters)
    _check_sparse_delta_model(model, adapters, "adapters")
    if len(weights) != len(adapters):
        raise ValueError(f"weights must have one number per adapter ({len(adapters)}), got {len(weights)}")
    _check_new_name(model, "adapter_name", adapter_name)
    for name, value in (("beta", beta), ("gamma", gamma)):
        check_type(name, value, (int, float), "a number in [0, 1)")
        if not 0 <= value < 1:
            raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    if beta + gamma >= 1:
        raise ValueError(f"beta + gamma must be below 1 (something must be kept), got {beta} + {gamma}")
    layer_sets = [dict(adapter_layers(model, name)) for name in adapters]
    if any(layers.keys() != layer_sets[0].keys() for layers in layer_sets):
        raise ValueError(f"adapters must cover the same layers to be merged, got {adapters}")

    merged = {
        name: breadcrumbs_merge([layer.get_delta_weight(source) for source in adapters], weights, beta, gamma)
        for name, layer in layer_sets[0].items()
    }
    layers = layer_sets[0]
    density = max(max(1, int(torch.count_nonzero(delta))) / delta.numel() for delta in merged.values())
    _add_sparse_adapter(model, adapters[0], adapter_name, min(1.0, density), layers)
    for name, layer in layers.items():
        indices = _padded_support(merged[name].reshape(-1), layer.num_values(adapter_name))
        _set_entries(layer, adapter_name, indices, merged[name].reshape(-1)[indices])


def _check_sparse_delta_model(model: PeftModel, adapters: list[str], parameter: str) -> None:
    if not isinstance(model, PeftModel) or not isinstance(model.base_model, SparseDeltaTuner):
        kind = type(model.base_model).__name__ if isinstance(model, PeftModel) else type(model).__name__
        raise ValueError(f"model must be a PeftModel with SparseConfig or LiftConfig adapters, got {kind}")
    unknown = [name for name in adapters if name not in model.peft_config]
    if unknown or not adapters:
        raise ValueError(f"{parameter} must name adapters among {sorted(model.peft_config)}, got {adapters}")


def _check_new_name(model: PeftModel, parameter: str, name: str) -> None:
    if name in model.peft_config:
        raise ValueError(f"{parameter} '{name}' already exists; choose a new name")
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"{parameter} must be a non-empty name without '.' (a parameter name), got {name!r}")


def _add_sparse_adapter(
    model: PeftModel, source: str, adapter_name: str, density: float, layers: dict[str, SparseDeltaLayer]
) -> None:
    """Add an all-zero adapter of ``source``'s method at ``density`` on exactly the ``layers``."""
    config = model.peft_config[source]
    other_budgets = {name: None for name in ("num_tunable_weights", "lora_rank_budget") if hasattr(config, name)}
    new_config = dataclasses.replace(
        config, density=density, **other_budgets, target_modules=sorted(layers), init_weights=True, modules_to_save=None
    )
    model.add_adapter(adapter_name, new_config)


@torch.no_grad()
def _set_entries(layer: SparseDeltaLayer, adapter_name: str, indices: torch.Tensor, values: torch.Tensor) -> None:
    layer.delta_indices[adapter_name].copy_(indices.to(layer.delta_indices[adapter_name]))
    layer.delta_values[adapter_name].copy_(values.to(layer.delta_values[adapter_name]))


def _padded_support(flat_delta: torch.Tensor, count: int) -> torch.Tensor:
    """Sorted flat indices [count]: every non-zero entry of ``flat_delta``, then the first zero positions."""
    is_zero = flat_delta == 0
    support = torch.nonzero(~is_zero).flatten()
    spare = torch.nonzero(is_zero).flatten()[: count - support.numel()]
    return torch.cat([support, spare]).sort().values
