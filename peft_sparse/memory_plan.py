"""Per-device memory plan of fine-tuning a Llama-style decoder with each method (``python -m peft_sparse plan``).

Every figure is bytes on one device, computed from the model's ``config.json`` alone:

- **Targets**: every linear layer of the decoder blocks (q, k, v, o, gate, up, down), never
  ``lm_head`` or the embeddings. ``[out, in]`` from ``hidden_size`` h, ``intermediate_size`` i,
  ``num_attention_heads`` n_h, ``num_key_value_heads`` n_kv and ``head_dim`` d.
- **Base weights**: every parameter in ``--dtype``; ``--quantized 4bit`` stores the target matrices
  at 0.5 byte per entry plus one fp32 absmax per 64 (bitsandbytes NF4, no double quantization),
  ``8bit`` at 1 byte plus one fp32 scale per row; embeddings, norms and ``lm_head`` stay in ``--dtype``.
- **Budget**: SFT and LIFT keep ``k = max(1, round(density * in * out))`` values per matrix (or
  ``min(r * (in + out), in * out)`` for ``--lora-rank r``); LoRA, SoRA and SNELL get the rank whose
  ``r * (in + out)`` count is nearest the same total (SNELL's rank even: two kernel groups).
- **Adapter state**: trainable tensors are fp32 (peft upcasts LoRA's too); AdamW keeps two fp32
  moments; indices are int32 below 2^31 entries per matrix, else int64. SFT/LIFT layers also keep
  bookkeeping: in place, the written indices, the overwritten weight entries and an fp32 undo term
  (k each) plus the CSR pattern (rows + 1 + k); on the additive path (sharded or quantized
  weights) the CSR pattern twice (row-major and output-major). SNELL in place keeps the same
  three k-long records for its written entries (k = 10% of each matrix at the default sparsity 0.9).
- **Selection statistics**: SFT "ag" keeps k candidates, their fp32 accumulated gradients and
  their CSR pattern per matrix through a window; with several processes the window's first
  micro-batch all-reduces one dense fp32 gradient (largest matrix; on one GPU the Triton scan never
  forms it). "ma" keeps fp32 row and column sums, plus a transient workspace of the matrix with the
  most rows + cols: its token factors (all-gathered in three copies with several processes, upcast
  to fp32) and the Gram route's ``T^2 + 2 T max(rows, cols)`` fp32 (T: the global batch's tokens),
  or 2^22-entry row chunks where that route does not pay. SFT "random" keeps its indices: no
  window. LIFT's mask refresh (and its initial selection) runs between steps on one matrix at a
  time: three fp32 copies of the largest matrix (the effective weight, its rank-r approximation
  and its magnitude) plus the randomized SVD's ``q = 2 * 128`` columns; it replaces the
  activations in the peak instead of adding to them.
- **Activations** (bytes kept for backward by Hugging Face's Llama with SDPA/flash attention, no
  padding mask, no dropout; measured per tensor with ``saved_tensors_hooks``), per token and
  layer, b = bytes of ``--dtype``::

      2 (4 h + 4)                  RMSNorm: fp32 input and 1/rms, twice
      + b (n_h d + 2 n_kv d)       q, k after RoPE, v (saved by SDPA)
      + b n_h d + 4 n_h            SDPA output (also o_proj's input) and its log-sum-exp
      + 3 b i                      gate output, SiLU output, up output
      + inputs of the adapted linears:
          SFT / LIFT / SNELL, and LoRA / SoRA in fp32:  b (2 h + i)   (the tensors themselves)
          LoRA / SoRA on a 16-bit base:  4 (5 h + n_h d + i)          (peft casts x to fp32 per target)
      + 7 * 4 r (LoRA: A x) or 7 * 8 r (SoRA: A x and the gated A x)

  times ``num_hidden_layers``, times B x S tokens; plus 12 V bytes per token for the loss (the
  fp32 log-softmax output, its gradient and the NLL gradient are alive together when backward
  starts; V the vocabulary) and 8 for the int64 labels; plus RoPE's cos/sin (2 S d b). With
  ``--gradient-checkpointing`` the layers keep only their input (b h per token and layer) and
  one layer's activations exist at a time (recomputed in backward). SNELL adds its kernel chunks
  (six fp32 blocks of 2^20 entries, transient); a quantized base adds one dequantized matrix
  (bitsandbytes' backward). With ``--autocast`` (16-bit autocast around a 16-bit base, as the
  Trainer's ``bf16=True``) LoRA and SoRA keep 16-bit copies instead: b (5 h + n_h d + i) + 7 b r
  (SoRA 14 b r), plus a 16-bit cast of their weights (b bytes per trainable value, autocast's
  cache); the other terms and methods are unchanged.
- **Strategies**: ``ddp`` replicates everything (and DDP's gradient buckets double the
  gradients when world size > 1). ``fsdp`` and ``zero3`` divide the base weights, the trainable
  adapter tensors, their gradients and the optimizer state by the world size and add one gathered
  decoder layer (FSDP2 prefetches the next one too: add another); indices, bookkeeping,
  statistics and activations stay whole on every device (indices are buffers, not parameters).
  ZeRO-3's bf16 copies plus fp32 master weights come to the same 16 bytes per trainable value.
- **Total** = the sum of the rows (gradients counted as alive at the peak, as under gradient
  accumulation), except LIFT's between-step workspace, which counts as ``max(activations,
  workspace)``.

Not modelled: the CUDA context and allocator fragmentation (add ~0.5-1 GiB per GPU), communication
buffers, dropout masks, padding masks (which push SDPA off the flash kernel: S^2 scores per head).

Example:
    >>> shape = DecoderShape(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    ...                      num_key_value_heads=2, head_dim=16, vocab_size=100, tie_word_embeddings=True)
    >>> plan = decoder_plan(shape, "sft", Budget(density=0.01), TrainingSetup(dtype="fp32", seq_len=32))
    >>> plan.trainable
    736
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from .sparse.indices import INT32_LIMIT

METHODS = ("sft", "lift", "sora", "snell", "lora")
METHOD_TITLES = {"sft": "SFT", "lift": "LIFT", "sora": "SoRA", "snell": "SNELL", "lora": "LoRA (peft)"}
SELECTIONS = ("ag", "ma", "random")
STRATEGIES = ("ddp", "fsdp", "zero3")
SHARDED_STRATEGIES = ("fsdp", "zero3")
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
QUANTIZATIONS = ("4bit", "8bit")
TARGET_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FP32 = 4
ADAM_MOMENTS = 2
NF4_BLOCK = 64  # entries per fp32 absmax (bitsandbytes' default 4-bit block size)
LIFT_SVD_RANK = 128  # LiftConfig's default rank; the randomized SVD takes 2 * rank columns
SNELL_KEPT_FRACTION = 0.1  # 1 - SnellConfig's default sparsity
SNELL_CHUNK_BYTES = 6 * FP32 * 2**20  # ~6 live fp32 blocks of triton_kernels.snell_matmul.CHUNK_ENTRIES
MA_CHUNK_ENTRIES = 2**22  # squared_product_sums' row chunks when the Gram route does not pay

Shape = tuple[int, int]  # [out, in]


@dataclass(frozen=True)
class DecoderShape:
    """The sizes of a Llama-style decoder that decide its memory (read from ``config.json``)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    mlp_bias: bool = False

    @classmethod
    def from_config(cls, config: dict, source: str = "config") -> DecoderShape:
        """Take the sizes from a transformers config dict; ``source`` names it in errors."""
        required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        missing = [key for key in required if not isinstance(config.get(key), int)]
        if missing:
            raise ValueError(f"--config must give integer {', '.join(missing)}, missing in {source}")
        heads = config["num_attention_heads"]
        return cls(
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            vocab_size=config["vocab_size"],
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=bool(config.get("attention_bias", False)),
            mlp_bias=bool(config.get("mlp_bias", False)),
        )

    @property
    def layer_targets(self) -> list[Shape]:
        """[out, in] of one decoder layer's q, k, v, o, gate, up, down weights."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        return [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]

    @property
    def targets(self) -> list[Shape]:
        """Every target matrix of the model (``num_hidden_layers`` x 7)."""
        return self.layer_targets * self.num_hidden_layers

    def layer_other_parameters(self) -> int:
        """Parameters of one layer outside the target weights: two RMSNorm weights and any biases."""
        biases = sum(out for out, _ in self.layer_targets[:4]) if self.attention_bias else 0
        biases += sum(out for out, _ in self.layer_targets[4:]) if self.mlp_bias else 0
        return 2 * self.hidden_size + biases

    def outer_parameters(self) -> int:
        """Parameters outside the decoder layers: embeddings, ``lm_head`` unless tied, final norm."""
        embeddings = self.vocab_size * self.hidden_size
        return embeddings * (1 if self.tie_word_embeddings else 2) + self.hidden_size


def load_decoder_shape(path: Union[str, Path]) -> DecoderShape:
    """The :class:`DecoderShape` of a ``config.json`` file or of a model folder holding one."""
    path = Path(path)
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        raise ValueError(f"--config must be a config.json file or a model folder with one, got '{path}'")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"--config must be valid JSON, got '{config_file}' ({error})") from error
    if not isinstance(config, dict):
        raise ValueError(f"--config must hold a JSON object, got '{config_file}'")
    return DecoderShape.from_config(config, source=str(config_file))


@dataclass(frozen=True)
class Budget:
    """How many values the sparse methods train: ``density`` of each matrix, or LoRA rank ``lora_rank``'s count."""

    density: Optional[float] = None
    lora_rank: Optional[int] = None

    def __post_init__(self) -> None:
        if self.density is not None and self.lora_rank is not None:
            raise ValueError(f"give --density or --lora-rank, not both (got {self.density} and {self.lora_rank})")
        if self.lora_rank is None:
            density = 0.01 if self.density is None else self.density
            if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
                raise ValueError(f"--density must be in (0, 1], got {density!r}")
            object.__setattr__(self, "density", density)
        elif isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank <= 0:
            raise ValueError(f"--lora-rank must be a positive integer, got {self.lora_rank!r}")

    def sparse_count(self, shape: Shape) -> int:
        """Values of SFT/LIFT in one [out, in] matrix."""
        out, inp = shape
        if self.lora_rank is not None:
            return min(self.lora_rank * (out + inp), out * inp)
        return max(1, round(self.density * out * inp))

    def rank(self, targets: list[Shape]) -> int:
        """The LoRA rank of this budget: the given one, or the one nearest the sparse methods' total."""
        if self.lora_rank is not None:
            return self.lora_rank
        total = sum(self.sparse_count(shape) for shape in targets)
        return max(1, round(total / sum(out + inp for out, inp in targets)))


@dataclass(frozen=True)
class TrainingSetup:
    """How one device trains: storage dtype, quantization, world size and strategy, batch x sequence."""

    dtype: str = "bf16"
    quantized: Optional[str] = None
    world_size: int = 1
    strategy: str = "ddp"
    batch_size: int = 1
    seq_len: int = 2048
    gradient_checkpointing: bool = False
    autocast: bool = False  # 16-bit autocast around the forward (the Trainer's bf16=True / fp16=True)

    def __post_init__(self) -> None:
        _check_choice("--dtype", self.dtype, tuple(DTYPE_BYTES))
        if self.autocast and self.dtype == "fp32":
            raise ValueError("--autocast needs a 16-bit --dtype (the base computes in it), got fp32")
        if self.quantized is not None:
            _check_choice("--quantized", self.quantized, QUANTIZATIONS)
        _check_choice("--strategy", self.strategy, STRATEGIES)
        for option, value in (("--world-size", self.world_size), ("--batch-size", self.batch_size),
                              ("--seq-len", self.seq_len)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{option} must be a positive integer, got {value!r}")

    @property
    def compute_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def sharded(self) -> bool:
        return self.strategy in SHARDED_STRATEGIES

    @property
    def shards(self) -> int:
        """What the sharded states are divided by: the world size under FSDP/ZeRO-3, else 1."""
        return self.world_size if self.sharded else 1

    @property
    def additive(self) -> bool:
        """Whether SFT/LIFT apply their delta as a sparse term (sharded or quantized weights) instead of in place."""
        return self.sharded or self.quantized is not None

    def target_weight_bytes(self, shape: Shape) -> float:
        """Bytes of one stored target weight [out, in] (packed when quantized)."""
        out, inp = shape
        if self.quantized == "4bit":
            return out * inp * (0.5 + FP32 / NF4_BLOCK)
        if self.quantized == "8bit":
            return out * inp + FP32 * out
        return out * inp * self.compute_bytes


def _check_choice(option: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{option} must be one of {allowed}, got {value!r}")


@dataclass
class MemoryPlan:
    """Bytes on one device for one method; ``total`` is the predicted peak."""

    method: str
    trainable: int = 0  # trainable values in the whole model (before sharding)
    base_weights: float = 0.0
    gathered_layer: float = 0.0
    adapter: float = 0.0
    bookkeeping: float = 0.0
    gradients: float = 0.0
    optimizer: float = 0.0
    selection: float = 0.0
    activations: float = 0.0
    selection_between_steps: bool = False  # LIFT: the workspace replaces the activations in the peak

    @property
    def total(self) -> float:
        persistent = (self.base_weights + self.gathered_layer + self.adapter + self.bookkeeping + self.gradients
                      + self.optimizer)  # fmt: skip
        if self.selection_between_steps:
            return persistent + max(self.activations, self.selection)
        return persistent + self.selection + self.activations


# (label, attribute) of the table's rows, in order
ROWS = (
    ("base weights", "base_weights"),
    ("gathered layer (FSDP/ZeRO-3)", "gathered_layer"),
    ("adapter values + indices", "adapter"),
    ("index bookkeeping (write log, CSR)", "bookkeeping"),
    ("gradients", "gradients"),
    ("optimizer state (AdamW)", "optimizer"),
    ("selection statistics (window)", "selection"),
    ("activations", "activations"),
)


def _index_bytes(shape: Shape) -> int:
    return FP32 if shape[0] * shape[1] < INT32_LIMIT else 8


def _low_rank_trainable(method: str, rank: int, targets: list[Shape]) -> int:
    if method == "snell":
        rank = max(2, 2 * round(rank / 2))  # split evenly into two kernel groups
    per_matrix_extra = rank if method == "sora" else 0  # SoRA's gate
    return sum(rank * (out + inp) + per_matrix_extra for out, inp in targets)


def adapter_plan(
    method: str, targets: list[Shape], budget: Budget, setup: TrainingSetup, selection: str = "ag"
) -> MemoryPlan:
    """Adapter values, bookkeeping, gradients, optimizer state and selection statistics for ``targets``.

    Base weights and activations are left at 0 (see :func:`decoder_plan`).
    """
    _check_choice("--method", method, METHODS)
    _check_choice("--selection", selection, SELECTIONS)
    plan = MemoryPlan(method)
    if method in ("sft", "lift"):
        counts = [budget.sparse_count(shape) for shape in targets]
        plan.trainable = sum(counts)
        index_bytes = sum(count * _index_bytes(shape) for count, shape in zip(counts, targets))
        csr = sum((shape[0] + 1 + count) * _index_bytes(shape) for count, shape in zip(counts, targets))
        if setup.additive:
            plan.bookkeeping = 2 * csr
        else:
            plan.bookkeeping = csr + sum(
                count * (_index_bytes(shape) + setup.compute_bytes + FP32) for count, shape in zip(counts, targets)
            )
        plan.adapter = FP32 * plan.trainable / setup.shards + index_bytes
        plan.selection = (
            _sft_statistics(selection, counts, targets, setup) if method == "sft" else _lift_workspace(targets, setup)
        )
        plan.selection_between_steps = method == "lift"
    else:
        plan.trainable = _low_rank_trainable(method, budget.rank(targets), targets)
        plan.adapter = FP32 * plan.trainable / setup.shards
        if method == "snell" and not setup.additive:  # the written entries, to restore W0 bit-exactly
            plan.bookkeeping = sum(
                round(SNELL_KEPT_FRACTION * out * inp) * (_index_bytes((out, inp)) + setup.compute_bytes + FP32)
                for out, inp in targets
            )
    ddp_buckets = 2 if setup.strategy == "ddp" and setup.world_size > 1 else 1
    plan.gradients = ddp_buckets * FP32 * plan.trainable / setup.shards
    plan.optimizer = ADAM_MOMENTS * FP32 * plan.trainable / setup.shards
    return plan


def _sft_statistics(selection: str, counts: list[int], targets: list[Shape], setup: TrainingSetup) -> float:
    """SFT's window statistics, plus the largest transient workspace they need in backward."""
    if selection == "random":  # fixed indices: no window
        return 0.0
    if selection == "ag":
        kept = sum(count * (2 * _index_bytes(shape) + FP32) + (shape[0] + 1) * _index_bytes(shape)
                   for count, shape in zip(counts, targets))  # fmt: skip
        dense_gradient = max(FP32 * out * inp for out, inp in targets) if setup.world_size > 1 else 0
        return kept + dense_gradient
    kept = sum(FP32 * (out + inp) for out, inp in targets)
    tokens = setup.tokens * setup.world_size
    rows, cols = max(targets, key=sum)
    # all-gathered parts, their concatenation and the scaled left factor, in the compute dtype; fp32 upcasts
    gathered_copies = 3 * setup.compute_bytes if setup.world_size > 1 else 0
    upcast = FP32 if setup.compute_bytes != FP32 else 0
    factors = (gathered_copies + upcast) * tokens * (rows + cols)
    if 2 * tokens * (rows + cols) < rows * cols:
        products = FP32 * (tokens**2 + 2 * tokens * max(rows, cols))
    else:
        products = FP32 * MA_CHUNK_ENTRIES
    return kept + factors + products


def _lift_workspace(targets: list[Shape], setup: TrainingSetup) -> float:
    """LIFT's SVD of the largest matrix at a refresh: three fp32 copies and the randomized SVD's factors."""
    out, inp = max(targets, key=lambda shape: shape[0] * shape[1])
    columns = min(2 * LIFT_SVD_RANK, out, inp)
    gathered = out * inp * setup.compute_bytes if setup.sharded else 0
    return FP32 * (3 * out * inp + 2 * columns * (out + inp)) + gathered


def layer_activation_bytes(
    shape: DecoderShape, method: str, rank: int, compute_bytes: int, autocast: bool = False
) -> int:
    """Bytes per token that one decoder layer keeps for backward (see the module docstring)."""
    h, i, b = shape.hidden_size, shape.intermediate_size, compute_bytes
    heads, q_dim = shape.num_attention_heads, shape.num_attention_heads * shape.head_dim
    kv_dim = shape.num_key_value_heads * shape.head_dim
    common = 2 * (FP32 * h + FP32) + b * (q_dim + 2 * kv_dim) + b * q_dim + FP32 * heads + 3 * b * i
    # peft's LoRA (and SoRA) cast x to their fp32 weights, once per target; autocast casts it back
    adapter_bytes = b if autocast else FP32
    casts_input = method in ("lora", "sora") and b != FP32
    inputs = adapter_bytes * (5 * h + q_dim + i) if casts_input else b * (2 * h + i)
    adapter = {"lora": 1, "sora": 2}.get(method, 0) * len(TARGET_NAMES) * adapter_bytes * rank
    return common + inputs + adapter


def decoder_activation_bytes(
    shape: DecoderShape, method: str, rank: int, setup: TrainingSetup, trainable: int = 0
) -> float:
    """Activation bytes of a training step's peak for B x S tokens (see the module docstring).

    ``trainable``: the adapter's values; under autocast LoRA/SoRA keep 16-bit casts of their weights.
    """
    b, tokens = setup.compute_bytes, setup.tokens
    per_layer = tokens * layer_activation_bytes(shape, method, rank, b, setup.autocast)
    loss = tokens * (3 * FP32 * shape.vocab_size + 8)
    rotary = 2 * setup.seq_len * shape.head_dim * b
    if setup.gradient_checkpointing:
        activations = shape.num_hidden_layers * tokens * b * shape.hidden_size + max(per_layer, loss) + rotary
    else:
        activations = shape.num_hidden_layers * per_layer + loss + rotary
    if method == "snell":
        activations += SNELL_CHUNK_BYTES
    if setup.autocast and method in ("lora", "sora"):
        activations += b * trainable
    if setup.quantized is not None:
        activations += max(out * inp for out, inp in shape.layer_targets) * b
    return activations


def decoder_plan(
    shape: DecoderShape, method: str, budget: Budget, setup: TrainingSetup, selection: str = "ag"
) -> MemoryPlan:
    """The full per-device plan of ``method`` on a decoder of ``shape``."""
    plan = adapter_plan(method, shape.targets, budget, setup, selection)
    layer_weights = sum(setup.target_weight_bytes(target) for target in shape.layer_targets)
    layer_weights += shape.layer_other_parameters() * setup.compute_bytes
    model_weights = shape.num_hidden_layers * layer_weights + shape.outer_parameters() * setup.compute_bytes
    plan.base_weights = model_weights / setup.shards
    plan.gathered_layer = layer_weights if setup.sharded else 0.0
    plan.activations = decoder_activation_bytes(shape, method, budget.rank(shape.targets), setup, plan.trainable)
    return plan


def human_bytes(count: float) -> str:
    """``count`` bytes in binary units with about three significant digits, e.g. ``1.50 GiB``, ``812 MiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 999.5 or unit == "TiB":
            break
        count /= 1024
    if unit == "B":
        return f"{count:.0f} B"
    decimals = 0 if count >= 100 else 1 if count >= 10 else 2
    return f"{count:.{decimals}f} {unit}"


def _method_title(plan: MemoryPlan, selection: str) -> str:
    title = METHOD_TITLES[plan.method]
    return f"{title} ({selection})" if plan.method == "sft" else title


def plan_table(plans: list[MemoryPlan], selection: str = "ag") -> str:
    """A markdown table: one column per method, one row per memory part, and the total."""
    lines = [
        "| per device | " + " | ".join(_method_title(plan, selection) for plan in plans) + " |",
        "|---|" + "---:|" * len(plans),
        "| trainable values (whole model) | " + " | ".join(f"{plan.trainable:,}" for plan in plans) + " |",
    ]
    for label, attribute in ROWS:
        values = [getattr(plan, attribute) for plan in plans]
        if not any(values):
            continue
        lines.append(f"| {label} | " + " | ".join(human_bytes(value) if value else "-" for value in values) + " |")
    lines.append("| **total (peak)** | " + " | ".join(f"**{human_bytes(plan.total)}**" for plan in plans) + " |")
    return "\n".join(lines)


def plan_report(
    shape: DecoderShape,
    budget: Budget,
    setup: TrainingSetup,
    methods: tuple[str, ...] = METHODS,
    selection: str = "ag",
    source: str = "config",
) -> str:
    """The plan as printed by ``python -m peft_sparse plan``: a summary of the inputs, then :func:`plan_table`."""
    targets = shape.targets
    plans = [decoder_plan(shape, method, budget, setup, selection) for method in methods]
    sparse_total = sum(budget.sparse_count(target) for target in targets)
    if budget.lora_rank is None:
        budget_line = f"density {budget.density:g} -> {sparse_total:,} SFT/LIFT values"
    else:
        budget_line = f"LoRA rank {budget.lora_rank} -> {sparse_total:,} SFT/LIFT values"
    quantized = f", target weights {setup.quantized}" if setup.quantized else ""
    checkpointing = ", gradient checkpointing" if setup.gradient_checkpointing else ""
    checkpointing += f", {setup.dtype} autocast" if setup.autocast else ""
    lines = [
        f"model: {source}: {shape.num_hidden_layers} layers, hidden {shape.hidden_size}, MLP "
        f"{shape.intermediate_size}, {shape.num_attention_heads} heads ({shape.num_key_value_heads} KV, head dim "
        f"{shape.head_dim}), vocab {shape.vocab_size}; {len(targets)} target matrices "
        f"({', '.join(TARGET_NAMES)}), {sum(out * inp for out, inp in targets):,} entries",
        f"training: {setup.dtype} base{quantized}, {setup.world_size} device(s), {setup.strategy}, batch "
        f"{setup.batch_size} x {setup.seq_len} tokens per device, AdamW{checkpointing}",
        f"budget: {budget_line}; LoRA/SoRA/SNELL at rank {budget.rank(targets)}",
        "",
        plan_table(plans, selection),
    ]
    return "\n".join(lines)

