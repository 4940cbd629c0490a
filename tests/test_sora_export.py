"""SoRA adapters: save/load as SORA, and export to a stock peft LoRA that loads without peft_sparse."""

import json
import textwrap

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import GPT2LMHeadModel, LlamaForCausalLM

from peft_sparse import SoraConfig, export_sora_to_lora
from peft_sparse.tuners.sora import SoraLinear
from tests.conftest import make_tiny_gpt2, make_tiny_llama, run_child
from tests.test_sora import logits_of, randomize_sora

STOCK_PEFT_CHILD = textwrap.dedent(
    """
    import sys, torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    for base_dir, lora_dir, expected_path in zip(*[iter(sys.argv[1:])] * 3):
        expected = torch.load(expected_path)
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), lora_dir).eval()
        assert type(model.peft_config["default"]).__name__ == "LoraConfig"
        with torch.no_grad():
            logits = model(input_ids=expected["input_ids"]).logits
        torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=1e-5)
    assert not any(name.startswith(("peft_sparse", "trl_callbacks")) for name in sys.modules)
    print("CHILD-OK")
    """
)

SORA_CHILD = textwrap.dedent(
    """
    import sys, torch
    import peft_sparse
    from peft import AutoPeftModelForCausalLM, PeftConfig

    adapter_dir, expected_path = sys.argv[1], sys.argv[2]
    expected = torch.load(expected_path)
    assert type(PeftConfig.from_pretrained(adapter_dir)).__name__ == "SoraConfig"
    model = AutoPeftModelForCausalLM.from_pretrained(adapter_dir).eval()
    with torch.no_grad():
        logits = model(input_ids=expected["input_ids"]).logits
        torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=1e-5)
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=expected["input_ids"]).logits, expected["logits"], rtol=0, atol=1e-5)
    print("CHILD-OK")
    """
)


def trained_looking_sora(base, dead_layer: str):
    """A SoRA model with random B and gates, some ranks dead, and every rank of ``dead_layer`` dead."""
    model = get_peft_model(base, SoraConfig(r=4, alpha=6.0))
    randomize_sora(model)
    with torch.no_grad():
        for name, layer in model.base_model.sora_layers():
            gate = layer.sora_gate["default"]
            gate[1] = 0.0
            if name == dead_layer:
                gate.zero_()
    return model


def test_export_loads_in_stock_peft_without_peft_sparse(tmp_path, input_ids):
    cases = [
        (make_tiny_llama, LlamaForCausalLM, "model.layers.1.mlp.up_proj", "model.layers.0.self_attn.q_proj"),
        (make_tiny_gpt2, GPT2LMHeadModel, "transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_fc"),
    ]
    child_args = []
    for make_base, model_cls, dead_layer, some_layer in cases:
        base_dir = tmp_path / model_cls.__name__ / "base"
        make_base().save_pretrained(base_dir)
        model = trained_looking_sora(model_cls.from_pretrained(base_dir).eval(), dead_layer)
        expected = logits_of(model, input_ids)
        lora_dir = export_sora_to_lora(model, tmp_path / model_cls.__name__ / "lora")
        torch.save({"input_ids": input_ids, "logits": expected}, tmp_path / model_cls.__name__ / "expected.pt")
        child_args += [base_dir, lora_dir, tmp_path / model_cls.__name__ / "expected.pt"]

        saved = json.loads((lora_dir / "adapter_config.json").read_text())
        assert saved["peft_type"] == "LORA" and saved["fan_in_fan_out"] == (model_cls is GPT2LMHeadModel)
        assert dead_layer not in saved["target_modules"] and some_layer in saved["target_modules"]
        assert len(saved["target_modules"]) == len(list(model.base_model.sora_layers())) - 1
        assert set(saved["rank_pattern"].values()) == {3}
        assert list(saved["alpha_pattern"].values()) == pytest.approx([1.5 * 3] * len(saved["target_modules"]))
        assert saved["lora_alpha"] / saved["r"] == 1.5  # the same scale for servers that ignore the patterns
        tensors = load_file(lora_dir / "adapter_model.safetensors")
        layer = model.base_model.model.get_submodule(some_layer)
        keep = [0, 2, 3]
        key = f"base_model.model.{some_layer}"
        assert torch.equal(tensors[f"{key}.lora_A.weight"], layer.sora_A["default"].detach()[keep])
        torch.testing.assert_close(
            tensors[f"{key}.lora_B.weight"], layer.sora_B["default"].detach()[:, keep] * layer.sora_gate["default"][keep]
        )
        assert not any(dead_layer in k for k in tensors)
    run_child(STOCK_PEFT_CHILD, *child_args)


def test_export_keeps_modules_to_save_and_replaces_existing_folder(tmp_path, input_ids):
    model = get_peft_model(make_tiny_llama(), SoraConfig(r=4, modules_to_save=["lm_head"]))
    randomize_sora(model)
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(2)
    expected = logits_of(model, input_ids)
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "stale.txt").write_text("old")
    lora_dir = export_sora_to_lora(model, tmp_path / "lora")
    assert sorted(p.name for p in lora_dir.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora"]  # no staging or old folder left behind
    loaded = PeftModel.from_pretrained(make_tiny_llama(), lora_dir)
    assert type(loaded.peft_config["default"]).__name__ == "LoraConfig"
    torch.testing.assert_close(logits_of(loaded, input_ids), expected, rtol=0, atol=1e-5)


def test_export_of_second_adapter(tmp_path, input_ids):
    model = get_peft_model(make_tiny_llama(), SoraConfig(r=4))
    model.add_adapter("other", SoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    randomize_sora(model, "other", seed=5)
    model.set_adapter("other")
    expected = logits_of(model, input_ids)
    lora_dir = export_sora_to_lora(model, tmp_path / "lora", adapter_name="other")
    saved = json.loads((lora_dir / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == sorted(
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    )
    loaded = PeftModel.from_pretrained(make_tiny_llama(), lora_dir)
    torch.testing.assert_close(logits_of(loaded, input_ids), expected, rtol=0, atol=1e-5)


def test_export_errors(tmp_path):
    model = get_peft_model(make_tiny_llama(), SoraConfig(r=2))
    with pytest.raises(ValueError, match=r"adapter_name must be one of \['default'\], got 'nope'"):
        export_sora_to_lora(model, tmp_path / "lora", adapter_name="nope")
    with torch.no_grad():
        for gate in model.base_model.gates():
            gate.zero_()
    with pytest.raises(ValueError, match="every gate of adapter 'default' is zero"):
        export_sora_to_lora(model, tmp_path / "lora")
    assert not (tmp_path / "lora").exists()
    with pytest.raises(ValueError, match="model must be a PeftModel with a SoraConfig adapter, got LlamaForCausalLM"):
        export_sora_to_lora(make_tiny_llama(), tmp_path / "lora")


def test_sora_adapter_saves_and_loads_in_fresh_interpreter(tmp_path, input_ids):
    make_tiny_llama().save_pretrained(tmp_path / "base")
    model = get_peft_model(LlamaForCausalLM.from_pretrained(tmp_path / "base").eval(), SoraConfig(r=4))
    randomize_sora(model)
    expected = logits_of(model, input_ids)
    model.save_pretrained(tmp_path / "adapter")
    torch.save({"input_ids": input_ids, "logits": expected}, tmp_path / "expected.pt")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "SORA" and saved["r"] == 4
    keys = load_file(tmp_path / "adapter" / "adapter_model.safetensors").keys()
    assert keys and all(key.endswith(("sora_A", "sora_B", "sora_gate")) for key in keys)
    assert not any(isinstance(m, SoraLinear) for m in make_tiny_llama().modules())
    run_child(SORA_CHILD, tmp_path / "adapter", tmp_path / "expected.pt")
