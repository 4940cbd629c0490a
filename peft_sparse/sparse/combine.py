"""``add_weighted_adapter`` for sparse deltas: the union of the sources' indices, and peft's merge rules on it.

A sparse adapter is a set of (index, value) pairs per weight matrix, so a weighted combination of
several is again one: its indices are the union of theirs, and at each index the values are merged
with peft's own rules (:mod:`peft.utils.merge_utils`):

* ``"linear"``: the weighted sum (exact: the composed delta is ``sum(w_i * delta_i)``);
* ``"magnitude_prune"``: each source keeps its ``int(density * k_i)`` largest ``|values|``, then the weighted sum;
* ``"ties"``: as magnitude_prune, then per index the majority sign is elected and the agreeing
  weighted values are averaged (TIES disjoint merge);
* ``"dare_linear"`` / ``"dare_ties"``: each source keeps a random ``density`` fraction of its values,
  rescaled by ``1 / density``, then the weighted sum / the TIES merge.

``density`` is the fraction of each source's *own* values that is kept, so it means the same whatever
the overlap of the sources. The argument checks here are shared with SoRA's ``add_weighted_adapter``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from peft.utils.merge_utils import calculate_majority_sign_mask, disjoint_merge, prune, task_arithmetic

SPARSE_COMBINATION_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
MAJORITY_SIGN_METHODS = ("total", "frequency")
# combination types that prune each source first, and how (the "_svd" variants of LoRA/SoRA prune alike)
PRUNING_METHODS = {"ties": "magnitude", "magnitude_prune": "magnitude", "dare_linear": "random", "dare_ties": "random"}
SIGN_ELECTING_TYPES = ("ties", "dare_ties")


def pruning_method(combination_type: str) -> Optional[str]:
    """``"magnitude"``, ``"random"`` or None: how ``combination_type`` prunes each source before merging."""
    return PRUNING_METHODS.get(combination_type.removesuffix("_svd"))


def check_weighted_adapter_arguments(
    peft_config: dict,
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: str,
    allowed_combination_types: tuple[str, ...],
    density: Optional[float],
    majority_sign_method: str,
) -> None:
    """Raise ValueError naming the argument when ``add_weighted_adapter``'s arguments do not fit the model."""
    if isinstance(adapters, str) or not isinstance(adapters, (list, tuple)) or not adapters:
        raise ValueError(f"adapters must be a non-empty list of adapter names, got {adapters!r}")
    unknown = [name for name in adapters if name not in peft_config]
    if unknown:
        raise ValueError(f"adapters: no adapter named {unknown} in this model; it has {sorted(peft_config)}")
    if adapter_name in peft_config:
        raise ValueError(f"adapter_name '{adapter_name}' already exists; choose a new name or delete_adapter it first")
    if not isinstance(weights, (list, tuple)) or len(weights) != len(adapters):
        raise ValueError(f"weights must be a list with one number per adapter ({len(adapters)}), got {weights!r}")
    if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights):
        raise ValueError(f"weights must be finite numbers, got {weights!r}")
    if combination_type not in allowed_combination_types:
        raise ValueError(
            f"combination_type must be one of {allowed_combination_types} for "
            f"{type(peft_config[adapters[0]]).__name__} adapters, got {combination_type!r}"
        )
    if pruning_method(combination_type) is None:
        if density is not None:
            raise ValueError(f"density is not used by combination_type={combination_type!r}; leave it None")
    elif isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1] with combination_type={combination_type!r}, got {density!r}")
    if majority_sign_method not in MAJORITY_SIGN_METHODS:
        raise ValueError(f"majority_sign_method must be one of {MAJORITY_SIGN_METHODS}, got {majority_sign_method!r}")
    with_modules_to_save = [name for name in adapters if peft_config[name].modules_to_save]
    if with_modules_to_save:
        raise ValueError(
            f"adapters {with_modules_to_save} have modules_to_save, which add_weighted_adapter cannot combine; "
            "combine adapters without modules_to_save"
        )


def check_same_modules(modules_by_adapter: dict[str, set[str]]) -> None:
    """Raise ValueError unless every adapter adapts the same modules (target_modules resolve alike)."""
    (first, reference), *others = modules_by_adapter.items()
    for name, modules in others:
        if modules != reference:
            only = sorted(modules ^ reference)
            raise ValueError(
                f"adapters '{first}' and '{name}' adapt different modules (e.g. '{only[0]}' is in only one of them); "
                "add_weighted_adapter needs adapters with the same target modules"
            )


@contextmanager
def seeded_random(seed: Optional[int], device: torch.device) -> Iterator[None]:
    """Seed torch's generator for the block (dare's random pruning) and restore it after; no-op for None."""
    if seed is None:
        yield
        return
    devices = [device.index or 0] if device.type == "cuda" else []  # the CPU generator is always forked
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def union_aligned(indices: list[torch.Tensor], values: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The sorted union of the index sets [u], and each set's values placed on it [n, u] (0 where it lacks one).

    Example:
        >>> union_aligned([torch.tensor([1, 4]), torch.tensor([4, 7])],
        ...               [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 5.0])])
        (tensor([1, 4, 7]), tensor([[1., 2., 0.],
                [0., 3., 5.]]))
    """
    union = torch.unique(torch.cat([index_set.long() for index_set in indices]))
    aligned = torch.zeros(len(values), union.numel(), dtype=values[0].dtype, device=values[0].device)
    for row, (index_set, value_set) in enumerate(zip(indices, values)):
        aligned[row, torch.searchsorted(union, index_set.long())] = value_set
    return union, aligned


def combine_sparse_deltas(
    indices: list[torch.Tensor],
    values: list[torch.Tensor],
    weights: list[float],
    combination_type: str,
    density: Optional[float] = None,
    majority_sign_method: str = "total",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine one matrix's deltas (sorted ``indices[i]`` [k_i], ``values[i]`` [k_i]) into ``(union [u], values [u])``.

    Dare draws from torch's global generator, as peft does (seed it, or pass ``seed`` to ``add_weighted_adapter``).

    Example:
        >>> combine_sparse_deltas([torch.tensor([1, 4]), torch.tensor([4, 7])],
        ...                       [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 5.0])], [1.0, 0.5], "linear")
        (tensor([1, 4, 7]), tensor([1.0000, 3.5000, 2.5000]))
    """
    method = pruning_method(combination_type)
    if method is not None:
        values = [prune(value_set, density, method=method, rescale=method == "random") for value_set in values]
    union, aligned = union_aligned(indices, values)
    weight_tensor = torch.tensor(weights, dtype=aligned.dtype, device=aligned.device)
    if combination_type in SIGN_ELECTING_TYPES:
        sign_mask = calculate_majority_sign_mask(aligned, method=majority_sign_method)
        return union, disjoint_merge(aligned * weight_tensor[:, None], sign_mask)
    return union, task_arithmetic(list(aligned), weight_tensor)
