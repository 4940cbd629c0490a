"""Every Triton kernel compiled ahead of time for real GPUs (sm_80, sm_90), on a machine without one.

Triton's interpreter accepts code that a GPU compile rejects (a ``tl.dot`` with K < 8 runs there),
so the kernel tests alone do not show the kernels build. ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))`` produces PTX and a cubin with the ``triton`` wheel's own
ptxas, no GPU or driver needed. For every launch configuration the launchers make (``LAUNCHES``)
and each target this checks that the compile succeeds, that no thread uses local memory (no
``ld.local``/``st.local`` in the PTX, and no stack frame in the cubin: ptxas register spills show
only there), and that the shared memory fits a block.

Covered: every constexpr combination, each with every combination of operand and index dtypes the
callers pass, except SNELL: there each dtype case appears, spread over the constexpr combinations,
at the default width (all ``r / kernel_groups <= 16`` give BLOCK_D = 16). Scalars are compiled as
i32 without Triton's divisible-by-16 specialization (the code odd shapes get).

The compile runs in a fresh interpreter (this file run as a script): tests/conftest.py imports
``triton.language`` under ``TRITON_INTERPRET=1``, and a GPU compile cannot use those interpreted
``tl`` functions. The 152 compiles take ~4.5 min of one core (SNELL's FMA-unrolled dots: 3-17 s
each, 70% of it); they land in Triton's cache (``TRITON_CACHE_DIR``, ~80 MB), and a rerun from
there takes ~15 s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from itertools import cycle, product
from pathlib import Path
from types import ModuleType

import pytest
import torch

from peft_sparse import SnellConfig
from triton_kernels import sddmm, snell_matmul, sparse_matmul, sparse_merge, topk_scan

triton = pytest.importorskip("triton", reason="the AOT compile needs triton (pip install 'peft-sparse[triton]')")


@dataclass(frozen=True)
class Target:
    arch: int  # compute capability, e.g. 90 for sm_90
    shared_memory_limit: int  # bytes of shared memory one block may use (opt-in maximum)


# Per-block shared memory maxima from the CUDA C Programming Guide (compute capabilities table).
TARGETS = {"sm_80": Target(80, 163 * 1024), "sm_90": Target(90, 227 * 1024)}

OPERAND_DTYPES = ("fp32", "bf16", "fp16")
INDEX_DTYPES = ("i32", "i64")
# (gradient-side, input-side) operands of a weight-gradient product: equal, or one 16-bit and one fp32
# under autocast (the output is 16-bit, the input to the layer may be fp32); Conv1D swaps the two.
OPERAND_PAIRS = tuple((a, b) for a, b in product(OPERAND_DTYPES, OPERAND_DTYPES) if a == b or "fp32" in (a, b))


def parameter_dtypes(activation: str) -> tuple[str, ...]:
    """Trainable tensors (delta values, SNELL factors) are fp32, or the model's dtype if it was cast after wrapping."""
    return tuple(dict.fromkeys(("fp32", activation)))


@dataclass
class Launch:
    """One launch configuration: a kernel, the element type of each pointer, its constexprs."""

    module: ModuleType  # the triton_kernels module holding the kernel
    kernel: str  # the lazy_jit-decorated kernel's name
    pointers: dict[str, str]  # pointer argument -> element type ("fp32", "i64", ...)
    constexprs: dict[str, object]
    floats: tuple[str, ...] = ()  # fp32 scalar arguments; the other scalars are i32
    name: str = field(init=False)

    def __post_init__(self) -> None:
        parts = [f"{key}={value}" for key, value in {**self.pointers, **self.constexprs}.items()]
        self.name = f"{self.kernel}[{','.join(parts)}]"


def _scatter_launches() -> list[Launch]:
    # sparse_merge._scatter_triton; scatter_assign (the in-place write of a delta: base values in the
    # weight's dtype) and scatter_add (values passed again as the unused base pointer)
    launches = []
    for weight, indices, accumulate in product(OPERAND_DTYPES, INDEX_DTYPES, (False, True)):
        for values in parameter_dtypes(weight):
            pointers = dict(
                weight_ptr=weight, indices_ptr=indices, base_ptr=values if accumulate else weight, values_ptr=values
            )
            constexprs = dict(ACCUMULATE=accumulate, BLOCK=sparse_merge.BLOCK_ENTRIES)
            launches.append(Launch(sparse_merge, "_scatter_kernel", pointers, constexprs, floats=("scale",)))
    return launches


def _sddmm_launches() -> list[Launch]:
    # sddmm._sddmm_triton: entry rows come from entry_rows() (int64), columns keep the pattern's dtype
    constexprs = dict(BLOCK_ENTRIES=sddmm.BLOCK_ENTRIES, BLOCK_TOKENS=sddmm.BLOCK_TOKENS)
    return [
        Launch(
            sddmm, "_sddmm_kernel",
            dict(left_ptr=left, right_t_ptr=right, entry_rows_ptr="i64", entry_cols_ptr=cols, out_ptr="fp32"),
            constexprs,
        )  # fmt: skip
        for (left, right), cols in product(OPERAND_PAIRS, INDEX_DTYPES)
    ]


def _sparse_matmul_launches() -> list[Launch]:
    # sparse_matmul._sparse_matmul_triton: output and inputs share a dtype (forward: x and x @ S^T;
    # backward: dx and dy); crow and col share the delta indices' dtype (csr_pattern, transpose_csr)
    constexprs = dict(BLOCK_ENTRIES=sparse_matmul.BLOCK_ENTRIES, BLOCK_TOKENS=sparse_matmul.BLOCK_TOKENS)
    launches = []
    for activation, indices in product(OPERAND_DTYPES, INDEX_DTYPES):
        for values in parameter_dtypes(activation):
            pointers = dict(
                output_ptr=activation, inputs_t_ptr=activation, crow_ptr=indices, cols_ptr=indices, values_ptr=values
            )
            launches.append(Launch(sparse_matmul, "_sparse_matmul_kernel", pointers, constexprs))
    return launches


def _scan_launches() -> list[Launch]:
    # topk_scan._scan_triton: pass 1 (COLLECT=False) passes the int32 counter for the unused
    # positions/found pointers; its tl.dot precision rule is restated here (fp32 operand: "ieee")
    launches = []
    for (left, right), collect in product(OPERAND_PAIRS, (False, True)):
        outputs = dict(positions_ptr="i64", found_ptr="fp32") if collect else dict(positions_ptr="i32", found_ptr="i32")
        pointers = dict(left_ptr=left, right_ptr=right, histogram_ptr="i32", counter_ptr="i32", **outputs)
        constexprs = dict(
            COLLECT=collect, BUCKET_SHIFT=topk_scan.BUCKET_SHIFT,
            INPUT_PRECISION="ieee" if "fp32" in (left, right) else "tf32",
            BLOCK_ROWS=topk_scan.BLOCK_ROWS, BLOCK_COLS=topk_scan.BLOCK_COLS, BLOCK_TOKENS=topk_scan.BLOCK_TOKENS,
        )  # fmt: skip
        launches.append(Launch(topk_scan, "_scan_kernel", pointers, constexprs))
    return launches


def _snell_launches() -> list[Launch]:
    # snell_matmul._TritonSnellMatmul at SnellConfig's default groups and width (every width <= 16
    # gives BLOCK_D = 16). A SNELL compile takes 3-20 s, so instead of the full product each
    # constexpr combination is compiled once, with the (activation, factor) dtype cases taken in turn:
    # every combination and every dtype case appear.
    config = SnellConfig()
    groups, width = config.kernel_groups, config.r // config.kernel_groups
    dtype_cases = [(x, factors) for x in OPERAND_DTYPES for factors in parameter_dtypes(x)]

    def constants(kernel: str, magnitude: bool, activations: str) -> dict:
        spec = snell_matmul.KernelSpec(kernel, scale=1.0, magnitude=magnitude)
        native_dot = activations != "fp32"  # what a GPU launch with these activations uses
        return snell_matmul._launch_constants(torch.empty(groups, 0, width), spec, native_dot)

    launches = []
    apply_combinations = list(product((False, True), snell_matmul.KERNELS, (False, True)))
    for (transposed, kernel, magnitude), (x, factors) in zip(apply_combinations, cycle(dtype_cases)):
        pointers = dict(inputs_ptr=x, a_ptr=factors, b_ptr=factors, tau_ptr="fp32", outputs_ptr="fp32")
        constexprs = dict(TRANSPOSED=transposed, **constants(kernel, magnitude, x))
        launches.append(Launch(snell_matmul, "_apply_delta_kernel", pointers, constexprs, floats=("scale", "gamma")))
    grad_combinations = list(product(snell_matmul.KERNELS, (False, True)))
    for (kernel, magnitude), (x, factors) in zip(grad_combinations, cycle(dtype_cases)):
        pointers = dict(
            x_ptr=x, dy_ptr=x, a_ptr=factors, b_ptr=factors, tau_ptr="fp32", da_ptr="fp32", db_ptr="fp32"
        )  # fmt: skip
        constexprs = constants(kernel, magnitude, x)
        launches.append(Launch(snell_matmul, "_grad_factors_kernel", pointers, constexprs, floats=("scale", "gamma")))
    return launches


LAUNCHES = {
    launch.name: launch
    for launch in (
        _scatter_launches() + _sddmm_launches() + _sparse_matmul_launches() + _scan_launches() + _snell_launches()
    )
}
CASES = [(name, target) for name in LAUNCHES for target in TARGETS]


def known_spill(launch: Launch) -> str | None:
    """Why ptxas is known to spill registers for this launch (on some target), or None.

    Both are fp32 "ieee" tl.dot tiles, which run on FMA units and hold whole operand rows per thread.
    Measured with triton 3.9 (ptxas -v "bytes spill stores"); xfail is not strict because the amounts
    move with the ptxas version and a few of these configurations fit on one target.
    """
    if launch.module is snell_matmul:
        # measured: fp32 'ieee' dots 560-4888 bytes; 16-bit activations on tensor cores 0-32 (forward) and
        # 560-5096 (factor-gradient kernel, whose products stay fp32)
        return "SNELL's [64, 64] fp32 tl.dot tiles spill up to ~5 KB/thread (see README: kernel roofline)"
    if launch.kernel == "_scan_kernel" and launch.pointers["left_ptr"] == "fp32":
        return "the 'ieee' scan with an fp32 left operand spills 8-584 bytes/thread"
    return None


# --- the compile, in a fresh interpreter --------------------------------------------------------


def _signature(function, launch: Launch) -> dict[str, str]:
    """Triton's signature of a launch: ``*<type>`` pointers, fp32/i32 scalars, constexprs."""
    signature = {}
    for argument in function.arg_names:
        if argument in launch.constexprs:
            signature[argument] = "constexpr"
        elif argument in launch.pointers:
            signature[argument] = f"*{launch.pointers[argument]}"
        else:
            signature[argument] = "fp32" if argument in launch.floats else "i32"
    return signature


def _cubin_resources(cubin: bytes) -> dict[str, int]:
    """``{"REG": ..., "STACK": ..., "SHARED": ..., "LOCAL": ...}`` of a cubin's kernel, from cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        report = subprocess.run(
            [triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", file.name],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    line = next(line for line in report.splitlines() if "REG:" in line)
    fields = dict(item.split(":", 1) for item in line.split())
    return {key: int(fields[key]) for key in ("REG", "STACK", "SHARED", "LOCAL")}


def compile_all() -> list[dict]:
    """Compile every launch for every target; one result per case, errors captured."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    results = []
    for name, target_name in CASES:
        launch, target = LAUNCHES[name], TARGETS[target_name]
        function = triton.jit(getattr(launch.module, launch.kernel).function)  # lazy_jit keeps the raw function
        source = ASTSource(fn=function, signature=_signature(function, launch), constexprs=launch.constexprs)
        result = {"name": name, "target": target_name}
        start = time.perf_counter()
        try:
            compiled = triton.compile(source, target=GPUTarget("cuda", target.arch, 32))
        except Exception as error:  # any compile failure is the result being tested
            message = f"{type(error).__name__}: {error}"  # source context first, the reason last
            result["error"] = message if len(message) <= 4000 else f"{message[:1000]}\n...\n{message[-3000:]}"
        else:
            ptx = compiled.asm["ptx"]
            result.update(
                error=None,
                ptx_local_accesses=sum(ptx.count(op) for op in ("ld.local", "st.local")),
                shared_memory=compiled.metadata.shared,  # dynamic, requested at launch; the cubin's SHARED is static
                **_cubin_resources(compiled.asm["cubin"]),
            )
        result["seconds"] = round(time.perf_counter() - start, 2)
        results.append(result)
    return results


@pytest.fixture(scope="module")
def compiled() -> dict[tuple[str, str], dict]:
    """All compile results, from one run of this file as a script (without TRITON_INTERPRET)."""
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    root = str(Path(__file__).resolve().parents[1])  # import this checkout's kernels, installed or not
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory() as directory:
        output = Path(directory) / "results.json"
        process = subprocess.run(
            [sys.executable, __file__, str(output)], env=environment, capture_output=True, text=True, timeout=1800
        )
        assert process.returncode == 0, process.stderr[-4000:]
        results = json.loads(output.read_text())
    return {(result["name"], result["target"]): result for result in results}


def _case_params(expected_failure=lambda launch: None) -> list:
    """One pytest param per (launch, target); ``expected_failure(launch)`` gives an xfail reason or None."""
    params = []
    for name, target in CASES:
        reason = expected_failure(LAUNCHES[name])
        marks = [pytest.mark.xfail(reason=reason, strict=False)] if reason else []
        params.append(pytest.param(name, target, id=f"{target}-{name}", marks=marks))
    return params


@pytest.mark.parametrize("name, target", _case_params())
def test_kernel_compiles_for_gpu(compiled, name, target):
    assert compiled[name, target]["error"] is None, compiled[name, target]["error"]


@pytest.mark.parametrize("name, target", _case_params(known_spill))
def test_kernel_uses_no_local_memory(compiled, name, target):
    result = compiled[name, target]
    if result["error"] is not None:
        pytest.skip("the compile failed (test_kernel_compiles_for_gpu)")
    assert result["ptx_local_accesses"] == 0, f"{result['ptx_local_accesses']} ld.local/st.local in the PTX"
    assert result["STACK"] == 0 and result["LOCAL"] == 0, (
        f"{result['STACK']} bytes of stack frame (register spills), {result['LOCAL']} bytes of local memory, "
        f"{result['REG']} registers per thread"
    )


@pytest.mark.parametrize("name, target", _case_params())
def test_kernel_shared_memory_fits_a_block(compiled, name, target):
    result = compiled[name, target]
    if result["error"] is not None:
        pytest.skip("the compile failed (test_kernel_compiles_for_gpu)")
    used, limit = result["shared_memory"] + result["SHARED"], TARGETS[target].shared_memory_limit
    assert used <= limit, f"{used} bytes of shared memory ({result['SHARED']} static) > {limit} on {target}"


if __name__ == "__main__":  # the compile step of the `compiled` fixture: python tests/test_aot_compile.py OUT.json
    Path(sys.argv[1]).write_text(json.dumps(compile_all(), indent=1))
