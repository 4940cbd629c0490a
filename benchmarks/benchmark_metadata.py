"""What every benchmark JSON records about the run: library versions, CPU/GPU, threads, date, command line."""

from __future__ import annotations

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
