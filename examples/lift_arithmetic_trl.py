"""LIFT (principal weights) vs SFT, LoRA and full fine-tuning on generated arithmetic, with TRL's SFTTrainer.

Every method gets the same steps and, for the adapters, LoRA rank ``--budget-rank``'s number of
trainable values. Reports exact match on held-out problems and the rise of the loss on held-out
general text (GSM8K questions; a forgetting measure). Runs offline on the embedded SmolLM2-135M.

    python examples/lift_arithmetic_trl.py --method lift --steps 80
    python examples/lift_arithmetic_trl.py --method lora --learning-rate 1e-3
    python examples/lift_arithmetic_trl.py --method sft --learning-rate 1e-3 --dtype bfloat16 --exact-delta
    python examples/lift_arithmetic_trl.py --method lt-sft --learning-rate 1e-3 --dense-steps 20

LT-SFT first trains the adapted matrices densely for ``--dense-steps`` (full fine-tuning's memory), then
trains its drawn entries for ``--steps``.
"""

from __future__ import annotations

import argparse
import time

from peft import LoraConfig, get_peft_model
from torch import nn
from trl import SFTConfig, SFTTrainer

from arithmetic_task import (
    DEFAULT_GENERAL_TEXT, add_run_arguments, arithmetic_problems, conversational_dataset, evaluate, load_and_score,
    read_general_texts, schedule_arguments, text_loss,
)  # fmt: skip
from peft_sparse import LiftConfig, RosaConfig, S2ftConfig, SparseConfig
from peft_sparse.sparse.lottery_ticket import LotteryTicket
from trl_callbacks import RosaCallback, SparseUpdateCallback

METHODS = ("lift", "sft", "lora", "full", "sara", "hft", "s2ft", "id3", "lt-sft", "rosa")


def lora_equivalent_count(model: nn.Module, rank: int) -> int:
    """Trainable values of LoRA rank ``rank`` on every linear layer except the output head."""
    head = model.get_output_embeddings()
    return sum(
        rank * (module.in_features + module.out_features)
        for module in model.modules()
        if isinstance(module, nn.Linear) and module is not head
    )


def prepare(
    method: str, model: nn.Module, budget_rank: int, lift_rank: int, mask_update_interval: int | None,
    delta_in_place: bool = True, steps: int = 80,
):
    """(model to train, callbacks) for ``method`` at LoRA rank ``budget_rank``'s budget.

    SaRA adjusts its trainable slots once, halfway through the ``steps`` (its reference run: 2500 of
    5000); HFT re-chooses its frozen half every quarter of the run. ID3 unmasks at every step, reaching
    its budget at the last; LT-SFT's indices are drawn by ``run_dense_phase`` before training. RoSA
    has a LoRA part of rank ``budget_rank / 2`` and a sparse part with the rest of the budget, its mask
    chosen from gradients after the first half of the run (LoRA alone until then).
    """
    if method == "full":
        return model, []
    if method == "lora":
        config = LoraConfig(r=budget_rank, lora_alpha=budget_rank, target_modules="all-linear", task_type="CAUSAL_LM")
        return get_peft_model(model, config), []
    if method == "lift":
        config = LiftConfig(lora_rank_budget=budget_rank, rank=lift_rank, mask_update_interval=mask_update_interval,
                            delta_in_place=delta_in_place, target_modules="all-linear", task_type="CAUSAL_LM")
        return get_peft_model(model, config), [SparseUpdateCallback()] if mask_update_interval else []
    if method == "sft":
        config = SparseConfig(num_tunable_weights=lora_equivalent_count(model, budget_rank),
                              delta_in_place=delta_in_place, target_modules="all-linear", task_type="CAUSAL_LM")
        return get_peft_model(model, config), [SparseUpdateCallback()]
    if method in ("id3", "lt-sft"):
        config = SparseConfig(num_tunable_weights=lora_equivalent_count(model, budget_rank), selection=method,
                              delta_in_place=delta_in_place, target_modules="all-linear", task_type="CAUSAL_LM")
        return get_peft_model(model, config), [SparseUpdateCallback()] if method == "id3" else []
    if method in ("sara", "hft"):
        interval = max(1, steps // 2 if method == "sara" else steps // 4)
        config = SparseConfig(num_tunable_weights=lora_equivalent_count(model, budget_rank), selection=method,
                              reselection_steps=interval, delta_in_place=delta_in_place, target_modules="all-linear",
                              task_type="CAUSAL_LM")
        return get_peft_model(model, config), [SparseUpdateCallback()]
    if method == "s2ft":
        config = S2ftConfig(lora_rank_budget=budget_rank, delta_in_place=delta_in_place, task_type="CAUSAL_LM")
        return get_peft_model(model, config), []
    if method == "rosa":
        half = budget_rank // 2
        sparse_count = lora_equivalent_count(model, budget_rank) - lora_equivalent_count(model, half)
        config = RosaConfig(r=half, lora_alpha=half, num_tunable_weights=sparse_count, mask_warmup_steps=steps // 2,
                            delta_in_place=delta_in_place, target_modules="all-linear", task_type="CAUSAL_LM")
        return get_peft_model(model, config), [RosaCallback()]
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def run_dense_phase(model: nn.Module, tokenizer, args: argparse.Namespace) -> None:
    """LT-SFT: ``args.dense_steps`` of dense training of the adapted matrices, then draw the adapter's entries."""
    ticket = LotteryTicket(model)
    dense = argparse.Namespace(**{**vars(args), "steps": args.dense_steps, "learning_rate": args.dense_learning_rate})
    train_set = conversational_dataset(arithmetic_problems(args.dense_steps * args.batch_size, seed=args.seed + 1))
    with ticket.dense_phase():
        SFTTrainer(model=model, args=SFTConfig(**schedule_arguments(dense)), train_dataset=train_set,
                   processing_class=tokenizer).train()  # fmt: skip
    ticket.draw()


def train_and_evaluate(args: argparse.Namespace) -> dict:
    """Train one method with SFTTrainer and return its scores (before/after exact match, general-text loss)."""
    model, tokenizer, eval_problems, before = load_and_score(args)
    general_texts = read_general_texts(args.general_text) if args.general_text else []
    general_before = text_loss(model, tokenizer, general_texts) if general_texts else None

    model, callbacks = prepare(args.method, model, args.budget_rank, args.lift_rank, args.mask_update_interval,
                               delta_in_place=not args.exact_delta, steps=args.steps)
    dense_started = time.perf_counter()
    if args.method == "lt-sft":
        run_dense_phase(model, tokenizer, args)
    dense_seconds = time.perf_counter() - dense_started
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    train_set = conversational_dataset(arithmetic_problems(args.steps * args.batch_size, seed=args.seed))
    training_args = SFTConfig(**schedule_arguments(args))
    trainer = SFTTrainer(model=model, args=training_args, train_dataset=train_set, processing_class=tokenizer,
                         callbacks=callbacks)
    started = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - started

    after = evaluate(model, tokenizer, eval_problems)
    general_after = text_loss(model, tokenizer, general_texts) if general_texts else None
    return {
        "method": args.method, "trainable_params": trainable, "train_seconds": round(train_seconds, 1),
        "dense_phase_seconds": round(dense_seconds, 1),
        "exact_match_before": before["exact_match"], "exact_match": after["exact_match"],
        "answer_loss_before": before["answer_loss"], "answer_loss": after["answer_loss"],
        "general_loss_rise": None if general_before is None else general_after - general_before,
    }  # fmt: skip


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="lift", choices=METHODS)
    add_run_arguments(parser, steps=80, batch_size=16, learning_rate=5e-4, eval_problems=128,
                      output_dir="outputs/lift-arithmetic")
    parser.add_argument("--budget-rank", type=int, default=16, help="LoRA rank whose parameter count all adapters get")
    parser.add_argument("--lift-rank", type=int, default=128, help="rank of LIFT's low-rank approximation")
    parser.add_argument("--mask-update-interval", type=int, default=None, help="LIFT mask refresh (steps)")
    parser.add_argument("--dense-steps", type=int, default=20, help="LT-SFT: steps of its dense phase")
    parser.add_argument("--dense-learning-rate", type=float, default=2e-5,
                        help="LT-SFT: learning rate of its dense phase (full fine-tuning's)")
    parser.add_argument("--exact-delta", action="store_true",
                        help="LIFT/SFT: delta_in_place=False, apply the delta as a separate sparse term summed in fp32 "
                        "(the forward sees W0 + delta exactly, not round(W0 + delta) on a bf16 base; slower)")
    parser.add_argument("--general-text", default=str(DEFAULT_GENERAL_TEXT) if DEFAULT_GENERAL_TEXT.exists() else None,
                        help="GSM8K-style .jsonl for the forgetting check (default: ../shared/data when present)")
    return parser


def main() -> None:
    args = argument_parser().parse_args()
    scores = train_and_evaluate(args)
    print(f"{args.method}: exact match {scores['exact_match_before']:.1%} -> {scores['exact_match']:.1%}, "
          f"answer loss {scores['answer_loss']:.3f}, general-text loss rise {scores['general_loss_rise']}, "
          f"{scores['trainable_params']:,} trainable, {scores['train_seconds']:.0f} s")


if __name__ == "__main__":
    main()
