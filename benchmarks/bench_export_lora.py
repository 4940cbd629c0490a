"""Export, compress and mask a trained arithmetic SFT adapter; exact match and bytes after each tool.

Rows: the adapter itself; its stock-LoRA export (``export_to_lora``) at each ``--ranks``, loaded with
plain peft; ComPEFT (``compress_adapter``) at each ``--compress-densities``; Model Breadcrumbs
(``breadcrumbs_merge_adapters`` of the adapter alone, weight 1). Scores: exact match on the
held-out problems of ``examples/sft_arithmetic.py`` (same seed, same count). Writes
``benchmarks/results/bench_export_lora.json``.

    python examples/sft_arithmetic.py --output-dir outputs/sft-arithmetic   # the adapter (~5-20 min on CPU)
    python benchmarks/bench_export_lora.py --adapter outputs/sft-arithmetic
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from arithmetic_task import (  # noqa: E402
    arithmetic_problems, evaluate, load_model_and_tokenizer, pad_batch, training_example,
)  # fmt: skip
from benchmark_metadata import run_metadata, write_text_atomically  # noqa: E402

import peft_sparse  # noqa: E402
from peft_sparse.delta_tools import adapter_layers  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "bench_export_lora.json"


def adapter_bytes(folder: Path) -> int:
    return (folder / "adapter_model.safetensors").stat().st_size


def sparse_adapter_size(model: PeftModel, adapter_name: str, scratch: Path) -> dict:
    """Values and saved bytes of one sparse adapter of ``model`` (saved alone to ``scratch``)."""
    model.save_pretrained(scratch / adapter_name, selected_adapters=[adapter_name])
    folder = scratch / adapter_name if adapter_name == "default" else scratch / adapter_name / adapter_name
    values = sum(layer.num_values(adapter_name) for _, layer in adapter_layers(model, adapter_name))
    return {"values": values, "bytes": adapter_bytes(folder)}


def scored_row(tool: str, model, tokenizer, problems, started: float, **fields) -> dict:
    row = {"tool": tool, **fields, **evaluate(model, tokenizer, problems)}
    row["seconds"] = round(time.perf_counter() - started)
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="folder of a SparseConfig adapter trained on arithmetic")
    parser.add_argument("--model", default=None, help="base model id or path (default: embedded SmolLM2-135M)")
    parser.add_argument("--ranks", default="16,64,256")
    parser.add_argument("--compress-densities", default="0.01,0.005,0.0025")
    parser.add_argument("--breadcrumbs", default="0.1,0.01", help="beta,gamma")
    parser.add_argument("--eval-problems", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="the training run's seed (held-out problems: seed + 1000)")
    args = parser.parse_args()
    problems = arithmetic_problems(args.eval_problems, seed=args.seed + 1000)
    base, tokenizer = load_model_and_tokenizer(args.model)
    model = PeftModel.from_pretrained(base, args.adapter).eval()
    sample = pad_batch([training_example(tokenizer, q, a) for q, a in problems[:8]], tokenizer.pad_token_id)
    sample_inputs = {key: sample[key] for key in ("input_ids", "attention_mask")}

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        started = time.perf_counter()
        rows = [scored_row("SFT adapter", model, tokenizer, problems, started,
                           **sparse_adapter_size(model, "default", scratch))]  # fmt: skip
        for rank in map(int, args.ranks.split(",")):
            started = time.perf_counter()
            report = peft_sparse.export_to_lora(model, scratch / f"lora-{rank}", rank=rank, sample_inputs=sample_inputs)
            export_seconds = round(time.perf_counter() - started, 1)
            lora = PeftModel.from_pretrained(load_model_and_tokenizer(args.model)[0], report.path).eval()
            errors = torch.tensor(list(report.relative_errors.values()))
            rows.append(scored_row(
                f"export_to_lora r={rank}", lora, tokenizer, problems, started, rank=rank,
                values=sum(tensor.numel() for tensor in load_file(report.path / "adapter_model.safetensors").values()),
                bytes=adapter_bytes(report.path), export_seconds=export_seconds,
                mean_relative_error=round(float(errors.mean()), 4), max_relative_error=round(float(errors.max()), 4),
                max_logit_error=round(report.max_logit_error, 4),
            ))  # fmt: skip
            del lora

        for density in map(float, args.compress_densities.split(",")):
            started = time.perf_counter()
            name = f"compeft-{density:g}".replace(".", "_")  # "." cannot be in a parameter name
            peft_sparse.compress_adapter(model, density=density, compressed_name=name)
            model.set_adapter(name)
            rows.append(scored_row(f"ComPEFT density={density}", model, tokenizer, problems, started, density=density,
                                   **sparse_adapter_size(model, name, scratch)))  # fmt: skip

        beta, gamma = map(float, args.breadcrumbs.split(","))
        started = time.perf_counter()
        peft_sparse.breadcrumbs_merge_adapters(model, ["default"], [1.0], "breadcrumbs", beta=beta, gamma=gamma)
        model.set_adapter("breadcrumbs")
        size = sparse_adapter_size(model, "breadcrumbs", scratch)
        rows.append(scored_row(f"Breadcrumbs beta={beta} gamma={gamma}", model, tokenizer, problems, started,
                               beta=beta, gamma=gamma, **size))  # fmt: skip

    write_text_atomically(RESULTS, json.dumps(
        {"rows": rows, "adapter": str(args.adapter), "eval_problems": args.eval_problems, **run_metadata()}, indent=2
    ))  # fmt: skip
    print("| tool | values | bytes | exact match | relative error mean / max | max logit error |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        errors = f"{row['mean_relative_error']:.3f} / {row['max_relative_error']:.3f}" if "rank" in row else ""
        logit = f"{row['max_logit_error']:.2f}" if "rank" in row else ""
        print(f"| {row['tool']} | {row['values']:,} | {row['bytes']:,} | {row['exact_match']:.1%} | {errors} "
              f"| {logit} |")


if __name__ == "__main__":
    main()
