"""Export adapters as stock peft LoRA adapters (load without peft_sparse: vLLM, TGI, LoRAX, plain peft).

SoRA and S2FT export exactly (:func:`export_sora_to_lora`,
:func:`~peft_sparse.tuners.s2ft.export.export_s2ft_to_lora`); any other adapter through a truncated
SVD of each layer's delta (:func:`export_to_lora`).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from peft import LoraConfig, PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .config_base import check_fraction, check_positive_int
from .delta_tools import adapter_layers
from .tuners.s2ft import S2ftModel
from .tuners.sora import SoraModel

CHECKPOINT_PREFIX = "base_model.model."


def checked_adapter_config(model: PeftModel, tuner_class: type, described: str, adapter_name: str):
    """The config of ``adapter_name``; ValueError unless ``model`` is a PeftModel whose tuner is ``tuner_class``."""
    if not isinstance(model, PeftModel) or not isinstance(model.base_model, tuner_class):
        raise ValueError(f"model must be a PeftModel with {described} adapter, got {type(model).__name__}")
    if adapter_name not in model.peft_config:
        raise ValueError(f"adapter_name must be one of {sorted(model.peft_config)}, got {adapter_name!r}")
    return model.peft_config[adapter_name]


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
    config = checked_adapter_config(model, SoraModel, "a SoraConfig", adapter_name)

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

    sora_layer_names = [name for name, _ in model.base_model.sora_layers(adapter_name)]
    tensors.update(saved_modules_besides(model, adapter_name, sora_layer_names))

    return write_lora_export(
        config,
        tensors,
        out_dir,
        targets,
        transposed,
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
    )


def write_lora_export(
    config,
    tensors: dict[str, torch.Tensor],
    out_dir: Union[str, PathLike],
    targets: list[str],
    transposed: list[bool],
    **lora_fields,
) -> Path:
    """Write ``tensors`` as a LoRA adapter of ``targets`` exported from the adapter of ``config``; return the path.

    The ``LoraConfig`` takes ``lora_fields`` (rank, alpha, patterns) and, from ``config``, the saved
    modules, task and base model; ``transposed`` says per target whether its weight is [in, out] (Conv1D).
    """
    lora_config = LoraConfig(
        target_modules=targets,
        fan_in_fan_out=all(transposed),
        modules_to_save=getattr(config, "modules_to_save", None),
        task_type=config.task_type,
        base_model_name_or_path=config.base_model_name_or_path,
        revision=config.revision,
        inference_mode=True,
        **lora_fields,
    )
    return write_lora_folder(lora_config, tensors, out_dir)


def write_lora_folder(lora_config: LoraConfig, tensors: dict[str, torch.Tensor], out_dir: Union[str, PathLike]) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` to ``out_dir`` atomically; return the path.

    The folder is written to a temporary sibling and renamed, so ``out_dir`` is never left half-written.
    """
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


def saved_modules_besides(model: PeftModel, adapter_name: str, layer_names: list[str]) -> dict[str, torch.Tensor]:
    """The adapter's saved tensors outside the layers ``layer_names`` (``modules_to_save``), by checkpoint key."""
    layer_keys = tuple(f"{CHECKPOINT_PREFIX}{name}." for name in layer_names)
    saved = get_peft_model_state_dict(model, adapter_name=adapter_name)
    return {key: value for key, value in saved.items() if not key.startswith(layer_keys)}


def _replace_directory(source: Path, target: Path) -> None:
    """Rename ``source`` to ``target``; an existing ``target`` is moved aside first and removed after."""
    if not target.exists():
        source.rename(target)
        return
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex}")
    target.rename(old)
    source.rename(target)
    shutil.rmtree(old)


@dataclass
class LoraExport:
    """What :func:`export_to_lora` wrote and how close it is, per layer (module name -> value)."""

    path: Path
    ranks: dict[str, int]
    relative_errors: dict[str, float]  # ||delta - B A s||_F / ||delta||_F
    max_logit_error: Optional[float]  # max |logits(adapter) - logits(LoRA)| on the sample batch, if given


def export_to_lora(
    model: PeftModel,
    out_dir: Union[str, PathLike],
    rank: Optional[int] = None,
    energy: Optional[float] = None,
    adapter_name: str = "default",
    sample_inputs: Optional[dict[str, torch.Tensor]] = None,
) -> LoraExport:
    """Write adapter ``adapter_name`` of any peft_sparse ``model`` to ``out_dir`` as a stock LoRA adapter.

    Per layer, the delta [out, in] is replaced by its truncated SVD ``U_r S_r V_r^T``: ``B = U_r S_r``
    [out, r], ``A = V_r^T`` [r, in], with ``rank_pattern`` r and ``alpha_pattern`` r (scale 1; the
    global ``lora_alpha`` equals the global ``r`` too). Give exactly one of ``rank`` (at most r
    components per layer) or ``energy`` (per layer, the fewest components keeping that fraction of
    the delta's squared Frobenius norm). Components below the numerical rank's tolerance are never
    kept, so a delta of rank <= r exports exactly; a zero delta leaves its layer out. SoRA and S2FT
    adapters export exactly (their own exporters, no ``rank``/``energy``). ``sample_inputs``: keyword
    inputs of one batch on which the logits of the adapter and of the export are compared.

    Example:
        >>> report = export_to_lora(model, "lora_out", energy=0.99, sample_inputs=batch)  # doctest: +SKIP
        >>> max(report.relative_errors.values()), report.max_logit_error  # doctest: +SKIP
        >>> PeftModel.from_pretrained(base_model, "lora_out")  # any process, no peft_sparse  # doctest: +SKIP
    """
    if not isinstance(model, PeftModel):
        raise ValueError(f"model must be a PeftModel with a peft_sparse adapter, got {type(model).__name__}")
    if adapter_name not in model.peft_config:
        raise ValueError(f"adapter_name must be one of {sorted(model.peft_config)}, got {adapter_name!r}")
    if sample_inputs is not None and model.active_adapters != [adapter_name]:
        raise ValueError(
            f"sample_inputs compare adapter '{adapter_name}' alone, but the active adapters are "
            f"{model.active_adapters}; call model.set_adapter('{adapter_name}') first"
        )
    exact_export = _exact_export(model)
    if exact_export is not None:
        method_with_article, export_exactly = exact_export
        if rank is not None or energy is not None:
            raise ValueError(
                f"rank and energy do not apply to {method_with_article} adapter, whose export is exact; leave both "
                f"unset (got rank={rank!r}, energy={energy!r})"
            )
        out_dir = export_exactly(model, out_dir, adapter_name)
    else:
        if (rank is None) == (energy is None):
            raise ValueError(f"give exactly one of rank or energy, got rank={rank!r}, energy={energy!r}")
        if rank is not None:
            check_positive_int("rank", rank)
        else:
            check_fraction("energy", energy)
        out_dir = _export_truncated_svd(model, out_dir, rank, energy, adapter_name)

    factors = _read_lora_factors(out_dir)
    layers = dict(adapter_layers(model, adapter_name))
    relative_errors = {
        name: _relative_error(_delta_out_in(layers[name], adapter_name), a, b) for name, (a, b) in factors.items()
    }
    max_logit_error = None
    if sample_inputs is not None:
        exported = {name: (layers[name], *factors[name]) for name in factors}
        max_logit_error = _max_logit_error(model, adapter_name, exported, sample_inputs)
    ranks = {name: a.shape[0] for name, (a, _) in factors.items()}
    return LoraExport(Path(out_dir), ranks, relative_errors, max_logit_error)


def _exact_export(model: PeftModel) -> Optional[tuple[str, Callable[[PeftModel, Path, str], Path]]]:
    """``(method with its article, exporter)`` for the adapters whose LoRA export is exact (SoRA, S2FT), else None."""
    from .tuners.s2ft.export import export_s2ft_to_lora  # that module imports this one

    if isinstance(model.base_model, SoraModel):
        return "a SoRA", export_sora_to_lora
    if isinstance(model.base_model, S2ftModel):
        return "an S2FT", export_s2ft_to_lora
    return None


@torch.no_grad()
def truncated_factors(
    delta: torch.Tensor, rank: Optional[int] = None, energy: Optional[float] = None
) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """``(A [r, in], B [out, r])`` with ``B @ A`` the best rank-r approximation of ``delta`` [out, in]; None if zero.

    ``r`` is ``min(rank, numerical rank)``, or the fewest components whose squared singular values
    reach ``energy`` of the total (fp32; singular values below ``s_max * max(out, in) * eps`` do not count).
    """
    left, singular, right_t = torch.linalg.svd(delta.float(), full_matrices=False)
    if singular.numel() == 0 or singular[0] == 0:
        return None
    tolerance = singular[0] * max(delta.shape) * torch.finfo(torch.float32).eps
    numerical_rank = int((singular > tolerance).sum())
    if rank is not None:
        kept = min(rank, numerical_rank)
    else:
        cumulative = torch.cumsum(singular[:numerical_rank].double() ** 2, dim=0)
        kept = min(int(torch.searchsorted(cumulative, energy * cumulative[-1])) + 1, numerical_rank)
    return right_t[:kept].contiguous(), (left[:, :kept] * singular[:kept]).contiguous()


def _delta_out_in(layer, adapter_name: str) -> torch.Tensor:
    """The layer's delta as an fp32 [out, in] matrix (Conv1D stores its weight [in, out])."""
    delta = layer.get_delta_weight(adapter_name).detach().float()
    return delta.T if layer.weight_is_transposed else delta


def _export_truncated_svd(
    model: PeftModel, out_dir: Union[str, PathLike], rank: Optional[int], energy: Optional[float], adapter_name: str
) -> Path:
    config = model.peft_config[adapter_name]
    tensors: dict[str, torch.Tensor] = {}
    rank_pattern: dict[str, int] = {}
    targets: list[str] = []
    transposed: list[bool] = []
    layers = list(adapter_layers(model, adapter_name))
    for name, layer in tqdm(layers, desc="export_to_lora: truncated SVD", unit="layer"):
        factors = truncated_factors(_delta_out_in(layer, adapter_name), rank, energy)
        if factors is None:
            continue
        key = CHECKPOINT_PREFIX + name
        tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = factors
        rank_pattern[re.escape(name)] = factors[0].shape[0]  # peft matches pattern keys as regexes
        targets.append(name)
        transposed.append(layer.weight_is_transposed)
    if not rank_pattern:
        raise ValueError(f"every layer's delta of adapter '{adapter_name}' is zero: there is no LoRA to export")
    tensors.update(saved_modules_besides(model, adapter_name, [name for name, _ in layers]))

    largest_rank = max(rank_pattern.values())
    return write_lora_export(
        config,
        tensors,
        out_dir,
        targets,
        transposed,
        r=largest_rank,
        lora_alpha=largest_rank,
        rank_pattern=rank_pattern,
        alpha_pattern={pattern: float(layer_rank) for pattern, layer_rank in rank_pattern.items()},  # scale 1
    )


def _read_lora_factors(lora_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module name -> ``(A, B * scale)`` of a written LoRA folder."""
    config = json.loads((Path(lora_dir) / "adapter_config.json").read_text())
    tensors = load_file(Path(lora_dir) / "adapter_model.safetensors")
    factors = {}
    for name in config["target_modules"]:
        pattern = re.escape(name)
        scale = config["alpha_pattern"].get(pattern, config["lora_alpha"]) / config["rank_pattern"].get(
            pattern, config["r"]
        )
        key = CHECKPOINT_PREFIX + name
        factors[name] = (tensors[f"{key}.lora_A.weight"].float(), tensors[f"{key}.lora_B.weight"].float() * scale)
    return factors


def _relative_error(delta: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.to(delta.device), b.to(delta.device)
    return float(torch.linalg.matrix_norm(delta - b @ a) / torch.linalg.matrix_norm(delta))


@torch.no_grad()
def _max_logit_error(
    model: PeftModel, adapter_name: str, exported: dict[str, tuple], sample_inputs: dict[str, torch.Tensor]
) -> float:
    """Max |logits| difference between the adapter and the export (each layer's delta swapped for its LoRA).

    Forward hooks add ``x A^T B^T - x delta^T`` to each exported layer's output, which turns the
    adapter model into the stock LoRA one (``modules_to_save`` are the same in both); a layer left
    out of the export has a zero delta. Runs in eval mode, with ``adapter_name`` the active adapter.
    """
    modes = [(module, module.training) for module in model.modules()]  # train(mode) would set them all alike
    model.eval()

    def swap_delta_for_lora(layer, a, b):
        def hook(module, args, output):
            inputs = args[0].float()  # [..., in]
            delta = _delta_out_in(layer, adapter_name).to(inputs.device)
            correction = (inputs @ a.to(inputs.device).T) @ b.to(inputs.device).T - inputs @ delta.T
            return output + correction.to(output.dtype)

        return hook

    try:
        adapter_logits = _logits(model(**sample_inputs))
        handles = [layer.register_forward_hook(swap_delta_for_lora(layer, a, b)) for layer, a, b in exported.values()]
        try:
            lora_logits = _logits(model(**sample_inputs))
        finally:
            for handle in handles:
                handle.remove()
    finally:
        for module, training in modes:
            module.training = training
    return float((adapter_logits.float() - lora_logits.float()).abs().max())


def _logits(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output
