"""LIFT: principal-weight selection, its budget, training through the sparse-delta layer, mask refresh."""

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import Trainer

import peft_sparse.tuners.lift.model as lift_model
import peft_sparse
from peft_sparse import LiftConfig
from peft_sparse.sparse.principal import principal_weight_indices
from tests.conftest import make_tiny_llama
from tests.test_trainer import repeating_sequences, training_args
from trl_callbacks import SparseUpdateCallback


def brute_force_principal_indices(weight: torch.Tensor, rank: int, count: int) -> torch.Tensor:
    """Top-|entries| of the rank-r approximation built from the eigenvectors of W^T W (float64)."""
    matrix = weight.double()
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix.T @ matrix)
    top = eigenvectors[:, eigenvalues.argsort(descending=True)[:rank]]  # [n, r]
    approximation = matrix @ top @ top.T  # projection onto the top right-singular subspace
    return approximation.abs().flatten().argsort(descending=True)[:count].sort().values


@pytest.mark.parametrize("shape, rank, count", [((12, 20), 3, 17), ((31, 7), 2, 50), ((16, 16), 16, 40)])
def test_exact_selection_equals_brute_force_top_k(shape, rank, count):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    selected = principal_weight_indices(weight, rank, count, svd_method="exact")
    assert selected.dtype == torch.int32
    assert torch.equal(selected.long(), brute_force_principal_indices(weight, rank, count))


def test_randomized_and_exact_agree_with_a_spectral_gap():
    generator = torch.Generator().manual_seed(1)
    left, _ = torch.linalg.qr(torch.randn(96, 96, generator=generator))
    right, _ = torch.linalg.qr(torch.randn(64, 64, generator=generator))
    singular = torch.cat([torch.linspace(10, 5, 8), torch.full((56,), 1e-3)])
    weight = (left[:, :64] * singular) @ right.T
    exact = principal_weight_indices(weight, 8, 300, svd_method="exact")
    randomized = principal_weight_indices(weight, 8, 300, svd_method="randomized", seed=3)
    assert torch.equal(exact, randomized)


def test_selection_differs_from_plain_magnitude():
    weight = torch.randn(40, 30, generator=torch.Generator().manual_seed(2))
    principal = principal_weight_indices(weight, 2, 60, svd_method="exact")
    magnitude = weight.abs().flatten().topk(60).indices.sort().values
    assert not torch.equal(principal.long(), magnitude)


def test_model_indices_are_principal_weights_of_each_layer_with_lora_budget():
    config = LiftConfig(lora_rank_budget=2, rank=0.25, svd_method="exact")
    model = get_peft_model(make_tiny_llama(), config)
    reference = make_tiny_llama()
    layers = list(model.base_model.sparse_delta_layers())
    assert len(layers) == 14 and all("lm_head" not in name for name, _ in layers)
    for name, layer in layers:
        weight = reference.get_submodule(name).weight
        rows, columns = weight.shape
        count = min((rows + columns) * 2, rows * columns)
        expected = principal_weight_indices(weight, max(1, round(0.25 * min(rows, columns))), count, "exact")
        assert torch.equal(layer.lift_indices["default"], expected), name


def test_training_changes_only_the_selected_entries(tmp_path):
    model = get_peft_model(make_tiny_llama(), LiftConfig(density=0.1, rank=4))
    selected = {name: layer.lift_indices["default"].long() for name, layer in model.base_model.sparse_delta_layers()}
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=5), train_dataset=repeating_sequences())
    trainer.train()
    merged = model.merge_and_unload()
    reference = make_tiny_llama()
    for name, indices in selected.items():
        changed = torch.nonzero((merged.get_submodule(name).weight != reference.get_submodule(name).weight).flatten())
        assert changed.numel() > 0.9 * indices.numel()
        assert torch.isin(changed.flatten(), indices).all(), name
    for name, parameter in merged.named_parameters():
        if not any(name.startswith(layer_name) for layer_name in selected):
            assert torch.equal(parameter, reference.get_parameter(name)), name


def test_mask_refresh_selects_principal_weights_of_current_weights_and_keeps_moments(tmp_path):
    config = LiftConfig(density=0.1, rank=4, svd_method="exact", mask_update_interval=3)
    model = get_peft_model(make_tiny_llama(), config)
    trainer = Trainer(
        model=model, args=training_args(tmp_path, max_steps=3, learning_rate=0.05),
        train_dataset=repeating_sequences(), callbacks=[SparseUpdateCallback()],
    )
    layers = dict(model.base_model.sparse_delta_layers())
    before, expected, moments = {}, {}, {}
    original_reselect = model.base_model.reselect

    def reselect_recording_state(adapter_name, rate, optimizer):
        state = optimizer.state
        for name, layer in layers.items():
            values = layer.lift_values[adapter_name]
            current = layer.effective_weight(adapter_name)
            before[name] = (layer.lift_indices[adapter_name].clone(), values.detach().clone())
            expected[name] = principal_weight_indices(current, 4, values.numel(), "exact")
            moments[name] = state[values]["exp_avg"].clone()
        return original_reselect(adapter_name, rate, optimizer)

    model.base_model.reselect = reselect_recording_state
    trainer.train()
    churn = [entry["sparse/churn"] for entry in trainer.state.log_history if "sparse/churn" in entry]
    assert len(churn) == 1 and churn[0] > 0
    for name, layer in layers.items():
        indices, values = layer.lift_indices["default"], layer.lift_values["default"]
        assert torch.equal(indices, expected[name]), name
        old_indices, old_values = before[name]
        kept_new = torch.isin(indices, old_indices)
        kept_old = torch.isin(old_indices, indices)
        assert torch.equal(values[kept_new].detach(), old_values[kept_old])
        assert (values[~kept_new] == 0).all()
        exp_avg = trainer.optimizer.state[values]["exp_avg"]
        assert torch.equal(exp_avg[kept_new], moments[name][kept_old])
        assert (exp_avg[~kept_new] == 0).all()


def test_loading_for_inference_skips_the_svd(tmp_path, monkeypatch, input_ids):
    model = get_peft_model(make_tiny_llama(), LiftConfig(density=0.1, rank=4))
    model.save_pretrained(tmp_path)

    def fail(*args, **kwargs):
        raise AssertionError("the SVD ran while loading an adapter for inference")

    monkeypatch.setattr(lift_model, "principal_weight_indices", fail)
    loaded = PeftModel.from_pretrained(make_tiny_llama(), tmp_path)
    for (_, saved), (_, restored) in zip(model.base_model.sparse_delta_layers(), loaded.base_model.sparse_delta_layers()):
        assert torch.equal(saved.lift_indices["default"], restored.lift_indices["default"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(density=0.1, lora_rank_budget=8), "give either density or lora_rank_budget"),
        (dict(density=1.5), r"density must be in \(0, 1\], got 1.5"),
        (dict(lora_rank_budget=0), "lora_rank_budget must be a positive integer, got 0"),
        (dict(rank=0), "rank must be a positive integer, got 0"),
        (dict(rank=1.5), r"rank must be in \(0, 1\], got 1.5"),
        (dict(svd_method="qr"), r"svd_method must be one of \('randomized', 'exact'\), got 'qr'"),
        (dict(mask_update_interval=0), "mask_update_interval must be a positive integer, got 0"),
        (dict(svd_power_iterations=-1), "svd_power_iterations must be a positive integer, got -1"),
    ],
)
def test_bad_config_raises_value_error_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LiftConfig(**kwargs)


def test_budget_formulas():
    assert LiftConfig(lora_rank_budget=128).count_for((4096, 11008)) == (4096 + 11008) * 128
    assert LiftConfig(lora_rank_budget=64).count_for((100, 50)) == 100 * 50
    assert LiftConfig(density=0.05).count_for((4096, 4096)) == round(0.05 * 4096 * 4096)
    assert LiftConfig(rank=0.5).rank_for((576, 1536)) == 288
    assert LiftConfig(rank=1000).rank_for((576, 1536)) == 576


@pytest.mark.parametrize(
    "config_class, fields",
    [(LiftConfig, {"rank": 4}), (peft_sparse.SparseConfig, {"selection": "sara"})],
    ids=["lift", "sara"],
)
def test_second_adapter_chooses_from_w0_not_from_a_delta_written_in_place(config_class, fields):
    def make_config(**extra):
        return config_class(density=0.1, target_modules=["q_proj"], **fields, **extra)

    input_ids = torch.arange(3, 20).reshape(1, -1)
    model = get_peft_model(make_tiny_llama(), make_config(init_weights=False))
    model(input_ids=input_ids)  # the first adapter's delta is now written into the weights
    model.add_adapter("second", make_config())
    fresh = get_peft_model(make_tiny_llama(), make_config(), adapter_name="second")
    for name, layer in fresh.base_model.sparse_delta_layers():
        held = model.base_model.model.get_submodule(name)
        assert held._written  # the first delta really is in the weight
        assert torch.equal(held.delta_indices["second"], layer.delta_indices["second"])
