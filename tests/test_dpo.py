"""TRL's DPOTrainer with a sparse-delta adapter: the adapter disabled is the reference model.

With ``ref_model=None`` and a ``peft_config``, DPOTrainer computes the reference log-probs by a
no-grad forward of the policy itself under ``disable_adapter()``, between the policy forward and
its backward. That forward must not disturb the pending backward: the gradients must be the
ones of a run against a separate copy of the base model.

Two setups. fp32 without gradient checkpointing is the exact guard: the weight the policy forward
saved must survive the reference forward (checkpointing would recompute it in backward and hide a
write), and the gradients agree to 1e-8. TRL's defaults (checkpointing on, bf16 autocast, also on
CPU): the disabled adapter's reference, bf16(W0 + delta) with the delta taken out in fp32, and a
separate model's bf16(W0) differ by rounding, so rewards agree to about 1% (a reference with the
adapter left on is off by over 100x) and gradients to about 2e-4 (largest 3e-2).
"""

import copy
import math

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback
from trl import DPOConfig, DPOTrainer

from tests.conftest import SPARSE_DELTA_CONFIGS, make_tiny_llama
from tests.test_trl import LETTERS, character_tokenizer

STEPS = 2
# per setup: DPOConfig keywords, absolute tolerance of the gradients, relative tolerance of the logged rewards
SETUPS = {
    "fp32": ({"gradient_checkpointing": False, "bf16": False}, 1e-6, 1e-4),
    "trl_defaults": ({}, 1e-3, 5e-2),
}


def preference_pairs(count: int = 8) -> Dataset:
    """Prompts of four letters; chosen continues the alphabet, rejected runs it backwards."""
    generator = torch.Generator().manual_seed(0)
    starts = torch.randint(0, len(LETTERS), (count,), generator=generator).tolist()

    def letters(start: int, step: int, length: int) -> str:
        return "".join(LETTERS[(start + step * i) % len(LETTERS)] for i in range(length))

    return Dataset.from_list([
        {"prompt": letters(start, 1, 4), "chosen": letters(start + 4, 1, 3), "rejected": letters(start + 2, -1, 3)}
        for start in starts
    ])  # fmt: skip


class GradientRecorder(TrainerCallback):
    """Copies the gradients of the trainable parameters just before each optimizer step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps.append({
            name: parameter.grad.detach().clone()
            for name, parameter in model.named_parameters() if parameter.requires_grad
        })  # fmt: skip


def train_dpo(
    method: str, tmp_path, separate_reference: bool, setup: str
) -> tuple[list[dict[str, torch.Tensor]], list[dict]]:
    """Two DPO steps from the same non-zero adapter; returns (gradients per step, logged steps)."""
    base = make_tiny_llama()
    reference = copy.deepcopy(base) if separate_reference else None
    args = DPOConfig(
        output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=1e-2,
        max_length=16, beta=0.1, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
        disable_tqdm=True, **SETUPS[setup][0],
    )  # fmt: skip
    recorder = GradientRecorder()
    trainer = DPOTrainer(
        model=base, ref_model=reference, args=args, train_dataset=preference_pairs(),
        processing_class=character_tokenizer(), callbacks=[recorder],
        # a zero adapter would make policy and reference agree: start from seeded non-zero values
        peft_config=SPARSE_DELTA_CONFIGS[method](init_weights=False),
    )  # fmt: skip
    trainer.train()
    return recorder.steps, [entry for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("setup", sorted(SETUPS))
@pytest.mark.parametrize("method", sorted(SPARSE_DELTA_CONFIGS))
def test_disabled_adapter_reference_gives_the_gradients_of_a_separate_reference(method, setup, tmp_path):
    own_reference, own_log = train_dpo(method, tmp_path / "own", False, setup)
    separate_reference, separate_log = train_dpo(method, tmp_path / "separate", True, setup)
    _, gradient_atol, rewards_rtol = SETUPS[setup]

    assert len(own_reference) == len(separate_reference) == STEPS
    for step, (own, separate) in enumerate(zip(own_reference, separate_reference)):
        assert own.keys() == separate.keys() and own
        assert any(gradient.abs().max() > 0 for gradient in own.values()), f"all gradients zero at step {step}"
        for name in own:
            torch.testing.assert_close(own[name], separate[name], rtol=0, atol=gradient_atol, msg=f"step {step} {name}")

    assert len(own_log) == len(separate_log) == STEPS
    for own, separate in zip(own_log, separate_log):
        values = [value for key, value in own.items() if key == "loss" or key.startswith(("rewards/", "logps/"))]
        assert values and all(math.isfinite(value) for value in values)
        # rewards are beta * (policy - reference) log-probs: they see the reference directly
        for key in ("rewards/chosen", "rewards/rejected"):
            assert own[key] != 0 and own[key] == pytest.approx(separate[key], rel=rewards_rtol), key
