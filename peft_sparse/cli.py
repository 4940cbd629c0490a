"""Command line: ``python -m peft_sparse inspect ADAPTER_DIR [--base-model PATH_OR_HUB_ID] [--plot out.png]``,
``python -m peft_sparse plan --config CONFIG_OR_MODEL_DIR [--density D | --lora-rank R] [--strategy fsdp ...]``."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from . import memory_plan
from .summary import base_weight_shapes, configured_density, layer_table, overview, summarize_adapter


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m peft_sparse", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser(
        "inspect",
        help="print a per-layer summary of a saved adapter",
        description="Print a per-layer summary of a saved peft_sparse adapter (reads adapter_config.json and "
        "adapter_model.safetensors only).",
    )
    inspect.add_argument("adapter_dir", help="folder with adapter_config.json and adapter_model.safetensors")
    inspect.add_argument(
        "--base-model",
        metavar="PATH_OR_HUB_ID",
        help="the base model's local folder or Hub id: its safetensors headers give the weight shapes, hence "
        "density (SFT, LIFT)",
    )
    inspect.add_argument("--plot", metavar="PNG", help="also draw the per-layer heatmap (and logged selection) here")
    inspect.add_argument(
        "--log-history",
        metavar="PATH",
        help="trainer_state.json (or a checkpoint folder) for the plot's time series; default: ADAPTER_DIR's",
    )
    inspect.set_defaults(run=inspect_adapter)
    plan = commands.add_parser(
        "plan",
        help="print the per-device training memory of every method for a model config",
        description="Predict per-device training memory (base weights, adapter, gradients, AdamW state, selection "
        "statistics, activations) of every method and of LoRA at the same budget, from a config.json alone. "
        "Formulas: peft_sparse/memory_plan.py.",
    )
    plan.add_argument("--config", required=True, help="a model's config.json, or a local model folder holding one")
    plan.add_argument("--method", default="all", help=f"all, or one of {memory_plan.METHODS} (shown beside LoRA)")
    plan.add_argument("--density", type=float, help="fraction of each target matrix SFT/LIFT train (default 0.01)")
    plan.add_argument("--lora-rank", type=int, help="instead of --density: the budget of LoRA at this rank")
    plan.add_argument("--selection", default="ag", help="SFT's growth statistics: ag, ma or random (no window)")
    plan.add_argument("--dtype", default="bf16", help="storage and compute dtype of the base: bf16, fp16 or fp32")
    plan.add_argument("--quantized", help="4bit or 8bit: bitsandbytes target weights")
    plan.add_argument("--world-size", type=int, default=1)
    plan.add_argument("--strategy", default="ddp", help="ddp (replicated), fsdp or zero3 (sharded)")
    plan.add_argument("--batch-size", type=int, default=1, help="sequences per device and micro-batch")
    plan.add_argument("--seq-len", type=int, default=2048)
    plan.add_argument("--gradient-checkpointing", action="store_true")
    plan.add_argument("--autocast", action="store_true", help="16-bit autocast around the forward (Trainer bf16=True)")
    plan.set_defaults(run=print_plan)
    return parser


def inspect_adapter(args: argparse.Namespace) -> None:
    shapes = base_weight_shapes(args.base_model) if args.base_model else None
    summary = summarize_adapter(args.adapter_dir, base_shapes=shapes)
    for name, value in overview(summary).items():
        print(f"{name}: {value}")
    if summary.density is None and summary.method in ("SPARSE", "LIFT") and configured_density(summary) is None:
        print("(density needs the base weight shapes: pass --base-model PATH)")
    print()
    print(layer_table(summary))
    if args.plot:
        from .plot import plot_adapter

        path = plot_adapter(args.plot, adapter_dir=args.adapter_dir, log_history=args.log_history, base_shapes=shapes)
        print(f"\nplot written to {path}")


def print_plan(args: argparse.Namespace) -> None:
    if args.method != "all" and args.method not in memory_plan.METHODS:
        raise ValueError(f"--method must be 'all' or one of {memory_plan.METHODS}, got {args.method!r}")
    shape = memory_plan.load_decoder_shape(args.config)
    budget = memory_plan.Budget(density=args.density, lora_rank=args.lora_rank)
    setup = memory_plan.TrainingSetup(
        dtype=args.dtype, quantized=args.quantized, world_size=args.world_size, strategy=args.strategy,
        batch_size=args.batch_size, seq_len=args.seq_len, gradient_checkpointing=args.gradient_checkpointing,
        autocast=args.autocast,
    )  # fmt: skip
    methods = memory_plan.METHODS if args.method == "all" else tuple(dict.fromkeys((args.method, "lora")))
    print(memory_plan.plan_report(shape, budget, setup, methods, args.selection, source=args.config))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status (2 with a message on stderr for bad input)."""
    args = _parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
