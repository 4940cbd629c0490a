"""Sparse hot-path kernels vs their torch references and the obvious dense / COO baselines.

For each weight shape [out, in] and density (k = density * out * in active entries, random
unique flat indices) and T tokens (default 1024):

- merge:  ours ``scatter_assign`` (W[idx] = base + values) vs ``index_put_`` and a SHiRA-style
          ``W += sparse_coo_tensor(...).to_dense()`` (2-D indices precomputed, in the baseline's favour)
- sddmm:  ours ``sampled_dense_dense_matmul(dY^T, X)`` vs dense ``dY^T @ X`` then gather k entries
- matmul: ours ``y = X @ W^T; y += X @ S^T`` (a base that cannot be written, S sparse) vs
          ``X @ (W + coo(S).to_dense())^T`` (dequantize-and-add; W is a dense stand-in here)
- scan:   ours ``topk_candidates(dY^T, X, active, k)`` vs dense ``dY^T @ X`` then ``topk`` of |.|

Time: median of --repeats calls after one warm-up (CUDA: synchronized). GB/s: the bytes each op
must move at least (stated per kernel in BYTES_MODEL) over our median time; "% of BW" divides by
the machine's copy bandwidth, measured here as (read + write bytes) / median time of ``copy_``
between two 256 MiB buffers. On CPU "ours" *is* the torch reference (Triton runs on CUDA only),
so the reference column is filled only when the Triton path ran.

    python benchmarks/bench_kernels.py            # all shapes and densities (several minutes on 2 cores)
    python benchmarks/bench_kernels.py --quick    # 1024x1024 and 4096x4096 at 1% density
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from benchmark_metadata import write_results
from peft_sparse.sparse.indices import csr_pattern, random_unique_indices
from triton_kernels import sampled_dense_dense_matmul, scatter_assign, sparse_matmul_accumulate, topk_candidates
from triton_kernels._dispatch import use_triton
from triton_kernels.sddmm import sampled_dense_dense_matmul_reference
from triton_kernels.sparse_matmul import sparse_matmul_accumulate_reference
from triton_kernels.sparse_merge import scatter_assign_reference
from triton_kernels.topk_scan import topk_candidates_reference

SHAPES = [(1024, 1024), (4096, 4096), (4096, 11008)]
DENSITIES = [0.001, 0.01, 0.05]
BYTES_MODEL = {
    "merge": "k * (index + base + value + weight write)",
    "sddmm": "T * (out + in) activations + k * (2 indices + fp32 result)",
    "matmul": "out * in weight + T * in inputs + 3 * T * out outputs (write, then read + write) + k * (index + value)",
    "scan": "T * (out + in) activations + k * (int64 index + fp32 value)",
}
RESULTS = Path(__file__).parent / "results" / "bench_kernels.json"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_ms(function: Callable[[], object], repeats: int, device: torch.device) -> float:
    function()  # warm-up (and Triton compilation)
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def copy_bandwidth_gbs(device: torch.device, repeats: int) -> float:
    """Read + write bytes per second of ``copy_`` between two 256 MiB fp32 buffers."""
    source = torch.ones(64 * 2**20, device=device)
    target = torch.empty_like(source)
    milliseconds = median_ms(lambda: target.copy_(source), repeats, device)
    return 2 * source.numel() * source.element_size() / milliseconds / 1e6


class Case:
    """One weight shape and density: weight, active entries, activations."""

    def __init__(self, shape: tuple[int, int], density: float, tokens: int, dtype: torch.dtype, device: torch.device):
        out_features, in_features = shape
        generator = torch.Generator().manual_seed(0)
        self.shape, self.density, self.tokens = shape, density, tokens
        self.count = round(density * out_features * in_features)
        self.weight = torch.randn(shape, generator=generator).to(device, dtype)
        self.indices = random_unique_indices(out_features * in_features, self.count, seed=0).to(device)
        self.long_indices = self.indices.long()
        self.coo_indices = torch.stack([self.long_indices // in_features, self.long_indices % in_features])
        self.crow, self.col = csr_pattern(self.indices, shape)
        self.values = (0.01 * torch.randn(self.count, generator=generator)).to(device)
        self.base_values = self.weight.view(-1)[self.long_indices]
        self.inputs = torch.randn(tokens, in_features, generator=generator).to(device, dtype)  # X [T, in]
        self.grad_output = torch.randn(tokens, out_features, generator=generator).to(device, dtype)  # dY [T, out]

    def dense_delta(self) -> torch.Tensor:
        delta = torch.sparse_coo_tensor(self.coo_indices, self.values.to(self.weight.dtype), self.shape)
        return delta.to_dense()

    def bytes_moved(self, kernel: str) -> int:
        element, index = self.weight.element_size(), self.indices.element_size()
        (out_features, in_features), tokens, count = self.shape, self.tokens, self.count
        activations = tokens * (out_features + in_features) * element
        return {
            "merge": count * (index + 2 * element + 4),
            "sddmm": activations + count * (2 * index + 4),
            "matmul": (out_features * in_features + tokens * in_features + 3 * tokens * out_features) * element
            + count * (index + 4),
            "scan": activations + count * 12,
        }[kernel]


def kernel_timings(case: Case, repeats: int, triton_path: bool) -> list[dict]:
    """Rows (kernel, baseline) with ours / reference / baseline times for one case."""
    device = case.weight.device
    weight = case.weight.clone()  # the baselines write into their own copy
    left, right = case.grad_output.t(), case.inputs  # dW = dY^T @ X: [out, in]

    def matmul_with(accumulate):
        def run():
            output = F.linear(case.inputs, case.weight)
            accumulate(output, case.inputs, case.crow, case.col, case.values)
            return output

        return run

    ops = {
        "merge": (
            lambda: scatter_assign(case.weight, case.indices, case.base_values, case.values),
            lambda: scatter_assign_reference(case.weight, case.indices, case.base_values, case.values),
            {
                "index_put_": lambda: weight.view(-1).index_put_(
                    (case.long_indices,), (case.base_values.float() + case.values).to(weight.dtype)
                ),
                "sparse_coo to_dense + add": lambda: weight.add_(case.dense_delta()),
            },
        ),
        "sddmm": (
            lambda: sampled_dense_dense_matmul(left, right, case.crow, case.col),
            lambda: sampled_dense_dense_matmul_reference(left, right, case.crow, case.col),
            {"dense dY^T X + gather": lambda: (left @ right).view(-1)[case.long_indices]},
        ),
        "matmul": (
            matmul_with(sparse_matmul_accumulate),
            matmul_with(sparse_matmul_accumulate_reference),
            {"dense X (W + delta)^T": lambda: F.linear(case.inputs, case.weight + case.dense_delta())},
        ),
        "scan": (
            lambda: topk_candidates(left, right, case.indices, case.count),
            lambda: topk_candidates_reference(left, right, case.indices, case.count),
            {"dense dY^T X + topk": lambda: torch.topk((left @ right).abs().view(-1), case.count)},
        ),
    }
    rows = []
    for kernel, (ours, reference, baselines) in ops.items():
        ours_ms = median_ms(ours, repeats, device)
        reference_ms = median_ms(reference, repeats, device) if triton_path else None
        for baseline, function in baselines.items():
            baseline_ms = median_ms(function, repeats, device)
            rows.append(
                {
                    "kernel": kernel,
                    "shape": list(case.shape),
                    "density": case.density,
                    "k": case.count,
                    "tokens": case.tokens,
                    "ours_ms": ours_ms,
                    "reference_ms": reference_ms,
                    "baseline": baseline,
                    "baseline_ms": baseline_ms,
                    "ours_vs_baseline": ours_ms / baseline_ms,
                    "ours_gbs": case.bytes_moved(kernel) / ours_ms / 1e6,
                }
            )
    return rows


def markdown_table(rows: list[dict], bandwidth_gbs: float) -> str:
    lines = [
        "| kernel | shape | density | k | ours ms | reference ms | baseline | baseline ms | ours / baseline "
        "| ours GB/s | % of BW |",
        "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        reference = f"{row['reference_ms']:.2f}" if row["reference_ms"] is not None else "= ours"
        lines.append(
            f"| {row['kernel']} | {row['shape'][0]}x{row['shape'][1]} | {100 * row['density']:g}% | {row['k']:,} "
            f"| {row['ours_ms']:.2f} | {reference} | {row['baseline']} | {row['baseline_ms']:.2f} "
            f"| {row['ours_vs_baseline']:.3f}x | {row['ours_gbs']:.2f} | {100 * row['ours_gbs'] / bandwidth_gbs:.1f}% |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1024x1024 and 4096x4096 at 1%% density only")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads for torch")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # bf16 matmuls are slow on CPU
    shapes, densities = (SHAPES[:2], [0.01]) if args.quick else (SHAPES, DENSITIES)
    probe = torch.empty(1, device=device)
    triton_path = use_triton(probe)
    bandwidth = copy_bandwidth_gbs(device, args.repeats)
    print(f"device {device}, {dtype}, {args.tokens} tokens, Triton path: {triton_path}, copy bandwidth {bandwidth:.1f} GB/s")

    rows = []
    for shape in shapes:
        for density in densities:
            rows.extend(kernel_timings(Case(shape, density, args.tokens, dtype, device), args.repeats, triton_path))
            print(markdown_table(rows[-5:], bandwidth), flush=True)
    print()
    print(markdown_table(rows, bandwidth))

    write_results(
        RESULTS, rows, device=str(device), dtype=str(dtype), triton_path=triton_path, tokens=args.tokens,
        repeats=args.repeats, quick=args.quick, copy_bandwidth_gbs=bandwidth,
        bandwidth_method="2 * 256 MiB / median time of copy_ between two 256 MiB fp32 buffers", bytes_model=BYTES_MODEL,
    )


if __name__ == "__main__":
    main()
