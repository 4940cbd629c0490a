"""End to end: the Trainer (and TRL's SFTTrainer) train a SparseConfig adapter with SparseUpdateCallback."""

import pytest
import torch
from datasets import Dataset
from peft import get_peft_model
from transformers import Trainer, TrainingArguments

from peft_sparse import SparseConfig
from tests.conftest import VOCAB_SIZE, make_tiny_llama
from trl_callbacks import SparseUpdateCallback


def repeating_sequences(count: int = 64, length: int = 16) -> Dataset:
    """Sequences that follow a fixed permutation of the vocabulary: learnable in a few steps."""
    generator = torch.Generator().manual_seed(0)
    successor = torch.randperm(VOCAB_SIZE, generator=generator)
    rows = []
    for start in torch.randint(0, VOCAB_SIZE, (count,), generator=generator).tolist():
        ids = [start]
        for _ in range(length - 1):
            ids.append(int(successor[ids[-1]]))
        rows.append({"input_ids": ids, "labels": ids})
    return Dataset.from_list(rows)


def training_args(tmp_path, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(tmp_path), max_steps=40, per_device_train_batch_size=8, learning_rate=1e-1,
        logging_steps=4, save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


@pytest.mark.parametrize("selection", ["ag", "ma"])
def test_trainer_loss_falls_and_indices_change(tmp_path, selection):
    config = SparseConfig(density=0.1, selection=selection, reselection_steps=8, selection_accumulation_steps=2)
    model = get_peft_model(make_tiny_llama(), config)
    initial = {n: l.sparse_indices["default"].clone() for n, l in model.base_model.sparse_delta_layers()}
    trainer = Trainer(
        model=model, args=training_args(tmp_path), train_dataset=repeating_sequences(),
        callbacks=[SparseUpdateCallback()],
    )
    trainer.train()

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < losses[0] - 0.2  # from ~ln(64) = 4.16 for the random model
    changed = sum(
        int((~torch.isin(layer.sparse_indices["default"], initial[name])).sum())
        for name, layer in model.base_model.sparse_delta_layers()
    )
    assert changed > 0
    churn = [entry["sparse/churn"] for entry in trainer.state.log_history if "loss" in entry and entry["step"] % 8 == 0]
    # selections at steps 8, 16, 24, 32, 40; the linear schedule decays to 0 at the last step
    assert len(churn) == 5 and all(0 < value <= 0.2 for value in churn[:-1]) and churn[-1] == 0
    assert churn == sorted(churn, reverse=True)


def test_static_random_selection_keeps_indices(tmp_path):
    model = get_peft_model(make_tiny_llama(), SparseConfig(density=0.05, selection="random", reselection_steps=4, selection_accumulation_steps=2))
    initial = {n: l.sparse_indices["default"].clone() for n, l in model.base_model.sparse_delta_layers()}
    Trainer(
        model=model, args=training_args(tmp_path, max_steps=8), train_dataset=repeating_sequences(),
        callbacks=[SparseUpdateCallback()],
    ).train()
    for name, layer in model.base_model.sparse_delta_layers():
        assert torch.equal(layer.sparse_indices["default"], initial[name])


def test_gradient_checkpointing_and_accumulation_train_the_same_adapter(tmp_path):
    adapters = []
    for checkpointing in (False, True):
        model = get_peft_model(make_tiny_llama(), SparseConfig(density=0.1, reselection_steps=4,
                                                                selection_accumulation_steps=2))
        args = training_args(tmp_path, max_steps=8, gradient_checkpointing=checkpointing,
                             gradient_accumulation_steps=2, per_device_train_batch_size=4)
        Trainer(model=model, args=args, train_dataset=repeating_sequences(),
                callbacks=[SparseUpdateCallback()]).train()
        adapters.append({n: (l.sparse_indices["default"].clone(), l.sparse_values["default"].detach().clone())
                         for n, l in model.base_model.sparse_delta_layers()})
    plain, checkpointed = adapters
    for name, (indices, values) in plain.items():
        assert torch.equal(checkpointed[name][0], indices)
        torch.testing.assert_close(checkpointed[name][1], values, rtol=1e-4, atol=1e-6)
