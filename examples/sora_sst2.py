"""SoRA on SST-2 sentence classification with the embedded all-MiniLM-L6-v2, then export to a plain LoRA.

Trains SoRA adapters on every linear layer plus a fresh 2-way head with the Trainer and
``SoraCallback``, prints accuracy and the live rank per layer, exports the adapter as a stock
peft LoRA (zero-gated ranks dropped, gates folded into B), and reloads that LoRA with plain peft
to check it scores the same. Runs offline (``--model`` takes any encoder id or path instead).

    python examples/sora_sst2.py --train-rows 4000 --eval-rows 1000
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from peft import PeftModel, get_peft_model

from peft_sparse import SoraConfig, export_sora_to_lora
from sst2_task import DEFAULT_DATA, accuracy, load_classifier, read_sst2, train_classifier
from trl_callbacks import SoraCallback


def main(argv: list[str] | None = None) -> dict:
    """Train, score, export and re-load with stock peft; returns both models, their accuracies and the live ranks."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="encoder id or path (default: embedded all-MiniLM-L6-v2)")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="GLUE SST-2 train.tsv (label<TAB>sentence)")
    parser.add_argument("--train-rows", type=int, default=4000, help="train on the first N rows")
    parser.add_argument("--eval-rows", type=int, default=1000, help="evaluate on the last N rows")
    parser.add_argument("--r", type=int, default=8, help="starting rank")
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--gate-lr", type=float, default=5e-2)
    parser.add_argument("--xi", type=float, default=0.5, help="sparsity strength (constant); higher prunes more")
    parser.add_argument("--output-dir", default="outputs/sora-sst2")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    rows = read_sst2(args.data)
    train_rows, eval_rows = rows[: args.train_rows], rows[-args.eval_rows :]
    model, tokenizer = load_classifier(args.model, seed=args.seed)
    print(f"before: accuracy {accuracy(model, tokenizer, eval_rows):.1%} (fresh head)")

    config = SoraConfig(
        r=args.r, alpha=args.r, target_modules="all-linear", task_type="SEQ_CLS",
        gate_lr=args.gate_lr, xi_schedule="constant", xi_start=args.xi,
    )
    model = get_peft_model(model, config)
    model.print_trainable_parameters()
    started = time.perf_counter()
    train_classifier(model, tokenizer, train_rows, args.learning_rate, [SoraCallback(log_layer_ranks=False)],
                     seed=args.seed)
    print(f"trained in {time.perf_counter() - started:.0f} s")
    trained_accuracy = accuracy(model, tokenizer, eval_rows)
    ranks = model.base_model.live_ranks()
    print(f"after:  accuracy {trained_accuracy:.1%}, live rank {sum(ranks.values())} of {args.r * len(ranks)}")
    for name, rank in ranks.items():
        print(f"  {name}: {rank}")

    lora_dir = export_sora_to_lora(model, Path(args.output_dir) / "lora")
    base, _ = load_classifier(args.model, seed=args.seed + 1)  # the head comes from the adapter, not this seed
    lora = PeftModel.from_pretrained(base, lora_dir)
    lora_accuracy = accuracy(lora, tokenizer, eval_rows)
    print(f"exported LoRA in {lora_dir}: accuracy {lora_accuracy:.1%} with stock peft")
    return {"model": model, "lora_model": lora, "tokenizer": tokenizer, "accuracy": trained_accuracy,
            "lora_accuracy": lora_accuracy, "live_ranks": ranks}


if __name__ == "__main__":
    main()
