"""Triton kernels (run by Triton's CPU interpreter) against their torch references.

Triton reads TRITON_INTERPRET when a kernel is decorated and when ``triton.language`` is imported:
tests/conftest.py imports Triton with it set, and our kernels are decorated at first launch
(``triton_kernels._dispatch.lazy_jit``), so the ``triton_interpreter`` fixture can set it per test.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model

from peft_sparse import SparseConfig
from peft_sparse.sparse.indices import csr_pattern, random_unique_indices
from tests.conftest import make_mlp, randomize_values
from triton_kernels import (
    sampled_dense_dense_matmul,
    scatter_add,
    scatter_assign,
    sddmm,
    sparse_delta_matmul,
    sparse_matmul,
    sparse_matmul_accumulate,
    sparse_merge,
    topk_candidates,
    topk_scan,
)

pytest.importorskip("triton")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
INDEX_DTYPES = [torch.int32, torch.int64]
# Results rounded to a 16-bit dtype may differ by one unit in the last place: the interpreter
# truncates fp32 -> bf16 where torch rounds to nearest, and fp32 sums are taken in another order.
TOLERANCES = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=1e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=8e-3, atol=8e-3),
}
FP32_SUMS = dict(rtol=1e-5, atol=1e-4)  # fp32 accumulations of up to ~150 products in another order


def unique_indices(num_entries: int, count: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    return random_unique_indices(num_entries, count, seed).to(dtype)


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def dense_from_csr(values: torch.Tensor, indices: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    dense = torch.zeros(shape[0] * shape[1], dtype=values.dtype)
    return dense.index_put((indices.long(),), values).view(shape)


# --- dispatch ---------------------------------------------------------------------------------


def tiny_calls():
    indices = torch.tensor([1, 4])
    crow, col = csr_pattern(indices, (2, 3))
    return {
        "scatter_assign_reference": (
            sparse_merge, lambda: scatter_assign(torch.zeros(2, 3), indices, torch.zeros(2), torch.ones(2))
        ),
        "scatter_add_reference": (sparse_merge, lambda: scatter_add(torch.zeros(2, 3), indices, torch.ones(2))),
        "sampled_dense_dense_matmul_reference": (
            sddmm, lambda: sampled_dense_dense_matmul(torch.ones(2, 4), torch.ones(4, 3), crow, col)
        ),
        "sparse_matmul_accumulate_reference": (
            sparse_matmul,
            lambda: sparse_matmul_accumulate(torch.zeros(4, 2), torch.ones(4, 3), crow, col, torch.ones(2)),
        ),
        "topk_candidates_reference": (topk_scan, lambda: topk_candidates(torch.ones(2, 4), torch.ones(4, 3), indices, 2)),
    }


@pytest.mark.parametrize("reference_name", list(tiny_calls()))
def test_cpu_tensors_use_the_reference_unless_interpreter_is_requested(reference_name, monkeypatch):
    module, call = tiny_calls()[reference_name]

    def refuse(*args, **kwargs):
        raise AssertionError("reference called")

    monkeypatch.setattr(module, reference_name, refuse)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(AssertionError, match="reference called"):
        call()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    call()  # the Triton kernel ran in the interpreter


def test_without_triton_every_op_falls_back_to_torch():
    script = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch, triton_kernels\n"
        "from triton_kernels import _dispatch\n"
        "weight = torch.zeros(2, 3)\n"
        "triton_kernels.scatter_assign(weight, torch.tensor([1, 4]), torch.zeros(2), torch.tensor([2.0, 3.0]))\n"
        "print(_dispatch.triton, _dispatch.use_triton(weight), weight.view(-1).tolist())\n"
    )
    environment = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=environment, cwd=Path(__file__).parents[1]
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "None False [0.0, 2.0, 0.0, 0.0, 3.0, 0.0]"


def test_interpreter_requested_after_triton_import_raises_a_clear_error():
    script = (
        "import os, peft, torch\n"  # peft imports triton while TRITON_INTERPRET is unset
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "from triton_kernels import sampled_dense_dense_matmul\n"
        "sampled_dense_dense_matmul(torch.ones(2, 4), torch.ones(4, 3), torch.tensor([0, 1, 1]), torch.tensor([2]))\n"
    )
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment)
    assert result.returncode != 0
    assert "RuntimeError: to run kernels on CPU, set TRITON_INTERPRET=1 before triton is imported" in result.stderr


# --- sparse merge -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("count", [0, 1, 1500])  # 1500 > one block of 1024 entries, not a multiple of it
def test_scatter_assign_and_add_match_reference(triton_interpreter, dtype, index_dtype, count):
    original = torch.randn(37, 53, generator=generator()).to(dtype)
    indices = unique_indices(original.numel(), count, index_dtype)
    values = torch.randn(count, generator=generator(1))
    base_values = original.view(-1)[indices.long()]
    untouched = torch.ones(original.numel(), dtype=torch.bool)
    untouched[indices.long()] = False
    for op, reference, args in [
        (scatter_assign, sparse_merge.scatter_assign_reference, (indices, base_values, values)),
        (scatter_add, sparse_merge.scatter_add_reference, (indices, values)),
    ]:
        weight, expected = original.clone(), original.clone()
        op(weight, *args, scale=0.5)
        reference(expected, *args, scale=0.5)
        torch.testing.assert_close(weight, expected, **TOLERANCES[dtype])
        assert torch.equal(weight.view(-1)[untouched], original.view(-1)[untouched])
        if count:
            assert not torch.equal(weight, original)


# --- SDDMM ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
def test_sddmm_matches_reference_on_odd_shapes(triton_interpreter, dtype, index_dtype):
    rows, cols, tokens = 19, 23, 150  # 150 tokens: one full 128-token tile and a partial one
    grad_output = torch.randn(tokens, rows, generator=generator()).to(dtype)
    inputs = torch.randn(tokens, cols, generator=generator(1)).to(dtype)
    indices = unique_indices(rows * cols, 45, index_dtype)  # 45 entries: a full block of 32 and a partial one
    crow, col = csr_pattern(indices, (rows, cols))
    left = grad_output.t()  # a transposed view, as in the layer's backward
    result = sampled_dense_dense_matmul(left, inputs, crow, col)
    expected = sddmm.sampled_dense_dense_matmul_reference(left, inputs, crow, col)
    assert result.dtype == torch.float32 and result.shape == (45,)
    torch.testing.assert_close(result, expected, **FP32_SUMS)
    exact = (left.double() @ inputs.double()).view(-1)[indices.long()]
    torch.testing.assert_close(result.double(), exact, **FP32_SUMS)


def test_sddmm_with_no_entries_returns_empty(triton_interpreter):
    crow, col = csr_pattern(torch.empty(0, dtype=torch.int64), (3, 4))
    result = sampled_dense_dense_matmul(torch.randn(3, 5), torch.randn(5, 4), crow, col)
    assert result.shape == (0,) and result.dtype == torch.float32


# --- sparse-delta matmul ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("count", [0, 400])  # 400 over 11 rows: rows longer than a 32-entry block
def test_sparse_matmul_accumulate_matches_reference(triton_interpreter, dtype, index_dtype, count):
    out_features, in_features, tokens = 11, 80, 70  # 70 tokens: a full 64-token tile and a partial one
    indices = unique_indices(out_features * in_features, count, index_dtype)
    crow, col = csr_pattern(indices, (out_features, in_features))
    values = torch.randn(count, generator=generator(2))
    inputs = torch.randn(tokens, in_features, generator=generator(1)).to(dtype)
    output = torch.randn(tokens, out_features, generator=generator()).to(dtype)
    expected = output.clone()
    sparse_matmul_accumulate(output, inputs, crow, col, values)
    sparse_matmul.sparse_matmul_accumulate_reference(expected, inputs, crow, col, values)
    torch.testing.assert_close(output, expected, **TOLERANCES[dtype])


@pytest.mark.parametrize("use_interpreter", [False, True])
def test_sparse_delta_matmul_forward_and_gradients_match_dense(use_interpreter, monkeypatch):
    if use_interpreter:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    shape = (9, 13)
    indices = unique_indices(shape[0] * shape[1], 30, torch.int32)
    crow, col = csr_pattern(indices, shape)
    values = torch.randn(30, generator=generator(1)).requires_grad_(True)
    inputs = torch.randn(2, 5, shape[1], generator=generator()).requires_grad_(True)
    output = sparse_delta_matmul(inputs, values, crow, col, out_features=shape[0])
    weights = torch.randn(2, 5, shape[0], generator=generator(3))
    (output * weights).sum().backward()
    dense_values = values.detach().clone().requires_grad_(True)
    dense_inputs = inputs.detach().clone().requires_grad_(True)
    expected = dense_inputs @ dense_from_csr(dense_values, indices, shape).t()
    (expected * weights).sum().backward()
    torch.testing.assert_close(output, expected, **FP32_SUMS)
    torch.testing.assert_close(inputs.grad, dense_inputs.grad, **FP32_SUMS)
    torch.testing.assert_close(values.grad, dense_values.grad, **FP32_SUMS)


# --- top-k candidate scan ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("num_excluded, count", [(0, 150), (630, 200), (6290, 50)])  # last: only 10 remain
def test_topk_candidates_match_reference(triton_interpreter, dtype, index_dtype, num_excluded, count):
    rows, cols, tokens = 70, 90, 40  # not multiples of the 64 x 64 x 32 tiles
    left = torch.randn(tokens, rows, generator=generator()).to(dtype).t()
    right = torch.randn(tokens, cols, generator=generator(1)).to(dtype)
    excluded = unique_indices(rows * cols, num_excluded, index_dtype)
    indices, values = topk_candidates(left, right, excluded, count)
    expected_indices, expected_values = topk_scan.topk_candidates_reference(left, right, excluded, count)
    assert indices.numel() == min(count, rows * cols - num_excluded)
    assert torch.equal(indices, expected_indices)
    torch.testing.assert_close(values, expected_values, **FP32_SUMS)


# --- wiring into the sparse-delta layer ---------------------------------------------------------


def train_and_select(use_interpreter: bool, monkeypatch) -> list[torch.Tensor]:
    """One "ag" selection window (merge on forward, SDDMM in backward, candidate scan) and a selection."""
    if use_interpreter:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = get_peft_model(make_mlp(), SparseConfig(density=0.2, target_modules=["0", "2"], selection="ag"))
    randomize_values(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.base_model.open_selection_window("default")
    for seed in range(3):
        model(torch.randn(5, 16, generator=generator(seed))).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    model.base_model.reselect("default", 0.25)
    output = model(torch.randn(4, 16, generator=generator(9)))
    state = [output.detach()]
    for _, layer in model.base_model.sparse_delta_layers():
        state += [layer.sparse_indices["default"], layer.sparse_values["default"].detach()]
        state.append(layer.get_base_layer().weight.detach())
    return state


def test_sparse_layer_training_and_selection_through_triton_match_torch(monkeypatch):
    expected = train_and_select(False, monkeypatch)
    result = train_and_select(True, monkeypatch)
    for got, want in zip(result, expected, strict=True):
        if want.dtype in (torch.int32, torch.int64):
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, **FP32_SUMS)
