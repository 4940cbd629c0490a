"""Our callbacks' metrics reach the reporting integrations (TensorBoard, W&B, ...), not only log_history."""

import pytest
from peft import get_peft_model
from transformers import PrinterCallback, Trainer, TrainerCallback
from transformers.integrations import integration_utils

from peft_sparse import SnellConfig, SoraConfig, SparseConfig
from tests.conftest import make_tiny_llama
from tests.test_trainer import repeating_sequences, training_args
from trl_callbacks import SnellAllocationCallback, SoraCallback, SparseUpdateCallback, log_before_reporting

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


def trained(tmp_path, method, callbacks, add_after_init=(), place=True) -> Trainer:
    args = training_args(tmp_path, max_steps=2, per_device_train_batch_size=2, logging_steps=1, report_to=["fake"])
    model = get_peft_model(make_tiny_llama(), METHODS[method][0]())
    trainer = Trainer(model=model, args=args, train_dataset=repeating_sequences(8), callbacks=list(callbacks))
    for callback in add_after_init:
        trainer.add_callback(callback)
    if place:
        log_before_reporting(trainer)
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
    first, second = SparseUpdateCallback(), SparseUpdateCallback(log_layer_metrics=True)
    trainer = trained(tmp_path, "sparse", [first], add_after_init=[second])
    order = trainer.callback_handler.callbacks
    position = {id(callback): index for index, callback in enumerate(order)}
    assert position[id(first)] < position[id(second)] < position[id(reporter_of(trainer))]
    assert position[id(second)] < position[id(trainer.pop_callback(PrinterCallback))]  # the console sees them too
    assert all("sparse/churn" in logs for logs in reporter_of(trainer).received[:2])


def test_unplaced_callback_warns_and_still_logs_to_the_history(tmp_path, report_to_fake):
    with pytest.warns(UserWarning, match=r"SparseUpdateCallback: its keys reach trainer.state.log_history and the "
                      r"console but not the report_to integrations \['fake'\].*log_before_reporting\(trainer\)"):
        trainer = trained(tmp_path, "sparse", [SparseUpdateCallback()], place=False)
    assert all("sparse/churn" not in logs for logs in reporter_of(trainer).received)
    assert all("sparse/churn" in entry for entry in trainer.state.log_history)


@pytest.mark.parametrize("method", list(METHODS))
def test_per_layer_keys_are_off_by_default(tmp_path, report_to_fake, method):
    _, callback_cls, _, totals, layer_prefixes = METHODS[method]
    trainer = trained(tmp_path, method, [callback_cls()])
    for entry in trainer.state.log_history:
        assert all(key in entry for key in totals)
        assert not [key for key in entry if key.startswith(tuple(layer_prefixes))]


def test_density_and_churn_since_the_last_log_at_every_logging_step(tmp_path):
    model = get_peft_model(make_tiny_llama(), METHODS["sparse"][0]())  # a selection step after every optimizer step
    churn_of_step = {}
    reselect = model.base_model.reselect

    def recording_reselect(adapter_name, rate, optimizer):
        statistics = reselect(adapter_name, rate, optimizer)
        churn_of_step[len(churn_of_step) + 1] = statistics["churn"]
        return statistics

    model.base_model.reselect = recording_reselect
    args = training_args(tmp_path, max_steps=6, per_device_train_batch_size=2, logging_steps=2)
    trainer = Trainer(model=model, args=args, train_dataset=repeating_sequences(16), callbacks=[SparseUpdateCallback()])
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logs] == [2, 4, 6] and len(churn_of_step) == 6
    assert all(churn_of_step[step] > 0 for step in range(1, 6))  # the linear schedule reaches 0 at step 6
    for entry in logs:
        assert entry["sparse/churn"] == pytest.approx(churn_of_step[entry["step"] - 1] + churn_of_step[entry["step"]])
        assert entry["sparse/density"] == pytest.approx((2 * 102 + 2 * 205) / (2 * 1024 + 2 * 2048))
