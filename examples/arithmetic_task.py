"""The arithmetic SFT task shared by the examples and benchmarks, and the embedded SmolLM2 loader.

Problems like "What is 347 + 56?" -> "The answer is 403." (+, - and * by one digit), trained with the
chat template and the loss on the answer tokens only; scored by exact match of greedy answers.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_sparse.embedded_model import embedded_model_path

ANSWER = re.compile(r"The answer is (-?\d+)")


def load_model_and_tokenizer(model: str | None, dtype: torch.dtype = torch.float32):
    """``model`` (an id or path), or the embedded SmolLM2-135M-Instruct checkpoint when None."""
    source = model or embedded_model_path()
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return AutoModelForCausalLM.from_pretrained(source, dtype=dtype), tokenizer


def arithmetic_problems(count: int, seed: int) -> list[tuple[str, int]]:
    """("What is 347 + 56?", 403)-style problems: +, - and * by one digit."""
    rng = random.Random(seed)
    problems = []
    for _ in range(count):
        operator = rng.choice("+-*")
        left = rng.randint(10, 999)
        right = rng.randint(2, 9) if operator == "*" else rng.randint(1, 99)
        result = {"+": left + right, "-": left - right, "*": left * right}[operator]
        problems.append((f"What is {left} {operator} {right}?", result))
    return problems


def prompt_text(tokenizer, question: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=False)


def training_example(tokenizer, question: str, answer: int) -> dict[str, list[int]]:
    """Token ids of prompt + answer; the loss is on the answer tokens only."""
    prompt_ids = tokenizer(prompt_text(tokenizer, question), add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(f"The answer is {answer}.<|im_end|>", add_special_tokens=False)["input_ids"]
    return {"input_ids": prompt_ids + answer_ids, "labels": [-100] * len(prompt_ids) + answer_ids}


def pad_batch(examples: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(example["input_ids"]) for example in examples)
    batch = {"input_ids": [], "labels": [], "attention_mask": []}
    for example in examples:
        padding = width - len(example["input_ids"])
        batch["input_ids"].append([pad_id] * padding + example["input_ids"])
        batch["labels"].append([-100] * padding + example["labels"])
        batch["attention_mask"].append([0] * padding + [1] * len(example["input_ids"]))
    return {key: torch.tensor(value) for key, value in batch.items()}


@torch.no_grad()
def evaluate(model, tokenizer, problems: list[tuple[str, int]], batch_size: int = 32) -> dict[str, float]:
    """Exact match of greedy answers, and mean loss on the reference answer tokens."""
    model.eval()
    correct, losses = 0, []
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        batch = pad_batch([training_example(tokenizer, q, a) for q, a in chunk], tokenizer.pad_token_id)
        losses.append(model(**batch).loss.item())
        prompts = tokenizer([prompt_text(tokenizer, q) for q, _ in chunk], return_tensors="pt", padding=True,
                            add_special_tokens=False)
        generated = model.generate(**prompts, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        for (_, answer), ids in zip(chunk, generated[:, prompts["input_ids"].shape[1] :]):
            match = ANSWER.search(tokenizer.decode(ids, skip_special_tokens=True))
            correct += bool(match) and int(match.group(1)) == answer
    return {"exact_match": correct / len(problems), "answer_loss": sum(losses) / len(losses)}


DEFAULT_GENERAL_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"


def conversational_dataset(problems: list[tuple[str, int]]):
    """A TRL prompt-completion dataset (chat messages): SFTTrainer puts the loss on the completion only."""
    from datasets import Dataset

    return Dataset.from_list([
        {"prompt": [{"role": "user", "content": question}],
         "completion": [{"role": "assistant", "content": f"The answer is {answer}."}]}
        for question, answer in problems
    ])  # fmt: skip


def read_general_texts(path: str | Path, count: int = 64) -> list[str]:
    """The last ``count`` questions of a GSM8K-style ``.jsonl`` file: held-out general text for a forgetting check."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"general text not found at {path}; pass --general-text PATH_TO/train.jsonl")
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["question"] for line in lines[-count:]]


@torch.no_grad()
def text_loss(model, tokenizer, texts: list[str], batch_size: int = 16) -> float:
    """Mean next-token loss over all tokens of ``texts`` (padding excluded)."""
    model.eval()
    total_loss, total_tokens = 0.0, 0
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        tokens = int((labels[:, 1:] != -100).sum())
        total_loss += model(**batch, labels=labels).loss.item() * tokens
        total_tokens += tokens
    return total_loss / total_tokens


def add_run_arguments(
    parser: argparse.ArgumentParser, *, steps: int, batch_size: int, learning_rate: float, eval_problems: int,
    output_dir: str,
) -> argparse.ArgumentParser:
    """Add the options every arithmetic example shares (model, dtype, schedule, evaluation, output, seed)."""
    parser.add_argument("--model", default=None, help="causal LM id or path (default: embedded SmolLM2-135M)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="dtype of the base model's weights (sparse values and LoRA factors stay fp32)")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--learning-rate", type=float, default=learning_rate)
    parser.add_argument("--eval-problems", type=int, default=eval_problems)
    parser.add_argument("--output-dir", default=output_dir)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def load_and_score(args: argparse.Namespace):
    """Seed, load ``args.model`` and score it before training: (model, tokenizer, eval problems, scores)."""
    torch.manual_seed(args.seed)
    model, tokenizer = load_model_and_tokenizer(args.model, getattr(torch, args.dtype))
    eval_problems = arithmetic_problems(args.eval_problems, seed=args.seed + 1000)
    return model, tokenizer, eval_problems, evaluate(model, tokenizer, eval_problems)


def schedule_arguments(args: argparse.Namespace) -> dict:
    """Trainer / SFTConfig keywords of the examples' schedule: cosine decay after 5% warm-up, no checkpoints, CPU."""
    return {
        "output_dir": args.output_dir, "max_steps": args.steps, "per_device_train_batch_size": args.batch_size,
        "learning_rate": args.learning_rate, "lr_scheduler_type": "cosine", "warmup_steps": max(1, args.steps // 20),
        "logging_steps": 10, "save_strategy": "no", "report_to": [], "use_cpu": True, "seed": args.seed,
    }  # fmt: skip
