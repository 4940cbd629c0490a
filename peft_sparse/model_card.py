"""A model card section for peft_sparse adapters: method, budget, targets, base model, training metrics.

peft's ``save_pretrained`` writes a generic card (``README.md``) and offers no hook to a plugin
method, and ``push_to_hub`` replaces that card by the Hub's (see :mod:`peft_sparse.hub`), so the
section is written by an explicit call after saving. It sits between two HTML comments and is
replaced, not duplicated, when written again; the rest of the card (peft's, the Trainer's) stays.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from huggingface_hub import ModelCard, ModelCardData
from torch import nn

from .summary import AdapterSummary, layer_table, model_weight_shapes, overview, summarize_adapter
from .training_log import LogHistory, latest_metrics, load_log_history

SECTION_START = "<!-- peft-sparse:start -->"
SECTION_END = "<!-- peft-sparse:end -->"
CARD_NAME = "README.md"

AUTO_CLASSES = {
    "CAUSAL_LM": "AutoPeftModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoPeftModelForSeq2SeqLM",
    "SEQ_CLS": "AutoPeftModelForSequenceClassification",
    "TOKEN_CLS": "AutoPeftModelForTokenClassification",
    "QUESTION_ANS": "AutoPeftModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoPeftModelForFeatureExtraction",
}


def _number(value: float) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


def card_section(summary: AdapterSummary, metrics: dict[str, float], repo_id: str) -> str:
    """The markdown of the peft_sparse section (without its marker comments)."""
    task_type = getattr(summary.config.task_type, "value", summary.config.task_type)
    auto_class = AUTO_CLASSES.get(str(task_type), "AutoPeftModel")
    lines = ["## peft-sparse adapter", "", "| | |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in overview(summary).items()]
    lines += [
        "",
        "Load it with `pip install peft-sparse` (the import registers the method with peft):",
        "",
        "```python",
        "import peft_sparse",
        f"from peft import {auto_class}",
        "",
        f'model = {auto_class}.from_pretrained("{repo_id}")',
        "```",
    ]
    if metrics:
        lines += ["", "### Training metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {name} | {_number(value)} |" for name, value in metrics.items()]
    lines += ["", "<details><summary>Per-layer summary</summary>", "", layer_table(summary), "", "</details>"]
    return "\n".join(lines)


def _insert_section(text: str, section: str) -> str:
    block = f"{SECTION_START}\n{section}\n{SECTION_END}"
    if SECTION_START in text and SECTION_END in text:
        head, rest = text.split(SECTION_START, 1)
        return head + block + rest.split(SECTION_END, 1)[1]
    lines = text.splitlines()
    # after the card's title, before its first "## " section
    at = next((number for number, line in enumerate(lines) if line.startswith("## ")), len(lines))
    return "\n".join(lines[:at] + [block, ""] + lines[at:])


def _set_base_model(card: ModelCard, base_model: Optional[str]) -> None:
    """Card metadata names the base model only by Hub id: the Hub rejects other values, such as the
    local path peft records for a base loaded from a folder."""
    recorded = card.data.base_model
    if isinstance(recorded, str) and Path(recorded).exists():
        card.data.tags = [tag for tag in card.data.tags if tag != f"base_model:adapter:{recorded}"]
        card.data.base_model = recorded = None
    if not recorded and base_model and not Path(base_model).exists():
        card.data.base_model = base_model


def write_model_card(
    model: Optional[nn.Module],
    output_dir: Union[str, Path],
    training_metrics: Optional[dict[str, float]] = None,
    log_history: Optional[Union[LogHistory, str, Path]] = None,
    repo_id: Optional[str] = None,
    adapter_name: str = "default",
) -> Path:
    """Add (or refresh) the peft_sparse section of ``output_dir/README.md``; returns the card's path.

    Call it after ``model.save_pretrained(output_dir)``. ``model`` (the PeftModel, or None) supplies
    the base weight shapes, so densities are known. Metrics: the last value of each metric in
    ``log_history`` (``trainer.state.log_history`` or a ``trainer_state.json`` path), updated by
    ``training_metrics``. ``repo_id`` goes into the loading snippet.

    Example:
        >>> model.save_pretrained("out")  # doctest: +SKIP
        >>> write_model_card(model, "out", log_history=trainer.state.log_history)  # doctest: +SKIP
    """
    output_dir = Path(output_dir)
    adapter_dir = output_dir if adapter_name == "default" else output_dir / adapter_name
    shapes = model_weight_shapes(model) if model is not None else None
    summary = summarize_adapter(adapter_dir, base_shapes=shapes)
    metrics = latest_metrics(load_log_history(log_history)) if log_history is not None else {}
    metrics.update(training_metrics or {})

    card_path = output_dir / CARD_NAME
    if not card_path.is_file() and hasattr(model, "create_or_update_model_card"):
        model.create_or_update_model_card(str(output_dir))  # peft's metadata: library, base model, versions
    card = ModelCard.load(card_path) if card_path.is_file() else ModelCard.from_template(ModelCardData())
    card.data.library_name = card.data.library_name or "peft"
    card.data.tags = sorted(set(card.data.tags or []) | {"peft-sparse", summary.method.lower()})
    _set_base_model(card, summary.config.base_model_name_or_path)
    card.text = _insert_section(card.text, card_section(summary, metrics, repo_id or str(output_dir)))
    card.save(card_path)
    return card_path
