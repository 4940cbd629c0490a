"""bitsandbytes-quantized base layers (``Linear4bit`` NF4/FP4, ``Linear8bitLt``): detection, shape, dequantization.

Detection looks at the class of the layer's weight (``Params4bit`` / ``Int8Params``, through peft's
``get_bnb_param_type``), so nothing here imports bitsandbytes unless a quantized layer exists.
"""

from __future__ import annotations

from typing import Optional

import torch
from peft.utils.integrations import dequantize_bnb_weight, get_bnb_param_type
from torch import nn

from .sparse.distributed import full_tensor


def quantization_of(layer: nn.Module) -> Optional[str]:
    """``"4bit"`` or ``"8bit"`` for a bitsandbytes-quantized layer, else None."""
    weight = getattr(layer, "weight", None)
    if weight is None:
        return None
    return get_bnb_param_type(weight) or None


def weight_matrix_shape(layer: nn.Module) -> tuple[int, int]:
    """Shape of the layer's weight as indices address it: [out, in] (Conv1D: [in, out], as stored).

    A quantized layer stores its weight packed (4-bit: [out * in / 2, 1] bytes), so its shape comes
    from ``out_features`` / ``in_features``.
    """
    if quantization_of(layer) is not None:
        return (layer.out_features, layer.in_features)
    return tuple(layer.weight.shape)


def keep_trainable_layout(layer: nn.Module) -> None:
    """Stop bitsandbytes from repacking a ``Linear4bit`` weight into its CPU inference layout.

    On CPUs with AVX512-BF16, bitsandbytes (0.49-0.50) repacks the weight in place on the layer's first
    eval-mode forward without gradients. That layout has no backward (training afterwards gets no
    input gradient through the layer), ``dequantize_4bit`` misreads it, and it rounds the block
    scales to bf16. Adapted layers therefore keep the standard layout (CPU inference takes the
    generic kernel); a layer that was already repacked is refused.
    """
    if quantization_of(layer) != "4bit":
        return
    if getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
        raise ValueError(
            f"this {type(layer).__name__} was repacked by bitsandbytes for CPU inference (an eval-mode forward "
            "without gradients ran before the adapter was added), and that layout cannot be trained or "
            "dequantized: load the model again and add the adapter before running it"
        )
    layer.support_avx512bf16_for_cpu = False


def keep_trainable_layouts(model: nn.Module) -> None:
    """:func:`keep_trainable_layout` for every 4-bit layer of ``model``, adapted or not.

    A layer the adapter skips is on the gradient's path to the adapters before it: repacked by an
    evaluation in the middle of training, it would pass them no gradient. Its CPU inference takes the
    generic kernel instead.
    """
    for module in model.modules():
        keep_trainable_layout(module)


def delta_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype of a dense delta for this layer: the weight's own, or fp32 for a quantized weight."""
    return torch.float32 if quantization_of(layer) is not None else layer.weight.dtype


@torch.no_grad()
def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's weight in fp32, shaped as :func:`weight_matrix_shape` says.

    For a quantized layer this is a new, transient [out, in] tensor (the layer keeps only its
    quantized weight); for a dense layer it may share memory with the weight.
    """
    if quantization_of(layer) is None:
        return full_tensor(layer.weight.detach()).float()  # FSDP2: gathered from the shards
    # Linear8bitLt keeps its row scales in `state`; Linear4bit keeps them on the weight
    weight = dequantize_bnb_weight(layer.weight, state=getattr(layer, "state", None))
    return weight.float().view(weight_matrix_shape(layer))


def merge_refusal(base_layer: nn.Module, adapter_names: list[str]) -> Optional[str]:
    """Why ``adapter_names`` cannot be merged into a quantized ``base_layer``, or None.

    We do not dequantize, merge and re-quantize (peft's LoRA does, with a warning): a fine-tuned
    delta is mostly smaller than the quantization step, so re-quantizing ``W + delta`` silently
    rounds most of it away. On SmolLM2-135M matrices with a 1%-density delta of std 1e-2, NF4 leaves
    92% of the delta entries unchanged (relative error of the merged delta 1.02); int8 at std 1e-3
    leaves 95% (``benchmarks/bench_requantize_merge.py``). Merge on an unquantized copy of the base.
    """
    kind = quantization_of(base_layer)
    if kind is None or not adapter_names:
        return None
    return (
        f"cannot merge adapter(s) {adapter_names} into a bitsandbytes {kind} {type(base_layer).__name__}: "
        "re-quantizing W + delta would round most of the delta away. Load the base model without "
        "quantization (dtype=torch.float32 or torch.bfloat16, no quantization_config), load the adapter "
        "with PeftModel.from_pretrained, then call merge_and_unload(); or use the adapter unmerged "
        "(unload() returns the quantized base unchanged)."
    )


def check_merge_supported(base_layer: nn.Module, adapter_names: list[str]) -> None:
    """Raise ValueError when ``adapter_names`` would be merged into a quantized ``base_layer`` (see :func:`merge_refusal`)."""
    refusal = merge_refusal(base_layer, adapter_names)
    if refusal is not None:
        raise ValueError(refusal)
