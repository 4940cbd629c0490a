"""The GPU benchmark suite: step time, kernels, memory and LIFT selection on one CUDA device (< 8 min).

Writes ``benchmarks/results/gpu_suite.json`` and prints each table; kernel rows carry their ratio to
the bandwidth roofline (bytes moved / peak HBM bandwidth) and the compute roofline (FLOPs / peak of
the unit the kernel uses: tensor cores for ``tl.dot``/cuBLAS in bf16 or tf32, CUDA cores for fp32
FMAs). Peaks come from ``DEVICE_PEAKS`` keyed by ``torch.cuda.get_device_name()``; ``--peak-gbs``
and ``--peak-tflops`` override them.

``--dry-run`` (any machine) prints the plan and the roofline expectations of every Triton kernel at
7B shapes (the README's kernel roofline table comes from it):

    python benchmarks/gpu_suite.py --dry-run --device-name H100
    python benchmarks/gpu_suite.py                 # on a CUDA machine
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch

from benchmark_metadata import write_results

RESULTS = Path(__file__).parent / "results" / "gpu_suite.json"
BF16, FP32, INDEX = 2, 4, 4  # bytes per element
SEVEN_B_SHAPES = [(4096, 4096), (4096, 11008)]  # [out, in]: attention and MLP matrices of a 7B Llama
DENSITY, TOKENS, SNELL_RANK = 0.01, 4096, 32
SNELL_BLOCK_TOKENS = 32  # triton_kernels/snell_matmul.py BLOCK_T: the kernel tile is recomputed per token block
BENCH_KERNEL_COSTS = {  # bench_kernels' kernel names -> the roofline rows of kernel_costs
    "merge": "sparse_merge scatter", "sddmm": "sddmm (per entry)", "matmul": "sparse_matmul (y += X S^T)",
    "scan": "topk_scan",
}  # fmt: skip
TABLE_COLUMNS = {
    "step": ["method", "trainable_params", "step_ms", "peak_mib"],
    "kernels": ["kernel", "shape", "density", "ours_ms", "expected_us", "ours_vs_roofline", "baseline", "baseline_ms",
                "baseline_expected_us"],
    "memory": ["method", "trainable_params", "step_ms", "peak_mib"],
    "lift": ["svd_method", "seconds"],
}  # fmt: skip
PLAN = [
    ("step", "train-step time and peak memory of frozen, LoRA, SFT, full FT on SmolLM2 (bf16 autocast)", 120),
    ("kernels", "bench_kernels cases (4096x4096, 4096x11008; 0.1/1/5%) vs dense baselines + roofline ratios", 120),
    ("memory", "peak torch.cuda memory and step time of LoRA / SNELL / full FT at r 32", 60),
    ("lift", "LIFT selection (exact and randomized SVD) for every linear of SmolLM2", 60),
]


@dataclass(frozen=True)
class DevicePeaks:
    """Dense peaks of one GPU (vendor datasheets, SXM parts)."""

    hbm_gbs: float
    bf16_tflops: float  # tensor cores, dense
    tf32_tflops: float  # tensor cores, dense
    fp32_tflops: float  # CUDA cores (FMA)


DEVICE_PEAKS = {
    "H200": DevicePeaks(hbm_gbs=4800, bf16_tflops=989, tf32_tflops=494, fp32_tflops=67),
    "H100": DevicePeaks(hbm_gbs=3350, bf16_tflops=989, tf32_tflops=494, fp32_tflops=67),
    "A100": DevicePeaks(hbm_gbs=2039, bf16_tflops=312, tf32_tflops=156, fp32_tflops=19.5),
}


def device_peaks(device_name: str) -> DevicePeaks:
    """Peaks of the first ``DEVICE_PEAKS`` key contained in ``device_name`` ("NVIDIA H100 80GB HBM3" -> H100)."""
    for key, peaks in DEVICE_PEAKS.items():
        if key in device_name.upper():
            return peaks
    raise ValueError(
        f"device_name must contain one of {list(DEVICE_PEAKS)} (or pass --peak-gbs and --peak-tflops), "
        f"got {device_name!r}"
    )


@dataclass(frozen=True)
class KernelCost:
    """What one kernel call must move and compute; ``unit`` is where its FLOPs run."""

    kernel: str
    shape: tuple[int, int]
    bytes_moved: float
    flops: float
    unit: str  # "bf16 tensor cores", "tf32 tensor cores" or "fp32 CUDA cores"

    def peak_tflops(self, peaks: DevicePeaks) -> float:
        return {"bf16 tensor cores": peaks.bf16_tflops, "tf32 tensor cores": peaks.tf32_tflops}.get(
            self.unit, peaks.fp32_tflops
        )

    def roofline_us(self, peaks: DevicePeaks) -> tuple[float, float, float]:
        """(memory-bound µs, compute-bound µs, expected µs = the larger)."""
        memory_us = self.bytes_moved / (peaks.hbm_gbs * 1e9) * 1e6
        compute_us = self.flops / (self.peak_tflops(peaks) * 1e12) * 1e6
        return memory_us, compute_us, max(memory_us, compute_us)


def kernel_costs(
    shape: tuple[int, int], density: float = DENSITY, tokens: int = TOKENS, rank: int = SNELL_RANK
) -> list[KernelCost]:
    """Minimum bytes and FLOPs of each Triton kernel (and the dense SDDMM alternative) for one [out, in] weight.

    bf16 weights, activations and values, int32 indices, fp32 results where the kernel writes fp32.
    Activations are counted once (ideal on-chip reuse); scattered accesses at their element size
    (a 32-byte sector per scattered write is the pessimistic bound, ~3x for the merge).
    """
    out_features, in_features = shape
    entries = out_features * in_features
    k = round(density * entries)
    activations = tokens * (out_features + in_features) * BF16  # dY [T, out] and X [T, in]
    token_blocks = -(-tokens // SNELL_BLOCK_TOKENS)
    return [
        KernelCost("sparse_merge scatter", shape, k * (INDEX + 3 * BF16), k, "fp32 CUDA cores"),
        KernelCost("sddmm (per entry)", shape, activations + k * (2 * INDEX + FP32), 2 * k * tokens, "fp32 CUDA cores"),
        KernelCost(  # the same kernel if no program shares a loaded row with another (every gather from HBM)
            "sddmm (per entry, no reuse)", shape, 2 * k * tokens * BF16 + k * (2 * INDEX + FP32), 2 * k * tokens,
            "fp32 CUDA cores",
        ),
        KernelCost(
            "dense dY^T X + gather", shape, activations + entries * BF16 + k * (BF16 + INDEX + FP32),
            2 * entries * tokens, "bf16 tensor cores",
        ),  # fmt: skip
        KernelCost(
            "sparse_matmul (y += X S^T)", shape,
            tokens * in_features * BF16 + 2 * tokens * out_features * BF16 + k * (INDEX + BF16) + out_features * INDEX,
            2 * k * tokens, "fp32 CUDA cores",
        ),  # fmt: skip
        KernelCost(
            "snell_matmul forward", shape,
            tokens * (in_features + out_features) * BF16 + (in_features + out_features) * rank * FP32,
            2 * entries * tokens + token_blocks * entries * (2 * rank + 6), "fp32 CUDA cores",
        ),  # fmt: skip
        KernelCost(
            "topk_scan", shape, activations + k * (8 + FP32) + k * INDEX, 2 * entries * tokens, "tf32 tensor cores"
        ),
    ]


def roofline_rows(peaks: DevicePeaks, shapes=SEVEN_B_SHAPES, density: float = DENSITY, tokens: int = TOKENS):
    rows = []
    for shape in shapes:
        for cost in kernel_costs(shape, density, tokens):
            memory_us, compute_us, expected_us = cost.roofline_us(peaks)
            rows.append({
                "kernel": cost.kernel, "shape": list(shape), "density": density, "tokens": tokens,
                "bytes": cost.bytes_moved, "flops": cost.flops, "unit": cost.unit,
                "memory_bound_us": memory_us, "compute_bound_us": compute_us, "expected_us": expected_us,
            })  # fmt: skip
    return rows


def roofline_table(rows: list[dict]) -> str:
    lines = [
        "| kernel | shape [out x in] | MB moved | GFLOP | FLOPs on | memory-bound µs | compute-bound µs "
        "| expected µs |",
        "|---|---|---:|---:|---|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['kernel']} | {row['shape'][0]}x{row['shape'][1]} | {row['bytes'] / 1e6:.1f} "
            f"| {row['flops'] / 1e9:.2f} | {row['unit']} | {row['memory_bound_us']:.1f} "
            f"| {row['compute_bound_us']:.1f} | {row['expected_us']:.1f} |"
        )
    return "\n".join(lines)


def sddmm_crossover_density(peaks: DevicePeaks) -> float:
    """Density above which the per-entry SDDMM's fp32 FLOPs take longer than a dense bf16 tensor-core dY^T X."""
    return peaks.fp32_tflops / peaks.bf16_tflops


def print_plan(peaks: DevicePeaks, label: str) -> list[dict]:
    print(f"GPU suite plan ({label}: {peaks.hbm_gbs:g} GB/s, {peaks.bf16_tflops:g} TFLOPs bf16 dense, "
          f"{peaks.tf32_tflops:g} tf32, {peaks.fp32_tflops:g} fp32)")  # fmt: skip
    for name, what, budget_s in PLAN:
        print(f"  {name:8s} <= {budget_s:3d} s  {what}")
    rows = roofline_rows(peaks)
    print(f"\nKernel roofline at 7B shapes (density {DENSITY:.0%}, {TOKENS} tokens, bf16, int32 indices)\n")
    print(roofline_table(rows))
    print(
        f"\nPer-entry SDDMM vs dense dY^T X + gather: equal compute time at density "
        f"{sddmm_crossover_density(peaks):.1%} (fp32 CUDA-core FLOPs vs bf16 tensor-core FLOPs)."
    )
    return rows


# --- the CUDA runs --------------------------------------------------------------------------


def cuda_median_ms(function, repeats: int = 10) -> float:
    function()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def cuda_training_row(method: str, model: torch.nn.Module, workload, repeats: int) -> dict:
    """Median step time (bf16 autocast, AdamW) and peak allocated memory of one model on CUDA."""
    model = model.cuda().train()
    batch = workload.batch.cuda()
    parameters = [p for p in model.parameters() if p.requires_grad]
    parameters = parameters or [torch.zeros(1, device="cuda", requires_grad=True)]  # frozen: a no-op step
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = workload.loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    step_ms = cuda_median_ms(step, repeats)
    return {"method": method, "step_ms": step_ms, "peak_mib": torch.cuda.max_memory_allocated() / 2**20,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}  # fmt: skip


def run_step_times(repeats: int) -> list[dict]:
    """bench_sft_step's methods on SmolLM2 at LoRA rank 16's budget."""
    from bench_sft_step import build_model, smollm2_workload

    workload = smollm2_workload(quick=False)
    rows = []
    for method in ("frozen", "lora", "sft", "full-ft"):
        torch.manual_seed(0)
        rows.append(cuda_training_row(method, build_model(method, workload, rank=16), workload, repeats))
    return rows


def run_memory(repeats: int) -> list[dict]:
    """bench_memory's methods (LoRA, SNELL, the dense-materialising SNELL) on SmolLM2 at r 32."""
    from bench_memory import build_model
    from bench_sft_step import smollm2_workload

    workload = smollm2_workload(quick=False)
    rows = []
    for method in ("lora", "snell", "full-ft"):
        torch.manual_seed(0)
        rows.append(cuda_training_row(method, build_model(method, workload, 32, 0.9), workload, repeats))
    return rows


def run_kernels(peaks: DevicePeaks, repeats: int) -> list[dict]:
    from bench_kernels import Case, kernel_timings

    rows = []
    for shape in SEVEN_B_SHAPES:
        for density in (0.001, 0.01, 0.05):
            case = Case(shape, density, TOKENS, torch.bfloat16, torch.device("cuda"))
            costs = {cost.kernel: cost for cost in kernel_costs(shape, density, TOKENS)}
            for row in kernel_timings(case, repeats, triton_path=True):
                cost = costs.get(BENCH_KERNEL_COSTS.get(row["kernel"]))
                if cost is not None:
                    row["expected_us"] = cost.roofline_us(peaks)[2]
                    row["ours_vs_roofline"] = 1e3 * row["ours_ms"] / row["expected_us"]
                if row["kernel"] == "sddmm":  # the open question: per-entry vs tensor-core dense + gather
                    row["baseline_expected_us"] = costs["dense dY^T X + gather"].roofline_us(peaks)[2]
                rows.append(row)
    return rows


def markdown(rows: list[dict], columns: list[str]) -> str:
    """A markdown table of ``columns`` (floats to 3 significant digits; missing values as "-")."""
    def cell(value) -> str:
        return "-" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(column)) for column in columns) + " |" for row in rows]
    return "\n".join(lines)


def run_lift_selection() -> list[dict]:
    from bench_sft_step import smollm2_workload
    from peft import get_peft_model

    from peft_sparse import LiftConfig

    rows = []
    for svd_method in ("exact", "randomized"):
        base = smollm2_workload(quick=False).build().cuda()
        torch.cuda.synchronize()
        start = time.perf_counter()
        get_peft_model(base, LiftConfig(density=0.05, rank=128, svd_method=svd_method))
        torch.cuda.synchronize()
        rows.append({"svd_method": svd_method, "seconds": time.perf_counter() - start})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="print the plan and roofline; no GPU needed")
    parser.add_argument("--device-name", default=None, help="peak table key for --dry-run (default: H100)")
    parser.add_argument("--peak-gbs", type=float, default=None, help="override the HBM bandwidth peak")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the bf16 tensor-core peak")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    on_cuda = torch.cuda.is_available() and not args.dry_run
    name = args.device_name or (torch.cuda.get_device_name() if on_cuda else "H100")
    overridden = args.peak_gbs is not None and args.peak_tflops is not None
    known = any(key in name.upper() for key in DEVICE_PEAKS)
    peaks = device_peaks(name) if known or not overridden else DEVICE_PEAKS["H100"]  # H100's tf32/fp32 peaks
    peaks = replace(peaks, hbm_gbs=args.peak_gbs or peaks.hbm_gbs, bf16_tflops=args.peak_tflops or peaks.bf16_tflops)
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("gpu_suite.py needs a CUDA device (none found); use --dry-run to print the plan and the roofline")
    roofline = print_plan(peaks, name)
    if args.dry_run:
        return

    results: dict[str, Optional[list]] = {"roofline": roofline}
    started = time.perf_counter()
    for section, run in (
        ("step", lambda: run_step_times(args.repeats)),
        ("kernels", lambda: run_kernels(peaks, args.repeats)),
        ("memory", lambda: run_memory(args.repeats)),
        ("lift", run_lift_selection),
    ):
        section_start = time.perf_counter()
        results[section] = run()
        print(f"\n## {section} ({time.perf_counter() - section_start:.0f} s)\n")
        print(markdown(results[section], TABLE_COLUMNS[section]), flush=True)
    rows = [{"section": section, **row} for section, section_rows in results.items() for row in section_rows]
    write_results(RESULTS, rows, device_name=name, peaks=peaks.__dict__, seconds=time.perf_counter() - started)


if __name__ == "__main__":
    main()
