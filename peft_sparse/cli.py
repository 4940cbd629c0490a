"""Command line: ``python -m peft_sparse inspect ADAPTER_DIR [--base-model PATH_OR_HUB_ID] [--plot out.png]``."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .summary import base_weight_shapes, layer_table, overview, summarize_adapter


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
    inspect.add_argument("--plot", metavar="PNG", help="also draw the per-layer bars (and logged selection) here")
    inspect.add_argument(
        "--log-history",
        metavar="PATH",
        help="trainer_state.json (or a checkpoint folder) for the plot's time series; default: ADAPTER_DIR's",
    )
    return parser


def inspect_adapter(args: argparse.Namespace) -> None:
    shapes = base_weight_shapes(args.base_model) if args.base_model else None
    summary = summarize_adapter(args.adapter_dir, base_shapes=shapes)
    for name, value in overview(summary).items():
        print(f"{name}: {value}")
    if summary.density is None and summary.method in ("SPARSE", "LIFT"):
        print("(density needs the base weight shapes: pass --base-model PATH)")
    print()
    print(layer_table(summary))
    if args.plot:
        from .plot import plot_adapter

        path = plot_adapter(args.plot, adapter_dir=args.adapter_dir, log_history=args.log_history, base_shapes=shapes)
        print(f"\nplot written to {path}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status (2 with a message on stderr for bad input)."""
    args = _parser().parse_args(argv)
    try:
        inspect_adapter(args)
    except (ValueError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
