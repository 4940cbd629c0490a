import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from peft_sparse import SparseConfig
from peft_sparse.sparse import SparseDeltaLinear
from peft_sparse.sparse.indices import check_index_set, index_dtype_for, random_unique_indices
from tests.conftest import make_mlp, make_tiny_llama, randomize_values


def make_layer(base: nn.Module, count: int, seed: int = 0) -> SparseDeltaLinear:
    indices = random_unique_indices(base.weight.numel(), count, seed=seed)
    layer = SparseDeltaLinear(base, "default", indices)
    randomize_values(layer, seed=seed + 1)
    return layer


def dense_reference(layer: SparseDeltaLinear, base_weight: torch.Tensor) -> torch.Tensor:
    """W0 + delta as a leaf tensor whose .grad is the dense weight gradient."""
    delta = torch.zeros(base_weight.numel())
    delta[layer.sparse_indices["default"].long()] = layer.sparse_values["default"].detach()
    return (base_weight + delta.view_as(base_weight)).requires_grad_(True)


@pytest.mark.parametrize("layer_type", ["linear", "conv1d"])
def test_values_gradient_equals_dense_gradient_at_indices(layer_type):
    torch.manual_seed(0)
    base = nn.Linear(24, 12) if layer_type == "linear" else Conv1D(12, 24)
    base.requires_grad_(False)
    base_weight = base.weight.detach().clone()
    layer = make_layer(base, count=40)
    inputs = torch.randn(3, 5, 24, requires_grad=True)
    upstream = torch.randn(3, 5, 12)

    (layer(inputs) * upstream).sum().backward()

    reference_inputs = inputs.detach().clone().requires_grad_(True)
    weight = dense_reference(layer, base_weight)
    matrix = weight if layer_type == "linear" else weight.t()
    reference = F.linear(reference_inputs, matrix, base.bias)
    (reference * upstream).sum().backward()
    torch.testing.assert_close(layer(inputs), reference, rtol=0, atol=1e-6)
    expected_grad = weight.grad.view(-1)[layer.sparse_indices["default"].long()]
    torch.testing.assert_close(layer.sparse_values["default"].grad, expected_grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(inputs.grad, reference_inputs.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fused", [False, True])  # fused AdamW does not bump tensor versions
def test_forward_follows_values_after_optimizer_step(fused):
    torch.manual_seed(0)
    base = nn.Linear(16, 8).requires_grad_(False)
    base_weight = base.weight.detach().clone()
    layer = make_layer(base, count=20)
    optimizer = torch.optim.AdamW([layer.sparse_values["default"]], lr=0.1, fused=fused)
    inputs = torch.randn(4, 16)
    layer(inputs).square().sum().backward()
    optimizer.step()
    expected = F.linear(inputs, dense_reference(layer, base_weight).detach(), base.bias)
    torch.testing.assert_close(layer(inputs), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unmerge_and_disable_restore_base_weight_bit_exactly(dtype):
    torch.manual_seed(0)
    base = nn.Linear(16, 8).to(dtype).requires_grad_(False)
    original = base.weight.detach().clone()
    layer = make_layer(base, count=30)
    inputs = torch.randn(4, 16, dtype=dtype)
    layer(inputs)
    assert not torch.equal(base.weight, original)  # the delta is merged in place

    layer.merge()
    layer.unmerge()
    assert torch.equal(base.weight, original)

    layer(inputs)
    layer.enable_adapters(False)
    assert torch.equal(layer(inputs), F.linear(inputs, original, base.bias))
    assert torch.equal(base.weight, original)


def test_overlapping_adapters_restore_exactly():
    torch.manual_seed(0)
    base = nn.Linear(8, 8).requires_grad_(False)
    original = base.weight.detach().clone()
    layer = SparseDeltaLinear(base, "first", torch.arange(0, 40, dtype=torch.int32))
    layer.update_layer("second", torch.arange(20, 60, dtype=torch.int32))
    randomize_values(layer)
    layer.set_adapter(["first", "second"])
    inputs = torch.randn(2, 8)
    both = layer(inputs).detach()  # no graph holds the weight, so the next forwards may rewrite it
    expected = F.linear(inputs, original + layer.get_delta_weight("first") + layer.get_delta_weight("second"), base.bias)
    torch.testing.assert_close(both, expected, rtol=0, atol=1e-6)
    layer.set_adapter("second")
    layer(inputs)
    torch.testing.assert_close(base.weight, original + layer.get_delta_weight("second"), rtol=0, atol=0)
    layer.delete_adapter("second")
    layer.set_adapter("first")
    layer.enable_adapters(False)
    layer(inputs)
    assert torch.equal(base.weight, original)


def test_unload_without_merge_restores_base_weights(input_ids):
    base = make_tiny_llama()
    originals = {name: p.detach().clone() for name, p in base.named_parameters()}
    model = get_peft_model(base, SparseConfig(density=0.1))
    randomize_values(model)
    model(input_ids=input_ids)
    unloaded = model.unload()
    for name, parameter in unloaded.named_parameters():
        assert torch.equal(parameter, originals[name]), name


def test_unsupported_target_module_is_named():
    with pytest.raises(ValueError, match=r"model\.embed_tokens.*Embedding.*torch\.nn\.Linear"):
        get_peft_model(make_tiny_llama(), SparseConfig(target_modules=["embed_tokens"]))


def test_index_dtype_switches_to_int64_at_2_pow_31():
    assert index_dtype_for(2**31 - 1) == torch.int32
    assert index_dtype_for(2**31) == torch.int64
    large = random_unique_indices(2**31 + 10, 1000, seed=0)
    assert large.dtype == torch.int64
    check_index_set(large, 2**31 + 10, where="test")


@pytest.mark.parametrize("count", [0, 1, 50, 90, 100])
def test_random_indices_are_unique_sorted_and_in_range(count):
    indices = random_unique_indices(100, count, seed=count)
    assert indices.numel() == count
    check_index_set(indices, 100, where="test")


def test_index_set_errors():
    with pytest.raises(ValueError, match=r"indices must be in \[0, 10\)"):
        check_index_set(torch.tensor([1, 10]), 10, where="x")
    with pytest.raises(ValueError, match="sorted ascending without duplicates"):
        check_index_set(torch.tensor([3, 3]), 10, where="x")


def test_training_touches_only_sparse_values():
    model = get_peft_model(make_mlp(), SparseConfig(density=0.2, target_modules=["0", "2"]))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("sparse_values" in name for name in trainable)
