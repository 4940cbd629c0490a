"""SoRA: proximal operator, schedules, config checks, the gated layer, and the Trainer callback."""

import math

import pytest
import torch
from peft import get_peft_model
from torch import nn
from transformers import Trainer, TrainerCallback
from trl import SFTConfig, SFTTrainer

from peft_sparse import SoraConfig
from peft_sparse.tuners.sora import SoraLinear
from peft_sparse.tuners.sora.proximal import scheduled_xi, soft_threshold_
from tests.conftest import make_mlp, make_tiny_gpt2, make_tiny_llama
from tests.test_trainer import repeating_sequences, training_args
from tests.test_trl import alphabet_runs, character_tokenizer
from trl_callbacks import SoraCallback, create_sora_optimizer, sora_optimizer_cls_and_kwargs


def randomize_sora(model: nn.Module, adapter_name: str = "default", seed: int = 1) -> None:
    """Non-zero B and gates (so the delta is non-zero), as after some training."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, SoraLinear) and adapter_name in module.sora_B:
                module.sora_B[adapter_name].copy_(torch.randn(module.sora_B[adapter_name].shape, generator=generator))
                module.sora_gate[adapter_name].copy_(torch.randn(module.r[adapter_name], generator=generator))


def logits_of(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


# --- the math ------------------------------------------------------------------------------------


def test_soft_threshold_is_exact_including_values_between_xi_and_two_xi():
    xi = 0.25
    gate = torch.tensor([1.0, -1.0, 0.3, -0.5, 0.25, -0.25, 0.1, 0.0, 0.26, -0.49])
    expected = torch.tensor([0.75, -0.75, 0.05, -0.25, 0.0, 0.0, 0.0, 0.0, 0.01, -0.24])
    soft_threshold_(gate, xi)
    torch.testing.assert_close(gate, expected, rtol=0, atol=1e-7)
    # the reference zeroes everything in (xi, 2 xi] after its first two lines; the exact operator keeps them
    assert gate[[2, 3, 8, 9]].ne(0).all()


def test_soft_threshold_with_zero_threshold_changes_nothing():
    gate = torch.randn(16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(soft_threshold_(gate.clone(), 0.0), gate)


@pytest.mark.parametrize(
    "schedule, middle",
    [
        ("constant", 0.1),
        ("linear", 0.55),
        ("log_linear", math.log((math.exp(0.1) + math.exp(1.0)) / 2)),
        ("exp", math.sqrt(0.1 * 1.0)),
    ],
)
def test_xi_schedules_go_from_start_to_end(schedule, middle):
    end = 0.1 if schedule == "constant" else 1.0
    assert scheduled_xi(schedule, 0.1, end, 0, 11) == pytest.approx(0.1, abs=1e-12)
    assert scheduled_xi(schedule, 0.1, end, 5, 11) == pytest.approx(middle, rel=1e-12)
    assert scheduled_xi(schedule, 0.1, end, 10, 11) == pytest.approx(end, rel=1e-12)
    assert scheduled_xi(schedule, 0.1, end, 50, 11) == pytest.approx(end, rel=1e-12)  # clamped past the end
    values = [scheduled_xi(schedule, 0.1, end, step, 11) for step in range(11)]
    assert values == sorted(values)


def test_log_linear_rises_faster_and_exp_slower_than_linear():
    for step in range(1, 10):
        at = {s: scheduled_xi(s, 0.01, 2.0, step, 11) for s in ("linear", "log_linear", "exp")}
        assert at["exp"] < at["linear"] < at["log_linear"]


# --- config checks -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 0}, "r must be a positive integer, got 0"),
        ({"alpha": 0}, "alpha must be a number > 0.0, got 0"),
        ({"dropout": -0.1}, "dropout must be a number >= 0.0, got -0.1"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
        ({"gate_init": "zeros"}, r"gate_init must be one of \('ones', 'randn'\), got 'zeros'"),
        ({"gate_lr": 0.0}, "gate_lr must be a number > 0.0, got 0.0"),
        ({"xi_start": -1.0}, "xi_start must be a number >= 0.0, got -1.0"),
        ({"xi_schedule": "cosine"}, r"xi_schedule must be one of \('constant', 'linear', 'log_linear', 'exp'\), got 'cosine'"),
        ({"xi_schedule": "linear", "xi_end": -0.5}, "xi_end must be a number >= 0.0, got -0.5"),
        ({"xi_start": 0.1, "xi_end": 0.2}, "xi_end must equal xi_start .* with xi_schedule='constant'"),
        ({"xi_schedule": "exp", "xi_start": 0.0, "xi_end": 1.0}, "xi_start and xi_end must be > 0 with xi_schedule='exp'"),
        ({"scale_xi_by_lr": "yes"}, "scale_xi_by_lr must be True or False, got 'yes'"),
        ({"l1_weight": -1}, "l1_weight must be a number >= 0.0, got -1"),
        ({"target_modules": []}, "target_modules must not be empty"),
    ],
)
def test_bad_config_raises_naming_field_and_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SoraConfig(**kwargs)


def test_config_defaults():
    config = SoraConfig(xi_start=0.3)
    assert (config.r, config.alpha, config.gate_init, config.xi_end, config.xi_schedule) == (8, 8.0, "ones", 0.3, "constant")
    assert config.xi_at(7, 10) == 0.3


# --- the layer -----------------------------------------------------------------------------------


@pytest.mark.parametrize("make_base", [make_tiny_llama, make_tiny_gpt2])
def test_forward_is_base_plus_gated_low_rank_and_merges_exactly(input_ids, make_base):
    model = get_peft_model(make_base(), SoraConfig(r=4, alpha=6.0, gate_init="randn"))
    randomize_sora(model)
    layer = next(m for m in model.modules() if isinstance(m, SoraLinear))
    x = torch.randn(3, layer.in_features)
    a, b, g = (getattr(layer, name)["default"] for name in ("sora_A", "sora_B", "sora_gate"))
    expected = layer.base_layer(x) + 1.5 * ((x @ a.T) * g) @ b.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)

    adapted = logits_of(model, input_ids)
    base = logits_of(make_base(), input_ids)
    assert not torch.allclose(adapted, base, atol=1e-3)
    with model.disable_adapter():
        torch.testing.assert_close(logits_of(model, input_ids), base, rtol=0, atol=1e-6)
    model.merge_adapter(safe_merge=True)
    torch.testing.assert_close(logits_of(model, input_ids), adapted, rtol=0, atol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(logits_of(model, input_ids), adapted, rtol=0, atol=1e-5)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, SoraLinear) for m in merged.modules())
    torch.testing.assert_close(logits_of(merged, input_ids), adapted, rtol=0, atol=1e-5)


def test_new_adapter_starts_as_zero_delta_with_ones_gates(input_ids):
    model = get_peft_model(make_tiny_llama(), SoraConfig(r=4))
    torch.testing.assert_close(logits_of(model, input_ids), logits_of(make_tiny_llama(), input_ids), rtol=0, atol=0)
    assert all(torch.equal(gate, torch.ones(4)) for gate in model.base_model.gates())
    assert model.base_model.live_ranks() == {name: 4 for name, _ in model.base_model.sora_layers()}


def test_safe_merge_rejects_non_finite_delta():
    model = get_peft_model(make_mlp(), SoraConfig(r=2, target_modules=["0"]))
    with torch.no_grad():
        model.base_model.model[0].sora_B["default"].fill_(float("inf"))
    weight = model.base_model.model[0].base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="NaNs detected in the merged weights"):
        model.merge_adapter(safe_merge=True)
    assert torch.equal(model.base_model.model[0].base_layer.weight, weight)
    with pytest.warns(UserWarning, match="Already unmerged"):
        model.base_model.model[0].unmerge()


def test_multiple_adapters_switch_and_delete(input_ids):
    model = get_peft_model(make_tiny_llama(), SoraConfig(r=4))
    model.add_adapter("other", SoraConfig(r=2))
    randomize_sora(model, "default", seed=1)
    randomize_sora(model, "other", seed=2)
    first = logits_of(model, input_ids)
    model.set_adapter("other")
    second = logits_of(model, input_ids)
    assert not torch.allclose(first, second, atol=1e-3)
    assert [gate.numel() for gate in model.base_model.gates("other")] == [2] * 14
    assert all(gate.requires_grad for gate in model.base_model.gates("other"))
    assert not any(gate.requires_grad for gate in model.base_model.gates("default"))
    model.delete_adapter("default")
    torch.testing.assert_close(logits_of(model, input_ids), second, rtol=0, atol=0)
    assert list(model.base_model.sora_layers("default")) == []


def test_l1_gradient_is_sign_over_gate_count():
    model = get_peft_model(make_mlp(), SoraConfig(r=2))  # two layers -> four gate entries
    gates = model.base_model.gates()
    with torch.no_grad():
        gates[0].copy_(torch.tensor([0.5, -2.0]))
        gates[1].copy_(torch.tensor([0.0, 3.0]))
    gates[0].grad = torch.tensor([1.0, 1.0])
    model.base_model.add_gate_l1_gradient("default", 2.0)
    assert torch.equal(gates[0].grad, torch.tensor([1.5, 0.5]))
    assert torch.equal(gates[1].grad, torch.tensor([0.0, 0.5]))


# --- the callback in the Trainer -----------------------------------------------------------------


def test_factory_gives_gates_their_own_lr_on_the_schedule_and_logs_live_rank(tmp_path):
    config = SoraConfig(r=4, gate_lr=5e-2, xi_schedule="linear", xi_start=0.0, xi_end=0.8)
    model = get_peft_model(make_tiny_llama(), config)
    args = training_args(tmp_path, max_steps=12, logging_steps=4, learning_rate=1e-2, weight_decay=0.1,
                         lr_scheduler_type="linear")
    trainer = Trainer(model=model, args=args, train_dataset=repeating_sequences(),
                      optimizer_cls_and_kwargs=sora_optimizer_cls_and_kwargs(args),
                      callbacks=[SoraCallback(log_layer_ranks=True)])  # fmt: skip
    trainer.train()

    gate_ids = {id(gate) for gate in model.base_model.gates()}
    groups = trainer.optimizer.param_groups
    gate_groups = [g for g in groups if {id(p) for p in g["params"]} & gate_ids]
    assert len(gate_groups) == 1 and {id(p) for p in gate_groups[0]["params"]} == gate_ids
    assert gate_groups[0]["weight_decay"] == 0.0 and gate_groups[0]["initial_lr"] == 5e-2
    other_params = {id(p) for g in groups if g is not gate_groups[0] for p in g["params"]}
    assert len(other_params) == 28 and any(g["weight_decay"] == 0.1 for g in groups)
    assert gate_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # the linear schedule reached zero with the rest

    logged = [entry for entry in trainer.state.log_history if "sora/xi" in entry and "loss" in entry]
    assert [entry["sora/xi"] for entry in logged] == pytest.approx([config.xi_at(s, 12) for s in (3, 7, 11)])
    # threshold of step s = lr used at step s * xi_s; linear decay without warmup: lr_s = 5e-2 * (1 - s / 12)
    assert [entry["sora/threshold"] for entry in logged] == pytest.approx(
        [5e-2 * (1 - s / 12) * config.xi_at(s, 12) for s in (3, 7, 11)]
    )
    final = trainer.state.log_history[-1]
    ranks = model.base_model.live_ranks()
    assert final["sora/live_rank"] == sum(ranks.values())
    assert all(final[f"sora/live_rank/{name}"] == rank for name, rank in ranks.items())
    assert final["sora/live_rank_fraction"] == pytest.approx(sum(ranks.values()) / (4 * len(ranks)))


class GateStepRecorder(TrainerCallback):
    """Keeps, for every optimizer step, the gates and their (clipped) gradients before it and the gates after it."""

    def __init__(self, gates):
        self.gates, self.steps = gates, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.steps.append([(gate.detach().clone(), gate.grad.clone()) for gate in self.gates])

    def on_optimizer_step(self, args, state, control, **kwargs):
        before_step = self.steps[-1]
        self.steps[-1] = [(*pair, gate.detach().clone()) for pair, gate in zip(before_step, self.gates)]


def test_gates_step_with_gate_lr_and_the_rest_with_lr(tmp_path):
    model = get_peft_model(make_tiny_llama(), SoraConfig(r=4, gate_lr=0.5, xi_start=0.0, init_weights=False))
    optimizer = create_sora_optimizer(model, torch.optim.SGD, lr=1e-3)
    recorder = GateStepRecorder(model.base_model.gates())
    args = training_args(tmp_path, max_steps=3, lr_scheduler_type="constant")
    trainer = Trainer(model=model, args=args, train_dataset=repeating_sequences(), optimizers=(optimizer, None),
                      callbacks=[SoraCallback(), recorder])  # fmt: skip
    trainer.train()
    assert [group["lr"] for group in optimizer.param_groups] == [1e-3, 0.5]  # no bias or norm is trainable
    assert len(recorder.steps) == 3
    for step in recorder.steps:
        for before, grad, after in step:
            assert torch.count_nonzero(grad) > 0
            torch.testing.assert_close(after, before - 0.5 * grad, rtol=0, atol=1e-7)


def test_an_optimizer_built_with_a_gate_group_is_used_as_it_is(tmp_path):
    model = get_peft_model(make_tiny_llama(), SoraConfig(r=4, xi_start=0.1))
    gates = model.base_model.gates()
    gate_ids = {id(gate) for gate in gates}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in gate_ids]
    optimizer = torch.optim.AdamW([{"params": others}, {"params": gates, "lr": 3e-2, "weight_decay": 0.0}], lr=1e-2)
    args = training_args(tmp_path, max_steps=4, lr_scheduler_type="constant")
    trainer = Trainer(model=model, args=args, train_dataset=repeating_sequences(), optimizers=(optimizer, None),
                      callbacks=[SoraCallback()])
    trainer.train()
    assert len(optimizer.param_groups) == 2 and optimizer.param_groups[1]["lr"] == 3e-2
    assert trainer.state.log_history[-1]["sora/threshold"] == pytest.approx(3e-2 * 0.1)


@pytest.mark.parametrize(
    "gate_lr, weight_decay, found",
    [
        (5e-2, 0.0, "weight_decay 0 and lr 0.05 \\(SoraConfig.gate_lr\\), got lr 0.1 and weight_decay 0"),
        (None, 0.01, "weight_decay 0, got lr 0.1 and weight_decay 0.01"),
    ],
)
def test_gates_in_the_trainers_default_groups_are_refused(tmp_path, gate_lr, weight_decay, found):
    model = get_peft_model(make_tiny_llama(), SoraConfig(r=4, gate_lr=gate_lr))
    args = training_args(tmp_path, max_steps=2, weight_decay=weight_decay)
    trainer = Trainer(model=model, args=args, train_dataset=repeating_sequences(), callbacks=[SoraCallback()])
    message = (
        f"SoraCallback: the gates of adapter 'default' must be in one param group with {found}; build the optimizer "
        "with trl_callbacks.create_sora_optimizer"
    )
    with pytest.raises(ValueError, match=message):
        trainer.train()


def test_sft_trainer_wraps_and_trains_sora(tmp_path):
    args = SFTConfig(
        output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=8, learning_rate=5e-2, weight_decay=0.01,
        logging_steps=4, save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=make_tiny_llama(), args=args, train_dataset=alphabet_runs(), processing_class=character_tokenizer(),
        peft_config=SoraConfig(r=4, gate_lr=0.1, xi_schedule="linear", xi_end=0.5),
        optimizer_cls_and_kwargs=sora_optimizer_cls_and_kwargs(args), callbacks=[SoraCallback()],
    )
    trainer.train()
    tuner = trainer.model.base_model
    gates = trainer.optimizer.param_groups[-1]
    assert {id(p) for p in gates["params"]} == {id(g) for g in tuner.gates()}
    assert gates["weight_decay"] == 0.0 and gates["initial_lr"] == 0.1
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < losses[0]
    assert trainer.state.log_history[-1]["sora/live_rank"] == sum(tuner.live_ranks().values())
