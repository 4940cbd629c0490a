import importlib
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import PeftType, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from safetensors import safe_open
from transformers import LlamaForCausalLM

import peft_sparse
from peft_sparse import SnellConfig, SoraConfig, SparseConfig, SparseModel
from tests.conftest import SPARSE_DELTA_CONFIGS, make_tiny_llama

CHILD = textwrap.dedent(
    """
    import sys, torch
    import peft_sparse
    from peft import AutoPeftModelForCausalLM, PeftConfig, PeftType
    from peft.tuners.tuners_utils import BaseTunerLayer

    for adapter_dir, expected_path, config_name, peft_type in zip(*[iter(sys.argv[1:])] * 4):
        expected = torch.load(expected_path)
        config = PeftConfig.from_pretrained(adapter_dir)
        assert type(config).__name__ == config_name, type(config)
        assert config.peft_type is PeftType[peft_type] and config.peft_type.value == peft_type
        model = AutoPeftModelForCausalLM.from_pretrained(adapter_dir).eval()
        with torch.no_grad():
            logits = model(input_ids=expected["input_ids"]).logits
        torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=1e-5)
        merged = model.merge_and_unload()
        assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
        with torch.no_grad():
            merged_logits = merged(input_ids=expected["input_ids"]).logits
        torch.testing.assert_close(merged_logits, expected["logits"], rtol=0, atol=1e-4)
        print("CHILD-OK", peft_type)
    """
)

# Every registered method, with a small config (LIFT and SNELL use their own fields).
ADAPTER_CONFIGS = {
    **SPARSE_DELTA_CONFIGS,
    "sora": lambda **kwargs: SoraConfig(r=2, **kwargs),
    "snell": lambda **kwargs: SnellConfig(r=4, sparsity=0.5, **kwargs),
}


def randomize_adapter(model: torch.nn.Module) -> None:
    """Move every trainable adapter tensor off its initial value (so the delta is non-zero for every method)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)


def test_saved_adapters_load_in_fresh_interpreter(tmp_path, input_ids):
    """One fresh interpreter loads every method's adapter (one process keeps the import cost down)."""
    make_tiny_llama().save_pretrained(tmp_path / "base")
    child_args = []
    for method, make_config in ADAPTER_CONFIGS.items():
        base = LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()  # records base_model_name_or_path
        config = make_config(task_type="CAUSAL_LM")
        model = get_peft_model(base, config)
        randomize_adapter(model)
        with torch.no_grad():
            logits = model(input_ids=input_ids).logits
        model.save_pretrained(tmp_path / method)
        torch.save({"input_ids": input_ids, "logits": logits}, tmp_path / f"{method}.pt")

        saved = json.loads((tmp_path / method / "adapter_config.json").read_text())
        assert saved["peft_type"] == config.peft_type.value == method.upper()
        with safe_open(tmp_path / method / "adapter_model.safetensors", "pt") as handle:
            keys = list(handle.keys())
        assert keys and all(key.rsplit(".", 1)[-1].startswith(f"{method}_") for key in keys)
        child_args += [str(tmp_path / method), str(tmp_path / f"{method}.pt"), type(config).__name__, method.upper()]

    result = subprocess.run(
        [sys.executable, "-c", CHILD, *child_args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[:-1] == [f"CHILD-OK {method.upper()}" for method in ADAPTER_CONFIGS]


def test_registering_twice_is_harmless():
    importlib.reload(peft_sparse.registration)
    peft_sparse.registration.register_methods()
    peft_sparse.registration.register_methods()
    assert PeftType("SPARSE") is PeftType.SPARSE
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.SPARSE] is SparseConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.SPARSE] is SparseModel
    for name, _, config_name, model_name in peft_sparse.registration.METHODS:
        assert list(PeftType).count(PeftType[name]) == 1
        assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType[name]] is getattr(peft_sparse, config_name)
        assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType[name]] is getattr(peft_sparse, model_name)


def test_adapter_name_with_a_dot_is_refused_and_the_model_keeps_its_adapter():
    model = get_peft_model(make_tiny_llama(), peft_sparse.SparseConfig(density=0.1, target_modules=["q_proj"]))
    with pytest.raises(KeyError, match=r'adapter_name must not contain "\."'):
        model.add_adapter("a.b", peft_sparse.SparseConfig(density=0.1, target_modules=["q_proj"]))
    assert list(model.peft_config) == ["default"]
    assert all("a.b" not in name for name, _ in model.named_parameters())
