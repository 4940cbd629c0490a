"""PNG plots of an adapter: a blocks x module-types heatmap of density (SFT, LIFT, SNELL) or live rank (SoRA),
and selection over time.

Needs matplotlib (``pip install "peft-sparse[plot]"``). No pyplot state is touched, so it is safe
in scripts, notebooks and servers without a display.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from .summary import AdapterSummary, Shape, module_order_key, summarize_adapter
from .training_log import TRAINER_STATE_NAME, LogHistory, load_log_history, metric_series

# Logged over time by trl_callbacks (SparseUpdateCallback, SoraCallback, SnellAllocationCallback).
TIME_SERIES = {
    "sparse/churn": "selection churn (fraction replaced)",
    "sora/live_rank": "SoRA live rank (all layers)",
    "snella/mean_sparsity": "SNELLA mean sparsity",
}


def split_module_name(name: str) -> tuple[str, str]:
    """``("model.layers.12", "self_attn.q_proj")``: the block (up to its last number) and the module type."""
    parts = name.split(".")
    numbered = [position for position, part in enumerate(parts) if part.isdigit()]
    if not numbered:
        return ".".join(parts[:-1]) or name, parts[-1]
    return ".".join(parts[: numbered[-1] + 1]), ".".join(parts[numbered[-1] + 1 :]) or parts[-1]


def layer_grid(summary: AdapterSummary) -> tuple[list[str], list[str], list[list[Optional[float]]], str]:
    """Blocks (rows, in the model's numeric order) x module types (columns) of the heatmap value, and its label.

    The value is the density in % (SFT, LIFT, SNELL), the trainable entries when the base shapes are
    unknown, or SoRA's live rank; cells without an adapted matrix are None.
    """
    if summary.method == "SORA":
        value, label = (lambda layer: layer.live_rank), "live rank"
    elif all(layer.density is not None for layer in summary.layers):
        value, label = (lambda layer: 100 * layer.density), "density (% of the weight's entries)"
    else:
        value, label = (lambda layer: layer.kept), "trainable entries k (pass the base model for density)"
    cells = {split_module_name(layer.name): value(layer) for layer in summary.layers}
    rows = sorted({row for row, _ in cells}, key=module_order_key)
    columns = list(dict.fromkeys(column for _, column in cells))
    grid = [[cells.get((row, column)) for column in columns] for row in rows]
    return rows, columns, grid, label


def _layer_heatmap(figure, axes, summary: AdapterSummary) -> None:
    rows, columns, grid, label = layer_grid(summary)
    image = axes.imshow([[float("nan") if cell is None else cell for cell in row] for row in grid], aspect="auto",
                        cmap="viridis", interpolation="nearest")
    figure.colorbar(image, ax=axes, label=label)
    axes.set_xticks(range(len(columns)), columns, rotation=45, ha="right", fontsize=8)
    axes.set_yticks(range(len(rows)), rows, fontsize=7)
    axes.set_title(f"{summary.method}: blocks x module types")


def plot_adapter(
    output: Union[str, Path],
    adapter_dir: Optional[Union[str, Path]] = None,
    log_history: Optional[Union[LogHistory, str, Path]] = None,
    base_shapes: Optional[dict[str, Shape]] = None,
) -> Path:
    """Draw the per-layer heatmap (blocks x module types) of the adapter in ``adapter_dir`` and the logged
    selection metrics over time (``log_history``: a list, a ``trainer_state.json``, or a checkpoint folder;
    a checkpoint ``adapter_dir`` supplies its own) into the PNG ``output``; returns its path.

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

    blocks = len({split_module_name(layer.name)[0] for layer in summary.layers}) if summary is not None else 0
    figure = Figure(figsize=(7 * panels, max(4.0, min(0.22 * blocks + 2.0, 30.0))), layout="constrained")
    axes_list = list(figure.subplots(1, panels, squeeze=False)[0])
    if summary is not None:
        _layer_heatmap(figure, axes_list.pop(0), summary)
    for (key, (steps, values)), axes in zip(series.items(), axes_list):
        axes.plot(steps, values, marker="o")
        axes.set_xlabel("optimizer step")
        axes.set_title(TIME_SERIES[key])
    output = Path(output)
    figure.savefig(output, dpi=100)
    return output
