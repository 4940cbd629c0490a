"""Time for LIFT to select principal-weight masks for every linear layer of SmolLM2-135M (goal: < 30 s on 2 cores).

Runs ``get_peft_model(model, LiftConfig(...))`` (SVD + top-k, layer by layer) for each SVD method
and rank, and reports wall time, the number of matrices, the trainable entries, and how many of the
entries the randomized SVD selects are also selected by the exact one.

    python benchmarks/bench_lift_selection.py --ranks 128 --density 0.05
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from peft import get_peft_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from arithmetic_task import load_model_and_tokenizer  # noqa: E402
from benchmark_metadata import write_results  # noqa: E402

from peft_sparse import LiftConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="causal LM id or path (default: embedded SmolLM2-135M)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--density", type=float, default=0.05)
    args = parser.parse_args()

    base, _ = load_model_and_tokenizer(args.model)
    rows = []
    for rank in args.ranks:
        selected: dict[str, dict[str, torch.Tensor]] = {}
        for svd_method in ("exact", "randomized"):
            started = time.perf_counter()
            model = get_peft_model(base, LiftConfig(density=args.density, rank=rank, svd_method=svd_method))
            seconds = time.perf_counter() - started
            selected[svd_method] = {
                name: layer.lift_indices["default"].clone() for name, layer in model.base_model.sparse_delta_layers()
            }
            base = model.unload()  # restores the base weights bit-exactly for the next run
            overlaps = [
                torch.isin(indices, selected["exact"][name]).float().mean().item()
                for name, indices in selected[svd_method].items()
            ]
            rows.append(dict(
                svd_method=svd_method, rank=rank, matrices=len(overlaps),
                trainable=sum(indices.numel() for indices in selected[svd_method].values()),
                seconds=round(seconds, 2), overlap_with_exact_mean=round(sum(overlaps) / len(overlaps), 4),
                overlap_with_exact_min=round(min(overlaps), 4),
            ))  # fmt: skip
    print("| svd_method | rank | matrices | trainable entries | select s | overlap with exact (mean / min) |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['svd_method']} | {row['rank']} | {row['matrices']} | {row['trainable']:,} | {row['seconds']:.1f} "
            f"| {row['overlap_with_exact_mean']:.3f} / {row['overlap_with_exact_min']:.3f} |"
        )
    write_results(Path(__file__).parent / "results" / "bench_lift_selection.json", rows, density=args.density)


if __name__ == "__main__":
    main()
