"""SaRA and HFT as SparseConfig selections: each rule against a brute-force version, frozen slots, round trips.

Resume and DDP runs of both are in tests/tiny_runs.py (methods "sparse-sara" and "sparse-hft").
"""

import pytest
import torch
from peft import PeftModel, get_peft_model

from peft_sparse import SparseConfig
from peft_sparse.config_base import ConfigTypeError
from peft_sparse.sparse.nuclear_norm import nuclear_norm_gradient
from tests.conftest import VOCAB_SIZE, make_tiny_llama

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def sparse_model(selection: str, **kwargs):
    return get_peft_model(make_tiny_llama(), SparseConfig(density=0.1, selection=selection, **kwargs))


def delta_layers(model) -> dict:
    return dict(model.base_model.sparse_delta_layers())


def loss_of(model) -> torch.Tensor:
    ids = torch.randint(0, VOCAB_SIZE, (2, 12), generator=torch.Generator().manual_seed(0))
    return model(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"selection": "hft", "hft_granularity": "row"}, ValueError, "hft_granularity must be one of \\('matrix', 'entry'\\), got 'row'"),
        ({"selection": "ag", "hft_granularity": "entry"}, ValueError, "hft_granularity applies to selection='hft' only"),
        ({"selection": "sara", "nuclear_norm_weight": -1.0}, ValueError, "nuclear_norm_weight must be a non-negative number, got -1.0"),
        ({"selection": "sara", "nuclear_norm_weight": "0.1"}, ConfigTypeError, "nuclear_norm_weight must be a non-negative number, got '0.1' \\(a str\\)"),
        ({"selection": "lt-sft"}, ValueError, "selection must be one of \\('ag', 'ma', 'random', 'sara', 'hft'\\), got 'lt-sft'"),
    ],
)  # fmt: skip
def test_bad_configs_name_the_field(kwargs, error, message):
    with pytest.raises(error, match=message):
        SparseConfig(**kwargs)


def test_defaults_follow_the_papers():
    sara = SparseConfig(selection="sara", reselection_steps=2)  # no statistics window: accumulation steps unused
    assert (sara.nuclear_norm_weight, sara.hft_granularity, sara.updates_indices, sara.freezes_slots) == (5e-4, None, False, True)
    hft = SparseConfig(selection="hft")
    assert (hft.nuclear_norm_weight, hft.hft_granularity, hft.freezes_slots) == (0.0, "matrix", True)
    assert not SparseConfig(selection="ag").freezes_slots


def test_sara_trains_the_smallest_magnitude_entries_of_each_matrix():
    base = make_tiny_llama()
    pristine = {name: module.weight.detach().clone() for name, module in base.named_modules() if hasattr(module, "weight")}
    model = get_peft_model(base, SparseConfig(density=0.1, selection="sara"))
    for name, layer in delta_layers(model).items():
        weight = pristine[name]
        expected = torch.argsort(weight.abs().view(-1))[: layer.num_values("default")].sort().values
        assert torch.equal(layer.delta_indices["default"].long(), expected), name


def test_sara_progressive_adjustment_freezes_the_slots_that_became_effective():
    model = sparse_model("sara", reselection_steps=3)
    layers = delta_layers(model)
    expected = {}
    with torch.no_grad():
        for name, layer in layers.items():
            values = layer.delta_values["default"]
            values.copy_(torch.randn(values.shape, generator=torch.Generator().manual_seed(1)) * 2e-3)
            pristine = layer.pristine_weight().view(-1)[layer.delta_indices["default"].long()]
            threshold = pristine.abs().max()
            expected[name] = [slot for slot in range(values.numel()) if abs(pristine[slot] + values[slot]) > threshold]
    tuner = model.base_model
    tuner.update_frozen_slots("default", 6)  # not the progressive step: nothing freezes
    assert tuner.frozen_slot_state("default") == {}
    tuner.update_frozen_slots("default", 3)
    frozen = {name: positions.tolist() for name, positions in tuner.frozen_slot_state("default").items()}
    assert frozen == expected
    assert 0 < sum(map(len, frozen.values())) < sum(layer.num_values("default") for layer in layers.values())


def test_frozen_slots_keep_their_values_through_adamw_with_weight_decay():
    model = sparse_model("hft", hft_granularity="entry", init_weights=False)
    tuner = model.base_model
    tuner.update_frozen_slots("default", 0)
    frozen = tuner.frozen_slot_state("default")
    layers = delta_layers(model)
    before = {name: layer.delta_values["default"].detach().clone() for name, layer in layers.items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        loss_of(model).backward()
        for name, positions in frozen.items():
            assert torch.all(layers[name].delta_values["default"].grad[positions] == 0)
        optimizer.step()
        optimizer.zero_grad()
    for name, layer in layers.items():
        values, positions = layer.delta_values["default"].detach(), frozen[name]
        trained = torch.ones(values.numel(), dtype=torch.bool)
        trained[positions] = False
        assert torch.equal(values[positions], before[name][positions]), name
        assert torch.all(values[trained] != before[name][trained]), name
    tuner.release_frozen_slots("default")
    loss_of(model).backward()
    assert all(torch.all(layer.delta_values["default"].grad != 0) for layer in layers.values())


def test_hft_freezes_half_of_each_blocks_matrices_and_redraws_them():
    model = sparse_model("hft")
    tuner = model.base_model
    sizes = {name: layer.num_values("default") for name, layer in delta_layers(model).items()}
    draws = []
    for step in (0, 10, 20, 30):
        tuner.update_frozen_slots("default", step)
        state = tuner.frozen_slot_state("default")
        assert all(torch.equal(positions, torch.arange(sizes[name])) for name, positions in state.items())
        for block in {name.rpartition(".")[0] for name in sizes}:
            members = [name for name in sizes if name.rpartition(".")[0] == block]
            assert len([name for name in members if name in state]) in (len(members) // 2, (len(members) + 1) // 2)
        draws.append(sorted(state))
    assert len({tuple(draw) for draw in draws}) > 1
    tuner.update_frozen_slots("default", 10)  # the same step gives the same half (every DDP rank agrees)
    assert sorted(tuner.frozen_slot_state("default")) == draws[1]


def test_hft_entry_granularity_freezes_half_of_every_matrix():
    model = sparse_model("hft", hft_granularity="entry")
    model.base_model.update_frozen_slots("default", 0)
    state = model.base_model.frozen_slot_state("default")
    for name, layer in delta_layers(model).items():
        count = layer.num_values("default")
        assert state[name].numel() in (count // 2, (count + 1) // 2)
        assert torch.unique(state[name]).numel() == state[name].numel()


@pytest.mark.parametrize("shape", [(8, 6), (6, 8)])
def test_nuclear_norm_gradient_matches_autograd_of_the_nuclear_norm(shape):
    generator = torch.Generator().manual_seed(0)
    indices = torch.randperm(48, generator=generator)[:30].sort().values
    values = torch.randn(30, generator=generator, dtype=torch.float64, requires_grad=True)
    delta = torch.zeros(48, dtype=torch.float64).index_put((indices,), values).view(shape)
    torch.linalg.matrix_norm(delta, "nuc").backward()
    assert torch.allclose(nuclear_norm_gradient(delta.detach().float(), indices), values.grad.float(), atol=1e-5)
    assert torch.equal(nuclear_norm_gradient(torch.zeros(shape), indices), torch.zeros(30))


def test_nuclear_norm_penalty_goes_to_one_layer_per_step_in_turn():
    model = sparse_model("sara", init_weights=False, nuclear_norm_weight=0.5)
    layers = list(delta_layers(model).items())
    step = len(layers) + 2
    model.base_model.add_nuclear_norm_gradient("default", step)
    for position, (name, layer) in enumerate(layers):
        grad = layer.delta_values["default"].grad
        if position != step % len(layers):
            assert grad is None, name
            continue
        expected = 0.5 * nuclear_norm_gradient(layer.get_delta_weight("default"), layer.delta_indices["default"])
        assert torch.allclose(grad, expected)


@pytest.mark.parametrize("selection", ["sara", "hft"])
def test_save_load_and_merge_round_trips(tmp_path, selection):
    model = sparse_model(selection, init_weights=False)
    model.eval()
    with torch.no_grad():
        expected = loss_of(model)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_tiny_llama(), tmp_path).eval()
    for name, layer in delta_layers(loaded).items():
        assert torch.equal(layer.delta_indices["default"], delta_layers(model)[name].delta_indices["default"])
    with torch.no_grad():
        assert torch.allclose(loss_of(loaded), expected, atol=1e-6)
        assert torch.allclose(loss_of(loaded.merge_and_unload()), expected, atol=1e-6)
