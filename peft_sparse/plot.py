"""PNG plots of an adapter: per-layer density (SFT, LIFT, SNELL) or live rank (SoRA), and selection over time.

Needs matplotlib (``pip install "peft-sparse[plot]"``). No pyplot state is touched, so it is safe
in scripts, notebooks and servers without a display.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from .summary import AdapterSummary, Shape, summarize_adapter
from .training_log import TRAINER_STATE_NAME, LogHistory, load_log_history, metric_series

# Logged over time by trl_callbacks (SparseUpdateCallback, SoraCallback, SnellAllocationCallback).
TIME_SERIES = {
    "sparse/churn": "selection churn (fraction replaced)",
    "sora/live_rank": "SoRA live rank (all layers)",
    "snella/mean_sparsity": "SNELLA mean sparsity",
}


def _layer_bars(axes, summary: AdapterSummary) -> None:
    names = [layer.name for layer in summary.layers]
    positions = range(len(names))
    if summary.method == "SORA":
        axes.barh(positions, [layer.rank for layer in summary.layers], color="0.85", label="rank r")
        axes.barh(positions, [layer.live_rank for layer in summary.layers], label="live rank")
        axes.set_xlabel("rank")
        axes.legend(loc="lower right")
    elif all(layer.density is not None for layer in summary.layers):
        axes.barh(positions, [100 * layer.density for layer in summary.layers])
        axes.set_xlabel("density (% of the weight's entries)")
    else:  # base shapes unknown: the number of trainable entries instead
        axes.barh(positions, [layer.kept for layer in summary.layers])
        axes.set_xlabel("trainable entries k (pass the base model for density)")
    axes.set_yticks(list(positions), names, fontsize=7)
    axes.invert_yaxis()
    axes.set_title(f"{summary.method}: per layer")


def plot_adapter(
    output: Union[str, Path],
    adapter_dir: Optional[Union[str, Path]] = None,
    log_history: Optional[Union[LogHistory, str, Path]] = None,
    base_shapes: Optional[dict[str, Shape]] = None,
) -> Path:
    """Draw per-layer bars of the adapter in ``adapter_dir`` and the logged selection metrics over
    time (``log_history``: a list, a ``trainer_state.json``, or a checkpoint folder; a checkpoint
    ``adapter_dir`` supplies its own) into the PNG ``output``; returns its path.

    Example:
        >>> plot_adapter("adapter.png", adapter_dir="out/checkpoint-100")  # doctest: +SKIP
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError('peft_sparse.plot needs matplotlib: pip install "peft-sparse[plot]"') from error
    if log_history is None and adapter_dir is not None and (Path(adapter_dir) / TRAINER_STATE_NAME).is_file():
        log_history = Path(adapter_dir)
    history = load_log_history(log_history) if log_history is not None else []
    series = {key: metric_series(history, key) for key in TIME_SERIES}
    series = {key: points for key, points in series.items() if points[0]}
    summary = summarize_adapter(adapter_dir, base_shapes=base_shapes) if adapter_dir is not None else None
    panels = (summary is not None) + len(series)
    if panels == 0:
        raise ValueError(
            f"nothing to plot: give adapter_dir, or a log_history with any of {sorted(TIME_SERIES)}, got "
            f"adapter_dir={adapter_dir!r} and a log history without them"
        )

    bar_height = 0.18 * len(summary.layers) + 1.5 if summary is not None else 0
    figure = Figure(figsize=(7 * panels, max(4.0, min(bar_height, 60.0))), layout="constrained")
    axes_list = list(figure.subplots(1, panels, squeeze=False)[0])
    if summary is not None:
        _layer_bars(axes_list.pop(0), summary)
    for (key, (steps, values)), axes in zip(series.items(), axes_list):
        axes.plot(steps, values, marker="o")
        axes.set_xlabel("optimizer step")
        axes.set_title(TIME_SERIES[key])
    output = Path(output)
    figure.savefig(output, dpi=100)
    return output
