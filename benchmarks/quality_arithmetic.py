"""The arithmetic SFT quality task: LIFT vs SFT vs LoRA vs full FT on SmolLM2-135M.

Each method trains with TRL's SFTTrainer (``examples/lift_arithmetic_trl.py``) for the same steps;
adapters get LoRA rank ``r``'s number of trainable values. Scores: exact match on held-out
problems, and the rise of the loss on held-out GSM8K questions (forgetting). Rows are merged into
``benchmarks/results/bench_quality.json`` (task "arithmetic") next to the classification rows.

    python benchmarks/quality_arithmetic.py --methods lift,sft,lora,full --steps 80 --batch-size 16
    python benchmarks/quality_arithmetic.py --methods lora --lr-multipliers 0.5,2   # learning-rate grid
    python benchmarks/quality_arithmetic.py --methods sft --dtype bfloat16 --exact-delta   # row "sft-bf16-exact"
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import lift_arithmetic_trl  # noqa: E402  (examples/ is not a package)
from bench_quality import environment, merge_results  # noqa: E402

ARITHMETIC_METHODS = lift_arithmetic_trl.METHODS
# Learning rates: full FT and LoRA from ../shared/BENCHMARKS.md; SFT as in the SFT demo; LIFT trains
# a few % of every matrix, between the two.
# SaRA, HFT, ID3 and LT-SFT train sparse values at SFT's budget: SFT's rate; RoSA LoRA's and SFT's (both 1e-3) (LT-SFT's dense phase: full FT's,
# lift_arithmetic_trl's --dense-learning-rate default).
DEFAULT_LEARNING_RATES = {
    "lift": 5e-4, "sft": 1e-3, "lora": 1e-3, "full": 2e-5, "sara": 1e-3, "hft": 1e-3, "id3": 1e-3, "lt-sft": 1e-3, "s2ft": 1e-3,
    "rosa": 1e-3,
}
DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16"}


def row_method(method: str, dtype: str, exact_delta: bool) -> str:
    """The row's method name: ``method`` on an fp32 base with the delta in place, else e.g. "sft-bf16-exact"."""
    if (dtype, exact_delta) == ("float32", False):
        return method
    return f"{method}-{DTYPE_NAMES[dtype]}-{'exact' if exact_delta else 'inplace'}"


def run_arithmetic(method: str, settings: dict, args: argparse.Namespace) -> dict:
    """Train ``method`` on generated arithmetic and score it; ``settings``: ``r``, ``learning_rate``, ``steps``, ``batch_size``, ``eval_problems``."""
    with tempfile.TemporaryDirectory() as output_dir:
        example_args = lift_arithmetic_trl.argument_parser().parse_args([
            "--method", method, "--learning-rate", str(settings["learning_rate"]),
            "--budget-rank", str(settings["r"]), "--steps", str(settings["steps"]),
            "--batch-size", str(settings["batch_size"]), "--eval-problems", str(settings["eval_problems"]),
            "--output-dir", output_dir, "--seed", str(args.seed), "--dtype", args.dtype,
            *(["--exact-delta"] if args.exact_delta else []),
        ])  # fmt: skip
        if args.model:
            example_args.model = args.model
        return lift_arithmetic_trl.train_and_evaluate(example_args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(ARITHMETIC_METHODS), help=f"from {ARITHMETIC_METHODS}")
    parser.add_argument("--r", type=int, default=16, help="LoRA rank whose parameter count every adapter gets")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval-problems", type=int, default=128)
    parser.add_argument("--model", default=None, help="causal LM id or path (default: embedded SmolLM2-135M)")
    parser.add_argument("--seed", type=int, default=0,
                        help="training problems, adapter init and held-out problems (each seed is its own grid point)")
    parser.add_argument("--dtype", default="float32", choices=tuple(DTYPE_NAMES),
                        help="dtype of the base model's weights (trainable values stay fp32)")
    parser.add_argument("--exact-delta", action="store_true",
                        help="LIFT/SFT: delta_in_place=False, the delta as a separate fp32 sparse term")
    parser.add_argument("--lr-multipliers", type=lambda text: [float(value) for value in text.split(",")],
                        default=[1.0], help="learning-rate grid: multiples of each method's default, e.g. 0.5,1,2")
    args = parser.parse_args()
    sparse_delta_methods = ("lift", "sft", "sara", "hft", "s2ft", "id3", "lt-sft", "rosa")
    if args.exact_delta and not set(args.methods.split(",")) <= set(sparse_delta_methods):
        parser.error(f"--exact-delta applies to {', '.join(sparse_delta_methods)} only, got --methods {args.methods}")
    rows = []
    for method, multiplier in [(m, x) for m in args.methods.split(",") for x in args.lr_multipliers]:
        settings = {"r": args.r, "learning_rate": DEFAULT_LEARNING_RATES[method] * multiplier, "steps": args.steps,
                    "batch_size": args.batch_size, "eval_problems": args.eval_problems, "seed": args.seed}
        name = row_method(method, args.dtype, args.exact_delta)
        if name != method:
            settings |= {"dtype": args.dtype, "delta_in_place": not args.exact_delta}
        started = time.perf_counter()
        metrics = {**run_arithmetic(method, settings, args), "method": name}
        point = {"task": "arithmetic", "method": name, "settings": settings, **metrics,
                 "wall_seconds": round(time.perf_counter() - started), "environment": environment()}
        print(json.dumps(point), flush=True)
        merge_results("arithmetic", name, [point], score_key="exact_match")
        rows.append(point)
    print("| method | lr | trainable | exact match | general-text loss rise | train s |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['method']} | {row['settings']['learning_rate']:.0e} | {row['trainable_params']:,} "
              f"| {row['exact_match']:.1%} | {row['general_loss_rise']:+.3f} | {row['train_seconds']:.0f} |")


if __name__ == "__main__":
    main()
