"""Compose two skills, Composable-SFT style: train one adapter per skill, then add them with ``add_weighted_adapter``.

Skill A is the arithmetic task ("What is 347 + 56?" -> "The answer is 403."), skill B is capital
letters ("Write in capital letters: green apple" -> "The answer is GREEN APPLE."), both generated in
code. Each skill gets its own SparseConfig adapter, trained alone; the two are then composed
("linear", weights 1 and 1: the union of their indices, each delta added as it is). The same is done
with peft's LoRA at an equal trainable count ("cat": the exact sum of the two deltas, and "linear").
Every adapter and composition is scored on both skills by exact match of greedy answers; the table
is printed and written to ``benchmarks/results/compose_sparse.json``.

    python examples/compose_sparse.py    # embedded SmolLM2-135M; 26 min measured on 2 busy CPU cores (load ~10)
    python examples/compose_sparse.py --steps 60 --eval-problems 64
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments

import peft_sparse
from arithmetic_task import (
    add_run_arguments, arithmetic_problems, load_model_and_tokenizer, pad_batch, prompt_text, schedule_arguments,
)  # fmt: skip
from trl_callbacks import SparseUpdateCallback

WORDS = (
    "apple river green stone happy window yellow garden silver orange bright planet quiet forest summer "
    "winter candle rabbit paper mountain ocean purple simple little castle dragon pencil market rocket "
    "shadow thunder valley wonder bottle cotton golden hidden jacket kitten lemon mirror number pillow"
).split()
SKILLS = ("arithmetic", "capitals")
DEFAULT_RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "compose_sparse.json"


def capitals_problems(count: int, seed: int) -> list[tuple[str, str]]:
    """("Write in capital letters: green apple", "GREEN APPLE")-style problems of 2 or 3 words."""
    rng = random.Random(seed)
    problems = []
    for _ in range(count):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 3)))
        problems.append((f"Write in capital letters: {text}", text.upper()))
    return problems


def skill_problems(skill: str, count: int, seed: int) -> list[tuple[str, str]]:
    """(question, answer text) pairs of one skill; the reply to learn is "The answer is <answer>."."""
    if skill == "arithmetic":
        return [(question, str(answer)) for question, answer in arithmetic_problems(count, seed)]
    return capitals_problems(count, seed)


def training_example(tokenizer, question: str, answer: str) -> dict[str, list[int]]:
    """Token ids of prompt + reply; the loss is on the reply tokens only."""
    prompt_ids = tokenizer(prompt_text(tokenizer, question), add_special_tokens=False)["input_ids"]
    reply_ids = tokenizer(f"The answer is {answer}.{tokenizer.eos_token}", add_special_tokens=False)["input_ids"]
    return {"input_ids": prompt_ids + reply_ids, "labels": [-100] * len(prompt_ids) + reply_ids}


@torch.no_grad()
def exact_match(model, tokenizer, problems: list[tuple[str, str]], batch_size: int = 32) -> float:
    """Fraction of greedy replies that start with "The answer is <answer>."."""
    model.eval()
    correct = 0
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        prompts = tokenizer([prompt_text(tokenizer, q) for q, _ in chunk], return_tensors="pt", padding=True,
                            add_special_tokens=False)  # fmt: skip
        generated = model.generate(**prompts, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        for (_, answer), ids in zip(chunk, generated[:, prompts["input_ids"].shape[1] :]):
            correct += tokenizer.decode(ids, skip_special_tokens=True).strip().startswith(f"The answer is {answer}.")
    return correct / len(problems)


def train_adapter(model, tokenizer, adapter_name: str, skill: str, args: argparse.Namespace, learning_rate: float,
                  callbacks: list) -> float:  # fmt: skip
    """Train adapter ``adapter_name`` alone on ``skill``; returns the training seconds."""
    model.set_adapter(adapter_name)
    problems = skill_problems(skill, args.steps * args.batch_size, seed=args.seed)
    settings = schedule_arguments(args) | {"learning_rate": learning_rate,
                                           "output_dir": f"{args.output_dir}/{adapter_name}"}  # fmt: skip
    trainer = Trainer(
        model=model, args=TrainingArguments(**settings, remove_unused_columns=False, disable_tqdm=True),
        train_dataset=[training_example(tokenizer, q, a) for q, a in problems],
        data_collator=lambda examples: pad_batch(examples, tokenizer.pad_token_id), callbacks=callbacks,
    )  # fmt: skip
    started = time.perf_counter()
    trainer.train()
    return time.perf_counter() - started


def score_adapters(model, tokenizer, adapter_names: list[str], eval_sets: dict) -> dict[str, dict[str, float]]:
    """Exact match of every skill for each adapter in ``adapter_names``."""
    scores = {}
    for adapter_name in adapter_names:
        model.set_adapter(adapter_name)
        scores[adapter_name] = {skill: exact_match(model, tokenizer, problems) for skill, problems in eval_sets.items()}
        print(f"  {adapter_name:>14}: " + ", ".join(f"{s} {v:.1%}" for s, v in scores[adapter_name].items()))
    return scores


def run_method(method: str, args: argparse.Namespace, eval_sets: dict, lora_count: int) -> dict:
    """Train one adapter per skill with ``method`` ("sparse" or "lora"), compose them, score everything."""
    model, tokenizer = load_model_and_tokenizer(args.model)
    if method == "sparse":
        config = peft_sparse.SparseConfig(num_tunable_weights=lora_count, target_modules="all-linear",
                                          task_type="CAUSAL_LM")  # fmt: skip
        learning_rate, callbacks, compositions = args.learning_rate, [SparseUpdateCallback()], ["linear"]
    else:
        config = LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, target_modules="all-linear",
                            task_type="CAUSAL_LM")  # fmt: skip
        learning_rate, callbacks, compositions = args.lora_learning_rate, [], ["cat", "linear"]
    model = get_peft_model(model, config, adapter_name=SKILLS[0])
    model.add_adapter(SKILLS[1], config)
    trainable = sum(p.numel() for n, p in model.named_parameters() if f".{SKILLS[0]}." in f"{n}.")
    seconds = {skill: train_adapter(model, tokenizer, skill, skill, args, learning_rate, callbacks) for skill in SKILLS}
    names = list(SKILLS)
    for combination_type in compositions:
        name = f"both-{combination_type}"
        model.add_weighted_adapter(list(SKILLS), [1.0, 1.0], name, combination_type=combination_type)
        names.append(name)
    print(f"{method}: {trainable:,} trainable values per adapter, trained in "
          + ", ".join(f"{s} {t:.0f} s" for s, t in seconds.items()))  # fmt: skip
    return {"trainable_per_adapter": trainable, "learning_rate": learning_rate, "train_seconds": seconds,
            "scores": score_adapters(model, tokenizer, names, eval_sets)}  # fmt: skip


def lora_trainable_count(args: argparse.Namespace) -> int:
    """Trainable values of one LoRA adapter of rank ``args.lora_rank`` on every linear layer of the model."""
    model, _ = load_model_and_tokenizer(args.model)
    model = get_peft_model(model, LoraConfig(r=args.lora_rank, target_modules="all-linear", task_type="CAUSAL_LM"))
    return model.get_nb_trainable_parameters()[0]


def print_table(results: dict) -> None:
    print("| method | adapter | trainable | arithmetic | capitals |")
    print("|---|---|---:|---:|---:|")
    for method, result in results["methods"].items():
        for adapter_name, scores in result["scores"].items():
            print(f"| {method} | {adapter_name} | {result['trainable_per_adapter']:,} | "
                  f"{scores['arithmetic']:.1%} | {scores['capitals']:.1%} |")  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    """Train, compose and score SFT and LoRA adapters; returns (and writes) the results."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, steps=30, batch_size=8, learning_rate=1e-3, eval_problems=32,
                      output_dir="outputs/compose-sparse")  # fmt: skip
    # --learning-rate is SFT's
    parser.add_argument("--lora-learning-rate", type=float, default=2e-3)
    parser.add_argument("--lora-rank", type=int, default=4, help="LoRA rank; SFT gets LoRA's trainable count")
    parser.add_argument("--results", default=str(DEFAULT_RESULTS))
    args = parser.parse_args(argv)
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    eval_sets = {skill: skill_problems(skill, args.eval_problems, seed=args.seed + 1000) for skill in SKILLS}
    base, tokenizer = load_model_and_tokenizer(args.model)
    print("base model:")
    base_scores = {skill: exact_match(base, tokenizer, problems) for skill, problems in eval_sets.items()}
    print("  " + ", ".join(f"{s} {v:.1%}" for s, v in base_scores.items()))
    lora_count = lora_trainable_count(args)
    results = {"settings": {key: value for key, value in vars(args).items() if key != "results"},
               "base": base_scores, "methods": {}}  # fmt: skip
    for method, label in (("sparse", "SFT (SparseConfig)"), ("lora", f"LoRA r={args.lora_rank}")):
        results["methods"][label] = run_method(method, args, eval_sets, lora_count)
    results["total_seconds"] = time.perf_counter() - started
    print_table(results)
    print(f"total {results['total_seconds']:.0f} s")
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
