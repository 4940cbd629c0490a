"""The compact adapter layout (format_version 2): index gaps, ``save_dtype``, and format-1 adapters still loading."""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn

from peft_sparse import SparseConfig
from peft_sparse.sparse.compact_format import decode_indices, encode_indices, expand_tensors
from peft_sparse.sparse.indices import random_unique_indices
from tests.conftest import SPARSE_DELTA_CONFIGS, make_tiny_llama, randomize_values

WEIGHTS = "adapter_model.safetensors"
METHODS = pytest.mark.parametrize("method", sorted(SPARSE_DELTA_CONFIGS))


@pytest.mark.parametrize(
    "indices, dtype",
    [
        ([0], torch.uint8),
        ([0, 1, 2, 3], torch.uint8),
        ([254, 255, 256, 511, 767, 1000], torch.uint8),  # gaps of 254, 255 (one escape) and more
        ([70_000, 140_001], torch.uint16),
        ([5, 2**31 + 5, 2**40, 2**40 + 1], torch.uint32),  # a matrix with more entries than int32 holds
    ],
)
def test_encode_decode_round_trip(indices, dtype):
    indices = torch.tensor(indices, dtype=torch.int64)
    stream = encode_indices(indices)
    assert stream.dtype == dtype
    assert torch.equal(decode_indices(stream), indices)


def test_empty_layer_round_trips():
    stream = encode_indices(torch.empty(0, dtype=torch.int32))
    assert stream.numel() == 0
    assert decode_indices(stream).numel() == 0


def test_random_one_percent_costs_about_one_byte_per_index():
    indices = random_unique_indices(576 * 1536, 8847, seed=0)  # 1% of SmolLM2's mlp weight
    stream = encode_indices(indices)
    assert stream.dtype == torch.uint8 and stream.numel() < 1.1 * indices.numel()
    assert torch.equal(decode_indices(stream), indices.long())


def test_encode_refuses_unsorted_indices():
    with pytest.raises(ValueError, match="sorted ascending without duplicates"):
        encode_indices(torch.tensor([3, 1]))


@pytest.mark.parametrize(
    "stream, message",
    [
        (torch.tensor([4, 255], dtype=torch.uint8), "end inside a gap"),
        (torch.tensor([4, 5], dtype=torch.int32), "uint8, uint16 or uint32, got a 1-D torch.int32"),
    ],
)
def test_malformed_streams_are_refused(stream, message):
    with pytest.raises(ValueError, match=message):
        decode_indices(stream)


def write_format_1(saved_dir, target):
    """The adapter in ``saved_dir`` rewritten as format 1 wrote it: int32 indices, ``format_version`` 1."""
    target.mkdir()
    config = json.loads((saved_dir / "adapter_config.json").read_text())
    config = {key: value for key, value in config.items() if key != "save_dtype"} | {"format_version": 1}
    (target / "adapter_config.json").write_text(json.dumps(config))
    tensors = expand_tensors(load_file(saved_dir / WEIGHTS))
    save_file({key: tensor.to(torch.int32) if key.endswith("_indices") else tensor for key, tensor in tensors.items()},
              target / WEIGHTS, metadata={"format": "pt"})  # fmt: skip
    return target


def adapter_state(model):
    state = model.state_dict()
    return {name: tensor.clone() for name, tensor in state.items() if "_values" in name or "_indices" in name}


@METHODS
def test_format_1_and_2_load_the_same_model_bit_identically(tmp_path, input_ids, method):
    model = get_peft_model(make_tiny_llama(), SPARSE_DELTA_CONFIGS[method]())
    randomize_values(model)
    model.save_pretrained(tmp_path / "v2")
    write_format_1(tmp_path / "v2", tmp_path / "v1")

    loaded = {version: PeftModel.from_pretrained(make_tiny_llama(), tmp_path / version) for version in ("v1", "v2")}
    assert loaded["v1"].peft_config["default"].format_version == 1
    v1_state, v2_state = adapter_state(loaded["v1"]), adapter_state(loaded["v2"])
    assert v1_state.keys() == v2_state.keys() == adapter_state(model).keys()
    for key, tensor in adapter_state(model).items():
        assert torch.equal(v1_state[key], tensor) and torch.equal(v2_state[key], tensor), key
        assert v1_state[key].dtype == v2_state[key].dtype == tensor.dtype, key
    with torch.no_grad():
        assert torch.equal(loaded["v1"](input_ids=input_ids).logits, loaded["v2"](input_ids=input_ids).logits)
    assert (tmp_path / "v2" / WEIGHTS).stat().st_size < (tmp_path / "v1" / WEIGHTS).stat().st_size


def two_layer_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(640, 640), nn.ReLU(), nn.Linear(640, 640))


@pytest.mark.parametrize("save_dtype", [None, "bfloat16"])
def test_compact_file_is_within_1_3x_of_lora_at_equal_trainable_count(tmp_path, save_dtype):
    lora = get_peft_model(two_layer_model(), LoraConfig(r=4, target_modules=["0", "2"], init_lora_weights=False))
    lora_count = sum(parameter.numel() for parameter in lora.parameters() if parameter.requires_grad)  # 2 x 5120
    per_module = {"0": lora_count // 2, "2": lora_count // 2}  # 1.25% of each 640 x 640 weight
    sparse = get_peft_model(two_layer_model(), SparseConfig(target_modules=["0", "2"], values_per_module=per_module,
                                                            save_dtype=save_dtype))  # fmt: skip
    assert sum(parameter.numel() for parameter in sparse.parameters() if parameter.requires_grad) == lora_count
    if save_dtype is not None:
        lora = lora.to(getattr(torch, save_dtype))  # LoRA in the same value dtype
    lora.save_pretrained(tmp_path / "lora")
    sparse.save_pretrained(tmp_path / "sparse")

    lora_bytes = (tmp_path / "lora" / WEIGHTS).stat().st_size
    sparse_bytes = (tmp_path / "sparse" / WEIGHTS).stat().st_size
    value_bytes = 4 if save_dtype is None else 2
    # at the information limit a 1.25% index costs ~7.8 bits: (4 + 1) / 4 in fp32, (2 + 1) / 2 in bf16
    assert sparse_bytes <= (1.3 if value_bytes == 4 else 1.55) * lora_bytes


@METHODS
@pytest.mark.parametrize("save_dtype", ["bfloat16", "float16"])
def test_save_dtype_round_trip(tmp_path, method, save_dtype):
    model = get_peft_model(make_tiny_llama(), SPARSE_DELTA_CONFIGS[method](save_dtype=save_dtype))
    randomize_values(model)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / WEIGHTS)
    assert {tensor.dtype for key, tensor in saved.items() if key.endswith("_values")} == {getattr(torch, save_dtype)}

    loaded = PeftModel.from_pretrained(make_tiny_llama(), tmp_path)
    assert loaded.peft_config["default"].save_dtype == save_dtype
    loaded_state = adapter_state(loaded)
    for key, tensor in adapter_state(model).items():
        expected = tensor.to(getattr(torch, save_dtype)).to(tensor.dtype) if "_values" in key else tensor
        assert loaded_state[key].dtype == tensor.dtype and torch.equal(loaded_state[key], expected), key


@METHODS
def test_in_memory_state_dict_round_trip(method):
    model = get_peft_model(make_tiny_llama(), SPARSE_DELTA_CONFIGS[method]())
    randomize_values(model)
    fresh = get_peft_model(make_tiny_llama(), SPARSE_DELTA_CONFIGS[method](init_weights=False))
    set_peft_model_state_dict(fresh, get_peft_model_state_dict(model))
    loaded_state = adapter_state(fresh)
    for key, tensor in adapter_state(model).items():
        assert torch.equal(loaded_state[key], tensor), key


def test_values_of_an_integer_dtype_are_refused(tmp_path):
    get_peft_model(make_tiny_llama(), SPARSE_DELTA_CONFIGS["sparse"]()).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS)
    key = sorted(key for key in tensors if key.endswith("sparse_values"))[0]
    tensors[key] = tensors[key].to(torch.int32)
    save_file(tensors, tmp_path / WEIGHTS)
    with pytest.raises(ValueError, match="values must be a floating-point tensor, got torch.int32"):
        PeftModel.from_pretrained(make_tiny_llama(), tmp_path)


@pytest.mark.parametrize("save_dtype", ["int8", "bf16", 16])
def test_unknown_save_dtype_is_a_config_error(save_dtype):
    with pytest.raises(
        ValueError,
        match=r"save_dtype must be None \(the values' training dtype\) or one of \('bfloat16', 'float16', 'float32'\)",
    ):
        SparseConfig(density=0.1, save_dtype=save_dtype)
