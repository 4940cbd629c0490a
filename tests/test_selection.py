import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model

from peft_sparse import SparseConfig
from peft_sparse.sparse.indices import check_index_set
from peft_sparse.sparse.selection import squared_product_sums
from tests.conftest import make_mlp, randomize_values


def sparse_mlp(selection: str = "ag", density: float = 0.2):
    model = get_peft_model(make_mlp(), SparseConfig(density=density, target_modules=["0", "2"], selection=selection))
    randomize_values(model)
    return model


def layers_of(model):
    return dict(model.base_model.sparse_delta_layers())


def window_batches(count: int = 3):
    generator = torch.Generator().manual_seed(7)
    return [torch.randn(5, 16, generator=generator) for _ in range(count)]


def run_window(model, batches, optimizer=None):
    model.base_model.open_selection_window("default")
    for inputs in batches:
        model(inputs).square().sum().backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad()


def dense_gradients(model, batches):
    """Per layer, the dense weight gradient of every micro-batch (reference for the growth statistics)."""
    with torch.no_grad():
        model(batches[0])  # writes the deltas into the base weights
    layers = layers_of(model)
    grads = {name: [] for name in layers}
    for inputs in batches:
        weights = {}
        for name, layer in layers.items():
            weights[name] = layer.get_base_layer().weight.detach().clone().requires_grad_(True)
        hidden = F.linear(inputs, weights["0"], layers["0"].base_layer.bias)
        output = F.linear(hidden.relu(), weights["2"], layers["2"].base_layer.bias)
        output.square().sum().backward()
        for name in grads:
            grads[name].append(weights[name].grad.view(-1))
    return grads


@pytest.mark.parametrize("selection", ["ag", "ma"])
def test_selection_replaces_expected_count_and_keeps_invariants(selection):
    model = sparse_mlp(selection)
    values = {n: layer.sparse_values["default"] for n, layer in layers_of(model).items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    run_window(model, window_batches(), optimizer)
    before = {n: (l.sparse_indices["default"].clone(), l.sparse_values["default"].detach().clone())
              for n, l in layers_of(model).items()}
    state_before = {n: {k: v.clone() for k, v in optimizer.state[values[n]].items()} for n in values}

    statistics = model.base_model.reselect("default", 0.25, optimizer)

    total_replaced = 0
    for name, layer in layers_of(model).items():
        old_indices, old_values = before[name]
        new_indices = layer.sparse_indices["default"]
        count = round(0.25 * old_indices.numel())
        check_index_set(new_indices, layer.get_base_layer().weight.numel(), where=name)
        assert new_indices.numel() == old_indices.numel()
        kept = torch.isin(new_indices, old_indices)
        assert int((~kept).sum()) == count
        total_replaced += count
        # the dropped entries are those with the smallest |value|
        dropped = old_indices[~torch.isin(old_indices, new_indices)]
        smallest = old_indices[old_values.abs().argsort()[:count]]
        assert set(dropped.tolist()) == set(smallest.tolist())
        # kept entries keep their values and optimizer moments; grown ones start at zero
        old_position = {int(i): p for p, i in enumerate(old_indices)}
        for slot, index in enumerate(new_indices.tolist()):
            state = optimizer.state[values[name]]
            if index in old_position:
                source = old_position[index]
                assert layer.sparse_values["default"][slot] == old_values[source]
                for key in ("exp_avg", "exp_avg_sq"):
                    assert state[key][slot] == state_before[name][key][source]
            else:
                assert layer.sparse_values["default"][slot] == 0
                assert state["exp_avg"][slot] == 0 and state["exp_avg_sq"][slot] == 0
        assert optimizer.state[values[name]]["step"] == state_before[name]["step"]
    assert statistics["churn"] == pytest.approx(total_replaced / sum(v.numel() for v in values.values()))


def select_once(selection: str, rate: float = 0.25):
    """Run one window + selection; per layer: (indices before, dense gradients per micro-batch, grown indices)."""
    model = sparse_mlp(selection)
    batches = window_batches()
    reference = dense_gradients(model, batches)
    before = {n: l.sparse_indices["default"].clone() for n, l in layers_of(model).items()}
    run_window(model, batches)
    model.base_model.reselect("default", rate)
    result = {}
    for name, layer in layers_of(model).items():
        after = layer.sparse_indices["default"]
        result[name] = (before[name], reference[name], set(after[~torch.isin(after, before[name])].tolist()), layer)
    return result


def test_accumulated_gradient_growth_matches_brute_force():
    for active, gradients, grown, _ in select_once("ag").values():
        first = gradients[0].abs()
        first[active.long()] = -1
        candidates = first.topk(active.numel()).indices
        accumulated = torch.stack(gradients).sum(0)[candidates]
        expected = candidates[accumulated.abs().topk(round(0.25 * active.numel())).indices]
        assert grown == set(expected.tolist())


def test_momentum_approximation_growth_matches_brute_force():
    for active, gradients, grown, layer in select_once("ma").values():
        squared = sum(g.view(layer.weight_shape).square() for g in gradients)
        score = torch.outer(squared.sum(1), squared.sum(0)).view(-1)
        score[active.long()] = -1
        expected = score.topk(round(0.25 * active.numel())).indices
        assert grown == set(expected.tolist())


@pytest.mark.parametrize("inner, max_chunk_elements", [(3, 1 << 22), (40, 1 << 22), (40, 70)])
def test_squared_product_sums_match_the_dense_product(inner, max_chunk_elements):
    # inner 3: Gram matrices; inner 40: the product itself, whole or 70 elements (2 rows) at a time
    generator = torch.Generator().manual_seed(3)
    left = torch.randn(24, inner, generator=generator, dtype=torch.float64).to(torch.bfloat16)
    right = torch.randn(inner, 35, generator=generator, dtype=torch.float64).to(torch.bfloat16)
    squared = (left.double() @ right.double()).square()
    row_sums, col_sums = squared_product_sums(left, right, max_chunk_elements)
    assert row_sums.dtype == col_sums.dtype == torch.float32
    torch.testing.assert_close(row_sums.double(), squared.sum(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(col_sums.double(), squared.sum(0), rtol=1e-5, atol=1e-5)


def test_forward_after_selection_uses_new_indices_over_restored_base():
    model = sparse_mlp("ag")
    originals = {n: l.get_base_layer().weight.detach().clone() for n, l in layers_of(model).items()}
    run_window(model, window_batches())
    model.base_model.reselect("default", 0.5)
    inputs = torch.randn(3, 16)
    output = model(inputs)
    layers = layers_of(model)
    for name, layer in layers.items():
        assert torch.equal(layer.get_base_layer().weight, originals[name] + layer.get_delta_weight("default"))
    first, second = layers["0"], layers["2"]
    hidden = F.linear(inputs, first.get_base_layer().weight, first.base_layer.bias).relu()
    torch.testing.assert_close(output, F.linear(hidden, second.get_base_layer().weight, second.base_layer.bias))


def test_selection_without_observed_gradients_changes_nothing():
    model = sparse_mlp("ag")
    before = {n: l.sparse_indices["default"].clone() for n, l in layers_of(model).items()}
    model.base_model.open_selection_window("default")
    assert model.base_model.reselect("default", 0.5)["churn"] == 0
    for name, layer in layers_of(model).items():
        assert torch.equal(layer.sparse_indices["default"], before[name])
