"""Adapter file size and load time: sparse-delta format 1 vs format 2 (fp32 and bf16 values) vs LoRA.

On the embedded SmolLM2-135M-Instruct (or the tiny test Llama with --tiny), a SparseConfig adapter
at 1% density (random indices, random values) is saved in format 2 with fp32 and bf16 values, and
rewritten in format 1's layout (int32 indices + fp32 values); LoRA of rank --lora-r over the same
target modules is saved in fp32 and bf16. Reported per file: bytes, bytes per trainable value, the
ratio to LoRA's bytes per value in the same value dtype, the time to read the file into tensors
(safetensors load + decoding the index gaps; median of --repeats), and the time of
``PeftModel.from_pretrained`` onto a fresh copy of the base model (one run).

    python benchmarks/bench_adapter_size.py [--tiny] [--density 0.01] [--lora-r 4] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import peft_sparse  # noqa: E402,F401  (registers the methods)
from benchmarks.benchmark_metadata import write_results  # noqa: E402
from peft_sparse import SparseConfig  # noqa: E402
from peft_sparse.sparse.compact_format import expand_tensors  # noqa: E402

WEIGHTS = "adapter_model.safetensors"
RESULTS = Path(__file__).resolve().parent / "results" / "bench_adapter_size.json"


def load_base(tiny: bool) -> tuple[torch.nn.Module, str]:
    if tiny:
        from tests.conftest import make_tiny_llama

        return make_tiny_llama(), "tiny Llama (tests/conftest.py)"
    from transformers import AutoModelForCausalLM

    from peft_sparse.embedded_model import embedded_model_path

    model = AutoModelForCausalLM.from_pretrained(embedded_model_path(), dtype=torch.float32)
    return model.eval(), "SmolLM2-135M-Instruct (embedded Q4_1 GGUF, dequantized to fp32)"


def save_format_1(format_2_dir: Path, target: Path) -> None:
    """Rewrite a format-2 fp32 adapter as format 1 wrote it: int32 indices, fp32 values, ``format_version`` 1."""
    target.mkdir()
    config = json.loads((format_2_dir / "adapter_config.json").read_text())
    (target / "adapter_config.json").write_text(json.dumps(config | {"format_version": 1}))
    tensors = expand_tensors(load_file(format_2_dir / WEIGHTS))
    save_file({key: tensor.to(torch.int32) if key.endswith("_indices") else tensor for key, tensor in tensors.items()},
              target / WEIGHTS, metadata={"format": "pt"})  # fmt: skip


def trainable_count(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)


def read_ms(folder: Path, repeats: int) -> float:
    """Median time to read the file into tensors (decoding index gaps where there are any)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        expand_tensors(load_file(folder / WEIGHTS))
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def from_pretrained_s(base: torch.nn.Module, folder: Path) -> tuple[float, PeftModel]:
    fresh = copy.deepcopy(base)
    start = time.perf_counter()
    loaded = PeftModel.from_pretrained(fresh, folder)
    return time.perf_counter() - start, loaded


def adapter_values(model: PeftModel) -> dict[str, torch.Tensor]:
    return {name: layer.delta_values["default"].detach() for name, layer in model.base_model.sparse_delta_layers()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny test Llama instead of SmolLM2-135M")
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--lora-r", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    base, source = load_base(args.tiny)
    work = Path(tempfile.mkdtemp(prefix="bench_adapter_size-"))
    sparse = get_peft_model(copy.deepcopy(base), SparseConfig(density=args.density, init_weights=False))
    sparse_count = trainable_count(sparse)
    sparse.save_pretrained(work / "v2-fp32")
    sparse.peft_config["default"].save_dtype = "bfloat16"
    sparse.save_pretrained(work / "v2-bf16")
    save_format_1(work / "v2-fp32", work / "v1-fp32")
    del sparse
    lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=args.lora_r, target_modules="all-linear"))
    lora_count = trainable_count(lora)
    lora.save_pretrained(work / "lora-fp32")
    lora.to(torch.bfloat16).save_pretrained(work / "lora-bf16")
    del lora

    variants = [
        ("v1-fp32", "sparse, format 1", "fp32", sparse_count),
        ("v2-fp32", "sparse, format 2", "fp32", sparse_count),
        ("v2-bf16", "sparse, format 2", "bf16", sparse_count),
        ("lora-fp32", f"LoRA r={args.lora_r}", "fp32", lora_count),
        ("lora-bf16", f"LoRA r={args.lora_r}", "bf16", lora_count),
    ]
    lora_bytes_per_value = {
        dtype: (work / folder / WEIGHTS).stat().st_size / count
        for folder, _, dtype, count in variants
        if folder.startswith("lora")
    }
    rows, loaded_values = [], {}
    for folder, layout, dtype, count in variants:
        size = (work / folder / WEIGHTS).stat().st_size
        load_s, loaded = from_pretrained_s(base, work / folder)
        if folder.startswith("v"):
            loaded_values[folder] = adapter_values(loaded)
        del loaded
        rows.append(
            {
                "workload": "tiny-llama" if args.tiny else "smollm2-135m",
                "source": source,
                "adapter": layout,
                "values_dtype": dtype,
                "trainable_values": count,
                "bytes": size,
                "bytes_per_value": size / count,
                "vs_lora_same_dtype": size / count / lora_bytes_per_value[dtype],
                "read_ms_median": read_ms(work / folder, args.repeats),
                "from_pretrained_s": load_s,
            }
        )
    same = all(torch.equal(loaded_values["v1-fp32"][name], loaded_values["v2-fp32"][name])
               for name in loaded_values["v1-fp32"])  # fmt: skip
    print(f"format 1 and format 2 (fp32) load bit-identical values: {same}")
    print(f"{'adapter':<18} {'dtype':<5} {'values':>10} {'bytes':>11} {'B/value':>8} {'vs LoRA':>8} "
          f"{'read ms':>8} {'load s':>7}")  # fmt: skip
    for row in rows:
        print(
            f"{row['adapter']:<18} {row['values_dtype']:<5} {row['trainable_values']:>10,} {row['bytes']:>11,} "
            f"{row['bytes_per_value']:>8.3f} {row['vs_lora_same_dtype']:>7.2f}x {row['read_ms_median']:>8.1f} "
            f"{row['from_pretrained_s']:>7.2f}"
        )
    write_results(
        RESULTS, rows, density=args.density, lora_r=args.lora_r, repeats=args.repeats,
        v1_v2_bit_identical=same,
    )  # fmt: skip


if __name__ == "__main__":
    main()
