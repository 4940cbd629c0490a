"""The GPU suite's roofline model and its CPU behaviour (``--dry-run`` works, a real run refuses)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_suite  # noqa: E402


def test_device_peaks_are_found_by_the_cuda_device_name():
    assert gpu_suite.device_peaks("NVIDIA H100 80GB HBM3").hbm_gbs == 3350
    assert gpu_suite.device_peaks("NVIDIA A100-SXM4-80GB").bf16_tflops == 312


def test_an_unknown_device_names_the_known_ones():
    with pytest.raises(ValueError, match=r"device_name must contain one of \['H200', 'H100', 'A100'\].*'Tesla T4'"):
        gpu_suite.device_peaks("Tesla T4")


def test_sddmm_roofline_at_a_7b_shape():
    costs = {cost.kernel: cost for cost in gpu_suite.kernel_costs((4096, 4096), density=0.01, tokens=4096)}
    k = round(0.01 * 4096 * 4096)
    per_entry, dense = costs["sddmm (per entry)"], costs["dense dY^T X + gather"]
    assert per_entry.flops == 2 * k * 4096
    assert per_entry.bytes_moved == 4096 * 8192 * 2 + k * 12  # dY and X in bf16 once, two int32 indices + fp32 out
    h100 = gpu_suite.DEVICE_PEAKS["H100"]
    assert dense.roofline_us(h100)[2] == pytest.approx(2 * 4096**3 / 989e12 * 1e6)  # tensor-core bound: 139 µs
    assert per_entry.roofline_us(h100)[2] < dense.roofline_us(h100)[2]


def test_dry_run_prints_the_plan_and_the_roofline_table(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["gpu_suite.py", "--dry-run", "--device-name", "H100"])
    gpu_suite.main()
    printed = capsys.readouterr().out
    assert "3350 GB/s" in printed
    assert "| sddmm (per entry) | 4096x4096 | 69.1 | 1.37 | fp32 CUDA cores | 20.6 | 20.5 | 20.6 |" in printed
    assert all(f"| {name} | 4096x11008 |" in printed for name in ("sparse_merge scatter", "snell_matmul forward"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_the_suite_refuses_with_a_message(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["gpu_suite.py"])
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        gpu_suite.main()


def test_peak_flags_override_the_table_for_an_unknown_device(monkeypatch, capsys):
    argv = ["gpu_suite.py", "--dry-run", "--device-name", "Tesla T4", "--peak-gbs", "300", "--peak-tflops", "65"]
    monkeypatch.setattr(sys, "argv", argv)
    gpu_suite.main()
    assert "GPU suite plan (Tesla T4: 300 GB/s, 65 TFLOPs bf16 dense" in capsys.readouterr().out


def test_every_benchmarked_kernel_has_a_roofline_row():
    names = {cost.kernel for cost in gpu_suite.kernel_costs((4096, 11008))}
    assert set(gpu_suite.BENCH_KERNEL_COSTS.values()) <= names
    assert set(gpu_suite.BENCH_KERNEL_COSTS) == {"merge", "sddmm", "matmul", "scan"}  # bench_kernels' ops
