"""DPO with sparse fine-tuning (SFT / SpIEL) on the embedded SmolLM2-135M-Instruct, with TRL's DPOTrainer.

Preference pairs are generated arithmetic problems: the correct answer is "chosen", a near miss
(off by 1 or 10, as a slipped digit or carry) is "rejected". The reference model is the policy
itself with its adapter disabled, so no second copy of the model is held. Prints, on held-out
pairs, how often the model gives the correct answer the higher log-probability and the mean
log-probability margin, before and after, then DPO's implicit reward margin and exact match;
saves the adapter.

    python examples/dpo_sparse.py --steps 10 --batch-size 4
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from arithmetic_task import (
    add_run_arguments, arithmetic_problems, evaluate, load_and_score, pad_batch, schedule_arguments, training_example,
)  # fmt: skip
from peft_sparse import SparseConfig
from trl_callbacks import SparseUpdateCallback

WRONG_ANSWER_OFFSETS = (-10, -1, 1, 10)


def preference_pairs(problems: list[tuple[str, int]], seed: int) -> list[tuple[str, int, int]]:
    """(question, correct answer, wrong answer) for each problem; the wrong one is off by 1 or 10."""
    rng = random.Random(seed)
    return [(question, answer, answer + rng.choice(WRONG_ANSWER_OFFSETS)) for question, answer in problems]


def preference_dataset(pairs: list[tuple[str, int, int]]) -> Dataset:
    """A TRL conversational preference dataset (prompt / chosen / rejected messages)."""
    return Dataset.from_list([
        {"prompt": [{"role": "user", "content": question}],
         "chosen": [{"role": "assistant", "content": f"The answer is {correct}."}],
         "rejected": [{"role": "assistant", "content": f"The answer is {wrong}."}]}
        for question, correct, wrong in pairs
    ])  # fmt: skip


@torch.no_grad()
def answer_log_probs(model, tokenizer, problems: list[tuple[str, int]], batch_size: int = 16) -> torch.Tensor:
    """Summed log-probability [N] of each answer's tokens ("The answer is X.<|im_end|>") given its question."""
    model.eval()
    sums = []
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        batch = pad_batch([training_example(tokenizer, q, a) for q, a in chunk], tokenizer.pad_token_id)
        inputs = {key: batch[key] for key in ("input_ids", "attention_mask")}
        logits = model(**inputs).logits[:, :-1]  # [B, S-1, V]
        labels = batch["labels"][:, 1:]  # [B, S-1]
        token_log_probs = logits.float().log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        sums.append((token_log_probs * (labels != -100)).sum(dim=1))
    return torch.cat(sums)


def log_prob_margins(model, tokenizer, pairs: list[tuple[str, int, int]]) -> torch.Tensor:
    """log p(correct answer) - log p(wrong answer) [N] for each pair."""
    chosen = answer_log_probs(model, tokenizer, [(question, correct) for question, correct, _ in pairs])
    rejected = answer_log_probs(model, tokenizer, [(question, wrong) for question, _, wrong in pairs])
    return chosen - rejected


def describe(margins: torch.Tensor) -> str:
    preferred = (margins > 0).float().mean().item()
    return f"correct answer preferred on {preferred:.1%}, mean log-prob margin {margins.mean().item():+.3f}"


def main(argv: list[str] | None = None) -> dict:
    """Train with DPO, score and save the adapter; returns the held-out margins and exact match, before and after."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, steps=10, batch_size=4, learning_rate=1e-3, eval_problems=32,
                      output_dir="outputs/dpo-sparse")
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--beta", type=float, default=0.1, help="DPO's KL strength")
    parser.add_argument("--reselection-steps", type=int, default=5, help="optimizer steps between selection steps")
    args = parser.parse_args(argv)

    model, tokenizer, eval_problems, before = load_and_score(args)
    held_out = preference_pairs(eval_problems, seed=args.seed + 1000)
    margins_before = log_prob_margins(model, tokenizer, held_out)
    print(f"before: {describe(margins_before)}, exact match {before['exact_match']:.1%}")

    config = SparseConfig(
        density=args.density, selection="ag", reselection_steps=args.reselection_steps,
        selection_accumulation_steps=min(5, args.reselection_steps), target_modules="all-linear",
        task_type="CAUSAL_LM",
    )  # fmt: skip
    train_pairs = preference_pairs(arithmetic_problems(args.steps * args.batch_size, seed=args.seed), seed=args.seed)
    # TRL defaults to bf16 autocast, which a CPU without bf16 units emulates (1.7x slower here), and to
    # gradient checkpointing, which a 135M model does not need.
    training_args = DPOConfig(**schedule_arguments(args), beta=args.beta, bf16=False, gradient_checkpointing=False)
    # The trainer wraps the model itself (peft_config): with ref_model=None the reference is then the
    # same model with its adapter disabled. A model wrapped beforehand would get a second "ref" adapter.
    trainer = DPOTrainer(
        model=model, args=training_args, train_dataset=preference_dataset(train_pairs), processing_class=tokenizer,
        peft_config=config, callbacks=[SparseUpdateCallback()],
    )  # fmt: skip
    trainer.model.print_trainable_parameters()
    started = time.perf_counter()
    trainer.train()
    print(f"trained {args.steps} steps in {time.perf_counter() - started:.0f} s")

    model = trainer.model
    margins_after = log_prob_margins(model, tokenizer, held_out)
    after = evaluate(model, tokenizer, eval_problems)
    # DPO's implicit reward of an answer is beta * (log p_policy - log p_reference); the reference is the model before
    reward_margin = args.beta * (margins_after - margins_before).mean().item()
    print(f"after:  {describe(margins_after)}, exact match {after['exact_match']:.1%}")
    print(f"held-out reward margin (beta * change of the log-prob margin): {reward_margin:+.4f}")
    model.save_pretrained(args.output_dir)
    print(f"adapter saved to {args.output_dir}")
    return {
        "margins_before": margins_before, "margins_after": margins_after, "reward_margin": reward_margin,
        "before": before, "after": after, "log_history": trainer.state.log_history,
    }  # fmt: skip


if __name__ == "__main__":
    main()
