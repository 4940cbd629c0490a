"""Our callbacks' metrics reach the reporting integrations (TensorBoard, W&B, ...), not only log_history."""

import pytest
from peft import get_peft_model
from transformers import Trainer, TrainerCallback
from transformers.integrations import integration_utils

from peft_sparse import SnellConfig, SoraConfig, SparseConfig
from tests.conftest import make_tiny_llama
from tests.test_trainer import repeating_sequences, training_args
from trl_callbacks import SnellAllocationCallback, SoraCallback, SparseUpdateCallback

TARGETS = ["q_proj", "down_proj"]
LAYERS = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj",
          "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"]  # fmt: skip
METHODS = {
    "sparse": (lambda: SparseConfig(target_modules=TARGETS, density=0.1, reselection_steps=1, selection_accumulation_steps=1),
               SparseUpdateCallback, "log_layer_metrics", ["sparse/density", "sparse/churn"], ["sparse/churn/", "sparse/density/"]),
    "sora": (lambda: SoraConfig(target_modules=TARGETS, r=4), SoraCallback, "log_layer_ranks",
             ["sora/live_rank", "sora/xi"], ["sora/live_rank/"]),
    "snella": (lambda: SnellConfig(target_modules=TARGETS, r=4, allocation="snella", sparsity=0.2, target_sparsity=0.5, allocation_interval=1),
               SnellAllocationCallback, "log_layer_sparsity", ["snella/budget", "snella/mean_sparsity"], ["snella/sparsity/"]),
}  # fmt: skip


class FakeReporter(TrainerCallback):
    """Stands in for TensorBoardCallback / WandbCallback: keeps a copy of every ``logs`` it is handed."""

    def __init__(self):
        self.received = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.received.append(dict(logs))


@pytest.fixture
def report_to_fake(monkeypatch):
    """Registers FakeReporter the way transformers registers its integrations (``report_to=["fake"]``)."""
    monkeypatch.setitem(integration_utils.INTEGRATION_TO_CALLBACK, "fake", FakeReporter)


def trained(tmp_path, method, callbacks, add_after_init=()) -> Trainer:
    args = training_args(tmp_path, max_steps=2, per_device_train_batch_size=2, logging_steps=1, report_to=["fake"])
    model = get_peft_model(make_tiny_llama(), METHODS[method][0]())
    trainer = Trainer(model=model, args=args, train_dataset=repeating_sequences(8), callbacks=list(callbacks))
    for callback in add_after_init:
        trainer.add_callback(callback)
    trainer.train()
    return trainer


def reporter_of(trainer: Trainer) -> FakeReporter:
    return next(callback for callback in trainer.callback_handler.callbacks if isinstance(callback, FakeReporter))


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("per_layer", [True, False])
def test_reporting_integration_receives_the_callbacks_metrics(tmp_path, report_to_fake, method, per_layer):
    _, callback_cls, switch, totals, layer_prefixes = METHODS[method]
    trainer = trained(tmp_path, method, [callback_cls(**{switch: per_layer})])
    received = reporter_of(trainer).received
    train_logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(received) == len(train_logs) + 1 == 3  # 2 step logs + the final train summary
    for logs, history in zip(received, train_logs):
        assert logs == {key: value for key, value in history.items() if key != "step"}
        assert all(key in logs for key in totals)
        layer_keys = {key for key in logs if key.startswith(tuple(layer_prefixes))}
        expected = {prefix + layer for prefix in layer_prefixes for layer in LAYERS} if per_layer else set()
        assert layer_keys == expected


def test_callbacks_move_ahead_of_reporters_and_keep_their_order(tmp_path, report_to_fake):
    first, second = SparseUpdateCallback(), SparseUpdateCallback(log_layer_metrics=False)
    trainer = trained(tmp_path, "sparse", [first], add_after_init=[second])  # added after init: moved at train begin
    order = trainer.callback_handler.callbacks
    position = {id(callback): index for index, callback in enumerate(order)}
    assert position[id(first)] < position[id(second)] < position[id(reporter_of(trainer))]
    assert all("sparse/churn" in logs for logs in reporter_of(trainer).received[:2])
