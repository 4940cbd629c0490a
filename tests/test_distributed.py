"""Multi-process training: 2 CPU processes (torchrun, gloo) under the Trainer's DDP end with identical adapters."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file

from peft_sparse.sparse.compact_format import expand_tensors
from tests.conftest import assert_same_adapter, make_tiny_llama
from tests.tiny_runs import METHODS, train

WORKER = Path(__file__).with_name("tiny_runs.py")


def launch(processes: int, *arguments: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               str(WORKER), *arguments]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment)


@pytest.fixture(scope="module")
def ddp_adapters(tmp_path_factory) -> Path:
    """Runs every method of the worker once in 2 processes (one launch: interpreter start-up dominates)."""
    out_dir = tmp_path_factory.mktemp("ddp")
    result = launch(2, str(out_dir), *METHODS)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out_dir


@pytest.mark.parametrize("method", list(METHODS))
def test_ranks_end_with_byte_identical_adapters(ddp_adapters, method):
    rank0 = (ddp_adapters / f"{method}-rank0.safetensors").read_bytes()
    rank1 = (ddp_adapters / f"{method}-rank1.safetensors").read_bytes()
    assert rank0 == rank1


@pytest.mark.parametrize("method", list(METHODS))
def test_resuming_under_ddp_is_bit_identical(ddp_adapters, method):
    """The step-3 checkpoint lies inside AG/MA statistics windows (averaged over ranks when saved)."""
    for rank in (0, 1):
        resumed = load_file(ddp_adapters / f"{method}-resumed-rank{rank}.safetensors")
        straight = load_file(ddp_adapters / f"{method}-rank{rank}.safetensors")
        assert resumed.keys() == straight.keys()
        assert all(torch.equal(resumed[key], straight[key]) for key in straight)


@pytest.mark.parametrize("method", ["sparse-ag", "sparse-ma", "lift"])
def test_selection_steps_changed_the_indices(ddp_adapters, method):
    initial = expand_tensors(get_peft_model_state_dict(get_peft_model(make_tiny_llama(), METHODS[method][0]())))
    trained = expand_tensors(load_file(ddp_adapters / f"{method}-rank0.safetensors"))
    indices = [key for key in initial if key.endswith("_indices")]
    assert len(indices) == 4
    assert sum(int((~torch.isin(trained[key], initial[key])).sum()) for key in indices) > 0


@pytest.mark.parametrize("method", ["sparse-ag", "rosa"])
def test_accumulated_gradient_selection_matches_one_process_with_the_global_batch(ddp_adapters, tmp_path, method):
    """AG averages its statistics over ranks and RoSA squares the global batch's gradient (from gathered
    token factors), so 2 x 2 samples pick what 1 x 4 samples pick."""
    single = expand_tensors(get_peft_model_state_dict(train(method, str(tmp_path), per_device_train_batch_size=4)))
    distributed = expand_tensors(load_file(ddp_adapters / f"{method}-rank0.safetensors"))
    for key in [key for key in single if key.endswith("_indices")]:
        assert torch.equal(distributed[key], single[key]), key


def test_trainer_with_fsdp2_ends_with_the_adapter_of_one_process(tmp_path):
    """``TrainingArguments(fsdp=..., fsdp_config={"fsdp_version": 2})``: 2 gloo processes, sharded weights."""
    result = launch(2, str(tmp_path), "--fsdp", "sparse-ag")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    sharded = expand_tensors(load_file(tmp_path / "sparse-ag" / "checkpoint-4" / "adapter_model.safetensors"))
    single = expand_tensors(
        get_peft_model_state_dict(train("sparse-ag", str(tmp_path / "single"), per_device_train_batch_size=4))
    )
    assert_same_adapter(sharded, single)
