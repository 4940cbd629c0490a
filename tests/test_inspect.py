"""`python -m peft_sparse inspect` and peft_sparse.plot on tiny saved adapters."""

import json
import runpy
import struct
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub.errors import OfflineModeIsEnabled
from huggingface_hub.utils import SafetensorsFileMetadata, SafetensorsRepoMetadata, TensorInfo
from peft import get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import TrainerState

from peft_sparse import LiftConfig, SnellConfig, SoraConfig, SparseConfig
from peft_sparse.cli import main
from peft_sparse.sparse.compact_format import expand_tensors
from peft_sparse.summary import AdapterSummary, budget_text, module_order_key
from peft_sparse.training_log import load_log_history
from tests.conftest import make_tiny_llama

TARGETS = ["q_proj", "up_proj"]
UP_PROJ = "model.layers.0.mlp.up_proj"


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """A tiny base model folder and one saved adapter per layout (sparse delta, SoRA with dead ranks, SNELL)."""
    root = tmp_path_factory.mktemp("inspect")
    make_tiny_llama().save_pretrained(root / "base")
    get_peft_model(make_tiny_llama(), SparseConfig(density=0.1, target_modules=TARGETS)).save_pretrained(root / "sft")
    sora = get_peft_model(make_tiny_llama(), SoraConfig(r=4, target_modules=TARGETS))
    with torch.no_grad():
        for gate in sora.base_model.gates():
            gate[:3] = 0.0  # live rank 1 everywhere
    sora.save_pretrained(root / "sora")
    snell = get_peft_model(make_tiny_llama(), SnellConfig(r=4, sparsity=0.75, target_modules=TARGETS))
    snell.save_pretrained(root / "snell")
    return {name: root / name for name in ("base", "sft", "sora", "snell")}


def run_inspect(capsys, *args: str) -> list[str]:
    assert main(["inspect", *map(str, args)]) == 0
    return capsys.readouterr().out.splitlines()


def row(lines: list[str], layer: str) -> list[str]:
    line = next(line for line in lines if line.startswith(f"| {layer} "))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_inspect_sparse_adapter_with_base_model_gives_density(capsys, saved):
    lines = run_inspect(capsys, saved["sft"], "--base-model", saved["base"])
    saved_tensors = expand_tensors(load_file(saved["sft"] / "adapter_model.safetensors"))
    indices = saved_tensors[f"base_model.model.{UP_PROJ}.sparse_indices"]
    assert "method: SPARSE (`SparseConfig`)" in lines
    assert "trainable values: 614 in 4 matrices" in lines
    assert "density: 9.99%" in lines
    assert row(lines, "layer") == ["layer", "shape", "values (k)", "density", "index range"]
    assert row(lines, UP_PROJ) == [UP_PROJ, "64x32", "205", "10%", f"{int(indices.min())}..{int(indices.max())}"]
    assert len([line for line in lines if line.startswith("| model.layers.")]) == 4


def test_inspect_sparse_adapter_alone_reads_the_density_from_its_config(capsys, saved):
    lines = run_inspect(capsys, saved["sft"])
    assert "density: 10% of each target matrix (from adapter_config.json)" in lines
    assert not any("pass --base-model" in line for line in lines)
    assert row(lines, UP_PROJ)[1:4] == ["?", "205", "?"]  # per-layer shapes still need the base model


def test_inspect_sparse_adapter_with_a_count_budget_alone_says_what_is_unknown(capsys, tmp_path):
    get_peft_model(make_tiny_llama(), SparseConfig(num_tunable_weights=300, target_modules=TARGETS)).save_pretrained(
        tmp_path / "count"
    )
    lines = run_inspect(capsys, tmp_path / "count")
    assert "density: ?" in lines
    assert "(density needs the base weight shapes: pass --base-model PATH)" in lines


def test_layers_are_listed_in_the_models_numeric_order():
    names = ["model.layers.10.mlp.up_proj", "model.layers.2.mlp.up_proj", "model.layers.1.self_attn.q_proj",
             "model.layers.2.self_attn.q_proj"]
    assert sorted(names, key=module_order_key) == [
        "model.layers.1.self_attn.q_proj", "model.layers.2.mlp.up_proj", "model.layers.2.self_attn.q_proj",
        "model.layers.10.mlp.up_proj",
    ]  # fmt: skip


def test_plot_grid_is_blocks_by_module_types(saved):
    from peft_sparse.plot import layer_grid
    from peft_sparse.summary import summarize_adapter

    rows, columns, grid, label = layer_grid(summarize_adapter(saved["sora"]))
    assert rows == ["model.layers.0", "model.layers.1"]
    assert columns == ["mlp.up_proj", "self_attn.q_proj"]
    assert grid == [[1, 1], [1, 1]] and label == "live rank"


def test_inspect_sora_adapter_shows_live_rank(capsys, saved):
    lines = run_inspect(capsys, saved["sora"])
    assert "budget: rank 4 per layer, gated; live rank 4 of 16 over all layers" in lines
    assert row(lines, "layer") == ["layer", "shape", "rank", "live rank", "trainable"]
    assert row(lines, UP_PROJ) == [UP_PROJ, "64x32", "4", "1", f"{4 * 32 + 64 * 4 + 4}"]


def test_inspect_snell_adapter_shows_kept_entries(capsys, saved):
    lines = run_inspect(capsys, saved["snell"])
    assert "budget: rank 4, kernel 'distance_diff', sparsity 0.75" in lines
    assert row(lines, UP_PROJ) == [UP_PROJ, "64x32", "4", f"{2 * (32 + 64) * 2}", "512", "25%"]


def hub_metadata_of(folder: Path) -> SafetensorsRepoMetadata:
    """What ``get_safetensors_metadata`` returns for a Hub repo holding ``folder``'s model.safetensors."""
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        tensors = {key: TensorInfo("F32", handle.get_slice(key).get_shape(), (0, 0)) for key in handle.keys()}
    files = {"model.safetensors": SafetensorsFileMetadata(metadata={}, tensors=tensors)}
    return SafetensorsRepoMetadata(None, False, dict.fromkeys(tensors, "model.safetensors"), files)


def test_inspect_reads_the_base_models_shapes_from_a_hub_id(capsys, saved, monkeypatch):
    asked = []

    def metadata(repo_id):
        asked.append(repo_id)
        return hub_metadata_of(saved["base"])

    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", metadata)
    from_hub = run_inspect(capsys, saved["sft"], "--base-model", "someone/tiny-llama")
    assert asked == ["someone/tiny-llama"]
    assert from_hub == run_inspect(capsys, saved["sft"], "--base-model", saved["base"])
    assert "density: 9.99%" in from_hub


def test_inspect_with_an_unreachable_hub_id_exits_2_with_message(capsys, saved, monkeypatch):
    def offline(repo_id):
        raise OfflineModeIsEnabled("Cannot reach https://huggingface.co: offline mode is enabled.")

    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", offline)
    assert main(["inspect", str(saved["sft"]), "--base-model", "someone/tiny-llama"]) == 2
    assert capsys.readouterr().err == (
        "error: base_model must be a local folder or a Hub model id with *.safetensors weights, got "
        "'someone/tiny-llama' (OfflineModeIsEnabled: Cannot reach https://huggingface.co: offline mode is enabled.)\n"
    )


def test_inspect_bad_folder_exits_2_with_message(capsys, tmp_path):
    assert main(["inspect", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: Can't find 'adapter_config.json' at '{tmp_path}'\n"


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_plot_from_adapter_and_checkpoint_log_history(tmp_path, saved):
    pytest.importorskip("matplotlib")
    from peft_sparse.plot import plot_adapter

    checkpoint = tmp_path / "checkpoint-40"
    checkpoint.mkdir()
    for path in saved["sft"].iterdir():
        (checkpoint / path.name).write_bytes(path.read_bytes())
    history = [{"step": step, "loss": 2 / step} for step in range(1, 41)]
    history += [{"step": step, "sparse/churn": 0.2 * (1 - step / 40)} for step in (10, 20, 30)]
    (checkpoint / "trainer_state.json").write_text(json.dumps({"log_history": history}))

    bars_only = plot_adapter(tmp_path / "bars.png", adapter_dir=saved["sft"])
    with_churn = plot_adapter(tmp_path / "churn.png", adapter_dir=checkpoint)
    assert png_size(bars_only)[0] == 700 and png_size(with_churn)[0] == 1400  # one panel, then bars + churn
    assert with_churn.stat().st_size > 10_000


def test_log_history_is_read_from_the_trainers_state_file_or_its_folder(tmp_path):
    state = TrainerState(global_step=2, log_history=[{"loss": 1.0, "step": 1}, {"sparse/churn": 0.1, "step": 2}])
    state.save_to_json(str(tmp_path / "trainer_state.json"))
    assert load_log_history(tmp_path) == load_log_history(tmp_path / "trainer_state.json") == state.log_history
    with pytest.raises(ValueError, match="log_history must be a list, a trainer_state.json file or a folder"):
        load_log_history(tmp_path / "missing")


def test_plot_needs_something_to_draw(tmp_path):
    pytest.importorskip("matplotlib")
    from peft_sparse.plot import plot_adapter

    with pytest.raises(ValueError, match=r"nothing to plot: give adapter_dir, or a log_history with any of"):
        plot_adapter(tmp_path / "empty.png", log_history=[{"step": 1, "loss": 1.0}])


def test_module_entry_point_writes_the_plot(tmp_path, saved, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "sora.png"
    monkeypatch.setattr(sys, "argv", ["peft_sparse", "inspect", str(saved["sora"]), "--plot", str(out)])
    with pytest.raises(SystemExit) as exited:
        runpy.run_module("peft_sparse", run_name="__main__")  # what `python -m peft_sparse` runs
    assert exited.value.code == 0
    assert f"plot written to {out}" in capsys.readouterr().out
    assert png_size(out)[0] == 700


@pytest.mark.parametrize(
    "config, expected",
    [
        (SparseConfig(num_tunable_weights=500), "500 weights over all target matrices; selection 'ag'"),
        (
            LiftConfig(lora_rank_budget=8, rank=4),
            "as many weights per matrix as LoRA rank 8; principal weights of the rank-4 approximation",
        ),
        (
            SnellConfig(allocation="snella", target_sparsity=0.95),
            "rank 32, kernel 'distance_diff', sparsity 0.9 -> 0.95 on average (SNELLA)",
        ),
    ],
    ids=["sft-count", "lift-lora-budget", "snella"],
)
def test_budget_text_of_other_budgets(config, expected):
    assert budget_text(AdapterSummary(config, layers=[])) == expected
