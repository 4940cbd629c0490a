"""A steady-state training step of a sparse-delta model makes no host synchronisation in our code."""

import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model

from tests.conftest import SPARSE_DELTA_CONFIGS, make_mlp, make_tiny_llama

OUR_PACKAGES = tuple(str(Path(__file__).resolve().parents[1] / package) for package in ("peft_sparse", "triton_kernels"))
# calls that read a tensor's contents on the host, and so wait for the GPU
SYNCING_TENSOR_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero")
SYNCING_FUNCTIONS = ("equal", "nonzero", "bincount", "unique", "is_nonzero")


def count_calls_from_our_code(monkeypatch) -> list[str]:
    """Wrap every syncing call; record those made directly from peft_sparse or triton_kernels."""
    calls = []

    def counting(owner, name):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(OUR_PACKAGES):
                calls.append(f"{name} from {caller}:{sys._getframe(1).f_lineno}")
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)

    for name in SYNCING_TENSOR_METHODS:
        counting(torch.Tensor, name)
    for name in SYNCING_FUNCTIONS:
        counting(torch, name)
    return calls


def train_step(model, optimizer, input_ids) -> None:
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


@pytest.mark.parametrize("method", sorted(SPARSE_DELTA_CONFIGS))
def test_a_training_step_makes_no_syncing_call_in_our_code(method, input_ids, monkeypatch):
    model = get_peft_model(make_tiny_llama(), SPARSE_DELTA_CONFIGS[method]())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, fused=True)
    train_step(model, optimizer, input_ids)  # first step: patterns are built once
    calls = count_calls_from_our_code(monkeypatch)
    with model.disable_adapter(), torch.no_grad():
        model(input_ids=input_ids)  # a reference pass too
    train_step(model, optimizer, input_ids)  # rewrites every delta: the optimizer step made them stale
    assert calls == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA to observe synchronisations")
@pytest.mark.parametrize("method", sorted(SPARSE_DELTA_CONFIGS))
def test_a_training_step_on_cuda_does_not_synchronise(method):
    # a stack of our layers only: transformers' own model code may synchronise, and is not under test
    model = get_peft_model(make_mlp(), SPARSE_DELTA_CONFIGS[method](target_modules=["0", "2"])).cuda()
    inputs = torch.randn(64, 16, device="cuda")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, fused=True)
    model(inputs).pow(2).mean().backward()
    optimizer.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with model.disable_adapter(), torch.no_grad():
            model(inputs)
        model(inputs).pow(2).mean().backward()
        optimizer.step()
        model(inputs).pow(2).mean().backward()  # rewrites the stale deltas
    finally:
        torch.cuda.set_sync_debug_mode("default")
