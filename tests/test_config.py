import pytest
from peft import get_peft_model

from peft_sparse import SparseConfig
from peft_sparse.sparse.tuner import split_budget
from tests.conftest import make_tiny_llama

BAD_VALUES = [
    ("density", 0.0), ("density", 1.5), ("density", -0.1), ("density", "0.1"),
    ("num_tunable_weights", 0), ("num_tunable_weights", -5), ("num_tunable_weights", 2.5),
    ("selection", "grad"), ("selection", None),
    ("reselection_steps", 0), ("reselection_steps", 2.0),
    ("selection_accumulation_steps", 0), ("selection_accumulation_steps", 25),
    ("initial_reselection_rate", 0.0), ("initial_reselection_rate", 1.2),
    ("reselection_rate_schedule", "exponential"),
    ("target_modules", 5), ("target_modules", []), ("target_modules", ["q_proj", 3]),
    ("exclude_modules", 7),
    ("init_seed", -1), ("init_seed", "7"),
]


@pytest.mark.parametrize("field, value", BAD_VALUES)
def test_bad_value_raises_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SparseConfig(**{field: value})


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("density", "0.01", r"density must be a number in \(0, 1\], got '0.01' \(a str\)"),
        ("density", True, r"density must be a number in \(0, 1\], got True \(a bool\)"),
        ("num_tunable_weights", 2.5, r"num_tunable_weights must be a positive integer, got 2.5 \(a float\)"),
        ("reselection_steps", "20", r"reselection_steps must be a positive integer, got '20' \(a str\)"),
    ],
)
def test_value_of_the_wrong_type_raises_type_error_naming_the_field(field, value, message):
    with pytest.raises(TypeError, match=message):
        SparseConfig(**{field: value})


def test_density_and_budget_are_exclusive():
    with pytest.raises(ValueError, match="either density or num_tunable_weights"):
        SparseConfig(density=0.1, num_tunable_weights=100)
    assert SparseConfig().density == 0.01
    assert SparseConfig(num_tunable_weights=100).density is None


def test_global_budget_is_split_by_size_and_sums_exactly():
    model = get_peft_model(make_tiny_llama(), SparseConfig(num_tunable_weights=1001))
    layers = dict(model.base_model.sparse_delta_layers())
    counts = {name: layer.num_values("default") for name, layer in layers.items()}
    assert sum(counts.values()) == 1001
    sizes = {name: layer.get_base_layer().weight.numel() for name, layer in layers.items()}
    total = sum(sizes.values())
    for name in counts:
        assert abs(counts[name] - 1001 * sizes[name] / total) < 1


def test_budget_larger_than_targets_is_rejected():
    with pytest.raises(ValueError, match="num_tunable_weights must be at most"):
        get_peft_model(make_tiny_llama(), SparseConfig(num_tunable_weights=10**9))


def test_split_budget_largest_remainder():
    assert split_budget(10, {"a": 1, "b": 1, "c": 1}) == {"a": 4, "b": 3, "c": 3}
    assert split_budget(7, {"a": 3, "b": 1}) == {"a": 5, "b": 2}
