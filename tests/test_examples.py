"""The arithmetic examples (SFT with the Trainer; LIFT / SFT / LoRA / full FT and SoRA with TRL's
SFTTrainer) end to end on a tiny chat model, and the helpers the quality benchmarks share."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from peft import LoraConfig, PeftModel
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))
sys.path.insert(0, str(REPO / "benchmarks"))
import arithmetic_task  # noqa: E402
import bench_quality  # noqa: E402
import quality_table  # noqa: E402
import benchmark_metadata  # noqa: E402
import dpo_sparse  # noqa: E402
import lift_arithmetic_trl  # noqa: E402
import sft_arithmetic  # noqa: E402
import sora_arithmetic_trl  # noqa: E402
import sora_sst2  # noqa: E402
import sst2_task  # noqa: E402

SPECIAL = ["<pad>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def character_vocab() -> dict[str, int]:
    return {token: i for i, token in enumerate(SPECIAL + [chr(code) for code in range(32, 127)] + ["\n"])}


def character_tokenizer(vocab: dict[str, int]) -> Tokenizer:
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return tokenizer


def save_tiny_chat_model(folder: Path) -> Path:
    """A 2-layer Llama and a character tokenizer with a ChatML template, saved like a Hub checkpoint."""
    vocab = character_vocab()
    tokenizer = character_tokenizer(vocab)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<|im_end|>", bos_token="<|im_start|>",
        additional_special_tokens=SPECIAL[1:], chat_template=CHAT_TEMPLATE,
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, eos_token_id=vocab["<|im_end|>"],
        bos_token_id=vocab["<|im_start|>"], tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def save_tiny_encoder(folder: Path) -> Path:
    """A 2-layer BERT and a character tokenizer, saved like a Hub checkpoint."""
    vocab = character_vocab()
    PreTrainedTokenizerFast(tokenizer_object=character_tokenizer(vocab), pad_token="<pad>").save_pretrained(folder)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128, pad_token_id=0)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory) -> Path:
    return save_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"))


def test_arithmetic_problems_are_seeded_and_correct():
    problems = arithmetic_task.arithmetic_problems(200, seed=7)
    assert problems == arithmetic_task.arithmetic_problems(200, seed=7)
    assert problems != arithmetic_task.arithmetic_problems(200, seed=8)
    operators = set()
    for question, answer in problems:
        left, operator, right = question.removeprefix("What is ").removesuffix("?").split()
        operators.add(operator)
        assert answer == {"+": int(left) + int(right), "-": int(left) - int(right), "*": int(left) * int(right)}[operator]
    assert operators == {"+", "-", "*"}


@pytest.mark.parametrize("method", lift_arithmetic_trl.METHODS)
def test_arithmetic_example_trains_each_method_at_the_same_budget(method, tiny_chat_model, tmp_path):
    general = tmp_path / "general.jsonl"
    general.write_text("".join(json.dumps({"question": f"How many apples are in {n} baskets?"}) + "\n"
                               for n in range(6)))
    args = lift_arithmetic_trl.argument_parser().parse_args([
        "--method", method, "--model", str(tiny_chat_model), "--steps", "6", "--batch-size", "4",
        "--learning-rate", "1e-2", "--budget-rank", "2", "--lift-rank", "4", "--eval-problems", "4",
        "--general-text", str(general), "--output-dir", str(tmp_path / "out"),
    ])  # fmt: skip
    scores = lift_arithmetic_trl.train_and_evaluate(args)

    model, _ = arithmetic_task.load_model_and_tokenizer(str(tiny_chat_model))
    budget = lift_arithmetic_trl.lora_equivalent_count(model, 2)
    expected_trainable = sum(p.numel() for p in model.parameters()) if method == "full" else budget
    if method == "s2ft":  # whole heads and channels: LoRA's count within 5%
        assert abs(scores["trainable_params"] / expected_trainable - 1) <= 0.05
    else:
        assert scores["trainable_params"] == expected_trainable
    assert 0.0 <= scores["exact_match"] <= 1.0
    assert scores["answer_loss"] < scores["answer_loss_before"]  # 6 steps at lr 1e-2 learn the answer format
    assert scores["general_loss_rise"] != 0.0 and torch.isfinite(torch.tensor(scores["general_loss_rise"]))


@pytest.mark.parametrize("values_dtype", ["float32", "bfloat16"])
def test_sft_example_trains_and_saves_a_loadable_adapter(tiny_chat_model, tmp_path, values_dtype):
    out = tmp_path / "sft"
    scores = sft_arithmetic.main([
        "--model", str(tiny_chat_model), "--steps", "6", "--batch-size", "4", "--learning-rate", "1e-2",
        "--density", "0.05", "--eval-problems", "4", "--output-dir", str(out), "--values-dtype", values_dtype,
    ])  # fmt: skip
    assert scores["after"]["answer_loss"] < scores["before"]["answer_loss"]
    saved = load_file(out / "adapter_model.safetensors")
    assert {tensor.dtype for key, tensor in saved.items() if key.endswith("sparse_values")} == {
        getattr(torch, values_dtype)
    }
    base, tokenizer = arithmetic_task.load_model_and_tokenizer(str(tiny_chat_model))
    reloaded = PeftModel.from_pretrained(base, out)
    again = arithmetic_task.evaluate(reloaded, tokenizer, arithmetic_task.arithmetic_problems(4, seed=1000))
    assert again["answer_loss"] == pytest.approx(scores["after"]["answer_loss"], abs=1e-5)


def test_sora_example_trains_and_exports_its_live_ranks_as_a_stock_lora(tiny_chat_model, tmp_path):
    result = sora_arithmetic_trl.main([
        "--model", str(tiny_chat_model), "--steps", "6", "--batch-size", "4", "--learning-rate", "1e-2",
        "--r", "4", "--gate-lr", "0.5", "--xi", "0.3", "--eval-problems", "4", "--output-dir", str(tmp_path),
    ])  # fmt: skip
    assert result["after"]["answer_loss"] < result["before"]["answer_loss"]
    live = sum(result["live_ranks"].values())
    assert live > 0
    exported = LoraConfig.from_pretrained(result["lora_dir"])
    assert sum(exported.rank_pattern.values()) == live


def test_sora_sst2_example_exports_a_lora_that_scores_the_same_in_stock_peft(tmp_path):
    encoder = save_tiny_encoder(tmp_path / "encoder")
    data = tmp_path / "train.tsv"
    words = ["good", "great", "fine", "bad", "awful", "poor"]
    data.write_text("label\tsentence\n" + "".join(f"{int(i % 6 < 3)}\ta {words[i % 6]} film {i}\n" for i in range(400)))
    result = sora_sst2.main([
        "--model", str(encoder), "--data", str(data), "--train-rows", "320", "--eval-rows", "64", "--r", "4",
        "--learning-rate", "3e-2", "--gate-lr", "0.1", "--xi", "0.5", "--output-dir", str(tmp_path / "out"),
    ])  # fmt: skip
    assert sum(result["live_ranks"].values()) > 0
    assert result["lora_accuracy"] == result["accuracy"]
    batch = result["tokenizer"](["a great film", "an awful film 7"], return_tensors="pt", padding=True)
    sora_logits, lora_logits = (result[key].eval()(**batch).logits for key in ("model", "lora_model"))
    fresh_head, _ = sst2_task.load_classifier(str(encoder), seed=1)
    assert not torch.allclose(fresh_head(**batch).logits, lora_logits, atol=1e-3)  # the head came from the adapter
    torch.testing.assert_close(lora_logits, sora_logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("task, train_rows", [("classification", 4000), ("classification-8k", 8000)])
def test_classification_tasks_train_pick_and_score_on_disjoint_rows(monkeypatch, task, train_rows):
    rows = [(f"sentence {i}", i % 2) for i in range(12000)]
    seen = {"scored": []}

    def train(model, tokenizer, train, learning_rate, callbacks, seed):
        seen["train"] = train
        return argparse.Namespace(state=argparse.Namespace(global_step=len(train) // 32))

    def score(model, tokenizer, scored_rows):
        seen["scored"].append(scored_rows)
        return 0.5

    monkeypatch.setattr(sst2_task, "read_sst2", lambda path: rows)
    monkeypatch.setattr(sst2_task, "load_classifier", lambda model, seed: (torch.nn.Linear(2, 2), None))
    monkeypatch.setattr(sst2_task, "train_classifier", train)
    monkeypatch.setattr(sst2_task, "accuracy", score)
    method = bench_quality.Method(build=lambda base, settings: (base, []), default={}, grid=[])
    result = bench_quality.TASKS[task](method, {"learning_rate": 1e-3}, argparse.Namespace(data="", model=None, seed=0))
    assert seen["train"] == rows[:train_rows]
    assert seen["scored"] == [rows[train_rows : train_rows + 1000], rows[-2000:]]  # dev, then test
    assert result["steps"] == train_rows // 32


def test_lt_sft_quality_row_draws_its_adapter_from_a_dense_phase_on_sst2_rows(tmp_path):
    """bench_quality's LT-SFT: the dense phase moves the matrices, the draw keeps the largest moves, W0 is restored."""
    base, tokenizer = sst2_task.load_classifier(str(save_tiny_encoder(tmp_path / "encoder")), seed=0)
    pristine = {name: p.detach().clone() for name, p in base.named_parameters()}
    model, callbacks = bench_quality.build_lt_sft(base, {"r": 2, "task_type": "SEQ_CLS"})
    layers = dict(model.base_model.sparse_delta_layers())
    placeholder = {name: layer.delta_indices["default"].clone() for name, layer in layers.items()}
    words = ["good", "great", "fine", "bad", "awful", "poor"]
    rows = [(f"a {words[i % 6]} film {i}", int(i % 6 < 3)) for i in range(64)]
    bench_quality.lt_sft_dense_phase(model, tokenizer, rows, {"dense_learning_rate": 1e-2}, seed=0)

    drawn = sum(layer.num_values("default") for layer in layers.values())
    assert callbacks == [] and drawn == bench_quality.lora_matched_count(base, 2)
    assert any(not torch.equal(layer.delta_indices["default"], placeholder[name]) for name, layer in layers.items())
    for name, layer in layers.items():
        assert torch.equal(layer.pristine_weight(), pristine[f"{name.removeprefix('base_model.model.')}.weight"]), name
        assert torch.count_nonzero(layer.delta_values["default"]) == 0, name  # the sparse phase starts from W0


def test_full_fine_tuning_quality_row_trains_every_weight(tmp_path):
    base, tokenizer = sst2_task.load_classifier(str(save_tiny_encoder(tmp_path / "encoder")), seed=0)
    base.bert.embeddings.requires_grad_(False)  # whatever the loader froze, full fine-tuning trains it
    before = {name: p.detach().clone() for name, p in base.named_parameters()}
    model, callbacks = bench_quality.build_full(base, {"r": 2, "task_type": "SEQ_CLS"})
    assert callbacks == [] and bench_quality.trainable_parameters(model) == sum(p.numel() for p in before.values())
    rows = [(f"a {['good', 'bad'][i % 2]} film {i}", i % 2) for i in range(64)]
    sst2_task.train_classifier(model, tokenizer, rows, 1e-3)
    moved = [name for name, p in model.named_parameters() if not torch.equal(p, before[name])]
    assert "bert.embeddings.word_embeddings.weight" in moved and "classifier.weight" in moved


def test_s2ft_gradient_quality_row_chooses_its_slices_before_training(tmp_path):
    base, tokenizer = sst2_task.load_classifier(str(save_tiny_encoder(tmp_path / "encoder")), seed=0)
    model, _ = bench_quality.build_s2ft(base, {"r": 2, "task_type": "SEQ_CLS", "selection": "gradient"})
    layers = dict(model.base_model.sparse_delta_layers())
    placeholder = {name: layer.delta_indices["default"].clone() for name, layer in layers.items()}
    rows = [(f"a {['good', 'bad'][i % 2]} film {i}", i % 2) for i in range(300)]
    bench_quality.s2ft_gradient_selection(model, tokenizer, rows, {}, seed=0)
    assert any(not torch.equal(layer.delta_indices["default"], placeholder[name]) for name, layer in layers.items())
    sst2_task.train_classifier(model, tokenizer, rows[:64], 1e-3)  # trains: its selection was made


def test_quality_table_picks_on_dev_pairs_by_seed_and_keeps_the_protocol_budget():
    def sst2(lr, r, dev, seeds, accuracies):
        return {"settings": {"r": r, "learning_rate": lr}, "dev_accuracy": dev, "seeds": seeds,
                "accuracy_by_seed": accuracies}

    def arithmetic(lr, steps, exact, rise, seed=0):
        settings = {"r": 16, "learning_rate": lr, "steps": steps, "batch_size": 16, "eval_problems": 128, "seed": seed}
        return {"settings": settings, "exact_match": exact, "general_loss_rise": rise}

    rows = [
        {"task": "classification", "method": "lora", "grid": [
            sst2(1e-3, 8, 0.80, [0, 1], [0.80, 0.90]), sst2(3e-3, 8, 0.85, [0, 1, 2], [0.84, 0.86, 0.85]),
            sst2(2e-3, 16, 0.99, [0], [0.99])]},  # another budget: not LoRA r=8's point
        {"task": "classification", "method": "sft", "grid": [sst2(3e-3, 8, 0.83, [0, 1], [0.86, 0.88])]},
        {"task": "arithmetic", "method": "sft", "grid": [
            arithmetic(5e-4, 80, 0.25, 0.01), arithmetic(1e-3, 80, 0.30, 0.1), arithmetic(1e-3, 40, 0.9, 0.0)]},
        {"task": "arithmetic", "method": "lift", "grid": [  # seeds 0 and 1 at 1e-3 average above 5e-4's one seed
            arithmetic(5e-4, 80, 0.30, 0.0), arithmetic(1e-3, 80, 0.25, 0.1), arithmetic(1e-3, 80, 0.45, 0.3, seed=1)]},
    ]
    lines = quality_table.markdown_table(rows).splitlines()
    assert lines[2] == "| LoRA (peft) | 3e-3 of 1e-3 / 3e-3 | 85.00% ± 0.58 (3) | - | - | - | - |"
    # SFT - LoRA on seeds 0 and 1: +2 and +2 points
    assert lines[3] == '| SFT "ag" | 3e-3 only | 87.00% ± 1.00 (2) | +2.00 (0.00) | 1e-3 of 5e-4 / 1e-3 | 30.00% | +0.100 |'
    assert lines[4] == "| LIFT | - | - | - | 1e-3 of 5e-4 / 1e-3 | 35.00% ± 10.00 (2) | +0.200 ± 0.100 |"
    assert len(lines) == 5  # methods without a point have no row
    assert quality_table.learning_rate_text(2.5e-4) == "2.5e-4" and quality_table.learning_rate_text(0.003) == "3e-3"


def test_parse_settings_reads_numbers_booleans_and_names():
    pairs = ["xi_end=1.5", "xi_schedule=linear", "scale_xi_by_lr=False", "learning_rate=3e-3"]
    assert bench_quality.parse_settings(pairs) == {
        "xi_end": 1.5, "xi_schedule": "linear", "scale_xi_by_lr": False, "learning_rate": 3e-3,
    }


def test_write_results_replaces_the_file_whole_or_not_at_all(tmp_path):
    path = tmp_path / "results" / "bench.json"
    benchmark_metadata.write_results(path, [{"ms": 1.5}], quick=True)
    written = json.loads(path.read_text())
    assert written["rows"] == [{"ms": 1.5}]
    assert written["metadata"]["quick"] is True and written["metadata"]["torch"] == torch.__version__
    with pytest.raises(UnicodeEncodeError):  # fails while writing, after the file was opened
        benchmark_metadata.write_text_atomically(path, "{" + "\ud800")
    assert json.loads(path.read_text()) == written  # the old file stays whole
    assert [entry.name for entry in path.parent.iterdir()] == ["bench.json"]


def test_average_runs_keeps_shared_counts_and_averages_the_rest():
    runs = [{"accuracy": 0.8, "trainable_params": 10}, {"accuracy": 0.9, "trainable_params": 10}]
    assert bench_quality.average_runs(runs) == {"accuracy": pytest.approx(0.85), "trainable_params": 10}
    assert isinstance(bench_quality.average_runs(runs)["trainable_params"], int)


def test_merge_results_replaces_a_rerun_point_and_keeps_other_methods(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_quality, "RESULTS", tmp_path / "bench_quality.json")

    def point(method, lr, score):
        return {"task": "t", "method": method, "settings": {"learning_rate": lr}, "dev_accuracy": score}

    bench_quality.merge_results("t", "lora", [point("lora", 1e-3, 0.80), point("lora", 2e-3, 0.85)])
    bench_quality.merge_results("t", "sora", [point("sora", 1e-3, 0.70)])
    row = bench_quality.merge_results("t", "lora", [point("lora", 2e-3, 0.75)])
    assert row["settings"] == {"learning_rate": 1e-3}  # the rerun 2e-3 point dropped below 1e-3
    assert [p["dev_accuracy"] for p in row["grid"]] == [0.80, 0.75]
    stored = json.loads((tmp_path / "bench_quality.json").read_text())["rows"]
    assert [(r["method"], r["dev_accuracy"]) for r in stored] == [("lora", 0.80), ("sora", 0.70)]


def test_dpo_example_trains_against_its_disabled_adapter_and_saves_it(tiny_chat_model, tmp_path):
    out = tmp_path / "dpo"
    result = dpo_sparse.main([
        "--model", str(tiny_chat_model), "--steps", "4", "--batch-size", "4", "--learning-rate", "3e-2",
        "--density", "0.05", "--reselection-steps", "2", "--eval-problems", "4", "--output-dir", str(out),
    ])  # fmt: skip
    summary = result["log_history"][-1]
    assert all(torch.isfinite(torch.tensor(summary[key])) for key in ("train_loss", "rewards/margins"))
    assert summary["sparse/churn"] > 0  # SparseUpdateCallback re-selected entries during DPO
    assert result["reward_margin"] > 0  # held-out pairs moved towards the correct answers
    base, tokenizer = arithmetic_task.load_model_and_tokenizer(str(tiny_chat_model))
    reloaded = PeftModel.from_pretrained(base, out)
    pairs = dpo_sparse.preference_pairs(arithmetic_task.arithmetic_problems(4, seed=1000), seed=1000)
    torch.testing.assert_close(dpo_sparse.log_prob_margins(reloaded, tokenizer, pairs), result["margins_after"])
