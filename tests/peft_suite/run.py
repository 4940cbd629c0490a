"""Run peft's own custom-model test matrix with rows for our methods added.

peft tests every method against one matrix of tiny models and properties
(``tests/test_custom_models.py``: forward, dtypes, training touches only adapter parameters,
merge/unmerge/safe merge, save/load, disable, delete, several adapters). This script runs that
file, from the peft release installed here, with rows for SparseConfig, LiftConfig, SoraConfig,
SnellConfig, S2ftConfig and RosaConfig (``matrix_rows.py``) put into its lists at collection time
(``matrix_plugin.py``); nothing of peft's is committed or edited.

Usage (from the repository root, in the venv)::

    python tests/peft_suite/run.py                 # our rows + LoRA's MLP/Conv1D rows (reference)
    python tests/peft_suite/run.py --ours-only     # our rows only
    python tests/peft_suite/run.py --full          # every row of peft's matrix, plus ours (slow)
    python tests/peft_suite/run.py -k "SNELL and merge"   # any other argument goes to pytest

The first run downloads peft's sdist (``pip download --no-binary :all: peft==<installed>``) and
unpacks its ``tests/`` into ``tests/peft_suite/.cache/peft-<version>/`` (gitignored; the folder
name starts with a dot, so the repository's own ``pytest`` never collects it). The summary at the
end counts passed/failed/error/skipped per method and lists our failures by test function, each
marked when LoRA fails the same test; it is also written to ``.cache/report/report.md``, with
every outcome in ``.cache/report/outcomes.json``.

The harness runs pytest with ``-q -p no:cacheprovider``, and with ``-n auto`` when pytest-xdist is
installed. Exit status: pytest's.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
PEFT_TEST_FILE = "test_custom_models.py"
# written by this script next to peft's tests: makes that folder pytest's rootdir, so neither this
# repository's pytest settings nor its tests/conftest.py apply to peft's tests
PYTEST_INI = "[pytest]\n"


def peft_tests_folder(version: str) -> Path:
    """peft's ``tests/`` of release ``version``, unpacked from its sdist into the cache (once)."""
    root = CACHE / f"peft-{version}"
    tests = root / "tests"
    done = root / ".complete"
    if done.is_file():
        return tests
    sdist_dir = CACHE / "sdist"
    sdist = sdist_dir / f"peft-{version}.tar.gz"
    if not sdist.is_file():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", f"peft=={version}",
             "-d", str(sdist_dir)],
            check=True,
        )
    member_prefix = f"peft-{version}/tests/"
    with tarfile.open(sdist) as archive:
        members = [member for member in archive.getmembers() if member.name.startswith(member_prefix)]
        for member in members:
            member.name = member.name.removeprefix(f"peft-{version}/")
        archive.extractall(root, members=members, filter="data")
    if not (tests / PEFT_TEST_FILE).is_file():
        raise RuntimeError(f"peft {version}'s sdist has no tests/{PEFT_TEST_FILE}; see {sdist}")
    # the sdist leaves out tests/__init__.py, but the test modules import their helpers relatively
    (tests / "__init__.py").touch()
    (root / "pytest.ini").write_text(PYTEST_INI)
    done.touch()
    return tests


def parse_arguments(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=True)
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--ours-only", action="store_true", help="run our rows only")
    choice.add_argument("--full", action="store_true", help="run every row and test of peft's file, plus ours")
    return parser.parse_known_args(argv)


def main(argv: list[str]) -> int:
    options, pytest_arguments = parse_arguments(argv)
    version = importlib.metadata.version("peft")
    tests = peft_tests_folder(version)
    matrix = "ours" if options.ours_only else "full" if options.full else "reference"
    arguments = [
        str(tests / PEFT_TEST_FILE),
        "-c", str(tests.parent / "pytest.ini"),
        "--rootdir", str(tests.parent),
        "-q", "-p", "no:cacheprovider",
        f"--matrix={matrix}",
        f"--report-dir={CACHE / 'report'}",
    ]
    if importlib.util.find_spec("xdist") is not None:
        arguments += ["-n", "auto"]
    # matrix_plugin.py and matrix_rows.py are imported by name, here and in pytest-xdist workers
    sys.path.insert(0, str(HERE))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    arguments += ["-p", "matrix_plugin"]

    print(f"peft {version}: {tests / PEFT_TEST_FILE}, matrix={matrix}", flush=True)
    start = time.perf_counter()
    status = pytest.main(arguments + pytest_arguments)
    print(f"peft_suite: {time.perf_counter() - start:.0f} s", flush=True)
    return int(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
