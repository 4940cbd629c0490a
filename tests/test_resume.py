"""Exact resume: N steps straight == N/2 steps + checkpoint + resume for N/2 steps, bit for bit (fp32, CPU)."""

import shutil

import pytest
import torch
from peft import get_peft_model, get_peft_model_state_dict
from transformers import Trainer

from peft_sparse import LiftConfig, SnellConfig, SoraConfig, SparseConfig
from tests.conftest import make_tiny_llama
from tests.test_trainer import repeating_sequences, training_args
from trl_callbacks import SnellAllocationCallback, SoraCallback, SparseUpdateCallback

TARGETS = ["q_proj", "down_proj"]  # 4 matrices: enough to test, fast

# 6 optimizer steps, checkpoint at step 3. SFT: the statistics window opens after step 2 and selects
# at step 4, so it spans the checkpoint (over 2 micro-batches per step for "ag"); LIFT refreshes its
# mask at steps 2, 4 and 6; SoRA's threshold moves every step, SNELLA's budget every 2 steps.
CASES = {
    "sft-ag": (lambda: SparseConfig(target_modules=TARGETS, density=0.1, selection="ag", reselection_steps=4, selection_accumulation_steps=2), SparseUpdateCallback, 2),
    "sft-ma": (lambda: SparseConfig(target_modules=TARGETS, density=0.1, selection="ma", reselection_steps=4, selection_accumulation_steps=2), SparseUpdateCallback, 1),
    "lift": (lambda: LiftConfig(target_modules=TARGETS, density=0.1, rank=4, mask_update_interval=2), SparseUpdateCallback, 1),
    "sora": (lambda: SoraConfig(target_modules=TARGETS, r=4, xi_schedule="linear", xi_start=0.01, xi_end=0.5), SoraCallback, 1),
    "snella": (lambda: SnellConfig(target_modules=TARGETS, r=4, allocation="snella", sparsity=0.2, target_sparsity=0.8, allocation_interval=2), SnellAllocationCallback, 1),
}  # fmt: skip


def train(case: str, output_dir, resume_from=None, **overrides) -> tuple[dict, Trainer]:
    make_config, callback, accumulation = CASES[case]
    model = get_peft_model(make_tiny_llama(), make_config())
    args = training_args(
        output_dir, max_steps=6, per_device_train_batch_size=2, gradient_accumulation_steps=accumulation,
        learning_rate=5e-2, save_strategy="steps", save_steps=3, **overrides,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=repeating_sequences(32), callbacks=[callback()])
    trainer.train(resume_from_checkpoint=resume_from)
    return {name: tensor.clone() for name, tensor in get_peft_model_state_dict(model).items()}, trainer


def assert_identical(resumed: dict, straight: dict) -> None:
    assert resumed.keys() == straight.keys()
    for name, tensor in straight.items():
        assert torch.equal(resumed[name], tensor), name


@pytest.fixture(scope="module")
def sft_ag_run(tmp_path_factory):
    """The uninterrupted "sft-ag" run: (its output folder, final adapter, trainer)."""
    output_dir = tmp_path_factory.mktemp("sft-ag")
    adapter, trainer = train("sft-ag", output_dir)
    return output_dir, adapter, trainer


@pytest.mark.parametrize("case", list(CASES))
def test_resumed_training_is_bit_identical(tmp_path, sft_ag_run, case):
    if case == "sft-ag":
        output_dir, straight, _ = sft_ag_run
    else:
        output_dir = tmp_path
        straight, _ = train(case, output_dir)
    resumed, trainer = train(case, tmp_path / "resumed", resume_from=str(output_dir / "checkpoint-3"),
                             resume_from_checkpoint=str(output_dir / "checkpoint-3"))  # fmt: skip
    assert trainer.state.global_step == 6
    assert_identical(resumed, straight)


def test_selection_window_open_at_the_checkpoint_is_saved_and_restored(sft_ag_run):
    output_dir, straight, trainer = sft_ag_run
    saved = output_dir / "checkpoint-3" / SparseUpdateCallback.state_file_name
    assert saved.is_file() and saved.stat().st_size > 1000  # candidates and their accumulated gradients
    churn = [entry["sparse/churn"] for entry in trainer.state.log_history if "sparse/churn" in entry]
    assert len(churn) == 1 and churn[0] > 0  # the step-4 selection used the window spanning the checkpoint
    # resume_from_checkpoint=True, with the Trainer re-creating the callback from trainer_state.json
    resumed, _ = train("sft-ag", output_dir, resume_from=True, restore_callback_states_from_checkpoint=True)
    assert_identical(resumed, straight)


def test_checkpoint_outside_output_dir_needs_resume_from_checkpoint_in_args(tmp_path, sft_ag_run):
    moved = tmp_path / "moved"
    shutil.copytree(sft_ag_run[0] / "checkpoint-3", moved)
    message = "set TrainingArguments\\(resume_from_checkpoint=<the checkpoint folder>\\)"
    with pytest.raises(FileNotFoundError, match=message):
        train("sft-ag", tmp_path / "other", resume_from=str(moved))
