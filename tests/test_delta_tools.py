"""ComPEFT compression and Model Breadcrumbs merging, against brute-force dense references."""

import math

import pytest
import torch
from peft import PeftModel, get_peft_model

from peft_sparse import SoraConfig, SparseConfig, breadcrumbs_merge_adapters, compress_adapter
from peft_sparse.delta_tools import adapter_layers, breadcrumbs_mask, breadcrumbs_merge, ternary_compress
from tests.conftest import SPARSE_DELTA_CONFIGS, make_tiny_gpt2, make_tiny_llama, randomize_values
from tests.test_sora import logits_of


def brute_force_ternary(delta: torch.Tensor, count: int, alpha=None) -> torch.Tensor:
    """Dense result of ComPEFT, entry by entry in Python."""
    flat = delta.flatten().tolist()
    kept = sorted(range(len(flat)), key=lambda i: -abs(flat[i]))[:count]
    magnitudes = [abs(flat[i]) for i in kept if flat[i] != 0]
    if alpha is None:
        scale = sum(magnitudes) / len(magnitudes)
    else:
        mean = sum(flat) / len(flat)
        scale = alpha * math.sqrt(sum((x - mean) ** 2 for x in flat) / (len(flat) - 1))
    result = [0.0] * len(flat)
    for i in kept:
        result[i] = math.copysign(scale, flat[i]) if flat[i] != 0 else 0.0
    return torch.tensor(result).view(delta.shape)


def brute_force_breadcrumbs(deltas, weights, beta, gamma) -> torch.Tensor:
    merged = [0.0] * deltas[0].numel()
    for delta, weight in zip(deltas, weights):
        flat = delta.flatten().tolist()
        ranked = sorted((abs(x), i) for i, x in enumerate(flat) if x != 0)  # distinct magnitudes: no ties
        n = len(ranked)
        for _, i in ranked[math.floor(beta * n) : n - math.floor(gamma * n)]:
            merged[i] += weight * flat[i]
    return torch.tensor(merged).view(deltas[0].shape)


def dense_of(indices: torch.Tensor, values: torch.Tensor, shape) -> torch.Tensor:
    dense = torch.zeros(shape).flatten()
    dense[indices] = values
    return dense.view(shape)


@pytest.mark.parametrize("alpha", [None, 2.0])
def test_ternary_compress_matches_brute_force(alpha):
    delta = torch.randn(7, 9, generator=torch.Generator().manual_seed(0))
    indices, values = ternary_compress(delta, count=20, alpha=alpha)
    assert torch.equal(indices, indices.sort().values) and indices.numel() == 20
    torch.testing.assert_close(dense_of(indices, values, delta.shape), brute_force_ternary(delta, 20, alpha))


def test_ternary_compress_of_a_sparser_delta_keeps_zeros_at_zero():
    delta = torch.zeros(4, 5)
    delta[0, 1], delta[2, 3], delta[3, 0] = 0.5, -1.5, 1.0
    indices, values = ternary_compress(delta, count=5)
    assert sorted(values.tolist()) == [-1.0, 0.0, 0.0, 1.0, 1.0]  # scale: mean of 0.5, 1.5, 1.0
    torch.testing.assert_close(dense_of(indices, values, delta.shape), brute_force_ternary(delta, 5))


@pytest.mark.parametrize("beta, gamma", [(0.1, 0.01), (0.3, 0.2), (0.0, 0.0), (0.5, 0.0)])
def test_breadcrumbs_merge_matches_brute_force(beta, gamma):
    generator = torch.Generator().manual_seed(1)
    deltas = [torch.randn(6, 10, generator=generator) for _ in range(3)]
    deltas[1][torch.rand(6, 10, generator=generator) < 0.7] = 0.0  # a sparse delta: fractions count non-zeros
    weights = [1.0, 0.5, -0.25]
    expected = brute_force_breadcrumbs(deltas, weights, beta, gamma)
    torch.testing.assert_close(breadcrumbs_merge(deltas, weights, beta, gamma), expected)
    kept = breadcrumbs_mask(deltas[1], beta, gamma)
    n = int(torch.count_nonzero(deltas[1]))
    assert int(kept.sum()) == n - math.floor(beta * n) - math.floor(gamma * n)


@pytest.mark.parametrize("method", sorted(SPARSE_DELTA_CONFIGS))
def test_compressed_adapter_is_the_ternary_delta_and_round_trips(tmp_path, input_ids, method):
    model = get_peft_model(make_tiny_llama(), SPARSE_DELTA_CONFIGS[method]())
    randomize_values(model)
    source_state = {key: value.clone() for key, value in model.state_dict().items() if ".default" in key}
    compress_adapter(model, density=0.04)

    for name, layer in adapter_layers(model, "compressed"):
        source = layer.get_delta_weight("default")
        count = max(1, round(0.04 * source.numel()))
        assert layer.num_values("compressed") == count, name
        torch.testing.assert_close(layer.get_delta_weight("compressed"), brute_force_ternary(source, count))
    assert all(torch.equal(model.state_dict()[key], value) for key, value in source_state.items())

    model.set_adapter("compressed")
    expected = logits_of(model, input_ids)
    model.save_pretrained(tmp_path, selected_adapters=["compressed"])
    loaded = PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "compressed").eval()
    torch.testing.assert_close(logits_of(loaded, input_ids), expected, rtol=0, atol=1e-5)


def test_breadcrumbs_merge_of_two_adapters_matches_the_dense_merge_and_round_trips(tmp_path, input_ids):
    model = get_peft_model(make_tiny_gpt2(), SparseConfig(density=0.1, init_seed=1), adapter_name="first")
    model.add_adapter("second", SparseConfig(density=0.1, init_seed=2))
    randomize_values(model)
    breadcrumbs_merge_adapters(model, ["first", "second"], [1.0, 0.5], "merged", beta=0.2, gamma=0.05)

    for name, layer in adapter_layers(model, "merged"):
        sources = [layer.get_delta_weight(adapter) for adapter in ("first", "second")]
        expected = brute_force_breadcrumbs(sources, [1.0, 0.5], 0.2, 0.05)
        torch.testing.assert_close(layer.get_delta_weight("merged"), expected, msg=name)

    model.set_adapter("merged")
    expected = logits_of(model, input_ids)
    model.save_pretrained(tmp_path, selected_adapters=["merged"])
    loaded = PeftModel.from_pretrained(make_tiny_gpt2(), tmp_path / "merged").eval()
    torch.testing.assert_close(logits_of(loaded, input_ids), expected, rtol=0, atol=1e-5)


def sparse_model():
    model = get_peft_model(make_tiny_llama(), SparseConfig(density=0.1))
    randomize_values(model)
    return model


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"density": 0.0}, r"density must be in \(0, 1\], got 0.0"),
        ({"density": 0.1, "alpha": -1.0}, "alpha must be a positive number or None, got -1.0"),
        ({"density": 0.1, "adapter_name": "other"}, r"adapter_name must name adapters among \['default'\]"),
        ({"density": 0.1, "compressed_name": "default"}, "compressed_name 'default' already exists"),
        ({"density": 0.1, "compressed_name": "v0.1"}, "compressed_name must be a non-empty name without '.'"),
    ],
)
def test_compress_adapter_errors_name_the_parameter(kwargs, message):
    with pytest.raises(ValueError, match=message):
        compress_adapter(sparse_model(), **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"weights": [1.0, 2.0]}, r"weights must have one number per adapter \(1\), got 2"),
        ({"beta": 1.0}, r"beta must be in \[0, 1\), got 1.0"),
        ({"gamma": -0.1}, r"gamma must be in \[0, 1\), got -0.1"),
        ({"beta": 0.6, "gamma": 0.5}, "beta \\+ gamma must be below 1"),
        ({"adapters": ["nope"]}, r"adapters must name adapters among \['default'\], got \['nope'\]"),
        ({"adapter_name": "default"}, "adapter_name 'default' already exists"),
    ],
)
def test_breadcrumbs_errors_name_the_parameter(kwargs, message):
    arguments = {"adapters": ["default"], "weights": [1.0], "adapter_name": "merged", **kwargs}
    with pytest.raises(ValueError, match=message):
        breadcrumbs_merge_adapters(sparse_model(), **arguments)


def test_breadcrumbs_refuses_adapters_on_different_layers():
    model = get_peft_model(make_tiny_llama(), SparseConfig(density=0.1, target_modules=["q_proj"]))
    model.add_adapter("other", SparseConfig(density=0.1, target_modules=["v_proj"]))
    with pytest.raises(ValueError, match="adapters must cover the same layers"):
        breadcrumbs_merge_adapters(model, ["default", "other"], [1.0, 1.0], "merged")


def test_tools_refuse_a_model_without_sparse_delta_adapters():
    model = get_peft_model(make_tiny_llama(), SoraConfig(r=2))
    with pytest.raises(ValueError, match="must be a PeftModel with SparseConfig or LiftConfig adapters, got SoraModel"):
        compress_adapter(model, density=0.1)
