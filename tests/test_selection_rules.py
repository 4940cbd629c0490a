"""SaRA, HFT, ID3 and LT-SFT as SparseConfig selections: each rule against a brute-force version, frozen
slots, round trips.

Resume and DDP runs of SaRA, HFT and ID3 are in tests/tiny_runs.py (methods "sparse-sara", "sparse-hft",
"sparse-id3"); LT-SFT's sparse phase is a plain fixed-index run.
"""

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import Trainer

from peft_sparse import SparseConfig
from peft_sparse.config_base import ConfigTypeError
from peft_sparse.sparse.incremental_unmasking import unmasked_count
from peft_sparse.sparse.lottery_ticket import LotteryTicket
from peft_sparse.sparse.nuclear_norm import nuclear_norm_gradient
from tests.conftest import VOCAB_SIZE, make_mlp, make_tiny_llama, randomize_values
from tests.test_trainer import repeating_sequences, training_args
from trl_callbacks import SparseUpdateCallback

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
        ({"selection": "lt_sft"}, ValueError, "selection must be one of \\('ag', 'ma', 'random', 'sara', 'hft', 'id3', 'lt-sft'\\), got 'lt_sft'"),
        ({"selection": "id3", "d3_epsilon": 0.0}, ValueError, "d3_epsilon must be a positive number, got 0.0"),
        ({"selection": "id3", "d3_exponent": "1"}, ConfigTypeError, "d3_exponent must be a number, got '1' \\(a str\\)"),
        ({"selection": "ag", "d3_epsilon": 1e-3}, ValueError, "d3_epsilon applies to selection='id3' only"),
        ({"selection": "lt-sft", "d3_exponent": 0.0}, ValueError, "d3_exponent applies to selection='id3' only"),
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


# --- ID3 (incremental unmasking) and LT-SFT (lottery ticket) ------------------------------------------


def mlp_model(selection: str, **kwargs):
    return get_peft_model(make_mlp(), SparseConfig(target_modules=["0", "2"], selection=selection, **kwargs))


def mlp_loss(model, seed: int = 0) -> torch.Tensor:
    return model(torch.randn(6, 16, generator=torch.Generator().manual_seed(seed))).square().mean()


@pytest.mark.parametrize("exponent", [1.0, 0.0, -1.0])
def test_id3_unmasks_the_best_d3_scores_of_the_steps_gradient(exponent):
    model = mlp_model("id3", density=0.25, d3_epsilon=1e-2, d3_exponent=exponent, init_weights=False)
    tuner = model.base_model
    tuner.update_frozen_slots("default", 0)
    layers = delta_layers(model)
    assert all(torch.all(layer.delta_values["default"] == 0) for layer in layers.values())  # all masked, zero
    dense = make_mlp()
    mlp_loss(dense).backward()
    tuner.open_selection_window("default")
    mlp_loss(model).backward()
    tuner.unmask("default", step=1, max_steps=3)
    masked = tuner.frozen_slot_state("default")
    for name, layer in layers.items():
        weight, gradient = dense.get_submodule(name.rpartition("model.")[2]).weight, None
        gradient = dense.get_submodule(name.rpartition("model.")[2]).weight.grad
        scores = {
            (row * weight.shape[1] + col): abs(gradient[row, col].item()) / (1e-2 + abs(weight[row, col].item())) ** exponent
            for row in range(weight.shape[0]) for col in range(weight.shape[1])
        }  # fmt: skip
        count = unmasked_count(layer.num_values("default"), 1, 3)
        expected = sorted(sorted(scores, key=scores.get, reverse=True)[:count])
        unmasked = torch.ones(layer.num_values("default"), dtype=torch.bool)
        unmasked[masked[name]] = False
        indices = layer.delta_indices["default"]
        assert indices[unmasked].tolist() == expected, name
        assert torch.allclose(layer.delta_values["default"].grad[unmasked], gradient.view(-1)[expected], atol=1e-6)
        assert torch.all(layer.delta_values["default"].grad[~unmasked] == 0)
        assert torch.unique(indices).numel() == indices.numel() and torch.all(indices[1:] > indices[:-1])


def test_id3_reaches_its_budget_linearly_and_masked_slots_stay_zero():
    model = mlp_model("id3", density=0.2)
    tuner = model.base_model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    layers = delta_layers(model)
    tuner.update_frozen_slots("default", 0)
    for step in range(1, 5):
        assert tuner.unmasking_due("default", step, 4)
        tuner.open_selection_window("default")
        mlp_loss(model, seed=step).backward()
        tuner.unmask("default", step, 4, optimizer)
        optimizer.step()
        optimizer.zero_grad()
        masked = tuner.frozen_slot_state("default")
        for name, layer in layers.items():
            values = layer.delta_values["default"].detach()
            k = values.numel()
            assert k - masked[name].numel() == unmasked_count(k, step, 4), (name, step)
            assert torch.all(values[masked[name]] == 0)
            unmasked = torch.ones(k, dtype=torch.bool)
            unmasked[masked[name]] = False
            assert torch.all(values[unmasked] != 0)  # unmasked at a step, trained by that step
    assert not tuner.unmasking_due("default", 5, 4)


def test_lt_sft_draws_the_largest_dense_movements_and_resets_theta_0():
    model = mlp_model("lt-sft", num_tunable_weights=40)
    pristine = {name: module.weight.detach().clone() for name, module in make_mlp().named_modules() if hasattr(module, "weight")}
    ticket = LotteryTicket(model)
    dense = make_mlp()
    dense_optimizer = torch.optim.SGD([dense[0].weight, dense[2].weight], lr=0.5)
    with ticket.dense_phase():
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert len(trainable) == 2  # the two target weights, nothing else
        optimizer = torch.optim.SGD(trainable, lr=0.5)
        for seed in range(3):
            for module, step in ((model, optimizer), (dense, dense_optimizer)):
                mlp_loss(module, seed).backward()
                step.step()
                step.zero_grad()
    movement = {name: (dense.get_submodule(name).weight - pristine[name]).abs().view(-1) for name in ("0", "2")}
    ranked = sorted(((value.item(), name, flat) for name in movement for flat, value in enumerate(movement[name])), reverse=True)
    firsts = {(name, int(torch.argmax(movement[name]))) for name in movement}  # every matrix keeps its largest
    rest = [(name, flat) for _, name, flat in ranked if (name, flat) not in firsts][: 40 - len(firsts)]
    counts = ticket.draw()
    assert sum(counts.values()) == 40
    for name, layer in delta_layers(model).items():
        short = name.rpartition("model.")[2]
        expected = sorted([flat for n, flat in firsts if n == short] + [flat for n, flat in rest if n == short])
        assert layer.delta_indices["default"].tolist() == expected, name
        assert torch.equal(layer.get_base_layer().weight, pristine[short])  # theta_0, bit-exactly
        assert torch.all(layer.delta_values["default"] == 0) and layer.delta_values["default"].requires_grad
    assert model.peft_config["default"].values_per_module == counts


def test_lt_sft_round_trip_loads_the_drawn_counts(tmp_path):
    model = mlp_model("lt-sft", density=0.1)
    ticket = LotteryTicket(model)
    with ticket.dense_phase(["0"]), torch.no_grad():  # a group at a time bounds the memory
        model.base_model.model[0].weight.add_(torch.randn(32, 16, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="draw needs a dense phase over every layer of the adapter first"):
        ticket.draw()
    with ticket.dense_phase(["2"]), torch.no_grad():
        model.base_model.model[2].weight.add_(torch.randn(8, 32, generator=torch.Generator().manual_seed(1)))
    counts = ticket.draw()
    randomize_values(model)
    expected = mlp_loss(model.eval()).detach()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_mlp(), tmp_path).eval()
    assert {name: layer.num_values("default") for name, layer in delta_layers(loaded).items()} == counts
    with torch.no_grad():
        assert torch.allclose(mlp_loss(loaded), expected, atol=1e-6)
        assert torch.allclose(mlp_loss(loaded.merge_and_unload()), expected, atol=1e-6)


def test_trainer_runs_id3_to_its_budget_and_lt_sft_in_two_runs(tmp_path):
    id3 = get_peft_model(make_tiny_llama(), SparseConfig(density=0.1, selection="id3"))
    Trainer(model=id3, args=training_args(tmp_path, max_steps=3), train_dataset=repeating_sequences(16),
            callbacks=[SparseUpdateCallback()]).train()  # fmt: skip
    assert all(positions.numel() == 0 for positions in id3.base_model.frozen_slot_state("default").values())
    assert all(torch.all(layer.delta_values["default"] != 0) for layer in delta_layers(id3).values())

    lt_sft = get_peft_model(make_tiny_llama(), SparseConfig(density=0.1, selection="lt-sft"))
    pristine = {name: layer.pristine_weight() for name, layer in delta_layers(lt_sft).items()}
    ticket = LotteryTicket(lt_sft)
    with ticket.dense_phase():
        Trainer(model=lt_sft, args=training_args(tmp_path, max_steps=2, learning_rate=1e-2),
                train_dataset=repeating_sequences(16)).train()  # fmt: skip
    ticket.draw()
    Trainer(model=lt_sft, args=training_args(tmp_path, max_steps=2), train_dataset=repeating_sequences(16)).train()
    for name, layer in delta_layers(lt_sft).items():
        assert torch.equal(layer.pristine_weight(), pristine[name]), name  # the sparse phase starts from theta_0
        assert torch.all(layer.delta_values["default"] != 0), name


def test_lt_sft_is_refused_on_a_quantized_base(tmp_path):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    make_tiny_llama().save_pretrained(tmp_path)
    quantized = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="cpu"
    )
    with pytest.raises(ValueError, match="selection='lt-sft' trains the target weights densely .* use selection='ag'"):
        get_peft_model(quantized, SparseConfig(density=0.1, selection="lt-sft"))
