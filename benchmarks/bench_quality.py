"""Quality of each method at equal budgets and equal steps (see ../shared/BENCHMARKS.md).

Methods live in one table (``METHODS``): a builder ``(base model, settings) -> (peft model,
callbacks)``, a default setting, a small tuning grid, and a report of method-specific numbers
after training. ``settings`` holds the shared budget (``r``: LoRA rank, or SoRA's starting rank)
plus the method's own values (``learning_rate`` always). Tasks live in ``TASKS``.

    python benchmarks/bench_quality.py --task classification --methods lora,sora
    python benchmarks/bench_quality.py --task classification --methods sora --grid   # tune, keep the best on dev

The arithmetic SFT task (LIFT vs SFT vs LoRA vs full FT on SmolLM2) is ``quality_arithmetic.py``;
its rows go into the same JSON.

``classification``: all-MiniLM-L6-v2 + a fresh 2-way head on SST-2 (``--data``): train on the
first 4000 rows (1 epoch, batch 32, max length 64), pick grid points on rows 4000-5000, report
accuracy on the last 2000 rows. ``classification-8k``: the same on the first 8000 rows (250 steps;
dev rows 8000-9000), a longer run for methods that prune during training. Prints a markdown table;
merges rows (by task and method) into ``benchmarks/results/bench_quality.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import DataCollatorWithPadding, TrainerCallback

from peft_sparse import LiftConfig, RosaConfig, S2ftConfig, SnellConfig, SoraConfig, SparseConfig
from peft_sparse.sparse.lottery_ticket import LotteryTicket
from peft_sparse.tuners.sora import SoraLayer
from trl_callbacks import RosaCallback, SoraCallback, SparseUpdateCallback

from benchmark_metadata import write_text_atomically

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))
import sst2_task  # noqa: E402  (examples/ is not a package)

RESULTS = REPO / "benchmarks" / "results" / "bench_quality.json"


@dataclass
class Method:
    build: Callable[[nn.Module, dict], tuple[nn.Module, list[TrainerCallback]]]
    default: dict
    grid: list[dict]
    report: Callable[[nn.Module], dict] = field(default=lambda model: {})
    # (model, tokenizer, train rows, settings, seed): work on the built model before its training (LT-SFT's dense phase)
    before_training: Optional[Callable[..., None]] = None


def build_lora(base: nn.Module, settings: dict):
    config = LoraConfig(r=settings["r"], lora_alpha=settings["r"], target_modules="all-linear",
                        task_type=settings["task_type"])
    return get_peft_model(base, config), []


def build_full(base: nn.Module, settings: dict):
    """Full fine-tuning: every weight of the encoder and the fresh head trains at ``learning_rate``."""
    base.requires_grad_(True)
    return base, []


def build_sora(base: nn.Module, settings: dict):
    config = SoraConfig(
        r=settings["r"], alpha=settings["r"], target_modules="all-linear", task_type=settings["task_type"],
        gate_lr=settings["gate_lr"], xi_schedule=settings["xi_schedule"], xi_start=settings["xi_start"],
        xi_end=settings["xi_end"], l1_weight=settings.get("l1_weight", 0.0),
        scale_xi_by_lr=settings.get("scale_xi_by_lr", True),
    )
    return get_peft_model(base, config), [SoraCallback(log_layer_ranks=False)]


def build_snell(base: nn.Module, settings: dict):
    """SNELL at LoRA's budget: factor width r gives the same r * (in + out) trainable values per matrix."""
    config = SnellConfig(r=settings["r"], sparsity=settings["sparsity"], target_modules="all-linear",
                         task_type=settings["task_type"])
    return get_peft_model(base, config), []


def lora_matched_count(base: nn.Module, rank: int) -> int:
    """Values of LoRA rank ``rank`` on every linear layer but the classifier head ("all-linear")."""
    return sum(rank * (module.in_features + module.out_features)
               for name, module in base.named_modules() if isinstance(module, nn.Linear) and "classifier" not in name)


def build_sft(base: nn.Module, settings: dict):
    """SFT ("ag" prune/regrow every 20 steps) at LoRA rank r's total count, split over the matrices by size."""
    config = SparseConfig(num_tunable_weights=lora_matched_count(base, settings["r"]), target_modules="all-linear",
                          selection="ag", reselection_steps=20, task_type=settings["task_type"])
    return get_peft_model(base, config), [SparseUpdateCallback(log_layer_metrics=False)]


def build_lift(base: nn.Module, settings: dict):
    """LIFT at LoRA rank r's count per matrix, principal weights of a rank-128 approximation."""
    config = LiftConfig(lora_rank_budget=settings["r"], rank=128, target_modules="all-linear",
                        task_type=settings["task_type"])
    return get_peft_model(base, config), []


def build_selection_rule(rule: str, base: nn.Module, settings: dict):
    """SaRA, HFT or ID3 (``SparseConfig(selection=rule)``) at LoRA rank r's total count.

    Over the 125 steps: SaRA adjusts its slots once, halfway (its reference: 2500 of 5000 steps); HFT
    re-chooses its frozen half every 31 steps; ID3 unmasks at every step, reaching its budget at the last.
    """
    interval = {"sara": 62, "hft": 31}.get(rule, 1)
    config = SparseConfig(num_tunable_weights=lora_matched_count(base, settings["r"]), target_modules="all-linear",
                          selection=rule, reselection_steps=interval, task_type=settings["task_type"])
    return get_peft_model(base, config), [SparseUpdateCallback(log_layer_metrics=False)]


def build_lt_sft(base: nn.Module, settings: dict):
    """LT-SFT at LoRA rank r's total count; ``lt_sft_dense_phase`` draws its indices before training."""
    config = SparseConfig(num_tunable_weights=lora_matched_count(base, settings["r"]), target_modules="all-linear",
                          selection="lt-sft", task_type=settings["task_type"])
    return get_peft_model(base, config), []


def lt_sft_dense_phase(model: nn.Module, tokenizer, train: list, settings: dict, seed: int) -> None:
    """LT-SFT's dense phase: one epoch of the adapted matrices at ``dense_learning_rate`` (the fresh head stays
    as initialised: it is trained in the sparse phase), then the entries that moved most become the adapter."""
    ticket = LotteryTicket(model)
    with ticket.dense_phase():
        sst2_task.train_classifier(model, tokenizer, train, settings["dense_learning_rate"], seed=seed)
    ticket.draw()


def build_rosa(base: nn.Module, settings: dict):
    """RoSA: a LoRA part of rank r/2 and a sparse part with the rest of LoRA rank r's count (gradient mask)."""
    half = settings["r"] // 2
    config = RosaConfig(r=half, lora_alpha=half, target_modules="all-linear", task_type=settings["task_type"],
                        num_tunable_weights=lora_matched_count(base, settings["r"]) - lora_matched_count(base, half))
    return get_peft_model(base, config), [RosaCallback()]


def build_s2ft(base: nn.Module, settings: dict):
    """S2FT at LoRA rank r's count: heads of each attention output and channels of each FFN output, chosen
    by ``settings["selection"]`` (default random; "gradient" by ``s2ft_gradient_selection``).

    BERT names them ``attention.output.dense`` and ``output.dense``; the attention role is matched first.
    """
    config = S2ftConfig(lora_rank_budget=settings["r"], attention_output_modules=["attention.output.dense"],
                        ffn_output_modules=["output.dense"], selection=settings.get("selection", "random"),
                        task_type=settings["task_type"])  # fmt: skip
    return get_peft_model(base, config), []


CALIBRATION_BATCHES = 8


def s2ft_gradient_selection(model: nn.Module, tokenizer, train: list, settings: dict, seed: int) -> None:
    """S2FT's gradient rule: score the columns on the first 8 batches of 32 training rows (eval mode, fresh head)."""
    collate = DataCollatorWithPadding(tokenizer)
    examples = sst2_task.encode(tokenizer, train[: CALIBRATION_BATCHES * 32])
    model.eval()
    model.base_model.select_by_gradient([collate(examples[i : i + 32]) for i in range(0, len(examples), 32)])


def adapter_ranks(model: nn.Module) -> dict:
    """Total (live) rank over the adapted layers, its fraction of the starting rank, and the LoRA size it makes."""
    live = start = params = 0
    for module in model.modules():
        if isinstance(module, SoraLayer):
            rank = module.live_rank("default")
        elif isinstance(module, LoraLayer):
            rank = module.r["default"]
        else:
            continue
        live, start = live + rank, start + module.r["default"]
        params += rank * (module.in_features + module.out_features)
    return {"live_rank": live, "live_rank_fraction": live / start, "low_rank_params_after": params}


def rates(*learning_rates: float) -> list[dict]:
    return [{"learning_rate": learning_rate} for learning_rate in learning_rates]


# The grid of every sparse method; where the dev pick fell on an edge, the next rate past it was added
# (SFT and RoSA down to 5e-4, SaRA up to 1e-2, HFT to 1e-2 and then 2e-2), as for full fine-tuning (1e-3).
SPARSE_RATES = (1e-3, 3e-3, 5e-3)

METHODS: dict[str, Method] = {
    "lora": Method(build_lora, {"learning_rate": 3e-3},
                   [{"learning_rate": lr} for lr in (5e-4, 1e-3, 2e-3, 3e-3, 5e-3)], adapter_ranks),
    "full": Method(build_full, {"learning_rate": 1e-4}, rates(3e-5, 1e-4, 3e-4, 1e-3)),
    # xi constant: the threshold gate_lr_t * xi follows the LR schedule, so ranks die early while the rest
    # can still adapt; xi 0.5 leaves ~60-70% of the ranks alive after the 125 steps here
    "sora": Method(build_sora,
                   {"learning_rate": 3e-3, "gate_lr": 5e-2, "xi_schedule": "constant", "xi_start": 0.5, "xi_end": 0.5},
                   [{"learning_rate": lr, "gate_lr": 5e-2, "xi_schedule": "constant", "xi_start": xi, "xi_end": xi}
                    for lr in (2e-3, 3e-3, 5e-3) for xi in (0.3, 0.5)],
                   adapter_ranks),
    "sft": Method(build_sft, {"learning_rate": 3e-3}, rates(5e-4, *SPARSE_RATES)),
    "lift": Method(build_lift, {"learning_rate": 3e-3}, rates(*SPARSE_RATES)),
    "sara": Method(partial(build_selection_rule, "sara"), {"learning_rate": 3e-3}, rates(*SPARSE_RATES, 1e-2)),
    "hft": Method(partial(build_selection_rule, "hft"), {"learning_rate": 3e-3}, rates(*SPARSE_RATES, 1e-2, 2e-2)),
    "id3": Method(partial(build_selection_rule, "id3"), {"learning_rate": 3e-3}, rates(*SPARSE_RATES)),
    # dense phase: the same epoch as the sparse phase (the paper's equal phases), at a full fine-tuning rate
    "lt-sft": Method(build_lt_sft, {"learning_rate": 3e-3, "dense_learning_rate": 1e-4},
                     [{"learning_rate": lr, "dense_learning_rate": 1e-4} for lr in SPARSE_RATES],
                     before_training=lt_sft_dense_phase),
    "rosa": Method(build_rosa, {"learning_rate": 3e-3}, rates(5e-4, *SPARSE_RATES)),
    "s2ft": Method(build_s2ft, {"learning_rate": 3e-3}, rates(*SPARSE_RATES)),
    "s2ft-gradient": Method(build_s2ft, {"learning_rate": 3e-3, "selection": "gradient"},
                            [{"learning_rate": lr, "selection": "gradient"} for lr in SPARSE_RATES],
                            before_training=s2ft_gradient_selection),
    "snell": Method(build_snell, {"learning_rate": 5e-3, "sparsity": 0.9},
                    [{"learning_rate": lr, "sparsity": s} for lr in (2e-3, 5e-3, 1e-2) for s in (0.5, 0.9)]),
}


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def run_classification(method: Method, settings: dict, args, train_rows: int = 4000) -> dict:
    rows = sst2_task.read_sst2(args.data)
    train, dev, test = rows[:train_rows], rows[train_rows : train_rows + 1000], rows[-2000:]
    base, tokenizer = sst2_task.load_classifier(args.model, seed=args.seed)
    model, callbacks = method.build(base, {**settings, "task_type": "SEQ_CLS"})
    trainable = trainable_parameters(model)
    started = time.perf_counter()
    if method.before_training is not None:
        method.before_training(model, tokenizer, train, settings, args.seed)
    before_training_seconds = time.perf_counter() - started
    started = time.perf_counter()
    trainer = sst2_task.train_classifier(model, tokenizer, train, settings["learning_rate"], callbacks, seed=args.seed)
    train_seconds = time.perf_counter() - started
    return {
        "dev_accuracy": sst2_task.accuracy(model, tokenizer, dev),
        "accuracy": sst2_task.accuracy(model, tokenizer, test),
        "trainable_params": trainable,
        "train_seconds": round(train_seconds, 1),
        **({"before_training_seconds": round(before_training_seconds, 1)} if method.before_training else {}),
        "steps": trainer.state.global_step,
        **method.report(model),
    }


TASKS: dict[str, Callable[[Method, dict, argparse.Namespace], dict]] = {
    "classification": run_classification,
    "classification-8k": partial(run_classification, train_rows=8000),
}


def environment() -> dict:
    return {
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def parse_settings(pairs: list[str]) -> dict:
    """``["xi_end=1.5", "xi_schedule=constant", "scale_xi_by_lr=false"]`` ->
    ``{"xi_end": 1.5, "xi_schedule": "constant", "scale_xi_by_lr": False}``."""
    settings = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if value.lower() in ("true", "false"):
            settings[key] = value.lower() == "true"
            continue
        try:
            settings[key] = float(value)
        except ValueError:
            settings[key] = value
    return settings


def average_runs(runs: list[dict]) -> dict:
    """Mean of each metric over ``runs`` (4 decimals); a value every run shares (a parameter count) is kept as is."""
    shared = {key for key in runs[0] if all(run[key] == runs[0][key] for run in runs)}
    return {
        key: runs[0][key] if key in shared else round(sum(run[key] for run in runs) / len(runs), 4) for key in runs[0]
    }


def run_method(name: str, args) -> list[dict]:
    """Train and score each requested setting of ``name`` once per seed; one grid point per setting,
    with numeric metrics averaged over the seeds and the accuracy of each seed kept."""
    method = METHODS[name]
    points = method.grid if args.grid else [{**method.default, **parse_settings(args.set)}]
    tried = []
    for point in points:
        settings = {"r": args.r, **point}
        runs = [TASKS[args.task](method, settings, argparse.Namespace(**{**vars(args), "seed": seed}))
                for seed in args.seeds]
        metrics = {**average_runs(runs), "accuracy_by_seed": [run["accuracy"] for run in runs]}
        print(f"  {name} {point}: {json.dumps(metrics)}", flush=True)
        tried.append({"task": args.task, "method": name, "settings": settings, "seeds": args.seeds, **metrics,
                      "environment": environment()})
    return tried


def merge_results(task: str, method: str, tried: list[dict], score_key: str = "dev_accuracy") -> dict:
    """Add grid points to the stored row of (task, method) (a rerun setting replaces its old point);
    the row's headline is the point with the best ``score_key``. Rows of other methods are kept."""
    stored = json.loads(RESULTS.read_text())["rows"] if RESULTS.exists() else []
    old = next((row for row in stored if (row["task"], row["method"]) == (task, method)), {"grid": []})
    fresh = [point["settings"] for point in tried]
    grid = [point for point in old["grid"] if point["settings"] not in fresh] + tried
    row = {**max(grid, key=lambda point: point[score_key]), "grid": grid}
    rows = [other for other in stored if (other["task"], other["method"]) != (task, method)] + [row]
    rows.sort(key=lambda other: (other["task"], other["method"]))
    write_text_atomically(RESULTS, json.dumps({"rows": rows}, indent=2) + "\n")
    return row


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| task | method | settings | seeds | accuracy | dev accuracy | trainable params | live rank (fraction) | train s |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        settings = ", ".join(f"{k}={v}" for k, v in row["settings"].items())
        rank = f"{row['live_rank']:.0f} ({row['live_rank_fraction']:.0%})" if "live_rank" in row else "-"
        seeds = ",".join(map(str, row.get("seeds", [0])))
        lines.append(
            f"| {row['task']} | {row['method']} | {settings} | {seeds} | {row['accuracy']:.1%} | {row['dev_accuracy']:.1%} | "
            f"{row['trainable_params']:,} | {rank} | {row['train_seconds']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="classification", choices=sorted(TASKS))
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {sorted(METHODS)}")
    parser.add_argument("--grid", action="store_true", help="run each method's grid, keep the best on dev")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one of the method's default settings (repeatable), e.g. --set xi_end=1.5")
    parser.add_argument("--r", type=int, default=8, help="LoRA rank = SoRA starting rank; others match its budget")
    parser.add_argument("--model", default=None, help="encoder id or path (default: embedded all-MiniLM-L6-v2)")
    parser.add_argument("--data", default=str(sst2_task.DEFAULT_DATA), help="SST-2 train.tsv")
    parser.add_argument("--seeds", type=lambda text: [int(seed) for seed in text.split(",")], default=[0],
                        help="comma-separated seeds (head init, data order); metrics are averaged over them")
    args = parser.parse_args()
    names = args.methods.split(",")
    unknown = sorted(set(names) - set(METHODS))
    if unknown:
        parser.error(f"--methods must be from {sorted(METHODS)}, got {unknown}")
    if args.grid and args.set:
        parser.error("--set overrides the default setting; it cannot be combined with --grid")

    rows = [merge_results(args.task, name, run_method(name, args)) for name in names]
    print(markdown_table([point for row in rows for point in row["grid"]]))
    print("best on dev:")
    print(markdown_table(rows))
    print(f"results merged into {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
