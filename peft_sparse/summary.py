"""Per-layer summary of a saved adapter, read from ``adapter_config.json`` + ``adapter_model.safetensors`` only.

The base model is not needed. The sparse methods (SFT, LIFT) do not store the base weight's shape,
so their density needs it: pass ``base_shapes`` (from :func:`base_weight_shapes` of a local base
model folder or Hub id, or :func:`model_weight_shapes` of a loaded PeftModel).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from peft import PeftConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from .loading import PEFT_KEY_PREFIX, check_adapter_weights_file
from .quantization import weight_matrix_shape
from .sparse.compact_format import expand_tensors
from .sparse.layer import SparseDeltaLinear
from .tuners.lift import LiftDeltaLinear
from .tuners.rosa import RosaLinear
from .tuners.s2ft import S2ftLinear
from .tuners.snell.layer import SnellLayer
from .tuners.sora.layer import SoraLayer

Shape = tuple[int, int]


@dataclass
class LayerSummary:
    """One adapted weight matrix.

    ``shape``: the base weight's shape ([out, in]; transformers Conv1D: [in, out] as stored), or None
    when unknown. ``kept``: non-zero delta entries (SFT/LIFT: the ``k`` values; SNELL: the entries
    its threshold keeps). ``index_range``: smallest and largest flat index (SFT/LIFT).
    ``rank`` / ``live_rank``: SoRA's rank and its non-zero gates; SNELL's factor width.
    """

    name: str
    trainable: int
    shape: Optional[Shape] = None
    kept: Optional[int] = None
    index_range: Optional[tuple[int, int]] = None
    rank: Optional[int] = None
    live_rank: Optional[int] = None

    @property
    def density(self) -> Optional[float]:
        """Fraction of the weight's entries the delta can change (None without ``shape`` or ``kept``)."""
        if self.shape is None or self.kept is None:
            return None
        return self.kept / (self.shape[0] * self.shape[1])


@dataclass
class AdapterSummary:
    """A saved adapter: its config and one :class:`LayerSummary` per adapted matrix (in the model's order)."""

    config: PeftConfig
    layers: list[LayerSummary]

    @property
    def method(self) -> str:
        return str(getattr(self.config.peft_type, "value", self.config.peft_type))

    @property
    def trainable(self) -> int:
        return sum(layer.trainable for layer in self.layers)

    @property
    def density(self) -> Optional[float]:
        """Kept entries over all entries of the adapted matrices (None if any shape is unknown)."""
        if not self.layers or any(layer.density is None for layer in self.layers):
            return None
        return sum(layer.kept for layer in self.layers) / sum(layer.shape[0] * layer.shape[1] for layer in self.layers)


def module_order_key(name: str) -> tuple:
    """Sort key that puts ``layers.2`` before ``layers.10``: numeric parts compare as numbers."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name))


def _sparse_delta_layer(name: str, tensors: dict[str, torch.Tensor], layer_cls: type) -> LayerSummary:
    values, indices = tensors[layer_cls.adapter_layer_names[0]], tensors[layer_cls.other_param_names[0]]
    index_range = (int(indices.min()), int(indices.max())) if indices.numel() else None
    return LayerSummary(name, trainable=values.numel(), kept=values.numel(), index_range=index_range)


def _sora_layer(name: str, tensors: dict[str, torch.Tensor]) -> LayerSummary:
    # A [r, in], B [out, r], gate [r]
    weight_a, weight_b, gate = (tensors[attribute] for attribute in SoraLayer.adapter_layer_names)
    return LayerSummary(
        name,
        trainable=weight_a.numel() + weight_b.numel() + gate.numel(),
        shape=(weight_b.shape[0], weight_a.shape[1]),
        rank=gate.numel(),
        live_rank=int(torch.count_nonzero(gate)),
    )


def _snell_layer(name: str, tensors: dict[str, torch.Tensor]) -> LayerSummary:
    input_factors, output_factors = (tensors[attribute] for attribute in SnellLayer.adapter_layer_names)  # [H, n, r/H]
    return LayerSummary(
        name,
        trainable=input_factors.numel() + output_factors.numel(),
        shape=(output_factors.shape[1], input_factors.shape[1]),
        kept=int(tensors[SnellLayer.other_param_names[0]]),
        rank=input_factors.shape[0] * input_factors.shape[2],
    )


def _rosa_layer(name: str, tensors: dict[str, torch.Tensor]) -> LayerSummary:
    """The sparse part as SFT's (``kept``: its values), plus the LoRA part's A [r, in] and B [out, r]."""
    layer = _sparse_delta_layer(name, tensors, RosaLinear)
    weight_a, weight_b = tensors["rosa_A"], tensors["rosa_B"]
    layer.trainable += weight_a.numel() + weight_b.numel()
    layer.rank = weight_a.shape[0]
    return layer


# The layer class of each method names its saved tensors.
LAYER_CLASSES = {
    "SPARSE": SparseDeltaLinear, "LIFT": LiftDeltaLinear, "S2FT": S2ftLinear, "SORA": SoraLayer, "SNELL": SnellLayer,
    "ROSA": RosaLinear,
}


def _read_layer(method: str, name: str, tensors: dict[str, torch.Tensor]) -> LayerSummary:
    if method == "SORA":
        return _sora_layer(name, tensors)
    if method == "SNELL":
        return _snell_layer(name, tensors)
    if method == "ROSA":
        return _rosa_layer(name, tensors)
    return _sparse_delta_layer(name, tensors, LAYER_CLASSES[method])


def summarize_adapter(adapter_dir: Union[str, Path], base_shapes: Optional[dict[str, Shape]] = None) -> AdapterSummary:
    """Summarize the adapter saved in ``adapter_dir``; ``base_shapes`` maps module names to weight shapes.

    Example:
        >>> summary = summarize_adapter("out", base_shapes=base_weight_shapes("my-base-model"))  # doctest: +SKIP
        >>> summary.method, summary.trainable, summary.layers[0].density  # doctest: +SKIP
        ('SPARSE', 1060000, 0.01)
    """
    adapter_dir = Path(adapter_dir)
    config = PeftConfig.from_pretrained(str(adapter_dir))
    method = str(getattr(config.peft_type, "value", config.peft_type))
    if method not in LAYER_CLASSES:
        raise ValueError(f"peft_type must be one of {sorted(LAYER_CLASSES)} (a peft_sparse adapter), got {method!r}")
    check_adapter_weights_file(adapter_dir)
    per_layer: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in expand_tensors(load_file(adapter_dir / SAFETENSORS_WEIGHTS_NAME)).items():  # any format
        module, attribute = key.removeprefix(PEFT_KEY_PREFIX).rsplit(".", 1)
        per_layer.setdefault(module, {})[attribute] = tensor
    layers = []
    for name in sorted(per_layer, key=module_order_key):
        tensors = per_layer[name]
        if LAYER_CLASSES[method].adapter_layer_names[0] not in tensors:
            continue  # modules_to_save and other full modules
        layer = _read_layer(method, name, tensors)
        if base_shapes is not None and layer.shape is None:
            layer.shape = find_shape(base_shapes, name)
        layers.append(layer)
    return AdapterSummary(config, layers)


def find_shape(shapes: dict[str, Shape], name: str) -> Optional[Shape]:
    """The shape for module ``name``; tolerates a base checkpoint saved with or without the model prefix."""
    if name in shapes:
        return shapes[name]
    matches = [shape for module, shape in shapes.items() if name.endswith(f".{module}") or module.endswith(f".{name}")]
    return matches[0] if len(matches) == 1 else None


def base_weight_shapes(base_model: Union[str, Path]) -> dict[str, Shape]:
    """``{module name: weight shape}`` of every 2-d ``*.weight`` of a base model's safetensors files.

    ``base_model`` is a local folder or, when no such folder exists, a Hub model id. Reads only the
    files' headers (no tensor data); from the Hub through ``huggingface_hub.get_safetensors_metadata``.
    """
    if Path(base_model).is_dir():
        return _local_weight_shapes(Path(base_model))
    from huggingface_hub import get_safetensors_metadata

    try:
        metadata = get_safetensors_metadata(str(base_model))
    except Exception as error:  # offline, unknown repo, no safetensors, bad id: all end the same way for the user
        raise ValueError(
            f"base_model must be a local folder or a Hub model id with *.safetensors weights, got '{base_model}' "
            f"({type(error).__name__}: {error})"
        ) from error
    tensors = [(name, info.shape) for file in metadata.files_metadata.values() for name, info in file.tensors.items()]
    return _matrix_shapes(tensors)


def _local_weight_shapes(base_model_dir: Path) -> dict[str, Shape]:
    index = base_model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [path.name for path in sorted(base_model_dir.glob("*.safetensors"))]
    if not files:
        raise ValueError(f"base_model must be a local folder with *.safetensors weights, got '{base_model_dir}'")
    tensors = []
    for file_name in files:
        with safe_open(str(base_model_dir / file_name), framework="pt") as handle:
            tensors += [(key, handle.get_slice(key).get_shape()) for key in handle.keys()]
    return _matrix_shapes(tensors)


def _matrix_shapes(tensors: list[tuple[str, list[int]]]) -> dict[str, Shape]:
    """``{module name: shape}`` of the 2-d ``*.weight`` among ``(tensor name, shape)`` pairs."""
    return {
        name.removesuffix(".weight"): (shape[0], shape[1])
        for name, shape in tensors
        if name.endswith(".weight") and len(shape) == 2
    }


def model_weight_shapes(model: nn.Module) -> dict[str, Shape]:
    """``{module name: weight shape}`` of every adapted layer of a live PeftModel (without ``base_model.model.``)."""
    return {
        name.removeprefix(PEFT_KEY_PREFIX): weight_matrix_shape(module.get_base_layer())
        for name, module in model.named_modules()
        if isinstance(module, BaseTunerLayer)
    }


def _percent(fraction: Optional[float]) -> str:
    return "?" if fraction is None else f"{100 * fraction:.3g}%"


def _shape_text(shape: Optional[Shape]) -> str:
    return "?" if shape is None else f"{shape[0]}x{shape[1]}"


# (column title, cell) per method; SFT and LIFT share the sparse-delta columns.
_SPARSE_COLUMNS = (
    ("values (k)", lambda layer: f"{layer.kept:,}"),
    ("density", lambda layer: _percent(layer.density)),
    ("index range", lambda layer: "-" if layer.index_range is None else "{}..{}".format(*layer.index_range)),
)
COLUMNS = {
    "SPARSE": _SPARSE_COLUMNS,
    "LIFT": _SPARSE_COLUMNS,
    "S2FT": _SPARSE_COLUMNS,
    "SORA": (
        ("rank", lambda layer: str(layer.rank)),
        ("live rank", lambda layer: str(layer.live_rank)),
        ("trainable", lambda layer: f"{layer.trainable:,}"),
    ),
    "SNELL": (
        ("rank", lambda layer: str(layer.rank)),
        ("trainable", lambda layer: f"{layer.trainable:,}"),
        ("kept entries", lambda layer: f"{layer.kept:,}"),
        ("density", lambda layer: _percent(layer.density)),
    ),
    "ROSA": (
        ("LoRA rank", lambda layer: str(layer.rank)),
        ("sparse values", lambda layer: f"{layer.kept:,}"),
        ("sparse density", lambda layer: _percent(layer.density)),
        ("trainable", lambda layer: f"{layer.trainable:,}"),
    ),
}


def layer_table(summary: AdapterSummary) -> str:
    """A markdown table with one row per adapted matrix (columns depend on the method)."""
    columns = (("layer", lambda layer: layer.name), ("shape", lambda layer: _shape_text(layer.shape))) + COLUMNS[
        summary.method
    ]
    rows = [[title for title, _ in columns]] + [[cell(layer) for _, cell in columns] for layer in summary.layers]
    widths = [max(len(row[column]) for row in rows) for column in range(len(columns))]
    lines = ["| " + " | ".join(text.ljust(width) for text, width in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (width + 2) for width in widths) + "|")
    return "\n".join(lines)


def budget_text(summary: AdapterSummary) -> str:
    """One line on how much the adapter can change, e.g. ``density 0.01 of each target matrix, selection 'ag'``."""
    config, method = summary.config, summary.method
    if method in ("SPARSE", "LIFT"):
        if config.density is not None:
            budget = f"density {config.density:g} of each target matrix"
        elif method == "SPARSE":
            budget = f"{config.num_tunable_weights:,} weights over all target matrices"
        else:
            budget = f"as many weights per matrix as LoRA rank {config.lora_rank_budget}"
        if method == "SPARSE":
            return f"{budget}; selection '{config.selection}'"
        return f"{budget}; principal weights of the rank-{config.rank} approximation"
    if method == "S2FT":
        if config.lora_rank_budget is not None:
            budget = f"as many weights as LoRA rank {config.lora_rank_budget} on all linear layers"
        else:
            budget = f"{config.num_heads} heads and {config.num_channels} FFN channels per block"
        return f"{budget}, as whole heads and channels; selection '{config.selection}'"
    if method == "SORA":
        live = sum(layer.live_rank for layer in summary.layers)
        total = sum(layer.rank for layer in summary.layers)
        return f"rank {config.r} per layer, gated; live rank {live} of {total} over all layers"
    if method == "ROSA":
        if config.density is not None:
            budget = f"density {config.density:g} of each target matrix"
        else:
            budget = f"{config.num_tunable_weights:,} weights over all target matrices"
        return f"LoRA rank {config.r} plus a sparse part of {budget}; mask rule '{config.mask_rule}'"
    sparsity = f"sparsity {config.sparsity:g}"
    if config.allocation == "snella":
        sparsity += f" -> {config.target_sparsity:g} on average (SNELLA)"
    return f"rank {config.r}, kernel '{config.kernel}', {sparsity}"


def target_modules_text(config: PeftConfig, limit: int = 8) -> str:
    """``target_modules`` as written, or, for a long list, the count and the distinct last name parts."""
    targets = config.target_modules
    if isinstance(targets, str) or targets is None or len(targets) <= limit:
        return repr(targets) if isinstance(targets, str) else ", ".join(sorted(targets or []))
    return f"{len(targets)} modules: " + ", ".join(sorted({name.rsplit('.', 1)[-1] for name in targets}))


def configured_density(summary: AdapterSummary) -> Optional[float]:
    """The per-matrix density an SFT/LIFT adapter config states (None for other budgets and methods)."""
    if summary.method in ("SPARSE", "LIFT"):
        return summary.config.density
    return None


def density_text(summary: AdapterSummary) -> str:
    """Measured density from the base shapes, else the density the adapter config states, else ``?``."""
    if summary.density is not None or configured_density(summary) is None:
        return _percent(summary.density)
    return f"{_percent(configured_density(summary))} of each target matrix (from adapter_config.json)"


def base_model_text(base_model: Optional[str]) -> str:
    """The base model's id or path, and what it is when its local ``config.json`` says (``peft_sparse_source``,
    written for the embedded model: the dequantized Q4_1 GGUF of SmolLM2-135M-Instruct).

    Example:
        >>> base_model_text("HuggingFaceTB/SmolLM2-135M-Instruct")
        'HuggingFaceTB/SmolLM2-135M-Instruct'
    """
    if not base_model:
        return "unknown"
    config_path = Path(base_model) / "config.json"
    source = json.loads(config_path.read_text()).get("peft_sparse_source") if config_path.is_file() else None
    return f"{base_model} ({source})" if source else str(base_model)


def overview(summary: AdapterSummary) -> dict[str, str]:
    """The adapter's headline facts (method, budget, trainable values, density, targets, base model, versions)."""
    config = summary.config
    return {
        "method": f"{summary.method} (`{type(config).__name__}`)",
        "budget": budget_text(summary),
        "trainable values": f"{summary.trainable:,} in {len(summary.layers)} matrices",
        "density": density_text(summary),
        "target modules": target_modules_text(config),
        "base model": base_model_text(config.base_model_name_or_path),
        "written by": f"peft_sparse {config.peft_sparse_version} (adapter format {config.format_version})",
    }
