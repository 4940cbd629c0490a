"""Hub upload (offline: the upload calls are replaced) and the model card."""

import json
import runpy
import shutil
import sys
from pathlib import Path

import pytest
import torch
import transformers.utils.hub
from huggingface_hub import HfApi, ModelCard, ModelCardData, RepoUrl
from peft import AutoPeftModelForCausalLM, get_peft_model
from transformers import LlamaForCausalLM

import peft_sparse.hub
from peft_sparse import FORMAT_VERSION, SoraConfig, SparseConfig, __version__
from peft_sparse.model_card import SECTION_START, write_model_card
from tests.conftest import make_tiny_llama, randomize_values

TARGETS = ["q_proj", "up_proj"]
LOG_HISTORY = [
    {"loss": 2.0, "step": 10, "sparse/churn": 0.2, "sparse/density": 0.1},
    {"loss": 1.5, "step": 20, "sparse/churn": 0.1, "sora/live_rank/model.layers.0.mlp.up_proj": 2},
    {"train_loss": 1.75, "train_runtime": 12.5, "step": 20},
]


@pytest.fixture
def base_dir(tmp_path) -> Path:
    make_tiny_llama().save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def sparse_model(base_dir: Path):
    base = LlamaForCausalLM.from_pretrained(base_dir).eval()  # records base_model_name_or_path
    model = get_peft_model(base, SparseConfig(density=0.1, target_modules=TARGETS, task_type="CAUSAL_LM"))
    randomize_values(model)
    return model


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """HfApi's network calls replaced: uploads land in ``tmp_path / "remote"``; returns the call log."""
    calls = []
    remote = tmp_path / "remote"

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        calls.append(("upload_folder", repo_id, kwargs))
        shutil.copytree(folder_path, remote)
        return "commit-info"

    def create_commit(self, repo_id, operations, **kwargs):  # the route of transformers' PushToHubMixin
        calls.append(("create_commit", repo_id, kwargs))
        remote.mkdir()
        for operation in operations:
            shutil.copy(operation.path_or_fileobj, remote / operation.path_in_repo)
        return "commit-info"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    return calls


def logits_of(model, input_ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def test_push_to_hub_uploads_adapter_and_model_card(tmp_path, base_dir, offline_hub, input_ids):
    model = sparse_model(base_dir)
    expected = logits_of(model, input_ids)
    result = peft_sparse.hub.push_to_hub(
        model, "me/tiny-sft", private=True, log_history=LOG_HISTORY, training_metrics={"eval_exact_match": 0.5}
    )

    assert result == "commit-info"
    assert [call[:2] for call in offline_hub] == [("create_repo", "me/tiny-sft"), ("upload_folder", "me/tiny-sft")]
    assert offline_hub[0][2]["private"] is True
    remote = tmp_path / "remote"
    files = sorted(path.name for path in remote.iterdir())
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    saved_config = json.loads((remote / "adapter_config.json").read_text())
    assert (saved_config["peft_type"], saved_config["format_version"]) == ("SPARSE", FORMAT_VERSION)
    assert saved_config["peft_sparse_version"] == __version__

    card = ModelCard.load(remote / "README.md")
    assert card.data.library_name == "peft"
    assert {"peft-sparse", "sparse"} <= set(card.data.tags)
    # peft records the local base folder; the Hub accepts only model ids there
    assert card.data.base_model is None and not any(str(base_dir) in tag for tag in card.data.tags)
    lines = card.text.splitlines()
    for line in [
        "| method | SPARSE (`SparseConfig`) |",
        "| budget | density 0.1 of each target matrix; selection 'ag' |",
        "| trainable values | 614 in 4 matrices |",
        "| density | 9.99% |",
        "| target modules | q_proj, up_proj |",
        f"| base model | {base_dir} |",
        f"| written by | peft_sparse {__version__} (adapter format {FORMAT_VERSION}) |",
        'model = AutoPeftModelForCausalLM.from_pretrained("me/tiny-sft")',
        "| loss | 1.5 |",
        "| sparse/churn | 0.1 |",
        "| train_loss | 1.75 |",
        "| eval_exact_match | 0.5 |",
    ]:
        assert line in lines, line
    assert not any("sora/live_rank/" in line for line in lines)  # per-layer log entries stay out of the card

    reloaded = AutoPeftModelForCausalLM.from_pretrained(remote).eval()
    torch.testing.assert_close(logits_of(reloaded, input_ids), expected, rtol=0, atol=1e-5)


def test_stock_push_to_hub_uploads_our_adapter_with_the_hub_card(
    tmp_path, base_dir, offline_hub, monkeypatch, input_ids
):
    # transformers' push_to_hub saves, then overwrites README.md with the card it found on the Hub
    hub_card = ModelCard.from_template(ModelCardData(), model_description="card already on the Hub")
    monkeypatch.setattr(transformers.utils.hub, "create_and_tag_model_card", lambda *args, **kwargs: hub_card)
    model = sparse_model(base_dir)
    expected = logits_of(model, input_ids)
    model.push_to_hub("me/tiny-sft")

    remote = tmp_path / "remote"
    assert [call[0] for call in offline_hub] == ["create_repo", "create_commit"]
    assert json.loads((remote / "adapter_config.json").read_text())["peft_type"] == "SPARSE"
    card_text = (remote / "README.md").read_text()
    assert "card already on the Hub" in card_text and SECTION_START not in card_text
    reloaded = AutoPeftModelForCausalLM.from_pretrained(remote).eval()
    torch.testing.assert_close(logits_of(reloaded, input_ids), expected, rtol=0, atol=1e-5)


def test_model_card_section_is_replaced_and_other_text_kept(tmp_path):
    model = get_peft_model(make_tiny_llama(), SoraConfig(r=2, target_modules=TARGETS))
    with torch.no_grad():
        model.base_model.gates()[0][0] = 0.0
    model.save_pretrained(tmp_path)
    card_path = tmp_path / "README.md"
    card_path.write_text("---\nlicense: mit\n---\n# My adapter\n\nWritten by hand.\n\n## Training results\n\nfine\n")
    write_model_card(model, tmp_path, training_metrics={"eval_loss": 3.0})
    write_model_card(model, tmp_path, training_metrics={"eval_loss": 2.0})

    card = ModelCard.load(card_path)
    text = card.text
    assert text.count(SECTION_START) == 1
    assert "Written by hand." in text and "## Training results\n\nfine" in text
    assert text.index("# My adapter") < text.index(SECTION_START) < text.index("## Training results")
    assert "| eval_loss | 2 |" in text.splitlines() and "| eval_loss | 3 |" not in text.splitlines()
    assert "| budget | rank 2 per layer, gated; live rank 7 of 8 over all layers |" in text.splitlines()
    assert card.data.license == "mit" and {"peft-sparse", "sora"} <= set(card.data.tags)


def test_push_example_dry_run_prints_the_card(tmp_path, base_dir, monkeypatch, capsys):
    example = Path(__file__).parents[1] / "examples" / "push_to_hub.py"
    out = tmp_path / "upload"
    argv = [str(example), "me/tiny-sft", "--model", str(base_dir), "--dry-run", "--output-dir", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(example), run_name="__main__")
    printed = capsys.readouterr().out
    assert "would upload ['README.md', 'adapter_config.json', 'adapter_model.safetensors'] to me/tiny-sft" in printed
    assert "| method | SPARSE (`SparseConfig`) |" in printed
    assert printed.endswith((out / "README.md").read_text() + "\n")
