"""What every benchmark JSON records about the run (library versions, CPU/GPU, threads, date, command line),
and the atomic write of a results file."""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import peft
import torch
import transformers


def cpu_name() -> str:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")


def run_metadata() -> dict:
    """Versions, hardware and invocation of this benchmark run."""
    return {
        "torch": torch.__version__,
        "peft": peft.__version__,
        "transformers": transformers.__version__,
        "cpu": cpu_name(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "threads": torch.get_num_threads(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv,
    }


def write_text_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: a crash leaves the old file whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    try:
        temporary.write_text(text)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    temporary.replace(path)


def write_results(path: Path, rows: list[dict], **settings) -> None:
    """Write ``{"metadata": run_metadata() | settings, "rows": rows}`` to ``path`` atomically; say where on stderr."""
    write_text_atomically(path, json.dumps({"metadata": run_metadata() | settings, "rows": rows}, indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)
