"""How much of a sparse delta survives ``dequantize -> W + delta -> re-quantize`` (why merging into a 4-bit/8-bit base is refused).

For each target matrix of the first decoder blocks of SmolLM2-135M-Instruct (the embedded GGUF
weights, or Gaussian std-0.02 stand-ins with --random), a 1%-density delta with Gaussian values of a
given std is added to the dequantized weight, which is then re-quantized (NF4 blocks of 64, or
LLM.int8 row-wise). Reported: the fraction of delta entries that rounding leaves with no change at
all, and ``||merged delta - delta|| / ||delta||``.

    python benchmarks/bench_requantize_merge.py [--blocks 2] [--random]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from bitsandbytes.functional import dequantize_4bit, int8_vectorwise_dequant, int8_vectorwise_quant, quantize_4bit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.benchmark_metadata import write_results  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DELTA_STDS = (1e-4, 1e-3, 1e-2)
DENSITY = 0.01


def round_trip_nf4(weight: torch.Tensor) -> torch.Tensor:
    packed, state = quantize_4bit(weight, quant_type="nf4", blocksize=64)
    return dequantize_4bit(packed, state)


def round_trip_int8(weight: torch.Tensor) -> torch.Tensor:
    quantized, scales, _ = int8_vectorwise_quant(weight)
    return int8_vectorwise_dequant(quantized, scales)


QUANTIZERS = {"nf4": round_trip_nf4, "int8": round_trip_int8}


def target_weights(blocks: int, random: bool) -> tuple[list[torch.Tensor], str]:
    if random:
        generator = torch.Generator().manual_seed(0)
        shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
        return [torch.randn(shape, generator=generator) * 0.02 for shape in shapes * blocks], "Gaussian std 0.02"
    from examples.arithmetic_task import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(None)
    weights = [
        module.weight.detach().float().clone()
        for name, module in model.named_modules()
        if name.split(".")[-1] in TARGETS and int(name.split(".")[2]) < blocks
    ]
    return weights, f"SmolLM2-135M-Instruct GGUF, first {blocks} blocks"


def measure(weights: list[torch.Tensor]) -> list[dict]:
    generator = torch.Generator().manual_seed(1)
    rows = []
    for quantization, round_trip in QUANTIZERS.items():
        for std in DELTA_STDS:
            unchanged = total = 0
            error_sq = delta_sq = 0.0
            for weight in weights:
                base = round_trip(weight)  # what a quantized base layer holds
                count = round(DENSITY * weight.numel())
                indices = torch.randperm(weight.numel(), generator=generator)[:count]
                delta = torch.zeros(weight.numel())
                delta[indices] = torch.randn(count, generator=generator) * std
                delta = delta.view_as(weight)
                merged_delta = round_trip(base + delta) - base
                unchanged += int((merged_delta.view(-1)[indices] == 0).sum())
                total += count
                error_sq += float((merged_delta - delta).square().sum())
                delta_sq += float(delta.square().sum())
            rows.append(
                {
                    "quantization": quantization,
                    "delta_std": std,
                    "entries_unchanged": unchanged / total,
                    "relative_error": (error_sq / delta_sq) ** 0.5,
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=2, help="decoder blocks whose matrices are measured")
    parser.add_argument("--random", action="store_true", help="Gaussian stand-in weights instead of SmolLM2")
    args = parser.parse_args()
    weights, source = target_weights(args.blocks, args.random)
    rows = measure(weights)
    print(f"{len(weights)} matrices ({source}), delta density {DENSITY:.0%}\n")
    print("| base | delta std | delta entries rounded to no change | relative error of merged delta |")
    print("|---|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['quantization']} | {row['delta_std']:g} | {row['entries_unchanged']:.0%} "
            f"| {row['relative_error']:.2f} |"
        )
    write_results(Path(__file__).parent / "results" / "bench_requantize_merge.json", rows, source=source)


if __name__ == "__main__":
    main()
