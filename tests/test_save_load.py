import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from peft_sparse.sparse import SparseDeltaLayer
from peft_sparse.sparse.compact_format import GAP_DTYPES, decode_indices, expand_tensors, gaps_name
from tests.conftest import SPARSE_DELTA_CONFIGS, make_tiny_gpt2, make_tiny_llama, randomize_values

METHODS = pytest.mark.parametrize("method", sorted(SPARSE_DELTA_CONFIGS))


def logits_of(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


@METHODS
@pytest.mark.parametrize("make_base", [make_tiny_llama, make_tiny_gpt2])
def test_save_load_gives_identical_logits(tmp_path, input_ids, make_base, method):
    model = get_peft_model(make_base(), SPARSE_DELTA_CONFIGS[method]())
    randomize_values(model)
    expected = logits_of(model, input_ids)
    assert not torch.allclose(expected, logits_of(make_base(), input_ids))
    model.save_pretrained(tmp_path)

    loaded = PeftModel.from_pretrained(make_base(), tmp_path)
    torch.testing.assert_close(logits_of(loaded, input_ids), expected, rtol=0, atol=1e-6)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    for name, layer in model.base_model.sparse_delta_layers():
        key = f"base_model.model.{name}.{gaps_name(layer.other_param_names[0])}"
        assert saved[key].dtype in GAP_DTYPES
        assert torch.equal(decode_indices(saved[key]), layer.delta_indices["default"].long())


@METHODS
@pytest.mark.parametrize("make_base", [make_tiny_llama, make_tiny_gpt2])
def test_merge_and_unload_gives_identical_logits(input_ids, make_base, method):
    model = get_peft_model(make_base(), SPARSE_DELTA_CONFIGS[method]())
    randomize_values(model)
    expected = logits_of(model, input_ids)
    merged = model.merge_and_unload()
    assert not any(isinstance(module, SparseDeltaLayer) for module in merged.modules())
    torch.testing.assert_close(logits_of(merged, input_ids), expected, rtol=0, atol=1e-5)


@METHODS
def test_disable_adapter_gives_base_logits(input_ids, method):
    expected = logits_of(make_tiny_llama(), input_ids)
    model = get_peft_model(make_tiny_llama(), SPARSE_DELTA_CONFIGS[method]())
    randomize_values(model)
    logits_of(model, input_ids)
    with model.disable_adapter():
        assert torch.equal(logits_of(model, input_ids), expected)


@METHODS
def test_loading_onto_a_base_of_other_shape_is_a_clear_error(tmp_path, method):
    model = get_peft_model(make_tiny_llama(), SPARSE_DELTA_CONFIGS[method]())
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="trained on another base model"):
        PeftModel.from_pretrained(make_tiny_llama(intermediate_size=48), tmp_path)


@METHODS
def test_out_of_range_indices_in_checkpoint_are_rejected(tmp_path, method):
    model = get_peft_model(make_tiny_llama(), SPARSE_DELTA_CONFIGS[method]())
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = expand_tensors(load_file(path))
    key = next(k for k in tensors if k.endswith("_indices"))
    tensors[key][-1] = 10**6
    save_file(tensors, path)
    with pytest.raises(ValueError, match=r"indices must be in \[0, "):
        PeftModel.from_pretrained(make_tiny_llama(), tmp_path)
