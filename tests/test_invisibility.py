"""The in-place delta is invisible outside its layer: forwards, backward, state dicts, tied weights."""

import copy

import pytest
import torch
from accelerate import Accelerator
from peft import PeftModel, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from peft_sparse import RosaConfig, S2ftConfig, SnellConfig, SoraConfig
from peft_sparse.sparse import SparseDeltaLinear
from peft_sparse.sparse.in_place import InPlaceDeltaLayer
from peft_sparse.tuners.rosa.layer import LowRankPart
from tests.conftest import SPARSE_DELTA_CONFIGS, make_tied_llama, make_tiny_gpt2, make_tiny_llama
from tests.test_save_load import logits_of

SPARSE_METHODS = pytest.mark.parametrize("method", sorted(SPARSE_DELTA_CONFIGS))
# every method whose delta may be held in the frozen weight
IN_PLACE_CONFIGS = {
    **SPARSE_DELTA_CONFIGS,
    "snell": lambda **kwargs: SnellConfig(r=4, sparsity=0.5, **kwargs),
    # RoSA's LoRA part is computed beside the weight; its sparse part is held in the weight like SFT's
    "rosa": lambda **kwargs: RosaConfig(r=2, density=0.1, mask_rule="magnitude", **kwargs),
}
IN_PLACE_METHODS = pytest.mark.parametrize("method", sorted(IN_PLACE_CONFIGS))
# every method, with a non-zero delta from the start
ALL_CONFIGS = {
    **{name: (lambda factory=factory: factory(init_weights=False)) for name, factory in SPARSE_DELTA_CONFIGS.items()},
    "sora": lambda: SoraConfig(r=4, init_weights=False),
    "snell": lambda: SnellConfig(r=4, sparsity=0.5, init_weights=False),
    "rosa": lambda: IN_PLACE_CONFIGS["rosa"](init_weights=False),
    # its targets follow from module roles: Llama's and GPT-2's names
    "s2ft": lambda: S2ftConfig(num_heads=1, num_channels=8, attention_output_modules=["o_proj", "attn.c_proj"],
                               ffn_output_modules=["down_proj", "mlp.c_proj"], init_weights=False),  # fmt: skip
}
ALL_METHODS = pytest.mark.parametrize("method", sorted(ALL_CONFIGS))


def value_gradients(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def assert_pristine_base(state: dict, base: nn.Module) -> None:
    """Every base parameter in a peft model's ``state`` equals the untouched ``base``'s."""
    for name, parameter in base.named_parameters():
        key = f"base_model.model.{name}"
        if key not in state:  # an adapted module keeps its base layer's tensors under base_layer
            module, attribute = key.rsplit(".", 1)
            key = f"{module}.base_layer.{attribute}"
        assert torch.equal(state[key], parameter), f"{key} is not the pristine base weight"


def sparse_model(method: str, make_base=make_tiny_llama):
    return get_peft_model(make_base(), IN_PLACE_CONFIGS[method](init_weights=False))


def second_config(method: str, **kwargs):
    """Another adapter's config of the same method, with another non-zero delta."""
    if method == "snell":  # its factors come from the global RNG
        torch.manual_seed(7)
        return IN_PLACE_CONFIGS[method](init_weights=False, **kwargs)
    return IN_PLACE_CONFIGS[method](init_weights=False, init_seed=7, **kwargs)


def in_place_layers(model: nn.Module) -> list[tuple[str, InPlaceDeltaLayer]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, InPlaceDeltaLayer)]


@IN_PLACE_METHODS
@pytest.mark.parametrize("switch", ["disable_adapter", "set_adapter"])
def test_a_forward_between_forward_and_backward_leaves_the_gradients_unchanged(method, switch, input_ids):
    model = sparse_model(method)
    model.add_adapter("other", second_config(method))
    model.set_adapter("default")
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    expected = value_gradients(model)
    model.zero_grad()

    loss = model(input_ids=input_ids, labels=input_ids).loss
    if switch == "disable_adapter":
        with model.disable_adapter(), torch.no_grad():
            reference = model(input_ids=input_ids).logits
        torch.testing.assert_close(reference, logits_of(make_tiny_llama(), input_ids), rtol=0, atol=1e-6)
    else:
        model.set_adapter("other")
        model(input_ids=input_ids)
        model.set_adapter("default")
    loss.backward()  # fails if the middle forward wrote a weight the graph saved
    gradients = value_gradients(model)
    assert gradients.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(gradients[name], expected[name], rtol=0, atol=1e-7, msg=name)


@IN_PLACE_METHODS
def test_the_weight_holds_the_delta_in_place_when_no_graph_needs_it(method, input_ids):
    model = sparse_model(method)
    pristine = {name: layer.get_base_layer().weight.detach().clone() for name, layer in in_place_layers(model)}
    model(input_ids=input_ids)  # the graph is dropped at once: nothing holds the weights
    for name, layer in in_place_layers(model):
        assert layer._written, name
        held = super(LowRankPart, layer) if isinstance(layer, LowRankPart) else layer  # RoSA: its sparse part
        expected = pristine[name] + held.get_delta_weight("default")
        torch.testing.assert_close(layer.get_base_layer().weight, expected, rtol=0, atol=0)


@IN_PLACE_METHODS
def test_a_fused_optimizer_step_is_seen_by_the_next_forward(method, input_ids):
    model = sparse_model(method)
    reference = copy.deepcopy(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, fused=True)
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    optimizer.step()  # fused: parameters change without a version bump
    with torch.no_grad():
        for parameter, copied in zip(model.parameters(), reference.parameters()):
            if parameter.requires_grad:  # the reference gets the new values through copy_, which bumps the version
                copied.copy_(parameter)
    torch.testing.assert_close(logits_of(model, input_ids), logits_of(reference, input_ids), rtol=0, atol=1e-6)


@ALL_METHODS
@pytest.mark.parametrize("make_base", [make_tiny_llama, make_tiny_gpt2])
def test_a_state_dict_round_trip_gives_identical_logits_and_base(method, make_base, input_ids):
    model = get_peft_model(make_base(), ALL_CONFIGS[method]())
    expected = logits_of(model, input_ids)
    state = model.state_dict()
    assert_pristine_base(state, make_base())

    restored = get_peft_model(make_base(seed=5), ALL_CONFIGS[method]())  # other base weights, other adapter
    restored.load_state_dict(state)
    torch.testing.assert_close(logits_of(restored, input_ids), expected, rtol=0, atol=1e-6)
    with restored.disable_adapter():
        torch.testing.assert_close(logits_of(restored, input_ids), logits_of(make_base(), input_ids), rtol=0, atol=1e-6)


@ALL_METHODS
def test_a_disabled_forward_of_a_merged_model_is_the_base_and_leaves_it_merged(method, input_ids):
    """peft's test_disable_adapters_with_merging, on the tiny Llama: disabling shows W0 whatever is merged."""
    model = get_peft_model(make_tiny_llama(), ALL_CONFIGS[method]())
    expected = logits_of(model, input_ids)
    model.merge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(logits_of(model, input_ids), logits_of(make_tiny_llama(), input_ids),
                                   rtol=0, atol=1e-5)  # fmt: skip
    torch.testing.assert_close(logits_of(model, input_ids), expected, rtol=0, atol=1e-5)
    merged = model.merge_and_unload()
    torch.testing.assert_close(logits_of(merged, input_ids), expected, rtol=0, atol=1e-5)


@IN_PLACE_METHODS
def test_a_state_dict_stays_pristine_after_later_forwards(method, input_ids):
    model = sparse_model(method)
    expected = logits_of(model, input_ids)
    state = model.state_dict()  # aliases the weights, which the next forward writes the deltas into
    logits_of(model, input_ids)
    restored = sparse_model(method)
    restored.load_state_dict(state)
    torch.testing.assert_close(logits_of(restored, input_ids), expected, rtol=0, atol=1e-6)
    with restored.disable_adapter():
        torch.testing.assert_close(logits_of(restored, input_ids), logits_of(make_tiny_llama(), input_ids), rtol=0, atol=0)


@IN_PLACE_METHODS
def test_a_state_dict_taken_while_a_graph_holds_the_weight_is_pristine(method, input_ids):
    model = sparse_model(method)
    loss = model(input_ids=input_ids, labels=input_ids).loss
    state = model.state_dict()
    loss.backward()  # the state dict did not write the weights under the graph
    assert_pristine_base(state, make_tiny_llama())


@ALL_METHODS
def test_accelerate_save_state_and_load_state_round_trip(method, input_ids, tmp_path):
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(get_peft_model(make_tiny_llama(), ALL_CONFIGS[method]()))
    expected = logits_of(model, input_ids)
    accelerator.save_state(str(tmp_path))

    restoring = Accelerator(cpu=True)
    restored = restoring.prepare(get_peft_model(make_tiny_llama(seed=5), ALL_CONFIGS[method]()))
    restoring.load_state(str(tmp_path))
    torch.testing.assert_close(logits_of(restored, input_ids), expected, rtol=0, atol=1e-6)
    with restored.disable_adapter():
        torch.testing.assert_close(logits_of(restored, input_ids), logits_of(make_tiny_llama(), input_ids), rtol=0, atol=1e-6)


@ALL_METHODS
@pytest.mark.parametrize("make_base", [make_tiny_llama, make_tiny_gpt2])
def test_every_layer_has_in_and_out_features(method, make_base):
    base = make_base()
    expected = {
        name: (module.in_features, module.out_features) if isinstance(module, nn.Linear)
        else tuple(module.weight.shape)  # transformers Conv1D: weight [in, out]
        for name, module in base.named_modules() if isinstance(module, (nn.Linear, Conv1D))
    }
    model = get_peft_model(base, ALL_CONFIGS[method]())
    layers = {name: module for name, module in model.base_model.model.named_modules() if hasattr(module, "base_layer")}
    assert layers
    for name, layer in layers.items():
        assert (layer.in_features, layer.out_features) == expected[name], name


@SPARSE_METHODS
def test_init_weights_false_gives_a_seeded_non_zero_delta(method, input_ids):
    zero = get_peft_model(make_tiny_llama(), SPARSE_DELTA_CONFIGS[method]())
    torch.testing.assert_close(logits_of(zero, input_ids), logits_of(make_tiny_llama(), input_ids), rtol=0, atol=0)
    first, second = sparse_model(method), sparse_model(method)
    assert not torch.allclose(logits_of(first, input_ids), logits_of(make_tiny_llama(), input_ids))
    for (_, layer), (_, twin) in zip(first.base_model.sparse_delta_layers(), second.base_model.sparse_delta_layers()):
        assert torch.equal(layer.delta_values["default"], twin.delta_values["default"])
        assert bool((layer.delta_values["default"] != 0).all())


def test_sora_init_weights_false_starts_from_a_non_zero_delta(input_ids):
    base_logits = logits_of(make_tiny_llama(), input_ids)
    torch.testing.assert_close(logits_of(get_peft_model(make_tiny_llama(), SoraConfig(r=4)), input_ids), base_logits)
    assert not torch.allclose(logits_of(get_peft_model(make_tiny_llama(), ALL_CONFIGS["sora"]()), input_ids), base_logits)


def test_lift_adapter_loaded_for_inference_keeps_int32_indices(tmp_path):
    model = get_peft_model(make_tiny_llama(), SPARSE_DELTA_CONFIGS["lift"](init_weights=False))
    model.save_pretrained(tmp_path / "saved")
    loaded = PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "saved")
    for _, layer in loaded.base_model.sparse_delta_layers():
        assert layer.delta_indices["default"].dtype == torch.int32
    loaded.save_pretrained(tmp_path / "again")
    from safetensors.torch import load_file

    first, again = (load_file(tmp_path / folder / "adapter_model.safetensors") for folder in ("saved", "again"))
    assert first.keys() == again.keys() and all(torch.equal(first[key], again[key]) for key in first)


@IN_PLACE_METHODS
def test_a_tied_weight_never_holds_the_delta(method, input_ids):
    base = make_tied_llama()
    assert base.lm_head.weight is base.model.embed_tokens.weight
    embeddings = base.model.embed_tokens.weight.detach().clone()
    model = get_peft_model(base, IN_PLACE_CONFIGS[method](target_modules=["lm_head", "q_proj"], init_weights=False))
    head = model.base_model.model.lm_head
    assert not head.writes_in_place and model.base_model.model.model.layers[0].self_attn.q_proj.writes_in_place
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.equal(base.model.embed_tokens.weight, embeddings)  # the embeddings never saw the head's delta
    hidden = model.base_model.model.model(input_ids=input_ids).last_hidden_state
    expected = hidden @ (embeddings + head.get_delta_weight("default")).T
    torch.testing.assert_close(logits_of(model, input_ids), expected.detach(), rtol=0, atol=1e-5)


@IN_PLACE_METHODS
def test_merging_into_a_tied_weight_is_refused_and_changes_nothing(method, input_ids):
    model = get_peft_model(make_tied_llama(), IN_PLACE_CONFIGS[method](target_modules=["q_proj", "lm_head"], init_weights=False))
    expected = logits_of(model, input_ids)
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match="module 'lm_head'.*tied to another module.*tie_word_embeddings=False"):
        model.merge_and_unload()
    assert not any(layer.merged for _, layer in in_place_layers(model))
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, weights[name]), name
    torch.testing.assert_close(logits_of(model, input_ids), expected, rtol=0, atol=0)


def test_a_bf16_forward_sees_rounded_weights_in_place_and_an_fp32_term_in_exact_mode():
    torch.manual_seed(0)
    base = nn.Linear(64, 32).to(torch.bfloat16).requires_grad_(False)
    pristine = base.weight.detach().clone()
    indices = torch.arange(0, 2048, 7, dtype=torch.int32)
    exact = SparseDeltaLinear(copy.deepcopy(base), "default", indices, writes_in_place=False, init_weights=False)
    in_place = SparseDeltaLinear(copy.deepcopy(base), "default", indices, init_weights=False)
    for layer in (exact, in_place):  # fp32 values on a bf16 base, as get_peft_model leaves them
        layer.delta_values["default"].data = layer.delta_values["default"].data.float()
    delta = torch.zeros(32 * 64)
    delta[indices.long()] = exact.delta_values["default"].detach()
    delta = delta.view(32, 64)  # fp32
    inputs = torch.randn(4, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        in_place_output, exact_output = in_place(inputs), exact(inputs)
    rounded = (pristine.float() + delta).to(torch.bfloat16)
    assert torch.equal(in_place_output, nn.functional.linear(inputs, rounded, base.bias))
    fp32_term = (inputs.float() @ delta.T).to(torch.bfloat16)
    assert torch.equal(exact_output, nn.functional.linear(inputs, pristine, base.bias) + fp32_term)
    assert torch.equal(exact.get_base_layer().weight, pristine)


@IN_PLACE_METHODS
def test_after_an_optimizer_step_the_frozen_parameters_are_the_base_weights(method, input_ids):
    model = sparse_model(method)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    pristine = dict(make_tiny_llama().named_parameters())
    for name, parameter in model.base_model.model.named_parameters():
        if not parameter.requires_grad:
            assert torch.equal(parameter, pristine[name.replace("base_layer.", "")]), name


@IN_PLACE_METHODS
def test_merging_only_another_adapter_takes_the_written_delta_out(method, input_ids):
    model = get_peft_model(make_tiny_llama(), IN_PLACE_CONFIGS[method](target_modules=["q_proj", "v_proj"], init_weights=False))
    model.add_adapter("other", second_config(method, target_modules=["q_proj"]))
    logits_of(model, input_ids)  # writes "default" into q_proj and v_proj
    model.set_adapter("other")
    expected = logits_of(model, input_ids)
    merged = model.merge_and_unload(adapter_names=["other"])
    torch.testing.assert_close(logits_of(merged, input_ids), expected, rtol=0, atol=1e-6)


def test_adding_a_lift_adapter_leaves_no_progress_bar_open():
    model = get_peft_model(make_tiny_llama(), SPARSE_DELTA_CONFIGS["lift"]())
    model.add_adapter("other", SPARSE_DELTA_CONFIGS["lift"](init_seed=3))
    assert model.base_model._selection_progress is None
    copy.deepcopy(model)  # an open tqdm bar holds the console stream, which cannot be copied
