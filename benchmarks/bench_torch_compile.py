"""``torch.compile(model)`` (default mode) vs eager for every method, on the tests' tiny Llama (CPU, fp32).

Per method (the cases of ``tests/test_torch_compile.py``, on all 14 linears): graph breaks in one training forward
(``torch._dynamo.explain``), the largest |compiled - eager| loss over the 3 training steps,
compile time (the 3 compiled steps minus the 3 eager ones: tracing, AOTAutograd, inductor; a warm
inductor cache on disk makes it shorter), and the median time of --steps further training steps.
The measured methods' rows replace theirs in the results file; the other methods' rows are kept
(each row carries the date it was measured).

    python benchmarks/bench_torch_compile.py
    python benchmarks/bench_torch_compile.py --methods s2ft rosa
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from benchmark_metadata import run_metadata, write_results  # noqa: E402
from test_torch_compile import CASES, batch, make_model, train_steps  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "bench_torch_compile.json"


def timed_steps(forward, model: torch.nn.Module, steps: int) -> float:
    """Median ms of ``steps`` AdamW training steps on the tests' batch."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    input_ids, times = batch(), []
    for _ in range(steps):
        start = time.perf_counter()
        forward(input_ids=input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def measure(method: str, steps: int) -> dict:
    case = CASES[method]
    torch._dynamo.reset()
    breaks = torch._dynamo.explain(make_model(case, "all-linear"))(input_ids=batch(), labels=batch()).graph_break_count
    torch._dynamo.reset()
    eager_model, compiled_model = make_model(case, "all-linear"), make_model(case, "all-linear")
    start = time.perf_counter()
    eager_losses = train_steps(eager_model, case, compiled=False, input_ids=batch())
    eager_seconds = time.perf_counter() - start
    start = time.perf_counter()
    compiled_losses = train_steps(compiled_model, case, compiled=True, input_ids=batch())
    compiled_seconds = time.perf_counter() - start
    return {
        "method": method,
        "date": run_metadata()["date"],
        "graph_breaks_per_forward": breaks,
        "max_loss_diff": max(abs(a - b) for a, b in zip(compiled_losses, eager_losses)),
        "compile_s": compiled_seconds - eager_seconds,
        "eager_step_ms": timed_steps(eager_model, eager_model, steps),
        "compiled_step_ms": timed_steps(torch.compile(compiled_model), compiled_model, steps),
    }


def merged_rows(measured: list[dict]) -> list[dict]:
    """The stored rows with the ``measured`` methods' rows replaced or added, in the order of ``CASES``."""
    stored = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"metadata": {}, "rows": []}
    # rows written before rows carried a date were all measured by the run the metadata describes
    old = [{"date": stored["metadata"].get("date"), **row} for row in stored["rows"]]
    by_method = {row["method"]: row for row in old} | {row["method"]: row for row in measured}
    return [by_method[method] for method in CASES if method in by_method]


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| method | graph breaks / forward | max \\|loss diff\\| (3 steps) | compile (s) | eager step (ms) "
        "| compiled step (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['method']} | {row['graph_breaks_per_forward']} | {row['max_loss_diff']:.1e} | "
            f"{row['compile_s']:.1f} | {row['eager_step_ms']:.1f} | {row['compiled_step_ms']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--steps", type=int, default=10, help="timed training steps after the 3 compared ones")
    args = parser.parse_args()
    rows = [measure(method, args.steps) for method in args.methods]
    print(markdown_table(rows))
    write_results(RESULTS, merged_rows(rows), steps=args.steps, device="cpu", dtype="float32")


if __name__ == "__main__":
    main()
