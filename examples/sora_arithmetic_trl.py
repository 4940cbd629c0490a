"""SoRA on the embedded SmolLM2-135M-Instruct with TRL's SFTTrainer (generated arithmetic), exported to a plain LoRA.

The gates of every linear layer are soft-thresholded after each step (strength --xi); ranks whose gate reaches zero
are dropped when the adapter is exported as a stock peft LoRA adapter (loadable by plain peft,
vLLM, TGI). Prints exact match before/after, the live rank, and the exported adapter's size.

    python examples/sora_arithmetic_trl.py --steps 80
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from peft import get_peft_model
from trl import SFTConfig, SFTTrainer

from arithmetic_task import (
    add_run_arguments, arithmetic_problems, conversational_dataset, evaluate, load_and_score, schedule_arguments,
)  # fmt: skip
from peft_sparse import SoraConfig, export_sora_to_lora
from trl_callbacks import SoraCallback, sora_optimizer_cls_and_kwargs


def main(argv: list[str] | None = None) -> dict:
    """Train, score and export; returns the scores, the live rank and the exported LoRA's folder."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, steps=80, batch_size=16, learning_rate=1e-3, eval_problems=128,
                      output_dir="outputs/sora-arithmetic")
    parser.add_argument("--r", type=int, default=16, help="starting rank")
    parser.add_argument("--gate-lr", type=float, default=5e-2)
    parser.add_argument("--xi", type=float, default=0.5, help="sparsity strength (constant); higher prunes more")
    args = parser.parse_args(argv)

    model, tokenizer, eval_problems, before = load_and_score(args)

    config = SoraConfig(
        r=args.r, alpha=args.r, target_modules="all-linear", task_type="CAUSAL_LM",
        gate_lr=args.gate_lr, xi_schedule="constant", xi_start=args.xi,
    )
    model = get_peft_model(model, config)
    model.print_trainable_parameters()
    training_args = SFTConfig(**schedule_arguments(args))
    train_set = conversational_dataset(arithmetic_problems(args.steps * args.batch_size, seed=args.seed))
    trainer = SFTTrainer(model=model, args=training_args, train_dataset=train_set, processing_class=tokenizer,
                         optimizer_cls_and_kwargs=sora_optimizer_cls_and_kwargs(training_args),  # gate_lr
                         callbacks=[SoraCallback(log_layer_ranks=False)])
    started = time.perf_counter()
    trainer.train()
    print(f"trained {args.steps} steps in {time.perf_counter() - started:.0f} s")

    after = evaluate(model, tokenizer, eval_problems)
    ranks = model.base_model.live_ranks()
    print(f"exact match {before['exact_match']:.1%} -> {after['exact_match']:.1%}, "
          f"live rank {sum(ranks.values())} of {args.r * len(ranks)}")
    lora_dir = export_sora_to_lora(model, Path(args.output_dir) / "lora")
    exported = json.loads((lora_dir / "adapter_config.json").read_text())
    print(f"exported LoRA in {lora_dir}: {len(exported['target_modules'])} of {len(ranks)} layers kept")
    return {"before": before, "after": after, "live_ranks": ranks, "lora_dir": lora_dir}


if __name__ == "__main__":
    main()
