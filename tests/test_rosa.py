"""RoSA / DSEE: forward and gradients against a dense reference, both mask rules against brute force, round trips."""

import json
import textwrap

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model, get_peft_model_state_dict
from torch import nn
from transformers import Trainer
from transformers.pytorch_utils import Conv1D

from peft_sparse import RosaConfig, export_to_lora
from peft_sparse.sparse.indices import random_unique_indices
from peft_sparse.summary import budget_text, layer_table, model_weight_shapes, summarize_adapter
from peft_sparse.tuners.rosa import RosaLinear
from tests.conftest import assert_same_adapter, make_mlp, make_tiny_llama, randomize_values, run_child
from tests.test_save_load import logits_of
from tests.test_trainer import repeating_sequences, training_args
from trl_callbacks import RosaCallback, SparseUpdateCallback

TARGETS = ["q_proj", "down_proj"]


def rosa_model(make_base=make_tiny_llama, **kwargs):
    """Both parts non-zero: random LoRA B (init_weights=False) and random sparse values."""
    config = RosaConfig(**{"r": 2, "lora_alpha": 4, "density": 0.1, "target_modules": TARGETS, "init_weights": False,
                           "mask_rule": "magnitude", **kwargs})  # fmt: skip
    model = get_peft_model(make_base(), config)
    randomize_values(model)
    return model


# --- one layer against a dense reference ----------------------------------------------------------


@pytest.mark.parametrize("base_cls", [nn.Linear, Conv1D])
@pytest.mark.parametrize("in_place", [True, False])
def test_forward_and_gradients_equal_the_dense_reference(base_cls, in_place):
    torch.manual_seed(0)
    base = nn.Linear(12, 6) if base_cls is nn.Linear else Conv1D(6, 12)
    stored = base.weight.detach().clone()
    w0 = stored if base_cls is nn.Linear else stored.T  # [out, in]
    indices = random_unique_indices(72, 20, seed=1)
    layer = RosaLinear(base, "default", indices, writes_in_place=in_place, init_weights=False, init_seed=3)
    layer.update_low_rank("default", r=3, lora_alpha=6, lora_dropout=0.0, init_weights=False, init_seed=4)
    x = torch.randn(2, 5, 12)
    output = layer(x)
    output.square().sum().backward()

    values = layer.rosa_values["default"].detach().clone().requires_grad_()
    a = layer.rosa_A["default"].detach().clone().requires_grad_()
    b = layer.rosa_B["default"].detach().clone().requires_grad_()
    sparse = torch.zeros(72).index_put((indices.long(),), values).view(stored.shape)
    sparse = sparse if base_cls is nn.Linear else sparse.T  # [out, in]
    reference = x @ w0.T + base.bias + x @ sparse.T + 2.0 * (x @ a.T) @ b.T
    reference.square().sum().backward()
    torch.testing.assert_close(output, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.rosa_values["default"].grad, values.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.rosa_A["default"].grad, a.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.rosa_B["default"].grad, b.grad, rtol=1e-4, atol=1e-4)
    dense_delta = (sparse + 2.0 * b @ a).detach()
    delta = layer.get_delta_weight("default")
    torch.testing.assert_close(delta if base_cls is nn.Linear else delta.T, dense_delta, rtol=1e-6, atol=1e-6)


# --- RoSA's gradient mask against brute force -----------------------------------------------------


def reference_mlp_gradients(model, layers, x):
    """Dense gradients of W1 and W2 of make_mlp's two RoSA layers (sparse parts held back), by plain autograd."""
    weights = [layer.get_base_layer().weight.detach().clone().requires_grad_() for layer in layers]
    hidden = x
    for position, (layer, weight) in enumerate(zip(layers, weights)):
        a, b = layer.rosa_A["default"].detach(), layer.rosa_B["default"].detach()
        hidden = F.linear(hidden, weight, layer.get_base_layer().bias) + layer.scaling["default"] * (hidden @ a.T) @ b.T
        if position == 0:
            hidden = torch.relu(hidden)
    hidden.square().mean().backward()
    return [weight.grad for weight in weights]


@pytest.mark.parametrize("statistic", ["squared", "mean"])
def test_gradient_mask_is_the_top_k_of_the_accumulated_gradient_statistic(statistic):
    config = RosaConfig(r=2, lora_alpha=2, density=0.05, target_modules=["0", "2"], mask_warmup_steps=1,
                        mask_accumulation_steps=2, gradient_statistic=statistic)  # fmt: skip
    model = get_peft_model(make_mlp(), config)
    tuner, layers = model.base_model, [model.base_model.model[0], model.base_model.model[2]]
    placeholder = [layer.rosa_indices["default"].clone() for layer in layers]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    generator = torch.Generator().manual_seed(0)
    accumulated = [torch.zeros_like(layer.get_base_layer().weight) for layer in layers]
    tuner.hold_back_sparse_part("default")
    for step in (1, 2, 3):  # step 1: LoRA warmup; steps 2-3: the window, two micro-batches each
        if step == 2:
            tuner.open_selection_window("default")
        for _ in range(2):
            x = torch.randn(4, 16, generator=generator)
            if step >= 2:
                for total, gradient in zip(accumulated, reference_mlp_gradients(model, layers, x)):
                    total += gradient.square() if statistic == "squared" else gradient
            model(x).square().mean().backward()
        assert all(layer.rosa_values["default"].grad is None for layer in layers)  # held back: no gradient
        optimizer.step()
        optimizer.zero_grad()
    tuner.choose_gradient_mask("default", optimizer)
    for layer, total, before in zip(layers, accumulated, placeholder):
        count = before.numel()
        expected = torch.topk(total.abs().view(-1), count).indices.sort().values
        assert torch.equal(layer.rosa_indices["default"].long(), expected)
        assert torch.count_nonzero(layer.rosa_values["default"]) == 0
    x = torch.randn(4, 16, generator=generator)
    model(x).square().mean().backward()
    assert all(layer.rosa_values["default"].grad.abs().sum() > 0 for layer in layers)  # the sparse part trains now


def test_trainer_with_rosa_callback_chooses_the_mask_at_its_step_and_trains_both_parts(tmp_path):
    model = get_peft_model(make_tiny_llama(), RosaConfig(r=2, density=0.1, target_modules=TARGETS,
                                                         mask_warmup_steps=2, mask_accumulation_steps=2))  # fmt: skip
    layers = dict(model.base_model.sparse_delta_layers())
    placeholder = {name: layer.rosa_indices["default"].clone() for name, layer in layers.items()}
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=6, logging_steps=2),
                      train_dataset=repeating_sequences(), callbacks=[RosaCallback()])  # fmt: skip
    trainer.train()
    for name, layer in layers.items():
        assert not torch.equal(layer.rosa_indices["default"], placeholder[name]), name
        assert torch.count_nonzero(layer.rosa_values["default"]) > 0, name
        assert torch.count_nonzero(layer.rosa_B["default"]) > 0, name
    chosen = [log["rosa/mask_chosen"] for log in trainer.state.log_history if "rosa/mask_chosen" in log]
    assert chosen == [0.0, 1.0, 1.0, 1.0]  # logs after steps 2, 4 (the mask step) and 6, and the summary


def test_resuming_inside_the_mask_window_is_bit_identical(tmp_path):
    def trainer(out_dir):
        config = RosaConfig(r=2, density=0.1, target_modules=TARGETS, mask_warmup_steps=2, mask_accumulation_steps=2)
        model = get_peft_model(make_tiny_llama(), config)
        args = training_args(out_dir, max_steps=5, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             learning_rate=5e-2, save_strategy="steps", save_steps=3)  # fmt: skip
        return Trainer(model=model, args=args, train_dataset=repeating_sequences(32), callbacks=[RosaCallback()])

    uninterrupted = trainer(tmp_path / "run")
    uninterrupted.train()  # the window covers steps 3-4: the step-3 checkpoint holds half of it
    resumed = trainer(tmp_path / "run")
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))
    assert_same_adapter(get_peft_model_state_dict(resumed.model), get_peft_model_state_dict(uninterrupted.model), 0)


def test_callback_errors(tmp_path):
    late = get_peft_model(make_tiny_llama(), RosaConfig(target_modules=TARGETS, mask_warmup_steps=4))
    trainer = Trainer(model=late, args=training_args(tmp_path, max_steps=4), train_dataset=repeating_sequences(),
                      callbacks=[RosaCallback()])  # fmt: skip
    with pytest.raises(ValueError, match=r"mask_warmup_steps \+ mask_accumulation_steps \(5\) must be at most"):
        trainer.train()
    sparse = get_peft_model(make_tiny_llama(), RosaConfig(target_modules=TARGETS, mask_rule="magnitude"))
    trainer = Trainer(model=sparse, args=training_args(tmp_path, max_steps=1), train_dataset=repeating_sequences(),
                      callbacks=[SparseUpdateCallback(), RosaCallback()])  # fmt: skip
    trainer.train()  # a magnitude mask needs no schedule; the callback accepts the adapter
    with pytest.raises(ValueError, match="RosaCallback drives RosaConfig adapters, got a model with no peft adapter"):
        Trainer(model=make_tiny_llama(), args=training_args(tmp_path, max_steps=1),
                train_dataset=repeating_sequences(), callbacks=[RosaCallback()]).train()  # fmt: skip


# --- DSEE's magnitude mask -------------------------------------------------------------------------


def test_magnitude_mask_finds_the_sparse_residual_of_a_low_rank_plus_sparse_weight():
    torch.manual_seed(0)
    low_rank = torch.randn(32, 2) @ torch.randn(2, 16)  # rank 2, the LoRA rank
    spikes = random_unique_indices(32 * 16, 25, seed=5)  # 5% of the entries
    weight = low_rank.view(-1).clone()
    weight[spikes.long()] += 8.0 * torch.sign(torch.randn(25))
    model = make_mlp()
    model[2] = nn.Linear(16, 32)
    with torch.no_grad():
        model[2].weight.copy_(weight.view(32, 16))
    peft_model = get_peft_model(model, RosaConfig(r=2, density=25 / 512, target_modules=["2"], mask_rule="magnitude"))
    assert torch.equal(peft_model.base_model.model[2].rosa_indices["default"], spikes)


# --- round trips -------------------------------------------------------------------------------------

CHILD_LOAD = textwrap.dedent(
    """
    import sys, torch, peft_sparse
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base_dir, adapter_dir, expected_path = sys.argv[1:]
    expected = torch.load(expected_path)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir).eval(), adapter_dir)
    assert type(model.peft_config["default"]).__name__ == "RosaConfig"
    with torch.no_grad():
        logits = model(input_ids=expected["input_ids"]).logits
        torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=1e-6)
        merged = model.merge_and_unload()
        logits = merged(input_ids=expected["input_ids"]).logits
        torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=1e-5)
    print("CHILD-OK")
    """
)


def test_save_load_in_a_fresh_process_and_merge(tmp_path, input_ids):
    make_tiny_llama().save_pretrained(tmp_path / "base")
    model = rosa_model()
    expected = logits_of(model, input_ids)
    assert not torch.allclose(expected, logits_of(make_tiny_llama(), input_ids))
    model.save_pretrained(tmp_path / "adapter")
    torch.save({"input_ids": input_ids, "logits": expected}, tmp_path / "expected.pt")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ROSA" and saved["r"] == 2 and saved["mask_rule"] == "magnitude"
    run_child(CHILD_LOAD, tmp_path / "base", tmp_path / "adapter", tmp_path / "expected.pt")


def test_merge_unmerge_disable_and_state_dict(input_ids):
    base_logits = logits_of(make_tiny_llama(), input_ids)
    base_weights = make_tiny_llama().state_dict()
    model = rosa_model()
    expected = logits_of(model, input_ids)
    for key, tensor in model.state_dict().items():
        if key.endswith("base_layer.weight"):  # the written sparse part is never reported
            name = key.removeprefix("base_model.model.").removesuffix(".base_layer.weight") + ".weight"
            assert torch.equal(tensor, base_weights[name]), key
    model.merge_adapter()
    torch.testing.assert_close(logits_of(model, input_ids), expected, rtol=0, atol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(logits_of(model, input_ids), expected, rtol=0, atol=1e-5)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(layer.pristine_weight(), base_weights["model.layers.0.self_attn.q_proj.weight"],
                               rtol=0, atol=1e-6)  # fmt: skip
    with model.disable_adapter():
        torch.testing.assert_close(logits_of(model, input_ids), base_logits, rtol=0, atol=1e-6)
    merged = rosa_model().merge_and_unload()
    assert not any(isinstance(module, RosaLinear) for module in merged.modules())
    torch.testing.assert_close(logits_of(merged, input_ids), expected, rtol=0, atol=1e-5)
    unloaded = rosa_model()
    unloaded.merge_adapter()
    torch.testing.assert_close(logits_of(unloaded.unload(), input_ids), base_logits, rtol=0, atol=1e-5)


def test_two_adapters_switch_merge_and_delete(input_ids):
    base_logits = logits_of(make_tiny_llama(), input_ids)
    model = rosa_model()
    first = logits_of(model, input_ids)
    other = RosaConfig(r=4, density=0.05, target_modules=TARGETS, init_weights=False, init_seed=7)
    model.add_adapter("other", other)
    model.set_adapter("other")
    second = logits_of(model, input_ids)
    assert not torch.allclose(first, second)
    model.set_adapter("default")
    torch.testing.assert_close(logits_of(model, input_ids), first, rtol=0, atol=1e-6)
    model.base_model.merge_adapter(["other"])
    torch.testing.assert_close(logits_of(model, input_ids), second, rtol=0, atol=1e-5)
    model.base_model.unmerge_adapter()
    model.delete_adapter("other")
    torch.testing.assert_close(logits_of(model, input_ids), first, rtol=0, atol=1e-5)
    with model.disable_adapter():
        torch.testing.assert_close(logits_of(model, input_ids), base_logits, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="add_weighted_adapter does not combine RoSA adapters"):
        model.add_weighted_adapter(["default"], [1.0], "sum")


def test_export_to_lora_is_exact_at_full_energy_and_lossy_at_rank_r(tmp_path, input_ids):
    model = rosa_model()
    expected = logits_of(model, input_ids)
    exact = export_to_lora(model, tmp_path / "exact", energy=1.0, sample_inputs={"input_ids": input_ids})
    assert max(exact.relative_errors.values()) < 1e-5 and exact.max_logit_error < 1e-4
    stock = PeftModel.from_pretrained(make_tiny_llama(), exact.path)
    assert type(stock.peft_config["default"]).__name__ == "LoraConfig"
    torch.testing.assert_close(logits_of(stock, input_ids), expected, rtol=0, atol=1e-4)
    truncated = export_to_lora(model, tmp_path / "rank2", rank=2)
    assert set(truncated.ranks.values()) == {2}
    assert min(truncated.relative_errors.values()) > 0.01  # the sparse part is not rank 2


def test_inspect_summarizes_both_parts(tmp_path):
    model = rosa_model()
    model.save_pretrained(tmp_path)
    summary = summarize_adapter(tmp_path, base_shapes=model_weight_shapes(model))
    assert summary.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    down = next(layer for layer in summary.layers if layer.name == "model.layers.0.mlp.down_proj")
    assert (down.rank, down.kept, down.shape, down.trainable) == (2, 205, (32, 64), 205 + 2 * 64 + 32 * 2)
    budget = "LoRA rank 2 plus a sparse part of density 0.1 of each target matrix; mask rule 'magnitude'"
    assert budget_text(summary) == budget
    assert "| LoRA rank | sparse values | sparse density | trainable |" in layer_table(summary)


# --- config errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(r=0), "r must be a positive integer, got 0"),
        (dict(lora_alpha=0), "lora_alpha must be a positive number, got 0"),
        (dict(lora_dropout=1.0), r"lora_dropout must be in \[0, 1\), got 1.0"),
        (dict(density=0.0), r"density must be in \(0, 1\], got 0.0"),
        (dict(density=0.01, num_tunable_weights=10), "give either density or num_tunable_weights, not both"),
        (dict(num_tunable_weights=0), "num_tunable_weights must be a positive integer, got 0"),
        (dict(mask_rule="random"), r"mask_rule must be one of \('gradient', 'magnitude'\), got 'random'"),
        (dict(mask_warmup_steps=-1), "mask_warmup_steps must be a non-negative integer, got -1"),
        (dict(mask_accumulation_steps=0), "mask_accumulation_steps must be a positive integer, got 0"),
        (dict(gradient_statistic="abs"), r"gradient_statistic must be one of \('squared', 'mean'\), got 'abs'"),
        (dict(mask_rule="magnitude", mask_warmup_steps=8),
         "mask_warmup_steps applies to mask_rule='gradient' only, got mask_warmup_steps=8 with mask_rule='magnitude'"),
        (dict(init_seed=-1), "init_seed must be a non-negative integer, got -1"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RosaConfig(**kwargs)
