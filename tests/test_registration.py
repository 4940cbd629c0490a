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
from peft_sparse import SparseConfig, SparseModel
from tests.conftest import SPARSE_DELTA_CONFIGS, make_tiny_llama, randomize_values

CHILD = textwrap.dedent(
    """
    import sys, torch
    import peft_sparse
    from peft import AutoPeftModelForCausalLM, PeftConfig, PeftType
    from peft_sparse.sparse import SparseDeltaLayer

    adapter_dir, input_ids_path, config_name, peft_type = sys.argv[1:5]
    expected = torch.load(input_ids_path)
    config = PeftConfig.from_pretrained(adapter_dir)
    assert type(config).__name__ == config_name, type(config)
    assert config.peft_type is PeftType[peft_type] and config.peft_type.value == peft_type
    model = AutoPeftModelForCausalLM.from_pretrained(adapter_dir).eval()
    with torch.no_grad():
        logits = model(input_ids=expected["input_ids"]).logits
    torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=1e-5)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, SparseDeltaLayer) for m in merged.modules())
    with torch.no_grad():
        merged_logits = merged(input_ids=expected["input_ids"]).logits
    torch.testing.assert_close(merged_logits, expected["logits"], rtol=0, atol=1e-5)
    print("CHILD-OK")
    """
)


@pytest.mark.parametrize("method", sorted(SPARSE_DELTA_CONFIGS))
def test_saved_adapter_loads_in_fresh_interpreter(tmp_path, input_ids, method):
    make_tiny_llama().save_pretrained(tmp_path / "base")
    base = LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()  # records base_model_name_or_path
    config = SPARSE_DELTA_CONFIGS[method](task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    randomize_values(model)
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    model.save_pretrained(tmp_path / "adapter")
    torch.save({"input_ids": input_ids, "logits": logits}, tmp_path / "expected.pt")

    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == config.peft_type.value == method.upper()
    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "pt") as handle:
        keys = list(handle.keys())
    assert keys and all(key.endswith((f"{method}_values", f"{method}_indices")) for key in keys)

    child_args = [str(tmp_path / "adapter"), str(tmp_path / "expected.pt"), type(config).__name__, method.upper()]
    result = subprocess.run(
        [sys.executable, "-c", CHILD, *child_args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "CHILD-OK" in result.stdout


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
