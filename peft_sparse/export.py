"""Export a trained SoRA adapter as a stock peft LoRA adapter (loads without peft_sparse: vLLM, TGI, plain peft)."""

from __future__ import annotations

import re
import shutil
import tempfile
import uuid
from os import PathLike
from pathlib import Path
from typing import Union

import torch
from peft import LoraConfig, PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from .tuners.sora import SoraModel

CHECKPOINT_PREFIX = "base_model.model."


def export_sora_to_lora(model: PeftModel, out_dir: Union[str, PathLike], adapter_name: str = "default") -> Path:
    """Write adapter ``adapter_name`` of a SoRA ``model`` to ``out_dir`` as a plain LoRA adapter; return the path.

    Ranks with a zero gate are dropped and the gates are folded into B: per layer
    ``A' = A[keep]`` [r', in], ``B' = B[:, keep] * g[keep]`` [out, r'], with ``rank_pattern``
    ``r'`` and ``alpha_pattern`` ``s * r'`` so the scale ``s = alpha / r`` is unchanged (and equal to
    the global ``lora_alpha / r``, so a server that ignores the patterns scales correctly too). A layer
    whose gates are all zero is left out of ``target_modules``. Other saved modules
    (``modules_to_save``) are copied. The folder is written to a temporary sibling and renamed,
    so ``out_dir`` is never left half-written.

    Example:
        >>> lora_dir = export_sora_to_lora(model, "lora_out")  # doctest: +SKIP
        >>> PeftModel.from_pretrained(base_model, lora_dir)  # in any process, without peft_sparse  # doctest: +SKIP
    """
    if not isinstance(model, PeftModel) or not isinstance(model.base_model, SoraModel):
        raise ValueError(f"model must be a PeftModel with a SoraConfig adapter, got {type(model).__name__}")
    if adapter_name not in model.peft_config:
        raise ValueError(f"adapter_name must be one of {sorted(model.peft_config)}, got {adapter_name!r}")
    config = model.peft_config[adapter_name]

    tensors: dict[str, torch.Tensor] = {}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    targets: list[str] = []
    transposed: list[bool] = []
    for name, layer in model.base_model.sora_layers(adapter_name):
        gate = layer.sora_gate[adapter_name].detach()
        keep = torch.nonzero(gate).flatten()  # [r']
        if keep.numel() == 0:
            continue
        key = CHECKPOINT_PREFIX + name
        tensors[f"{key}.lora_A.weight"] = layer.sora_A[adapter_name].detach()[keep].contiguous()
        tensors[f"{key}.lora_B.weight"] = (layer.sora_B[adapter_name].detach()[:, keep] * gate[keep]).contiguous()
        pattern = re.escape(name)  # peft matches pattern keys as regexes against module names
        rank_pattern[pattern] = keep.numel()
        alpha_pattern[pattern] = layer.scaling[adapter_name] * keep.numel()
        targets.append(name)
        transposed.append(layer.weight_is_transposed)
    if not targets:
        raise ValueError(f"every gate of adapter '{adapter_name}' is zero: there is no LoRA to export")

    sora_keys = tuple(f"{CHECKPOINT_PREFIX}{name}.sora_" for name, _ in model.base_model.sora_layers(adapter_name))
    saved = get_peft_model_state_dict(model, adapter_name=adapter_name)
    tensors.update({key: value for key, value in saved.items() if not key.startswith(sora_keys)})

    lora_config = LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=targets,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        fan_in_fan_out=all(transposed),
        modules_to_save=config.modules_to_save,
        task_type=config.task_type,
        base_model_name_or_path=config.base_model_name_or_path,
        revision=config.revision,
        inference_mode=True,
    )
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        lora_config.save_pretrained(staging)
        save_file({key: value.contiguous() for key, value in tensors.items()}, staging / "adapter_model.safetensors",
                  metadata={"format": "pt"})
        _replace_directory(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _replace_directory(source: Path, target: Path) -> None:
    """Rename ``source`` to ``target``; an existing ``target`` is moved aside first and removed after."""
    if not target.exists():
        source.rename(target)
        return
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex}")
    target.rename(old)
    source.rename(target)
    shutil.rmtree(old)
