"""The README's one quality table: every method on both tasks, read from ``results/bench_quality.json``.

SST-2 (``bench_quality.py``): each method's grid point with the best dev accuracy, its test accuracy as
the mean over its seeds with the standard error, and its difference from LoRA's dev-picked point paired
by seed (the seeds both ran). Arithmetic (``quality_arithmetic.py``): the learning rate with the best
exact match (the mean over its seeds where it ran more than one), with its general-text loss rise.
Only points at the shared budget and steps count (SST-2: LoRA r=8's; arithmetic: r=16, 80 steps x 16,
128 problems); each cell names the learning rates that ran.

    python benchmarks/quality_table.py
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

RESULTS = Path(__file__).resolve().parent / "results" / "bench_quality.json"
PROTOCOL = {
    "classification": {"r": 8},
    "arithmetic": {"r": 16, "steps": 80, "batch_size": 16, "eval_problems": 128},
}
METHOD_ORDER = ("lora", "full", "sft", "lift", "s2ft", "s2ft-gradient", "lt-sft", "sara", "hft", "id3", "rosa",
                "sora", "snell")
LABELS = {
    "lora": "LoRA (peft)", "full": "full fine-tuning", "sft": 'SFT "ag"', "lift": "LIFT", "s2ft": "S2FT (random)",
    "s2ft-gradient": "S2FT (gradient)", "lt-sft": "LT-SFT", "sara": "SaRA", "hft": "HFT", "id3": "ID3",
    "rosa": "RoSA", "sora": "SoRA", "snell": "SNELL",
}


def protocol_points(rows: list[dict], task: str, method: str) -> list[dict]:
    """Grid points of (task, method) run at the protocol's shared settings."""
    row = next((row for row in rows if (row["task"], row["method"]) == (task, method)), {"grid": []})
    return [point for point in row["grid"]
            if all(point["settings"].get(key) == value for key, value in PROTOCOL[task].items())]


def mean_and_standard_error(values: list[float]) -> tuple[float, Optional[float]]:
    """Mean and standard error of the mean (None for a single value).

    Example:
        >>> mean_and_standard_error([1.0, 3.0])
        (2.0, 1.0)
    """
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    variance = sum((value - mean) ** 2 for value in values) / (len(values) - 1)
    return mean, math.sqrt(variance / len(values))


def paired_difference(point: dict, reference: dict) -> tuple[float, Optional[float]]:
    """Mean accuracy difference ``point - reference`` over the seeds both ran, and its standard error."""
    by_seed = dict(zip(reference["seeds"], reference["accuracy_by_seed"]))
    differences = [accuracy - by_seed[seed] for seed, accuracy in zip(point["seeds"], point["accuracy_by_seed"])
                   if seed in by_seed]
    if not differences:
        return math.nan, None
    return mean_and_standard_error(differences)


def learning_rate_text(learning_rate: float) -> str:
    """``0.003`` -> ``"3e-3"``, ``0.00025`` -> ``"2.5e-4"``."""
    mantissa, exponent = f"{learning_rate:.1e}".split("e")
    return f"{mantissa.removesuffix('.0')}e{int(exponent)}"


def picked_text(points: list[dict], picked: dict) -> str:
    """The picked learning rate, with the grid it was picked from when there was one."""
    rates = sorted({point["settings"]["learning_rate"] for point in points})  # a rerun setting counts once
    chosen = learning_rate_text(picked["settings"]["learning_rate"])
    if len(rates) == 1:
        return f"{chosen} only"
    return f"{chosen} of {' / '.join(learning_rate_text(rate) for rate in rates)}"


def points_text(value: float, error: Optional[float]) -> str:
    return f"{value:+.2f}" if error is None else f"{value:+.2f} ({error:.2f})"


def classification_cells(rows: list[dict], method: str, lora: Optional[dict]) -> list[str]:
    points = protocol_points(rows, "classification", method)
    if not points:
        return ["-", "-", "-"]
    picked = max(points, key=lambda point: point["dev_accuracy"])
    mean, error = mean_and_standard_error([100 * accuracy for accuracy in picked["accuracy_by_seed"]])
    accuracy = f"{mean:.2f}%" + ("" if error is None else f" ± {error:.2f}") + f" ({len(picked['seeds'])})"
    if method == "lora" or lora is None:
        return [picked_text(points, picked), accuracy, "-"]
    difference, difference_error = paired_difference(picked, lora)
    return [picked_text(points, picked), accuracy, points_text(100 * difference, None if difference_error is None
                                                               else 100 * difference_error)]


def arithmetic_cells(rows: list[dict], method: str) -> list[str]:
    """The learning rate whose exact match, averaged over its seeds, is best; with the standard error over
    seeds where it ran more than one."""
    points = protocol_points(rows, "arithmetic", method)
    if not points:
        return ["-", "-", "-"]
    by_rate: dict[float, list[dict]] = {}
    for point in points:
        by_rate.setdefault(point["settings"]["learning_rate"], []).append(point)
    runs = max(by_rate.values(), key=lambda runs: sum(run["exact_match"] for run in runs) / len(runs))
    exact, exact_error = mean_and_standard_error([100 * run["exact_match"] for run in runs])
    rise, rise_error = mean_and_standard_error([run["general_loss_rise"] for run in runs])
    if exact_error is None:
        return [picked_text(points, runs[0]), f"{exact:.2f}%", f"{rise:+.3f}"]
    return [picked_text(points, runs[0]), f"{exact:.2f}% ± {exact_error:.2f} ({len(runs)})",
            f"{rise:+.3f} ± {rise_error:.3f}"]


def markdown_table(rows: list[dict]) -> str:
    lora_points = protocol_points(rows, "classification", "lora")
    lora = max(lora_points, key=lambda point: point["dev_accuracy"]) if lora_points else None
    lines = [
        "| method | SST-2 lr (dev-picked) | SST-2 accuracy ± SE (seeds) | minus LoRA, paired by seed (SE) "
        "| arithmetic lr (best) | exact match | general-text loss rise |",
        "|---|---|---:|---:|---|---:|---:|",
    ]
    for method in METHOD_ORDER:
        cells = classification_cells(rows, method, lora) + arithmetic_cells(rows, method)
        if set(cells) != {"-"}:
            lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    print(markdown_table(json.loads(RESULTS.read_text())["rows"]))


if __name__ == "__main__":
    main()
