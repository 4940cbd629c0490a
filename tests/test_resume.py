"""Exact resume: 4 steps straight == 3 steps + checkpoint + resume for 1 step, bit for bit (fp32, CPU).

The runs (tests/tiny_runs.py) put the checkpoint inside an SFT statistics window, before a LIFT mask
refresh, a SoRA threshold step and a SNELLA re-allocation.
"""

import shutil

import pytest
import torch
from peft import get_peft_model_state_dict

from tests.tiny_runs import METHODS, tiny_trainer, train
from trl_callbacks import SparseUpdateCallback


def adapter_of(model) -> dict:
    return {name: tensor.clone() for name, tensor in get_peft_model_state_dict(model).items()}


def assert_identical(resumed: dict, straight: dict) -> None:
    assert resumed.keys() == straight.keys()
    for name, tensor in straight.items():
        assert torch.equal(resumed[name], tensor), name


@pytest.fixture(scope="module")
def sparse_ag_run(tmp_path_factory):
    """The uninterrupted "sparse-ag" run: (its output folder, final adapter)."""
    output_dir = tmp_path_factory.mktemp("sparse-ag")
    return output_dir, adapter_of(train("sparse-ag", str(output_dir)))


@pytest.mark.parametrize("method", list(METHODS))
def test_resumed_training_is_bit_identical(tmp_path, sparse_ag_run, method):
    if method == "sparse-ag":
        output_dir, straight = sparse_ag_run
    else:
        output_dir, straight = tmp_path, adapter_of(train(method, str(tmp_path)))
    checkpoint = str(output_dir / "checkpoint-3")
    resumed = train(method, str(tmp_path / "resumed"), resume_from=checkpoint, resume_from_checkpoint=checkpoint)
    assert_identical(adapter_of(resumed), straight)


def test_open_selection_window_is_saved_and_restored_by_the_trainers_callback_restore(sparse_ag_run):
    output_dir, straight = sparse_ag_run
    saved = output_dir / "checkpoint-3" / SparseUpdateCallback.state_file_name
    assert saved.stat().st_size > 1000  # the window's candidates and their accumulated gradients
    # resume_from_checkpoint=True, with the Trainer re-creating the callback from trainer_state.json
    resumed = train("sparse-ag", str(output_dir), resume_from=True, restore_callback_states_from_checkpoint=True)
    assert_identical(adapter_of(resumed), straight)


def test_checkpoint_outside_output_dir_needs_resume_from_checkpoint_in_args(tmp_path, sparse_ag_run):
    moved = tmp_path / "moved"
    shutil.copytree(sparse_ag_run[0] / "checkpoint-3", moved)
    message = "set TrainingArguments\\(resume_from_checkpoint=<the checkpoint folder>\\)"
    with pytest.raises(FileNotFoundError, match=message):
        train("sparse-ag", str(tmp_path / "other"), resume_from=str(moved))


def test_sora_gate_group_and_its_schedule_are_saved_and_resumed_exactly(tmp_path):
    straight = tiny_trainer("sora", str(tmp_path))
    straight.train()
    checkpoint = tmp_path / "checkpoint-3"
    saved_schedule = torch.load(checkpoint / "scheduler.pt", weights_only=False)
    saved_groups = torch.load(checkpoint / "optimizer.pt", weights_only=False)["param_groups"]
    assert saved_schedule["base_lrs"] == [5e-2, 0.2] and saved_schedule["last_epoch"] == 3
    assert [group["weight_decay"] for group in saved_groups] == [0.0, 0.0]
    resumed = tiny_trainer("sora", str(tmp_path / "resumed"), resume_from_checkpoint=str(checkpoint))
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.lr_scheduler.state_dict() == straight.lr_scheduler.state_dict()
    expected, actual = straight.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert actual["param_groups"] == expected["param_groups"]
    for index, state in expected["state"].items():
        for key, value in state.items():
            assert torch.equal(actual["state"][index][key], value), (index, key)
