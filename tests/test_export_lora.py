"""export_to_lora: any adapter -> stock peft LoRA through a truncated SVD of each layer's delta."""

import json

import pytest
import torch
from peft import get_peft_model
from transformers import GPT2LMHeadModel, LlamaForCausalLM

from peft_sparse import SnellConfig, SoraConfig, SparseConfig, export_to_lora
from peft_sparse.export import truncated_factors
from peft_sparse.sparse import SparseDeltaLayer
from tests.conftest import make_tiny_gpt2, make_tiny_llama, randomize_values
from tests.test_sora import logits_of
from tests.test_sora_export import STOCK_PEFT_CHILD, run_child


def sparse_model(make_base=make_tiny_llama, **config):
    model = get_peft_model(make_base(), SparseConfig(**{"density": 0.1, **config}))
    randomize_values(model)
    return model


def delta_with_spectrum(singular_values: list[float], shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """A [rows, cols] matrix with exactly these singular values (random orthonormal singular vectors)."""
    generator = torch.Generator().manual_seed(seed)
    rank = len(singular_values)
    left = torch.linalg.qr(torch.randn(shape[0], rank, generator=generator)).Q
    right = torch.linalg.qr(torch.randn(shape[1], rank, generator=generator)).Q
    return left @ torch.diag(torch.tensor(singular_values)) @ right.T


@torch.no_grad()
def place_in_rows(model, rows: list[int], seed: int = 2) -> None:
    """Move every layer's sparse entries into a few rows of its stored weight: each delta has rank <= len(rows)."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, SparseDeltaLayer):
            columns = module.weight_shape[1]
            positions = torch.cat([torch.arange(columns) + row * columns for row in rows])
            count = module.num_values("default")
            module.delta_indices["default"].copy_(positions[:count].to(module.delta_indices["default"]))
            module.delta_values["default"].copy_(torch.randn(count, generator=generator))


def test_error_does_not_increase_with_rank_and_vanishes_at_full_rank(tmp_path, input_ids):
    model = sparse_model()
    modes = [module.training for module in model.modules()]  # mixed: base in eval, new adapter layers in train
    reports = [export_to_lora(model, tmp_path / f"r{rank}", rank=rank, sample_inputs={"input_ids": input_ids})
               for rank in (1, 2, 4, 8, 16, 32)]  # fmt: skip
    for smaller, larger in zip(reports, reports[1:]):
        for name, error in larger.relative_errors.items():
            assert error <= smaller.relative_errors[name] + 1e-6, name
    assert reports[0].ranks == dict.fromkeys(reports[0].ranks, 1)
    assert min(reports[0].relative_errors.values()) > 0.1
    assert max(reports[-1].relative_errors.values()) < 1e-5  # rank 32 >= min(out, in) of every layer
    assert reports[0].max_logit_error > 0.01 > 1e-4 > reports[-1].max_logit_error  # logits need not be monotone
    assert [module.training for module in model.modules()] == modes


@pytest.mark.parametrize("make_base", [make_tiny_llama, make_tiny_gpt2], ids=["linear", "conv1d"])
def test_delta_of_rank_at_most_r_exports_exactly(tmp_path, input_ids, make_base):
    model = sparse_model(make_base, density=0.05)
    place_in_rows(model, rows=[1, 3, 5, 7, 9, 11, 13, 15])
    exact = export_to_lora(model, tmp_path / "r8", rank=8, sample_inputs={"input_ids": input_ids})
    assert max(exact.ranks.values()) <= 8
    assert max(exact.relative_errors.values()) < 1e-6
    assert exact.max_logit_error < 1e-5
    truncated = export_to_lora(model, tmp_path / "r2", rank=2)
    above_two = [name for name, rank in exact.ranks.items() if rank > 2]
    assert above_two and min(truncated.relative_errors[name] for name in above_two) > 1e-3


def test_energy_picks_the_fewest_components_reaching_it():
    delta = delta_with_spectrum([4.0, 2.0, 1.0, 0.5], (24, 16))  # energy after 1..4: .753 .941 .988 1
    expected = {0.5: 1, 0.75: 1, 0.76: 2, 0.94: 2, 0.95: 3, 0.98: 3, 0.99: 4, 1.0: 4}
    assert {energy: truncated_factors(delta, energy=energy)[0].shape[0] for energy in expected} == expected
    assert truncated_factors(delta, rank=10)[0].shape[0] == 4  # never beyond the numerical rank
    assert truncated_factors(torch.zeros(8, 4), rank=2) is None


def test_energy_sets_each_layers_rank(tmp_path):
    model = get_peft_model(make_tiny_llama(), SparseConfig(density=1.0, target_modules=["q_proj", "v_proj"]))
    spectra = {"q_proj": [4.0, 2.0, 1.0, 0.5], "v_proj": [3.0, 0.1]}  # at 0.95: 3 and 1 components
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, SparseDeltaLayer):
                spectrum = spectra[name.rsplit(".", 1)[-1]]
                module.delta_values["default"].copy_(delta_with_spectrum(spectrum, module.weight_shape).flatten())
    report = export_to_lora(model, tmp_path / "lora", energy=0.95)
    assert {name: rank for name, rank in report.ranks.items()} == {
        name: 3 if name.endswith("q_proj") else 1 for name in report.ranks
    }
    saved = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert sorted(saved["rank_pattern"].values()) == [1, 1, 3, 3]
    assert saved["rank_pattern"] == {key: int(value) for key, value in saved["alpha_pattern"].items()}  # scale 1


def test_zero_layers_are_left_out_and_an_all_zero_adapter_is_refused(tmp_path):
    model = sparse_model()
    layers = [(name, module) for name, module in model.base_model.model.named_modules()
              if isinstance(module, SparseDeltaLayer)]  # fmt: skip
    with torch.no_grad():
        layers[0][1].delta_values["default"].zero_()
    report = export_to_lora(model, tmp_path / "lora", rank=2)
    saved = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert layers[0][0] not in saved["target_modules"] and layers[0][0] not in report.ranks
    assert sorted(saved["target_modules"]) == sorted(name for name, _ in layers[1:])
    with torch.no_grad():
        for _, module in layers:
            module.delta_values["default"].zero_()
    with pytest.raises(ValueError, match="every layer's delta of adapter 'default' is zero"):
        export_to_lora(model, tmp_path / "none", rank=2)


def test_export_loads_in_stock_peft_without_peft_sparse(tmp_path, input_ids):
    cases = [
        (make_tiny_llama, LlamaForCausalLM, SparseConfig(density=0.1, modules_to_save=["lm_head"])),
        (make_tiny_gpt2, GPT2LMHeadModel, SnellConfig(init_weights=False)),
    ]
    child_args = []
    for make_base, model_cls, config in cases:
        folder = tmp_path / model_cls.__name__
        make_base().save_pretrained(folder / "base")
        model = get_peft_model(model_cls.from_pretrained(folder / "base").eval(), config)
        randomize_values(model)
        if config.modules_to_save:
            with torch.no_grad():
                model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(2)
        report = export_to_lora(model, folder / "lora", rank=4, sample_inputs={"input_ids": input_ids})
        # the merged export: base weights + B A, computed here without peft
        merged = model_cls.from_pretrained(folder / "base").eval()
        for name, (layer_rank, a, b) in _exported_factors(folder / "lora").items():
            weight = merged.get_submodule(name).weight
            with torch.no_grad():
                weight += (b @ a).T if model_cls is GPT2LMHeadModel else b @ a
            assert layer_rank == report.ranks[name]
        if config.modules_to_save:  # a new Parameter: the tiny Llama ties lm_head to the embeddings
            trained_head = model.base_model.model.lm_head.modules_to_save["default"].weight
            merged.lm_head.weight = torch.nn.Parameter(trained_head.detach().clone())
        expected = logits_of(merged, input_ids)
        adapter_logits = logits_of(model, input_ids)
        assert (expected - adapter_logits).abs().max().item() == pytest.approx(report.max_logit_error, rel=1e-3)
        torch.save({"input_ids": input_ids, "logits": expected}, folder / "expected.pt")
        child_args += [folder / "base", folder / "lora", folder / "expected.pt"]
    run_child(STOCK_PEFT_CHILD, *child_args)


def _exported_factors(lora_dir) -> dict:
    from safetensors.torch import load_file

    config = json.loads((lora_dir / "adapter_config.json").read_text())
    tensors = load_file(lora_dir / "adapter_model.safetensors")
    assert config["peft_type"] == "LORA" and config["lora_alpha"] == config["r"]
    factors = {}
    for name in config["target_modules"]:
        key = f"base_model.model.{name}"
        a, b = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]
        factors[name] = (a.shape[0], a, b)
    return factors


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "give exactly one of rank or energy, got rank=None, energy=None"),
        ({"rank": 4, "energy": 0.9}, "give exactly one of rank or energy, got rank=4, energy=0.9"),
        ({"rank": 0}, "rank must be a positive integer, got 0"),
        ({"rank": 2.5}, r"rank must be a positive integer, got 2.5 \(a float\)"),
        ({"energy": 0.0}, r"energy must be in \(0, 1\], got 0.0"),
        ({"energy": 1.5}, r"energy must be in \(0, 1\], got 1.5"),
        ({"rank": 4, "adapter_name": "other"}, r"adapter_name must be one of \['default'\], got 'other'"),
    ],
)
def test_bad_arguments_name_the_parameter(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        export_to_lora(sparse_model(), tmp_path / "lora", **kwargs)
    assert not (tmp_path / "lora").exists()


def test_sora_exports_exactly_and_refuses_a_rank(tmp_path, input_ids):
    from tests.test_sora import randomize_sora

    model = get_peft_model(make_tiny_llama(), SoraConfig(r=4))
    randomize_sora(model)
    with pytest.raises(ValueError, match="rank and energy do not apply to a SoRA adapter"):
        export_to_lora(model, tmp_path / "lora", rank=2)
    report = export_to_lora(model, tmp_path / "lora", sample_inputs={"input_ids": input_ids})
    assert max(report.relative_errors.values()) < 1e-6 and report.max_logit_error < 1e-5
    assert set(report.ranks.values()) == {4}


def test_sample_inputs_need_the_adapter_active(tmp_path, input_ids):
    model = sparse_model()
    model.add_adapter("other", SparseConfig(density=0.1))
    with pytest.raises(ValueError, match=r"call model.set_adapter\('other'\) first"):
        export_to_lora(model, tmp_path / "lora", rank=2, adapter_name="other", sample_inputs={"input_ids": input_ids})
