"""The memory plan (``python -m peft_sparse plan``) against measured peaks of a CPU training step.

Workloads, fp32 on CPU, each method in a fresh subprocess:

- ``smollm2-135m``: ``LlamaForCausalLM`` built from SmolLM2-135M's config (random weights: their
  values do not change memory), batch 2 x 128 tokens; predicted by
  :func:`peft_sparse.memory_plan.decoder_plan` from the same config.
- ``linear-4096``: one bias-free 4096x4096 ``nn.Linear``, 1024 tokens, loss ``mean(y^2)``; the
  adapter rows come from :func:`peft_sparse.memory_plan.adapter_plan`, the rest from
  :func:`linear_activation_bytes` (this toy loss is no transformer).

Methods: SFT at density 0.01 (``selection="random"``: a plain step, no selection window) and peft
LoRA r=16, each predicted at its own budget.

Measured peak: as ``bench_memory.py``, the highest RSS seen by a sampling thread (every 2 ms)
during two steps (forward + backward + AdamW; the second runs with AdamW's state allocated), here
minus the RSS before the base model is built, so it includes the weights as the plan does. The
children run with glibc's mmap threshold fixed at 64 KiB (``MALLOC_MMAP_THRESHOLD_``): tensors
then come from and go back to the OS, and RSS follows the live bytes as ``torch.cuda.max_memory_allocated``
does on a GPU. With glibc's default (a threshold that grows up to 32 MiB) freed activations stay
resident and RSS read 1.1-1.4x higher here (SmolLM2 SFT: 1163 vs 1045 MiB).

What the plan leaves out, measured on the SFT rows: MKL keeps its GEMM packing buffers for reuse
(25 MiB on SmolLM2, 8 MiB on the linear layer: the gap shrinks by that much under
``MKL_DISABLE_FAST_MM=1``), and the rest (~20 and ~6 MiB) is memory that is no tensor (autograd
graph, Python objects, thread stacks). Tensors alone match closely: torch.profiler's allocation
trace of a SmolLM2 SFT step peaks 449 MiB above the step's start, in ``LogSoftmaxBackward0`` as the
plan says, against 441 MiB predicted (activations + gradients).

    python benchmarks/bench_memory_plan.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import peft_sparse  # registers SparseConfig with peft
import psutil
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from peft_sparse.memory_plan import Budget, DecoderShape, MemoryPlan, TrainingSetup, adapter_plan, decoder_plan

from bench_sft_step import LLAMA_TARGETS, SMOLLM2_SHAPES, PeakRss, release_freed_memory
from benchmark_metadata import write_results

METHODS = ("sft", "lora")
WORKLOADS = ("smollm2-135m", "linear-4096")
DENSITY = 0.01
LORA_RANK = 16
SMOLLM2_BATCH = (2, 128)  # [B, S]
LINEAR_SIZE, LINEAR_TOKENS = 4096, 1024
FP32 = 4
SEED = 0
MIB = 2**20
# glibc: a fixed threshold also stops the dynamic one from growing, so large blocks are unmapped on free
CHILD_ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}


def budget_of(method: str) -> Budget:
    return Budget(density=DENSITY) if method == "sft" else Budget(lora_rank=LORA_RANK)


def smollm2_shape() -> DecoderShape:
    return DecoderShape.from_config(LlamaConfig(**SMOLLM2_SHAPES).to_dict(), source="SmolLM2-135M")


def predict_smollm2(method: str) -> MemoryPlan:
    batch_size, seq_len = SMOLLM2_BATCH
    setup = TrainingSetup(dtype="fp32", batch_size=batch_size, seq_len=seq_len)
    return decoder_plan(smollm2_shape(), method, budget_of(method), setup, selection="random")


def linear_activation_bytes(method: str, rank: int, tokens: int, size: int) -> int:
    """The linear workload's activations: the input, and what ``mean((x W^T)^2)`` holds at backward.

    x [T, in] (no grad; both methods save this same tensor), y = x W^T [T, out] (saved by the square),
    and four more [T, out] fp32 buffers alive together in backward: mean's expanded gradient,
    ``y^1``, ``2 y`` and ``grad * 2 y`` (``pow``'s backward). LoRA also saves ``A x`` [T, r].
    """
    lora_hidden = tokens * rank * FP32 if method == "lora" else 0
    return FP32 * tokens * size + 5 * FP32 * tokens * size + lora_hidden


def predict_linear(method: str) -> MemoryPlan:
    shape = (LINEAR_SIZE, LINEAR_SIZE)
    plan = adapter_plan(method, [shape], budget_of(method), TrainingSetup(dtype="fp32"), selection="random")
    plan.base_weights = FP32 * LINEAR_SIZE * LINEAR_SIZE
    plan.activations = linear_activation_bytes(method, LORA_RANK, LINEAR_TOKENS, LINEAR_SIZE)
    return plan


PREDICTIONS = {"smollm2-135m": predict_smollm2, "linear-4096": predict_linear}


def build(workload: str) -> tuple[nn.Module, list[str]]:
    """A fresh fp32 base model and the leaf names of its target linears."""
    if workload == "smollm2-135m":
        return LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPES)), LLAMA_TARGETS
    return nn.Sequential(OrderedDict(proj=nn.Linear(LINEAR_SIZE, LINEAR_SIZE, bias=False))), ["proj"]


def make_batch(workload: str) -> torch.Tensor:
    if workload == "smollm2-135m":
        return torch.randint(0, SMOLLM2_SHAPES["vocab_size"], SMOLLM2_BATCH)  # input_ids [B, S]
    return torch.randn(LINEAR_TOKENS, LINEAR_SIZE)  # x [T, D], no grad


def loss_of(workload: str, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    if workload == "smollm2-135m":
        return model(input_ids=batch, labels=batch).loss
    return model(batch).square().mean()


def rss() -> int:
    return psutil.Process().memory_info().rss


def measure(workload: str, method: str) -> dict:
    """Peak RSS of two training steps above the RSS before the base model existed (in this process)."""
    torch.manual_seed(SEED)
    warm_up = nn.Linear(64, 64)  # thread pools and kernel caches exist before the baseline
    warm_up(torch.randn(8, 64, requires_grad=True)).sum().backward()
    del warm_up
    release_freed_memory()
    before = rss()
    model, targets = build(workload)
    release_freed_memory()
    with_base = rss()
    batch = make_batch(workload)  # counted with the activations, as the plan does
    if method == "sft":
        config = peft_sparse.SparseConfig(density=DENSITY, selection="random", target_modules=targets)
    else:
        config = LoraConfig(r=LORA_RANK, target_modules=targets)
    model = get_peft_model(model, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    release_freed_memory()
    with PeakRss() as memory:
        for _ in range(2):  # the first step allocates AdamW's moments; the second runs with them
            loss_of(workload, model, batch).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return {
        "workload": workload,
        "method": method,
        "trainable_params": sum(p.numel() for p in params),
        "measured_mib": (memory.peak - before) / MIB,
        "measured_base_mib": (with_base - before) / MIB,
    }


def measure_in_subprocess(workload: str, method: str) -> dict:
    command = [sys.executable, __file__, "--child", method, "--workloads", workload]
    completed = subprocess.run(
        command, check=True, capture_output=True, text=True, env=os.environ | CHILD_ENVIRONMENT
    )
    return json.loads(completed.stdout.strip().splitlines()[-1])


def add_prediction(row: dict) -> dict:
    plan = PREDICTIONS[row["workload"]](row["method"])
    row["predicted_trainable"] = plan.trainable
    row["predicted"] = {label: getattr(plan, label) / MIB for label in (
        "base_weights", "adapter", "bookkeeping", "gradients", "optimizer", "activations")}  # fmt: skip
    row["predicted_mib"] = plan.total / MIB
    row["ratio"] = row["predicted_mib"] / row["measured_mib"]
    # the part that is not simply the weights: everything above the base model
    row["predicted_above_base_mib"] = (plan.total - plan.base_weights) / MIB
    row["measured_above_base_mib"] = row["measured_mib"] - row["measured_base_mib"]
    row["ratio_above_base"] = row["predicted_above_base_mib"] / row["measured_above_base_mib"]
    return row


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| workload | method | trainable | predicted MiB | measured MiB | predicted / measured "
        "| above base: predicted | measured | ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        label = f"SFT (density {DENSITY:g})" if row["method"] == "sft" else f"LoRA r={LORA_RANK}"
        lines.append(
            f"| {row['workload']} | {label} | {row['trainable_params']:,} | {row['predicted_mib']:.0f} "
            f"| {row['measured_mib']:.0f} | **{row['ratio']:.2f}** | {row['predicted_above_base_mib']:.0f} "
            f"| {row['measured_above_base_mib']:.0f} | {row['ratio_above_base']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/bench_memory_plan.json"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.workloads[0], args.child)))
        return

    rows = []
    for workload in args.workloads:
        for method in args.methods:
            rows.append(add_prediction(measure_in_subprocess(workload, method)))
            print(f"{workload} {method}: ratio {rows[-1]['ratio']:.2f}", file=sys.stderr, flush=True)
    print(f"\nPredicted peak (memory plan) vs measured peak RSS, fp32 on CPU, SFT density {DENSITY:g}, LoRA "
          f"r={LORA_RANK}; SmolLM2-135M batch {SMOLLM2_BATCH[0]} x {SMOLLM2_BATCH[1]}, linear {LINEAR_TOKENS} "
          f"tokens\n")  # fmt: skip
    print(markdown_table(rows))
    write_results(
        args.output, rows, density=DENSITY, lora_rank=LORA_RANK, smollm2_batch=SMOLLM2_BATCH,
        linear_tokens=LINEAR_TOKENS, child_environment=CHILD_ENVIRONMENT,
    )  # fmt: skip


if __name__ == "__main__":
    main()
