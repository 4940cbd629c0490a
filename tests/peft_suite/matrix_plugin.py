"""pytest plugin: puts our rows into peft's ``test_custom_models.py`` matrix and reports by method.

peft builds its parametrizations from module-level lists (``TEST_CASES``,
``ALL_PEFT_CONFIG_CLASSES``, ``MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES``) whose list objects the
``@pytest.mark.parametrize`` marks hold; pytest reads them only when it generates the tests of a
class. So the rows are put into those very lists (in place) right after pytest imports the module
and before it collects the module's classes: no text of peft's file is changed.

``--matrix`` chooses which of peft's own rows stay: ``ours`` (none), ``reference`` (LoRA's rows on
the MLP and Embedding+Conv1D models, to tell failures of the release from ours) or ``full`` (all of
peft's rows and tests).
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import types
from collections import defaultdict
from pathlib import Path
from typing import Optional

import pytest

import matrix_rows as rows

PEFT_TEST_FILE = "test_custom_models.py"
MATRIX_CHOICES = ("ours", "reference", "full")
REFERENCE_MODEL_IDS = ("MLP", "EmbConv1D")
MATRIX_LISTS = ("TEST_CASES", "ALL_PEFT_CONFIG_CLASSES", "MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES")
REFERENCE_METHOD = "Lora"
# peft's tests that first assert a fresh adapter is an identity (peft's own rows leave init_weights at
# its default; tests that want a non-zero adapter call set_init_weights_false themselves)
IDENTITY_AT_INIT_TESTS = ("test_disable_adapters", "test_disable_adapters_with_merging")
ROW_PROPERTY = "peft_suite_row"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("peft_suite", "peft's custom-model matrix with peft_sparse rows")
    group.addoption(
        "--matrix", choices=MATRIX_CHOICES, default="reference",
        help="which of peft's rows run besides ours: none, LoRA on MLP/EmbConv1D (default), or all",
    )
    group.addoption("--report-dir", default=None, help="write report.md and outcomes.json here")


def method_of(config_cls: type) -> str:
    return config_cls.__name__.removesuffix("Config")


OUR_METHODS = tuple(method_of(config_cls) for config_cls in rows.OUR_CONFIG_CLASSES)
OUR_ROWS = {row[0] for row in rows.TEST_CASES + rows.LORA_TWIN_ROWS}


def _keeps_peft_row(matrix: str, config_cls: type, model_id: Optional[str]) -> bool:
    if matrix == "full":
        return True
    if matrix == "ours":
        return False
    from peft import LoraConfig

    return config_cls is LoraConfig and (model_id is None or model_id in REFERENCE_MODEL_IDS)


def add_rows(module, matrix: str) -> None:
    """Filter peft's lists to ``matrix`` and append our rows, in place (the marks hold these lists)."""
    missing = [name for name in MATRIX_LISTS if not isinstance(getattr(module, name, None), list)]
    if missing:
        raise RuntimeError(
            f"{module.__file__} has no list(s) {missing}: this peft release lays out its matrix differently; "
            "update tests/peft_suite/matrix_plugin.py"
        )
    module.TEST_CASES[:] = [
        row for row in module.TEST_CASES if _keeps_peft_row(matrix, row[2], row[1])
    ] + (rows.LORA_TWIN_ROWS if matrix != "ours" else []) + rows.TEST_CASES
    config_classes = {row[2] for row in module.TEST_CASES}
    module.ALL_PEFT_CONFIG_CLASSES[:] = sorted(config_classes, key=lambda config_cls: config_cls.__name__)
    module.MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES[:] = [
        row for row in module.MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES if _keeps_peft_row(matrix, row[2], None)
    ] + rows.MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES


def pytest_collectstart(collector: pytest.Collector) -> None:
    if not isinstance(collector, pytest.Module) or collector.path.name != PEFT_TEST_FILE:
        return
    try:
        module = collector.obj  # imports the module (cached); its classes are collected after this hook
    except Exception:
        return  # pytest imports it again while collecting and reports the error there
    if not getattr(module, "_peft_sparse_rows_added", False):
        add_rows(module, collector.config.getoption("matrix"))
        module._peft_sparse_rows_added = True


class MatrixReport:
    """Outcome of every test of the matrix, by method, with the first lines of each failure."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        # nodeid -> {"function", "row", "method"}: filled from each report's user_properties, which
        # also reach the controller of a pytest-xdist run (where no items are collected)
        self.rows: dict[str, dict] = {}
        self.outcomes: dict[str, dict] = {}  # nodeid -> {"outcome", "message"}

    @pytest.hookimpl(tryfirst=True)  # before -k/-m: the check below sees every collected test
    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        matrix = config.getoption("matrix")
        kept, deselected, kept_methods = [], [], set()
        for item in items:
            params = getattr(getattr(item, "callspec", None), "params", {})
            config_cls = params.get("config_cls")
            method = method_of(config_cls) if config_cls is not None else None
            if matrix != "full" and method not in OUR_METHODS + (REFERENCE_METHOD,):
                deselected.append(item)
                continue
            if matrix == "ours" and method not in OUR_METHODS:
                deselected.append(item)
                continue
            kept.append(item)
            kept_methods.add(method)
            config_kwargs = params.get("config_kwargs", {})
            non_zero_init = False in (config_kwargs.get("init_weights"), config_kwargs.get("init_lora_weights"))
            if item.originalname in IDENTITY_AT_INIT_TESTS and non_zero_init and params.get("test_name") in OUR_ROWS:
                item.add_marker(pytest.mark.skip(
                    reason="this peft test asserts the fresh adapter is an identity; the row sets init_weights=False"
                ))
            row_name = params.get("test_name", method or "-")
            row = {"function": item.originalname, "row": row_name, "method": method or "-"}
            item.user_properties.append((ROW_PROPERTY, row))
        if items and not kept_methods & set(OUR_METHODS):
            raise pytest.UsageError(
                f"none of our rows reached the tests of {PEFT_TEST_FILE}: peft no longer parametrizes from the "
                "module-level lists this harness fills; update tests/peft_suite/matrix_plugin.py"
            )
        if deselected:
            config.hook.pytest_deselected(items=deselected)
            items[:] = kept

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        row = dict(report.user_properties).get(ROW_PROPERTY)
        if row is None:
            return
        self.rows[report.nodeid] = row
        current = self.outcomes.get(report.nodeid)
        if report.failed:
            outcome = "failed" if report.when == "call" else "error"
            if current is None or current["outcome"] not in ("failed", "error"):
                self.outcomes[report.nodeid] = {"outcome": outcome, "message": _failure_text(report)}
        elif report.skipped and current is None:
            self.outcomes[report.nodeid] = {"outcome": "skipped", "message": _skip_reason(report)}
        elif report.passed and report.when == "call" and current is None:
            self.outcomes[report.nodeid] = {"outcome": "passed", "message": ""}

    def counts(self) -> dict[str, dict[str, int]]:
        table: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for nodeid, result in self.outcomes.items():
            table[self.rows[nodeid]["method"]][result["outcome"]] += 1
        return table

    def failures(self, methods: tuple[str, ...]) -> dict[str, list[tuple[str, str, str]]]:
        """function -> [(method, row, message)] of failed or erroring tests of ``methods``."""
        by_function: dict[str, list] = defaultdict(list)
        for nodeid, result in sorted(self.outcomes.items()):
            row = self.rows[nodeid]
            if result["outcome"] in ("failed", "error") and row["method"] in methods:
                by_function[row["function"]].append((row["method"], row["row"], result["message"]))
        return by_function

    def markdown(self) -> str:
        counts = self.counts()
        lines = ["| method | passed | failed | error | skipped |", "|---|---|---|---|---|"]
        for method in sorted(counts, key=lambda name: (name not in OUR_METHODS, name)):
            numbers = counts[method]
            lines.append(
                f"| {method} | {numbers['passed']} | {numbers['failed']} | {numbers['error']} | {numbers['skipped']} |"
            )
        reference_failures = self.failures((REFERENCE_METHOD,))
        lines += ["", "## Failures of our rows, by test function", ""]
        for function, failures in sorted(self.failures(OUR_METHODS).items()):
            lora = reference_failures.get(function, [])
            lines.append(f"### {function}" + (f"  (also fails for LoRA: {len(lora)} rows)" if lora else ""))
            grouped: dict[tuple[str, str], list[str]] = defaultdict(list)
            for method, row, message in failures:
                grouped[(method, _signature(message))].append(row)
            for (method, _), failed_rows in sorted(grouped.items()):
                example = next(message for m, row, message in failures if m == method and row == failed_rows[0])
                lines.append(f"- {method} ({len(failed_rows)}): {', '.join(failed_rows)}")
                lines.extend(f"    {line}" for line in example.splitlines()[:4])
            lines.append("")
        if reference_failures:
            lines += ["## Failures of LoRA rows (this peft release, or LoRA twins of our rows)", ""]
            for function, failures in sorted(reference_failures.items()):
                lines.append(f"- {function}: {', '.join(row for _, row, _ in failures)}")
                lines.extend(f"    {line}" for line in failures[0][2].splitlines()[:2])
        return "\n".join(lines)

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not self.outcomes:
            return
        text = self.markdown()
        terminalreporter.section("peft custom-model matrix: peft_sparse rows")
        terminalreporter.write_line(text)
        report_dir = self.config.getoption("report_dir")
        if report_dir:
            folder = Path(report_dir)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "report.md").write_text(text + "\n")
            outcomes = {nodeid: {**self.rows[nodeid], **result} for nodeid, result in self.outcomes.items()}
            (folder / "outcomes.json").write_text(json.dumps(outcomes, indent=1, sort_keys=True) + "\n")
            terminalreporter.write_line(f"report: {folder / 'report.md'}, every outcome: {folder / 'outcomes.json'}")


def _failure_text(report: pytest.TestReport) -> str:
    """Where it failed (file:line and the failing source line), then the first lines of the error."""
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is None:
        return "\n".join(line[:300] for line in str(report.longrepr).splitlines()[:6])
    entries = getattr(getattr(report.longrepr, "reprtraceback", None), "reprentries", [])
    # the innermost frame in peft's test files says which check failed; the crash may be deeper
    in_tests = [entry for entry in entries if _is_peft_test_frame(entry)]
    where = _frame_text(in_tests[-1]) if in_tests else ""
    if not entries or not in_tests or in_tests[-1] is not entries[-1]:
        where += f" -> {Path(crash.path).name}:{crash.lineno}"
    return "\n".join(line[:300] for line in [where.strip(), *crash.message.splitlines()[:5]])


def _is_peft_test_frame(entry) -> bool:
    location = getattr(entry, "reprfileloc", None)
    return location is not None and Path(location.path).name.startswith(("test_", "testing_"))


def _frame_text(entry) -> str:
    source = [line for line in getattr(entry, "lines", []) if line.startswith(">")]
    location = entry.reprfileloc
    return f"{Path(location.path).name}:{location.lineno}" + (f": {source[-1][1:].strip()}" if source else "")


def _skip_reason(report: pytest.TestReport) -> str:
    if isinstance(report.longrepr, tuple) and len(report.longrepr) == 3:
        return report.longrepr[2]
    return str(report.longrepr)


def _signature(message: str) -> str:
    """The location and first error line of a failure with numbers blanked, to group one cause across rows."""
    first_lines = " | ".join(message.splitlines()[:2])
    return re.sub(r"\d+(\.\d+)?(e-?\d+)?", "#", first_lines)[:200]


def stand_in_for_diffusers() -> None:
    """peft's testing_common.py imports diffusers only for ``isinstance(model, StableDiffusionPipeline)``.

    Without diffusers installed, a module whose pipeline class nothing is an instance of keeps
    those checks false, as they are for every model of this matrix.
    """
    if "diffusers" in sys.modules or importlib.util.find_spec("diffusers") is not None:
        return
    diffusers = types.ModuleType("diffusers", "stand-in for diffusers (not installed), from tests/peft_suite")
    diffusers.StableDiffusionPipeline = type("StableDiffusionPipeline", (), {})
    sys.modules["diffusers"] = diffusers


def pytest_configure(config: pytest.Config) -> None:
    stand_in_for_diffusers()
    config.pluginmanager.register(MatrixReport(config), "peft_suite_report")
