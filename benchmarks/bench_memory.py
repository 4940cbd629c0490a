"""Peak training memory of SNELL (ours) vs LoRA at equal r, and vs the dense-materialising SNELL design.

Methods, each in a fresh subprocess (so one method's freed heap cannot hide the next one's peak):

- ``lora``: stock peft LoRA, rank r, on the target linears.
- ``snell``: ours, ``SnellConfig(r, sparsity)``: the same r * (in + out) trainable parameters per
  matrix; the custom autograd function saves x, the factors and tau, and recomputes the kernel in
  backward (on CPU this is the torch path; the Triton path never forms the kernel at all).
- ``snell-dense``: the paper's design: the kernel matrix (``torch.cdist`` of the factors) and the
  thresholded delta are built in forward and autograd keeps them alive until backward.
- ``full-ft`` (optional): every weight trained.

Peak memory (CPU): tracemalloc does not see torch's allocations, so this is the highest process RSS
seen by a sampling thread (every 2 ms) during a warm-up step and ``--steps`` timed steps, minus the
RSS right before the first step (after the model is built). A step = forward + backward + AdamW.

    python benchmarks/bench_memory.py --workloads smollm2-135m linear-4096
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import peft_sparse  # registers SnellConfig with peft
import peft_sparse.tuners.snell.layer as snell_layer
from triton_kernels.snell_matmul import KernelSpec

from bench_sft_step import linear_workload, smollm2_workload, timed_training
from benchmark_metadata import write_results

METHODS = ("lora", "snell", "snell-dense", "full-ft")
WORKLOADS = {"smollm2-135m": smollm2_workload, "linear-4096": linear_workload}
SEED = 0


def dense_snell_matmul(
    x: torch.Tensor, input_factors: torch.Tensor, output_factors: torch.Tensor, threshold: torch.Tensor, spec: KernelSpec
) -> torch.Tensor:
    """The paper's design: ``K`` [out, in] from ``torch.cdist`` and the masked ``E`` both live in autograd's graph."""
    groups = input_factors.shape[0]
    signs = torch.tensor([(-1.0) ** group for group in range(groups)])[:, None, None]  # distance_diff's c_h / scale
    kernel = spec.scale * (signs * torch.cdist(output_factors, input_factors)).sum(0)  # [out, in]
    magnitude = kernel.detach().abs()
    delta = kernel * (magnitude >= threshold) * (magnitude if spec.magnitude else 1.0)
    return x @ delta.T


def build_model(method: str, workload, rank: int, sparsity: float) -> nn.Module:
    model = workload.build()
    if method == "full-ft":
        return model
    if method == "lora":
        return get_peft_model(model, LoraConfig(r=rank, target_modules=workload.targets))
    if method == "snell-dense":
        snell_layer.snell_delta_matmul = dense_snell_matmul  # this subprocess only
    return get_peft_model(model, peft_sparse.SnellConfig(r=rank, sparsity=sparsity, target_modules=workload.targets))


def measure(method: str, workload_name: str, rank: int, sparsity: float, steps: int, quick: bool) -> dict:
    torch.manual_seed(SEED)
    workload = WORKLOADS[workload_name](quick)
    model = build_model(method, workload, rank, sparsity)
    return {"workload": workload_name, "source": workload.source, "method": method,
            **timed_training(model, workload, steps)}


def measure_in_subprocess(method: str, workload_name: str, args) -> dict:
    command = [
        sys.executable, __file__, "--child", method, "--workloads", workload_name, "--r", str(args.r),
        "--sparsity", str(args.sparsity), "--steps", str(args.steps),
    ] + (["--quick"] if args.quick else [])  # fmt: skip
    completed = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def markdown_table(rows: list[dict]) -> str:
    lora = next((row["peak_mib"] for row in rows if row["method"] == "lora"), None)
    lines = [
        "| method | trainable params | peak MiB | vs LoRA | step ms (median) |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        label = "snell (ours)" if row["method"] == "snell" else row["method"]
        ratio = f"{row['peak_mib'] / lora:.2f}x" if lora else "-"
        lines.append(
            f"| {label} | {row['trainable_params']:,} | {row['peak_mib']:.0f} | {ratio} | {row['step_ms_median']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=["lora", "snell", "snell-dense"])
    parser.add_argument("--r", type=int, default=32, help="LoRA rank = SNELL r (equal trainable parameters)")
    parser.add_argument("--sparsity", type=float, default=0.9, help="SNELL sparsity (fraction of zeroed entries)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test only")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/bench_memory.json"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.workloads[0], args.r, args.sparsity, args.steps, args.quick)))
        return

    rows = []
    for workload_name in args.workloads:
        workload_rows = []
        for method in args.methods:
            workload_rows.append(measure_in_subprocess(method, workload_name, args))
            print(f"{workload_name} {method}: {workload_rows[-1]['peak_mib']:.0f} MiB", file=sys.stderr, flush=True)
        print(f"\n### {workload_name} ({workload_rows[0]['source']}; r {args.r}, SNELL sparsity {args.sparsity})\n")
        print(markdown_table(workload_rows))
        rows.extend(workload_rows)
    write_results(args.output, rows, quick=args.quick, steps=args.steps, r=args.r, sparsity=args.sparsity)


if __name__ == "__main__":
    main()
