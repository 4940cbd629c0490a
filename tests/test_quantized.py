"""bitsandbytes 4-bit (NF4/FP4) and 8-bit bases, on CPU: the sparse-term path, SoRA/SNELL, save/load, merge."""

import pytest

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install -e '.[bitsandbytes]')")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from peft import PeftModel, get_peft_model  # noqa: E402
from torch import nn  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer  # noqa: E402

from peft_sparse import LiftConfig, RosaConfig, SnellConfig, SoraConfig, SparseConfig  # noqa: E402
from peft_sparse.quantization import dequantized_weight  # noqa: E402
from peft_sparse.sparse.indices import random_unique_indices  # noqa: E402
from peft_sparse.sparse.principal import principal_weight_indices  # noqa: E402
from peft_sparse.sparse.quantized_layer import QuantizedSparseDeltaLinear  # noqa: E402
from peft_sparse.tuners.rosa.layer import QuantizedRosaLinear, RosaLinear  # noqa: E402
from peft_sparse.tuners.snell.layer import SnellLinear  # noqa: E402
from peft_sparse.tuners.sora.layer import SoraLinear  # noqa: E402
from tests.conftest import make_tiny_llama, randomize_values  # noqa: E402
from tests.test_trainer import repeating_sequences, training_args  # noqa: E402
from trl_callbacks import RosaCallback, SparseUpdateCallback  # noqa: E402

QUANTIZATIONS = {
    "nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "fp4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
    "int8": BitsAndBytesConfig(load_in_8bit=True),
}
METHOD_CONFIGS = {
    "sparse": lambda: SparseConfig(density=0.1, selection="ag", reselection_steps=4, selection_accumulation_steps=2),
    "lift": lambda: LiftConfig(density=0.1, rank=4, svd_method="exact"),
    "sora": lambda: SoraConfig(r=4),
    "snell": lambda: SnellConfig(r=4, sparsity=0.5),
    "rosa": lambda: RosaConfig(r=2, density=0.1, mask_rule="magnitude", init_weights=False),
}
MERGE_ERROR = r"cannot merge adapter\(s\) \['default'\] into a bitsandbytes 4bit Linear4bit: re-quantizing W \+ delta"


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    make_tiny_llama().save_pretrained(path)
    return path


def load_quantized(path, quantization: str = "nf4") -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=QUANTIZATIONS[quantization], device_map="cpu")


def quantized_linear(quantization: str, in_features: int = 64, out_features: int = 48, seed: int = 0) -> nn.Module:
    """A bitsandbytes layer quantized from a seeded ``nn.Linear`` (with bias)."""
    torch.manual_seed(seed)
    dense = nn.Linear(in_features, out_features)
    if quantization == "int8":
        layer = bnb.nn.Linear8bitLt(in_features, out_features, has_fp16_weights=False, threshold=0.0)
    else:
        layer = bnb.nn.Linear4bit(in_features, out_features, compute_dtype=torch.float32, quant_type=quantization)
    layer.load_state_dict(dense.state_dict())
    return layer.to("cpu")  # quantizes the weight


def sparse_term_layer(quantization: str) -> QuantizedSparseDeltaLinear:
    base = quantized_linear(quantization)
    indices = random_unique_indices(base.out_features * base.in_features, 300, seed=1)
    layer = QuantizedSparseDeltaLinear(base, "default", indices)
    randomize_values(layer, scale=0.05)
    return layer


# --- the sparse-term path of one layer ------------------------------------------------------------


@pytest.mark.parametrize("quantization", ["nf4", "fp4"])
def test_4bit_sparse_term_equals_dequantized_weight_plus_dense_delta(quantization):
    """fp32 compute: outputs and gradients match the dense reference within 1e-5 (summation order only)."""
    layer = sparse_term_layer(quantization)
    base = layer.get_base_layer()
    inputs = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    output = layer(inputs)
    output.square().sum().backward()

    reference_weight = (dequantized_weight(base) + layer.get_delta_weight("default")).requires_grad_()
    reference_inputs = inputs.detach().clone().requires_grad_()
    reference = F.linear(reference_inputs, reference_weight, base.bias)
    reference.square().sum().backward()
    indices = layer.sparse_indices["default"].long()
    torch.testing.assert_close(output, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(inputs.grad, reference_inputs.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        layer.sparse_values["default"].grad, reference_weight.grad.view(-1)[indices], rtol=1e-5, atol=1e-5
    )


def test_8bit_sparse_term_is_exact_on_top_of_the_int8_base():
    """Linear8bitLt also quantizes activations, so the base output differs from ``x @ W_deq^T`` by ~1e-2:
    the sparse term itself must be exact (1e-5), and the whole output within the int8 base's error."""
    layer = sparse_term_layer("int8")
    base = layer.get_base_layer()
    inputs = torch.randn(4, 64, generator=torch.Generator().manual_seed(2))
    delta = layer.get_delta_weight("default")
    with torch.no_grad():
        torch.testing.assert_close(layer(inputs) - base(inputs), inputs @ delta.T, rtol=1e-5, atol=1e-5)
        reference = F.linear(inputs, dequantized_weight(base) + delta, base.bias)
        torch.testing.assert_close(layer(inputs), reference, rtol=0, atol=5e-2)

    layer(inputs).sum().backward()
    expected_grad = torch.ones(4, 48).T @ inputs  # d(sum y) / dW, gathered at the indices
    torch.testing.assert_close(
        layer.sparse_values["default"].grad,
        expected_grad.view(-1)[layer.sparse_indices["default"].long()],
        rtol=1e-5,
        atol=1e-5,
    )


def test_selection_observer_gets_the_dense_weight_gradient_on_a_quantized_base():
    layer = sparse_term_layer("nf4")
    base = layer.get_base_layer()
    products = []
    layer.gradient_observers["default"] = lambda left, right: products.append(left @ right)
    inputs = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(4))
    layer(inputs).square().sum().backward()

    reference_weight = (dequantized_weight(base) + layer.get_delta_weight("default")).requires_grad_()
    F.linear(inputs, reference_weight, base.bias).square().sum().backward()
    assert len(products) == 1
    torch.testing.assert_close(products[0], reference_weight.grad, rtol=1e-5, atol=1e-5)


def test_quantized_weight_is_never_changed_or_copied():
    layer = sparse_term_layer("nf4")
    weight = layer.get_base_layer().weight
    packed = weight.data.clone()
    layer(torch.randn(4, 64)).sum().backward()
    assert weight.dtype == torch.uint8 and torch.equal(weight.data, packed)
    assert [name for name, _ in layer.named_buffers()] == ["sparse_indices.default"]


def test_cpu_inference_repacking_is_refused_before_and_prevented_after_wrapping():
    """bitsandbytes repacks a Linear4bit for its AVX512-BF16 CPU kernel on an eval forward without
    gradients; that layout has no backward. Adapted layers keep the trainable layout."""
    repacked = quantized_linear("nf4", in_features=64, out_features=64).eval()
    with torch.no_grad():
        repacked(torch.randn(2, 64))
    if not getattr(repacked.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("bitsandbytes does not repack Linear4bit weights on this CPU (no AVX512-BF16)")
    with pytest.raises(ValueError, match="was repacked by bitsandbytes for CPU inference"):
        QuantizedSparseDeltaLinear(repacked, "default", torch.tensor([0, 5], dtype=torch.int32))

    layer = QuantizedSparseDeltaLinear(
        quantized_linear("nf4", in_features=64, out_features=64), "default", torch.tensor([0, 5], dtype=torch.int32)
    )
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(2, 64))
    assert not getattr(layer.get_base_layer().weight.quant_state, "packing_format_for_cpu", False)
    inputs = torch.randn(2, 64, requires_grad=True)
    layer.train()
    layer(inputs).sum().backward()
    assert inputs.grad is not None and bool(inputs.grad.abs().sum() > 0)


# --- whole models --------------------------------------------------------------------------------

def test_every_4bit_layer_keeps_its_trainable_layout_whether_adapted_or_not(tiny_llama_dir):
    """An evaluation mid-training must not repack the layers the adapter skips: the adapters before
    them get their gradients through them (a repacked layer passes none back, silently)."""
    model = get_peft_model(load_quantized(tiny_llama_dir), SparseConfig(density=0.1, target_modules=["o_proj"]))
    layers = [module for module in model.modules() if type(module).__name__ == "Linear4bit"]
    assert len(layers) > len(list(model.base_model.sparse_delta_layers())) > 0  # the skipped q/k/v and MLP layers too
    assert all(layer.support_avx512bf16_for_cpu is False for layer in layers)


def test_a_repacked_layer_the_adapter_skips_is_refused_before_injection(tiny_llama_dir):
    base = load_quantized(tiny_llama_dir)
    skipped = base.model.layers[0].self_attn.q_proj
    skipped.weight.quant_state.packing_format_for_cpu = True  # as an eval forward leaves it on an AVX512-BF16 CPU
    with pytest.raises(ValueError, match="was repacked by bitsandbytes for CPU inference"):
        get_peft_model(base, SparseConfig(density=0.1, target_modules=["o_proj"]))
    assert not any("sparse" in name for name, _ in base.named_parameters())



def held_out_losses_around_training(model: nn.Module, tmp_path, callback) -> tuple[float, float]:
    """The loss on 8 repeating sequences before and after 6 Trainer steps (lr 0.05, constant) with ``callback``."""
    dataset = repeating_sequences()
    held_out = torch.tensor(dataset[:8]["input_ids"])

    def held_out_loss() -> float:
        with torch.no_grad():
            return model(input_ids=held_out, labels=held_out).loss.item()

    initial_loss = held_out_loss()
    args = training_args(tmp_path, max_steps=6, logging_steps=3, lr_scheduler_type="constant", learning_rate=0.05)
    Trainer(model=model, args=args, train_dataset=dataset, callbacks=[callback]).train()
    return initial_loss, held_out_loss()


def test_sft_on_4bit_trains_with_the_trainer_and_loss_falls(tiny_llama_dir, tmp_path):
    config = SparseConfig(density=0.1, selection="ag", reselection_steps=3, selection_accumulation_steps=1)
    model = get_peft_model(load_quantized(tiny_llama_dir, "nf4"), config)
    layers = dict(model.base_model.sparse_delta_layers())
    assert len(layers) == 14 and all(isinstance(layer, QuantizedSparseDeltaLinear) for layer in layers.values())
    initial_indices = {name: layer.sparse_indices["default"].clone() for name, layer in layers.items()}
    packed = {name: layer.get_base_layer().weight.data.clone() for name, layer in layers.items()}
    initial_loss, final_loss = held_out_losses_around_training(model, tmp_path, SparseUpdateCallback())

    assert final_loss < initial_loss - 0.1  # from ~ln(64) = 4.16
    # selection steps (at steps 3 and 6) ran on the quantized path, AG observers in backward
    grown = sum(
        int((~torch.isin(layer.sparse_indices["default"], initial_indices[name])).sum())
        for name, layer in layers.items()
    )
    assert grown > 0
    assert all(torch.equal(layer.get_base_layer().weight.data, packed[name]) for name, layer in layers.items())


@pytest.mark.parametrize("selection, quantization", [("ag", "int8"), ("ma", "fp4")])
def test_sft_selection_steps_on_fp4_and_int8(tiny_llama_dir, selection, quantization):
    config = SparseConfig(density=0.1, selection=selection)
    model = get_peft_model(load_quantized(tiny_llama_dir, quantization), config)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    before = {name: layer.sparse_indices["default"].clone() for name, layer in model.base_model.sparse_delta_layers()}
    model.base_model.open_selection_window("default")
    model(input_ids=ids, labels=ids).loss.backward()
    stats = model.base_model.reselect("default", reselection_rate=0.5)

    assert stats["churn"] > 0
    for name, layer in model.base_model.sparse_delta_layers():
        indices = layer.sparse_indices["default"]
        assert indices.numel() == before[name].numel() and bool((indices[1:] > indices[:-1]).all())


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_lift_selects_principal_weights_of_the_dequantized_matrix(tiny_llama_dir, quantization):
    config = METHOD_CONFIGS["lift"]()
    model = get_peft_model(load_quantized(tiny_llama_dir, quantization), config)
    layers = dict(model.base_model.sparse_delta_layers())
    assert len(layers) == 14
    layer = layers["model.layers.1.mlp.down_proj"]
    weight = dequantized_weight(layer.get_base_layer())
    count = layer.lift_values["default"].numel()
    expected = principal_weight_indices(weight, config.rank_for(tuple(weight.shape)), count, svd_method="exact")
    assert torch.equal(layer.lift_indices["default"], expected)

    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(bool(layer.lift_values["default"].grad.abs().sum() > 0) for layer in layers.values())

    # a mask refresh: principal weights of the current dequantized W0 + delta
    randomize_values(model, scale=0.5)
    refreshed = principal_weight_indices(
        weight + layer.get_delta_weight("default"), config.rank_for(tuple(weight.shape)), count, svd_method="exact"
    )
    model.base_model.reselect("default", reselection_rate=1.0)
    assert torch.equal(layer.lift_indices["default"], refreshed)
    assert not torch.equal(refreshed, expected)


@pytest.mark.parametrize("method, layer_cls", [("sora", SoraLinear), ("snell", SnellLinear)])
def test_sora_and_snell_on_4bit_match_the_dequantized_dense_layer(method, layer_cls):
    """Same adapter parameters on the 4-bit layer and on an nn.Linear holding its dequantized weight."""
    base = quantized_linear("nf4")
    dense = nn.Linear(64, 48)
    with torch.no_grad():
        dense.weight.copy_(dequantized_weight(base))
        dense.bias.copy_(base.bias)
    config = METHOD_CONFIGS[method]()
    if method == "sora":
        quantized_layer, dense_layer = (
            layer_cls(layer, "default", r=4, alpha=8.0, dropout=0.0, gate_init="ones") for layer in (base, dense)
        )
    else:
        quantized_layer, dense_layer = (layer_cls(layer, "default", config) for layer in (base, dense))
    generator = torch.Generator().manual_seed(5)
    for name, parameter in quantized_layer.named_parameters():
        if parameter.requires_grad:
            with torch.no_grad():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
                dense_layer.get_parameter(name).copy_(parameter)
    inputs = torch.randn(3, 64, generator=generator)
    quantized_output, dense_output = quantized_layer(inputs), dense_layer(inputs)
    quantized_output.square().sum().backward()
    dense_output.square().sum().backward()

    torch.testing.assert_close(quantized_output, dense_output, rtol=1e-5, atol=1e-5)
    for name, parameter in quantized_layer.named_parameters():
        if parameter.requires_grad:
            torch.testing.assert_close(parameter.grad, dense_layer.get_parameter(name).grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        quantized_layer.get_delta_weight("default"), dense_layer.get_delta_weight("default"), rtol=0, atol=0
    )


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_rosa_on_quantized_bases_matches_the_dequantized_dense_layer(quantization):
    """Both RoSA parts beside the quantized weight equal RoSA on an nn.Linear holding the dequantized weight."""
    base = quantized_linear(quantization)
    dense = nn.Linear(64, 48)
    with torch.no_grad():
        dense.weight.copy_(dequantized_weight(base))
        dense.bias.copy_(base.bias)
    indices = random_unique_indices(64 * 48, 300, seed=2)
    quantized_layer = QuantizedRosaLinear(base, "default", indices, init_weights=False, init_seed=3)
    dense_layer = RosaLinear(dense, "default", indices, init_weights=False, init_seed=3)
    for layer in (quantized_layer, dense_layer):
        layer.update_low_rank("default", r=4, lora_alpha=8, lora_dropout=0.0, init_weights=False, init_seed=4)
    inputs = torch.randn(3, 64, generator=torch.Generator().manual_seed(5))
    quantized_output, dense_output = quantized_layer(inputs), dense_layer(inputs)
    quantized_output.square().sum().backward()
    dense_output.square().sum().backward()

    torch.testing.assert_close(quantized_output, dense_output, rtol=1e-5, atol=1e-5)
    for name in ("rosa_values.default", "rosa_A.default", "rosa_B.default"):
        torch.testing.assert_close(quantized_layer.get_parameter(name).grad, dense_layer.get_parameter(name).grad,
                                   rtol=1e-4, atol=1e-4)  # fmt: skip
    assert quantized_layer.get_parameter("rosa_B.default").grad.abs().sum() > 0
    torch.testing.assert_close(quantized_layer.get_delta_weight("default"), dense_layer.get_delta_weight("default"),
                               rtol=0, atol=0)  # fmt: skip


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_rosa_gradient_mask_is_chosen_and_trains_on_quantized_models(tiny_llama_dir, tmp_path, quantization):
    """RosaCallback's mask step reads the dense weight gradient on the quantized path; the packed weight never moves."""
    config = RosaConfig(r=2, density=0.1, mask_warmup_steps=2, mask_accumulation_steps=2)
    model = get_peft_model(load_quantized(tiny_llama_dir, quantization), config)
    layers = dict(model.base_model.sparse_delta_layers())
    assert len(layers) == 14 and all(isinstance(layer, QuantizedRosaLinear) for layer in layers.values())
    placeholder = {name: layer.rosa_indices["default"].clone() for name, layer in layers.items()}
    packed = {name: layer.get_base_layer().weight.data.clone() for name, layer in layers.items()}
    initial_loss, final_loss = held_out_losses_around_training(model, tmp_path, RosaCallback())

    assert final_loss < initial_loss  # slowly: the LoRA part starts at B = 0 (dense RoSA: 4.157 -> 4.151)
    for name, layer in layers.items():
        assert not torch.equal(layer.rosa_indices["default"], placeholder[name]), name
        assert torch.count_nonzero(layer.rosa_values["default"]) > 0, name  # the sparse part trained after the mask
        assert torch.equal(layer.get_base_layer().weight.data, packed[name]), name


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
@pytest.mark.parametrize("method", ["sora", "snell"])
def test_sora_and_snell_train_on_quantized_models(tiny_llama_dir, method, quantization):
    model = get_peft_model(load_quantized(tiny_llama_dir, quantization), METHOD_CONFIGS[method]())
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    assert trainable and all(parameter.is_floating_point() for parameter in trainable)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("method", ["sparse", "lift"])
def test_sparse_and_lift_train_on_4bit_under_cpu_bf16_autocast(tiny_llama_dir, method):
    """SFTConfig turns bf16 on by default; the sparse term must survive CPU autocast (torch.sparse.mm has no bf16)."""
    torch.manual_seed(0)
    model = get_peft_model(load_quantized(tiny_llama_dir, "nf4"), METHOD_CONFIGS[method]())
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=5e-2)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    losses = []
    for step in range(3):  # 2 optimizer steps, then the loss after them
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        losses.append(loss.item())
        if step < 2:
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[2] < losses[0]


# --- save / load / merge --------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["sparse", "lift", "sora", "rosa"])
def test_adapter_trained_on_4bit_round_trips_and_merges_on_an_fp32_base(tiny_llama_dir, tmp_path, method):
    model = get_peft_model(load_quantized(tiny_llama_dir, "nf4"), METHOD_CONFIGS[method]())
    generator = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")

    loaded = PeftModel.from_pretrained(load_quantized(tiny_llama_dir, "nf4"), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, expected)

    # the documented way to merge: the same adapter on an unquantized copy of the base
    dense_base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    dense_model = PeftModel.from_pretrained(dense_base, tmp_path / "adapter")
    with torch.no_grad():
        adapted = dense_model(input_ids=ids).logits
        merged = dense_model.merge_and_unload()(input_ids=ids).logits
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["sparse", "lift", "sora", "snell", "rosa"])
def test_merge_on_a_quantized_base_raises_and_changes_nothing(tiny_llama_dir, method):
    model = get_peft_model(load_quantized(tiny_llama_dir, "nf4"), METHOD_CONFIGS[method]())
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.1)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            base_output = model(input_ids=ids).logits

    with pytest.raises(ValueError, match=MERGE_ERROR):
        model.merge_and_unload()
    with pytest.raises(ValueError, match=MERGE_ERROR):
        model.merge_adapter()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, adapted)
        base = model.unload()  # without merging: the quantized base as it was
        assert isinstance(base.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
        assert torch.equal(base(input_ids=ids).logits, base_output)


def test_sft_trainer_casts_values_to_bf16_and_the_readme_loop_keeps_them_fp32(tmp_path):
    """TRL casts trainable parameters of a quantized model to bf16; the README's loop after the
    trainer is built puts them back to fp32, and training then updates fp32 values."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from test_examples import save_tiny_chat_model

    model_dir = save_tiny_chat_model(tmp_path / "model")
    texts = [f"What is {n} + 1? The answer is {n + 1}." for n in range(16)]
    trainer = SFTTrainer(
        model=load_quantized(model_dir, "nf4"),
        args=SFTConfig(output_dir=str(tmp_path / "run"), max_steps=2, use_cpu=True, report_to=[],
                       per_device_train_batch_size=4, learning_rate=1e-2),
        train_dataset=Dataset.from_dict({"text": texts}),
        peft_config=SparseConfig(density=0.1, target_modules=["q_proj", "down_proj"], task_type="CAUSAL_LM"),
    )
    values = [parameter for parameter in trainer.model.parameters() if parameter.requires_grad]
    assert {parameter.dtype for parameter in values} == {torch.bfloat16}  # TRL's QLoRA cast
    for p in trainer.model.parameters():  # the README's loop, as written
        p.data = p.data.float() if p.requires_grad else p.data
    before = [parameter.detach().clone() for parameter in values]
    trainer.train()
    assert {parameter.dtype for parameter in values} == {torch.float32}
    assert any(not torch.equal(old, parameter) for old, parameter in zip(before, values))
