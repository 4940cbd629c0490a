"""S2FT: slice layers (GEMM gradient, dense additive term), budgets, selection, round trips, exact LoRA export."""

import json
import textwrap

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn
from transformers import GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

from peft_sparse import S2ftConfig
from peft_sparse.tuners.s2ft.layer import COLUMNS, ROWS, S2ftLinear, slice_indices
from tests.conftest import make_tiny_gpt2, make_tiny_llama, randomize_values, run_child
from tests.test_save_load import logits_of

COUPLED = dict(ffn_input_modules=["up_proj", "gate_proj"])


def s2ft_model(make_base=make_tiny_llama, **kwargs):
    model = get_peft_model(make_base(), S2ftConfig(**{"num_heads": 1, "num_channels": 8, **kwargs}))
    randomize_values(model)
    return model


# --- one layer ------------------------------------------------------------------------------------


@pytest.mark.parametrize("base_cls", [nn.Linear, Conv1D])
@pytest.mark.parametrize("axis", [ROWS, COLUMNS])
@pytest.mark.parametrize("in_place", [True, False])
def test_slice_gradient_equals_dense_gradient_restricted_to_the_slice(base_cls, axis, in_place):
    torch.manual_seed(0)
    base = nn.Linear(12, 10) if base_cls is nn.Linear else Conv1D(10, 12)  # Conv1D(nf=out, nx=in)
    shape = tuple(base.weight.shape)
    indices = slice_indices(axis, torch.tensor([1, 4, 5]), shape)
    pristine = base.weight.detach().clone()
    layer = S2ftLinear(base, "default", indices, writes_in_place=in_place, init_weights=False)
    x = torch.randn(3, 4, 12, requires_grad=True)
    target = torch.randn(3, 4, 10)

    F.mse_loss(layer(x), target).backward()

    weight = pristine.requires_grad_(True)
    delta = torch.zeros(weight.numel()).index_put((indices.long(),), layer.s2ft_values["default"].detach())
    dense_x = x.detach().clone().requires_grad_(True)
    merged = weight + delta.view(shape)
    output = F.linear(dense_x, merged.t() if base_cls is Conv1D else merged, base.bias)
    F.mse_loss(output, target).backward()
    expected = weight.grad.view(-1)[indices.long()]
    torch.testing.assert_close(layer.s2ft_values["default"].grad, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(x.grad, dense_x.grad, rtol=1e-5, atol=1e-7)


def test_indices_that_are_not_a_slice_are_refused():
    with pytest.raises(ValueError, match="must be whole rows or whole columns of the 4x8 weight"):
        S2ftLinear(nn.Linear(8, 4), "default", torch.tensor([0, 1, 9], dtype=torch.int32))


# --- the tuner ------------------------------------------------------------------------------------


def test_training_changes_only_the_slice(input_ids):
    model = get_peft_model(make_tiny_llama(), S2ftConfig(num_heads=1, num_channels=8, **COUPLED))
    pristine = {name: p.detach().clone() for name, p in make_tiny_llama().named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    slices = {name: layer.delta_indices["default"].long() for name, layer in model.base_model.sparse_delta_layers()}
    merged = model.merge_and_unload()

    assert {name.rsplit(".", 1)[-1] for name in slices} == {"o_proj", "down_proj", "up_proj", "gate_proj"}
    for name, parameter in merged.named_parameters():
        changed = torch.nonzero(parameter.detach().view(-1) != pristine[name].view(-1)).flatten()
        module = name.removesuffix(".weight")
        if module in slices:
            assert torch.isin(changed, slices[module]).all(), name
            assert changed.numel() > 0.9 * slices[module].numel(), name
        else:
            assert changed.numel() == 0, name


def test_coupled_rows_are_the_channels_of_the_blocks_down_proj():
    model = get_peft_model(make_tiny_llama(), S2ftConfig(num_heads=0, num_channels=8, **COUPLED))
    for block in model.base_model.model.model.layers:
        channels = block.mlp.down_proj.weight_slice("default").positions
        assert block.mlp.down_proj.weight_slice("default").axis == COLUMNS
        for name in ("up_proj", "gate_proj"):
            weight_slice = getattr(block.mlp, name).weight_slice("default")
            assert weight_slice.axis == ROWS and torch.equal(weight_slice.positions, channels)
        assert isinstance(block.self_attn.o_proj, nn.Linear)  # num_heads=0: left alone


def test_weight_norm_selects_the_heads_and_channels_with_the_largest_columns():
    base = make_tiny_llama()
    o_proj = base.model.layers[0].self_attn.o_proj.weight  # [32, 32]: 4 heads of 8 columns
    with torch.no_grad():
        o_proj[:, 16:24] *= 10  # head 2
        base.model.layers[0].mlp.down_proj.weight[:, [5, 40]] *= 10
    model = get_peft_model(base, S2ftConfig(num_heads=1, num_channels=2, selection="weight_norm"))
    block = model.base_model.model.model.layers[0]
    assert block.self_attn.o_proj.weight_slice("default").positions.tolist() == list(range(16, 24))
    assert block.mlp.down_proj.weight_slice("default").positions.tolist() == [5, 40]


def calibration_batches() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(11)
    batches = [torch.randint(0, 64, (2, 10), generator=generator) for _ in range(3)]
    return [{"input_ids": ids, "labels": ids} for ids in batches]


def brute_force_column_scores(base: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Sum over batches of each column's squared norm of the dense weight gradient, by plain autograd."""
    weights = {name: base.get_submodule(name).weight for name in names}
    base.requires_grad_(False)
    for weight in weights.values():
        weight.requires_grad_(True)
    scores = {name: torch.zeros(weight.shape[1]) for name, weight in weights.items()}
    for batch in calibration_batches():
        base(**batch).loss.backward()
        for name, weight in weights.items():
            scores[name] += weight.grad.square().sum(0)
            weight.grad = None
    return scores


def test_gradient_selection_keeps_the_heads_and_channels_with_the_largest_gradient_columns():
    names = [f"model.layers.{i}.{module}" for i in range(2) for module in ("self_attn.o_proj", "mlp.down_proj")]
    scores = brute_force_column_scores(make_tiny_llama(), names)
    model = get_peft_model(make_tiny_llama(), S2ftConfig(num_heads=2, num_channels=5, selection="gradient", **COUPLED))
    model.base_model.select_by_gradient(calibration_batches())

    for name in names:
        layer = model.base_model.model.get_submodule(name)
        if name.endswith("o_proj"):  # 4 heads of 8 columns
            heads = torch.topk(scores[name].view(4, 8).sum(1), 2).indices.sort().values
            expected = (heads[:, None] * 8 + torch.arange(8)).flatten()
        else:
            expected = torch.topk(scores[name], 5).indices.sort().values
        assert layer.weight_slice("default").positions.tolist() == expected.tolist(), name
        if name.endswith("down_proj"):  # the block's up/gate rows follow its channels
            mlp = model.base_model.model.get_submodule(name.rpartition(".")[0])
            for coupled in (mlp.up_proj, mlp.gate_proj):
                assert coupled.weight_slice("default").positions.tolist() == expected.tolist()
    assert all(p.grad is None for p in model.parameters())  # the calibration leaves no gradient behind


def test_gradient_selection_must_run_before_training_and_then_trains(input_ids, tmp_path):
    model = get_peft_model(make_tiny_llama(), S2ftConfig(num_heads=1, num_channels=4, selection="gradient"))
    model.eval()
    model(input_ids=input_ids)  # inference needs no selection
    model.train()
    with pytest.raises(ValueError, match=r"selection='gradient' and no selection yet: call .*select_by_gradient"):
        model(input_ids=input_ids, labels=input_ids)
    model.base_model.select_by_gradient(calibration_batches())
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    optimizer.step()
    with pytest.raises(ValueError, match="select_by_gradient chooses before training: adapter 'default' has trained"):
        model.base_model.select_by_gradient(calibration_batches())

    expected = logits_of(model, input_ids)
    model.save_pretrained(tmp_path / "saved")
    loaded = PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "saved", is_trainable=True)
    torch.testing.assert_close(logits_of(loaded, input_ids), expected, rtol=0, atol=1e-6)
    loaded.train()
    loaded(input_ids=input_ids, labels=input_ids).loss.backward()  # its indices came with the checkpoint
    with pytest.raises(ValueError, match="select_by_gradient needs S2ftConfig\\(selection='gradient'\\), got 'random'"):
        get_peft_model(make_tiny_llama(), S2ftConfig(num_heads=1)).base_model.select_by_gradient([])


def test_random_selection_follows_init_seed():
    def heads(seed):
        model = get_peft_model(make_tiny_llama(), S2ftConfig(num_heads=2, num_channels=4, init_seed=seed))
        return [layer.delta_indices["default"] for _, layer in model.base_model.sparse_delta_layers()]

    first, again, other = heads(1), heads(1), heads(2)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def smollm2_shaped_llama() -> LlamaForCausalLM:
    """SmolLM2-135M's block shapes (576 hidden, 9 heads of 64, 1536 FFN), 2 blocks, small vocabulary."""
    config = LlamaConfig(
        vocab_size=64, hidden_size=576, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=9,
        num_key_value_heads=3,
    )  # fmt: skip
    return LlamaForCausalLM(config)


@pytest.mark.parametrize(
    "make_base, extra, rank",
    [
        (make_tiny_llama, {}, 4), (make_tiny_gpt2, "gpt2", 4), (smollm2_shaped_llama, {}, 4),
        (smollm2_shaped_llama, {}, 16), (smollm2_shaped_llama, COUPLED, 16), (smollm2_shaped_llama, COUPLED, 64),
    ],
)  # fmt: skip
def test_lora_rank_budget_matches_lora_all_linear_within_5_percent(make_base, extra, rank):
    if extra == "gpt2":
        extra = dict(attention_output_modules=["attn.c_proj"], ffn_output_modules=["mlp.c_proj"])
    base = make_base()
    lora = get_peft_model(make_base(), LoraConfig(r=rank, target_modules="all-linear"))
    lora_count = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    model = get_peft_model(base, S2ftConfig(lora_rank_budget=rank, **extra))
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert abs(count / lora_count - 1) <= 0.05, (count, lora_count)


def test_an_unreachable_lora_rank_budget_is_a_clear_error():
    with pytest.raises(ValueError, match="lora_rank_budget=64 asks for 65,536 trainable weights, but whole heads"):
        get_peft_model(make_tiny_llama(), S2ftConfig(lora_rank_budget=64))


# --- bitsandbytes bases --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    make_tiny_llama().save_pretrained(path)
    return path


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
@pytest.mark.parametrize("axis", [ROWS, COLUMNS])
def test_quantized_base_gives_the_dequantized_weight_plus_the_slice(quantization, axis):
    """4-bit: output and slice gradient match ``F.linear`` on the dequantized weight + slice. 8-bit also
    quantizes activations (base off by ~1e-2), so there the slice term itself must be exact."""
    pytest.importorskip("bitsandbytes")
    from peft_sparse.quantization import dequantized_weight
    from peft_sparse.tuners.s2ft.layer import QuantizedS2ftLinear
    from tests.test_quantized import quantized_linear

    base = quantized_linear(quantization)  # [48, 64]
    indices = slice_indices(axis, torch.tensor([2, 7, 30]), (48, 64))
    layer = QuantizedS2ftLinear(base, "default", indices)
    randomize_values(layer, scale=0.05)
    inputs = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(2))
    output = layer(inputs)
    output.square().sum().backward()

    delta = layer.get_delta_weight("default")
    reference_weight = (dequantized_weight(base) + delta).requires_grad_()
    reference = F.linear(inputs, reference_weight, base.bias)
    reference.square().sum().backward()
    with torch.no_grad():
        torch.testing.assert_close(output - base(inputs), inputs @ delta.T, rtol=1e-5, atol=1e-5)
    if quantization == "int8":
        torch.testing.assert_close(output, reference, rtol=0, atol=5e-2)
        return
    torch.testing.assert_close(output, reference, rtol=1e-5, atol=1e-5)
    expected_grad = reference_weight.grad.view(-1)[indices.long()]
    torch.testing.assert_close(layer.s2ft_values["default"].grad, expected_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_s2ft_trains_on_a_quantized_model_and_never_writes_its_weights(tiny_llama_dir, quantization):
    pytest.importorskip("bitsandbytes")
    from peft_sparse.tuners.s2ft.layer import QuantizedS2ftLinear
    from tests.test_quantized import load_quantized

    config = S2ftConfig(num_heads=1, num_channels=8, **COUPLED)
    model = get_peft_model(load_quantized(tiny_llama_dir, quantization), config)
    layers = dict(model.base_model.sparse_delta_layers())
    assert len(layers) == 8 and all(isinstance(layer, QuantizedS2ftLinear) for layer in layers.values())
    packed = {name: layer.get_base_layer().weight.data.clone() for name, layer in layers.items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    losses = []
    for step in range(3):  # 2 optimizer steps, then the loss after them
        loss = model(input_ids=ids, labels=ids).loss
        losses.append(loss.item())
        if step < 2:
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    assert losses[2] < losses[1] < losses[0]
    assert all(torch.equal(layer.get_base_layer().weight.data, packed[name]) for name, layer in layers.items())


def test_merge_on_a_quantized_base_is_refused_and_changes_nothing(tiny_llama_dir):
    pytest.importorskip("bitsandbytes")
    from tests.test_quantized import MERGE_ERROR, load_quantized

    model = get_peft_model(load_quantized(tiny_llama_dir, "nf4"), S2ftConfig(num_heads=1, num_channels=8))
    randomize_values(model)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    adapted = logits_of(model, ids)
    with pytest.raises(ValueError, match=MERGE_ERROR):
        model.merge_and_unload()
    with pytest.raises(ValueError, match=MERGE_ERROR):
        model.merge_adapter()
    assert torch.equal(logits_of(model, ids), adapted)


# --- round trips ----------------------------------------------------------------------------------

CHILD_LOAD = textwrap.dedent(
    """
    import sys, torch, peft_sparse
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base_dir, adapter_dir, expected_path = sys.argv[1:]
    expected = torch.load(expected_path)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir).eval(), adapter_dir)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=expected["input_ids"]).logits, expected["logits"], rtol=0, atol=1e-6)
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=expected["input_ids"]).logits, expected["logits"], rtol=0, atol=1e-5)
    print("CHILD-OK")
    """
)


def test_save_load_in_a_fresh_process_and_merge(tmp_path, input_ids):
    make_tiny_llama().save_pretrained(tmp_path / "base")
    model = s2ft_model(**COUPLED)
    expected = logits_of(model, input_ids)
    assert not torch.allclose(expected, logits_of(make_tiny_llama(), input_ids))
    model.save_pretrained(tmp_path / "adapter")
    torch.save({"input_ids": input_ids, "logits": expected}, tmp_path / "expected.pt")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "S2FT" and saved["num_heads"] == 1 and saved["num_channels"] == 8
    run_child(CHILD_LOAD, tmp_path / "base", tmp_path / "adapter", tmp_path / "expected.pt")


def test_merge_unmerge_and_state_dict_keep_w0(input_ids):
    base_logits = logits_of(make_tiny_llama(), input_ids)
    model = s2ft_model(make_base=make_tiny_llama)
    expected = logits_of(model, input_ids)
    for key, tensor in model.state_dict().items():
        if key.endswith("base_layer.weight"):  # the written slice is never reported
            name = key.removeprefix("base_model.model.").removesuffix(".base_layer.weight") + ".weight"
            assert torch.equal(tensor, make_tiny_llama().state_dict()[name]), key
    model.merge_adapter()
    torch.testing.assert_close(logits_of(model, input_ids), expected, rtol=0, atol=1e-6)
    model.unmerge_adapter()
    with model.disable_adapter():
        assert torch.equal(logits_of(model, input_ids), base_logits)
    merged = s2ft_model().merge_and_unload()
    assert not any(isinstance(module, S2ftLinear) for module in merged.modules())
    torch.testing.assert_close(logits_of(merged, input_ids), expected, rtol=0, atol=1e-5)


def test_two_adapters_switch_and_delete(input_ids):
    model = s2ft_model()
    first = logits_of(model, input_ids)
    model.add_adapter("other", S2ftConfig(num_heads=2, num_channels=4, init_seed=7, init_weights=False))
    model.set_adapter("other")
    second = logits_of(model, input_ids)
    assert not torch.allclose(first, second)
    model.set_adapter("default")
    torch.testing.assert_close(logits_of(model, input_ids), first, rtol=0, atol=1e-6)
    model.delete_adapter("other")
    torch.testing.assert_close(logits_of(model, input_ids), first, rtol=0, atol=1e-6)


def test_a_checkpoint_whose_indices_are_not_a_slice_is_refused(tmp_path):
    model = s2ft_model()
    indices = model.base_model.model.model.layers[0].self_attn.o_proj.s2ft_indices["default"]
    indices.copy_(torch.arange(1, indices.numel() + 1))  # sorted and in range, but neither rows nor columns
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="must be whole rows or whole columns"):
        PeftModel.from_pretrained(make_tiny_llama(), tmp_path)


# --- export to stock LoRA -------------------------------------------------------------------------

STOCK_PEFT_CHILD = textwrap.dedent(
    """
    import sys, torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    assert "peft_sparse" not in sys.modules
    for base_dir, lora_dir, expected_path in zip(*[iter(sys.argv[1:])] * 3):
        expected = torch.load(expected_path)
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir).eval(), lora_dir)
        assert "peft_sparse" not in sys.modules
        with torch.no_grad():
            logits = model(input_ids=expected["input_ids"]).logits
            torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=1e-5)
            merged = model.merge_and_unload()
            torch.testing.assert_close(merged(input_ids=expected["input_ids"]).logits, expected["logits"], rtol=0, atol=1e-5)
    print("CHILD-OK")
    """
)


def test_lora_export_gives_identical_logits_in_stock_peft(tmp_path, input_ids):
    from peft_sparse.tuners.s2ft.export import export_s2ft_to_lora

    gpt2_modules = dict(attention_output_modules=["attn.c_proj"], ffn_output_modules=["mlp.c_proj"])
    cases = [(make_tiny_llama, LlamaForCausalLM, COUPLED), (make_tiny_gpt2, GPT2LMHeadModel, gpt2_modules)]
    child_args = []
    for make_base, model_cls, extra in cases:
        folder = tmp_path / model_cls.__name__
        make_base().save_pretrained(folder / "base")
        model = get_peft_model(model_cls.from_pretrained(folder / "base").eval(), S2ftConfig(num_heads=1, num_channels=8, **extra))
        randomize_values(model)
        expected = logits_of(model, input_ids)
        lora_dir = export_s2ft_to_lora(model, folder / "lora")
        torch.save({"input_ids": input_ids, "logits": expected}, folder / "expected.pt")
        child_args += [folder / "base", lora_dir, folder / "expected.pt"]
        saved = json.loads((lora_dir / "adapter_config.json").read_text())
        assert saved["peft_type"] == "LORA" and saved["lora_alpha"] == saved["r"]
        assert saved["alpha_pattern"] == saved["rank_pattern"]
        assert saved["fan_in_fan_out"] == (model_cls is GPT2LMHeadModel)
    run_child(STOCK_PEFT_CHILD, *child_args)


def test_lora_export_factors_are_identity_rows_and_the_slice(tmp_path):
    from peft_sparse.tuners.s2ft.export import export_s2ft_to_lora

    model = s2ft_model(**COUPLED)
    lora_dir = export_s2ft_to_lora(model, tmp_path / "lora")
    tensors = load_file(lora_dir / "adapter_model.safetensors")
    layers = dict(model.base_model.sparse_delta_layers())
    down = layers["model.layers.0.mlp.down_proj"]
    key = "base_model.model.model.layers.0.mlp.down_proj"
    columns = down.weight_slice("default").positions
    assert torch.equal(tensors[f"{key}.lora_A.weight"], torch.eye(64)[columns])  # [8, 64]
    assert torch.equal(tensors[f"{key}.lora_B.weight"], down.s2ft_values["default"].detach().view(32, 8))
    up = layers["model.layers.0.mlp.up_proj"]
    key = "base_model.model.model.layers.0.mlp.up_proj"
    assert torch.equal(tensors[f"{key}.lora_A.weight"], up.s2ft_values["default"].detach().view(8, 32))
    assert torch.equal(tensors[f"{key}.lora_B.weight"], torch.eye(64)[:, columns])  # [64, 8]
    with pytest.raises(ValueError, match="model must be a PeftModel with an S2ftConfig adapter, got LlamaForCausalLM"):
        export_s2ft_to_lora(make_tiny_llama(), tmp_path / "x")


def test_generic_export_to_lora_takes_the_exact_s2ft_export(tmp_path, input_ids):
    from peft_sparse.export import export_to_lora

    model = s2ft_model(**COUPLED)
    with pytest.raises(ValueError, match="rank and energy do not apply to an S2FT adapter, whose export is exact"):
        export_to_lora(model, tmp_path / "lora", rank=4)
    report = export_to_lora(model, tmp_path / "lora", sample_inputs={"input_ids": input_ids})
    layers = model.base_model.sparse_delta_layers()
    widths = {name: layer.weight_slice("default").positions.numel() for name, layer in layers}
    assert report.ranks == widths  # one rank per selected column or row: 8 (a head of 8, 8 channels)
    assert max(report.relative_errors.values()) < 1e-6 and report.max_logit_error < 1e-5


# --- config errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_heads=1, lora_rank_budget=8), "give either lora_rank_budget or num_heads/num_channels, not both"),
        (dict(num_heads=0, num_channels=0), "num_heads and num_channels must not both be 0"),
        (dict(num_heads=-1), "num_heads must be a non-negative integer, got -1"),
        (dict(num_channels="8"), "num_channels must be a non-negative integer, got '8'"),
        (dict(lora_rank_budget=0), "lora_rank_budget must be a positive integer, got 0"),
        (dict(selection="norm"), "selection must be one of \\('random', 'weight_norm', 'gradient'\\), got 'norm'"),
        (dict(head_dim=0), "head_dim must be a positive integer, got 0"),
        (dict(init_seed=-3), "init_seed must be a non-negative integer, got -3"),
        (dict(target_modules=["q_proj"]), "target_modules is set by S2ftConfig"),
        (dict(ffn_input_modules="up_proj"), "ffn_input_modules must be a list of module names"),
        (dict(ffn_input_modules=["down_proj"]), "must not share a module name"),
        (dict(ffn_output_modules=[], ffn_input_modules=["up_proj"]), "take their channels from ffn_output_modules"),
        (dict(attention_output_modules=[], num_heads=1), "num_heads=1 needs attention_output_modules"),
        (dict(delta_in_place="yes"), "delta_in_place must be True or False"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        S2ftConfig(**kwargs)


def test_injection_errors():
    with pytest.raises(ValueError, match="num_heads must be at most the 4 of module"):
        get_peft_model(make_tiny_llama(), S2ftConfig(num_heads=5))
    with pytest.raises(ValueError, match="head_dim must divide the 32 inputs"):
        get_peft_model(make_tiny_llama(), S2ftConfig(num_heads=1, head_dim=5))


def test_inspect_and_model_card_describe_the_slices(tmp_path):
    from peft_sparse.model_card import write_model_card
    from peft_sparse.summary import budget_text, model_weight_shapes, summarize_adapter

    model = s2ft_model(**COUPLED)
    model.save_pretrained(tmp_path)
    write_model_card(model, tmp_path)
    summary = summarize_adapter(tmp_path, base_shapes=model_weight_shapes(model))
    assert summary.method == "S2FT" and summary.trainable == 2 * (256 + 3 * 8 * 32)
    o_proj = next(layer for layer in summary.layers if layer.name.endswith("0.self_attn.o_proj"))
    assert o_proj.shape == (32, 32) and o_proj.density == 0.25  # one head of 8 of the 32 columns
    expected = "1 heads and 8 FFN channels per block, as whole heads and channels; selection 'random'"
    assert budget_text(summary) == expected
    assert expected in (tmp_path / "README.md").read_text()
