"""Export an S2FT adapter as a stock peft LoRA adapter, exactly: a slice of n columns is a rank-n product.

For a slice of input columns ``C`` the delta is ``B @ A`` with ``A`` [n, in] the identity rows at
``C`` and ``B`` [out, n] the trained slice; for a slice of output rows ``R`` (coupled FFN inputs),
``A`` [n, in] is the slice and ``B`` [out, n] the identity columns at ``R``. The scale is 1.
"""

from __future__ import annotations

import re
from collections import Counter
from os import PathLike
from pathlib import Path
from typing import Union

import torch
from peft import PeftModel

from ...export import CHECKPOINT_PREFIX, checked_adapter_config, saved_modules_besides, write_lora_export
from .layer import SliceDelta
from .model import S2ftModel


def lora_factors(layer: SliceDelta, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A [n, in], B [out, n])`` with ``B @ A`` equal to the layer's delta in the [out, in] orientation."""
    selects_inputs, positions, delta = layer.logical_slice(adapter_name)
    delta = delta.detach()
    count = positions.numel()
    picks = torch.zeros(count, layer.in_features if selects_inputs else layer.out_features, dtype=delta.dtype)
    picks[torch.arange(count), positions.cpu()] = 1  # picks[j, positions[j]] = 1
    picks = picks.to(delta.device)
    if selects_inputs:
        return picks, delta.contiguous()  # A selects the inputs, B is the slice [out, n]
    return delta.contiguous(), picks.t().contiguous()  # A is the slice [n, in], B places its rows


def export_s2ft_to_lora(model: PeftModel, out_dir: Union[str, PathLike], adapter_name: str = "default") -> Path:
    """Write S2FT adapter ``adapter_name`` of ``model`` to ``out_dir`` as a plain LoRA adapter; return the path.

    Each layer's rank is its slice width (``rank_pattern``), with ``alpha_pattern`` equal to it, so the
    scale is 1 (the global ``lora_alpha`` equals the global ``r``). The logits of the export in
    stock peft equal the adapter's up to float rounding. ``modules_to_save`` are copied.

    Example:
        >>> lora_dir = export_s2ft_to_lora(model, "lora_out")  # doctest: +SKIP
        >>> PeftModel.from_pretrained(base_model, lora_dir)  # any process, without peft_sparse  # doctest: +SKIP
    """
    config = checked_adapter_config(model, S2ftModel, "an S2ftConfig", adapter_name)
    tensors: dict[str, torch.Tensor] = {}
    rank_pattern: dict[str, int] = {}
    targets: list[str] = []
    transposed: list[bool] = []
    for name, layer in model.base_model.sparse_delta_layers():
        if adapter_name not in layer.delta_values:
            continue
        lora_a, lora_b = lora_factors(layer, adapter_name)
        key = CHECKPOINT_PREFIX + name
        tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = lora_a, lora_b
        rank_pattern[re.escape(name)] = lora_a.shape[0]  # peft matches pattern keys as regexes
        targets.append(name)
        transposed.append(layer.weight_is_transposed)
    tensors.update(saved_modules_besides(model, adapter_name, targets))
    rank = Counter(rank_pattern.values()).most_common(1)[0][0]
    return write_lora_export(
        config,
        tensors,
        out_dir,
        targets,
        transposed,
        r=rank,
        lora_alpha=rank,
        rank_pattern=rank_pattern,
        alpha_pattern=dict(rank_pattern),
    )
