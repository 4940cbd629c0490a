"""Every row of the README error table: the failure, its exact error, and a base model left unchanged."""

import importlib.metadata
import json
import re
import struct
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils.error import NoMatchingPeftModuleError
from peft.utils.peft_types import PeftType
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from peft_sparse import (
    FORMAT_VERSION,
    LiftConfig,
    RosaConfig,
    S2ftConfig,
    SnellConfig,
    SoraConfig,
    SparseConfig,
    __version__,
    export_to_lora,
)
from peft_sparse.format_version import installed_version
from peft_sparse.sparse.compact_format import expand_tensors
from tests.conftest import make_tied_llama, make_tiny_llama

TARGETS = ["q_proj", "up_proj"]
CONFIGS = {
    "sparse": lambda: SparseConfig(density=0.1, target_modules=TARGETS),
    "lift": lambda: LiftConfig(density=0.1, rank=2, target_modules=TARGETS),
    "sora": lambda: SoraConfig(r=2, target_modules=TARGETS),
    "snell": lambda: SnellConfig(r=4, target_modules=TARGETS),
}
WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """One saved adapter per method, trained on ``make_tiny_llama()``."""
    folders = {}
    for method, make_config in CONFIGS.items():
        folders[method] = tmp_path_factory.mktemp(method)
        get_peft_model(make_tiny_llama(), make_config()).save_pretrained(folders[method])
    return folders


def edited_copy(saved_dir: Path, target: Path, edit_tensors=None, edit_config=None) -> Path:
    """A copy of a saved adapter with its tensors and/or config edited."""
    target.mkdir(parents=True, exist_ok=True)
    config = json.loads((saved_dir / "adapter_config.json").read_text())
    (target / "adapter_config.json").write_text(json.dumps(edit_config(config) if edit_config else config))
    tensors = expand_tensors(load_file(saved_dir / WEIGHTS))  # format 2 index gaps -> indices, to edit them
    save_file(edit_tensors(tensors) if edit_tensors else tensors, target / WEIGHTS)
    return target


def first_key(tensors: dict, suffix: str) -> str:
    return sorted(key for key in tensors if key.endswith(suffix))[0]


def with_indices(change):
    def edit(tensors):
        key = first_key(tensors, "sparse_indices")
        tensors[key] = change(tensors[key].clone())
        return tensors

    return edit


def one_layer_llama() -> LlamaForCausalLM:
    config = make_tiny_llama().config
    config.num_hidden_layers = 1
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


# --- the failing actions: action(tmp_path, saved, track, monkeypatch); track(model) records a base model --------
# whose state the test compares before and after the failure.


def load(model, folder):
    PeftModel.from_pretrained(model, folder)


def forgot_import(tmp_path, saved, track, monkeypatch):
    monkeypatch.delitem(PEFT_TYPE_TO_CONFIG_MAPPING, PeftType.SPARSE)  # as in a process without `import peft_sparse`
    load(track(make_tiny_llama()), saved["sparse"])


def target_not_found(tmp_path, saved, track, monkeypatch):
    get_peft_model(track(make_tiny_llama()), SparseConfig(target_modules=["nope"]))


def unsupported_layer(tmp_path, saved, track, monkeypatch):
    # the q_proj layers come before model.norm: they are swapped first, then put back
    get_peft_model(track(make_tiny_llama()), SparseConfig(target_modules=["q_proj", "norm"]))


def budget_too_large(tmp_path, saved, track, monkeypatch):
    get_peft_model(track(make_tiny_llama()), SparseConfig(num_tunable_weights=10**9, target_modules=TARGETS))


def other_base_shape(method):
    def action(tmp_path, saved, track, monkeypatch):
        load(track(make_tiny_llama(intermediate_size=48)), saved[method])

    return action


def other_base_layers(tmp_path, saved, track, monkeypatch):
    load(track(one_layer_llama()), saved["sparse"])


def missing_tensor(tmp_path, saved, track, monkeypatch):
    def drop(tensors):
        del tensors[first_key(tensors, "sparse_values")]
        return tensors

    load(track(make_tiny_llama()), edited_copy(saved["sparse"], tmp_path / "edited", edit_tensors=drop))


def damaged_file(cut):
    def action(tmp_path, saved, track, monkeypatch):
        folder = edited_copy(saved["sparse"], tmp_path / "damaged")
        (folder / WEIGHTS).write_bytes(cut((folder / WEIGHTS).read_bytes()))
        load(track(make_tiny_llama()), folder)

    return action


def garbled_header(data: bytes) -> bytes:
    header_size = struct.unpack("<Q", data[:8])[0]
    return data[:8] + b"{" + b" " * (header_size - 1) + data[8 + header_size :]


def edited_indices(change):
    def action(tmp_path, saved, track, monkeypatch):
        folder = edited_copy(saved["sparse"], tmp_path / "edited", edit_tensors=with_indices(change))
        load(track(make_tiny_llama()), folder)

    return action


def set_last(indices, value):
    indices[-1] = value
    return indices


def newer_format(tmp_path, saved, track, monkeypatch):
    folder = edited_copy(
        saved["sparse"],
        tmp_path / "future",
        edit_config=lambda config: {**config, "format_version": FORMAT_VERSION + 1, "peft_sparse_version": "9.0.0"},
    )
    load(track(make_tiny_llama()), folder)


def broken_values_merge(tmp_path, saved, track, monkeypatch):
    model = get_peft_model(make_tiny_llama(), SparseConfig(density=0.1, target_modules=TARGETS))
    *_, (_, last_layer) = model.base_model.sparse_delta_layers()  # the earlier layers must not be merged either
    last_layer.delta_values["default"].data[0] = float("nan")
    track(model).merge_and_unload(safe_merge=True)


def tied_merge(tmp_path, saved, track, monkeypatch):
    model = get_peft_model(make_tied_llama(), SparseConfig(density=0.1, target_modules=["q_proj", "lm_head"]))
    track(model).merge_and_unload()


def combine_different_modules(tmp_path, saved, track, monkeypatch):
    model = get_peft_model(make_tiny_llama(), SparseConfig(density=0.1, target_modules=TARGETS), adapter_name="first")
    model.add_adapter("second", SparseConfig(density=0.1, target_modules=["q_proj"]))
    track(model).add_weighted_adapter(["first", "second"], [1.0, 1.0], "both")


def combine_snell(tmp_path, saved, track, monkeypatch):
    model = get_peft_model(make_tiny_llama(), CONFIGS["snell"](), adapter_name="first")
    model.add_adapter("second", CONFIGS["snell"]())
    track(model).add_weighted_adapter(["first", "second"], [1.0, 1.0], "both")


def export_without_rank(tmp_path, saved, track, monkeypatch):
    model = PeftModel.from_pretrained(make_tiny_llama(), saved["sparse"])
    export_to_lora(track(model), tmp_path / "lora")


def bad_config(make_config):
    def action(tmp_path, saved, track, monkeypatch):
        make_config()

    return action


DENSITY_ROWS = {
    "density-out-of-range-sft": (lambda: SparseConfig(density=1.5), r"density must be in (0, 1], got 1.5"),
    "density-out-of-range-lift": (lambda: LiftConfig(density=0), r"density must be in (0, 1], got 0"),
    "sparsity-out-of-range-snell": (lambda: SnellConfig(sparsity=1.0), r"sparsity must be in [0, 1), got 1.0"),
    "rank-out-of-range-sora": (lambda: SoraConfig(r=0), r"r must be a positive integer, got 0"),
}

INDICES_OF_LAYER = r"layer 'base_model\.model\.model\.layers\.0\.mlp\.up_proj': "


def other_base_shape_message(attribute: str, saved_shape: str, model_shape: str) -> str:
    return re.escape(
        f"'model.layers.0.mlp.up_proj.{attribute}': the checkpoint has shape {saved_shape}, this model expects "
        f"{model_shape}; was the adapter trained on another base model or config?"
    )


# (row id as in the README error table, exception type, full message (regex), action)
ROWS = [
    ("forgot-import", KeyError, r"'SPARSE'", forgot_import),
    (
        "target-not-found",
        NoMatchingPeftModuleError,
        r"Target modules \['nope'\] not found in the base model\. Please check the target modules and try again\.",
        target_not_found,
    ),
    (
        "unsupported-layer",
        ValueError,
        r"target module 'model\.norm' is a LlamaRMSNorm; SparseConfig supports torch\.nn\.Linear and transformers "
        r"Conv1D\. Change target_modules to leave it out\.",
        unsupported_layer,
    ),
    (
        "budget-too-large",
        ValueError,
        r"num_tunable_weights must be at most the 6144 entries of the target modules, got 1000000000",
        budget_too_large,
    ),
    (
        "other-base-shape-sft",
        ValueError,
        other_base_shape_message("sparse_indices", "(205,)", "(154,)"),
        other_base_shape("sparse"),
    ),
    (
        "other-base-shape-lift",
        ValueError,
        other_base_shape_message("lift_indices", "(205,)", "(154,)"),
        other_base_shape("lift"),
    ),
    (
        "other-base-shape-sora",
        ValueError,
        other_base_shape_message("sora_B", "(64, 2)", "(48, 2)"),
        other_base_shape("sora"),
    ),
    (
        "other-base-shape-snell",
        ValueError,
        other_base_shape_message("snell_output_factors", "(2, 64, 2)", "(2, 48, 2)"),
        other_base_shape("snell"),
    ),
    (
        "other-base-layers",
        ValueError,
        r"the adapter checkpoint has 4 tensor\(s\) for modules this model does not have, e\.g\. "
        r"'model\.layers\.1\.mlp\.up_proj\.sparse_indices'; was the adapter trained on another base model\?",
        other_base_layers,
    ),
    (
        "missing-tensor",
        ValueError,
        r"the adapter checkpoint has no tensor for 1 adapter weight\(s\) of this model, e\.g\. "
        r"'model\.layers\.0\.mlp\.up_proj\.sparse_values'; was the adapter trained on another base model or with "
        r"other target_modules\?",
        missing_tensor,
    ),
    (
        "truncated-file",
        ValueError,
        r".*adapter_model\.safetensors is not a complete safetensors file \(Error while deserializing header: "
        r"incomplete metadata, file not fully covered\); it was probably truncated or edited: save or download the "
        r"adapter again",
        damaged_file(lambda data: data[:-10]),
    ),
    (
        "garbled-header",
        ValueError,
        r".*adapter_model\.safetensors is not a complete safetensors file \(Error while deserializing header: "
        r"invalid JSON in header: .*\); it was probably truncated or edited: save or download the adapter again",
        damaged_file(garbled_header),
    ),
    (
        "index-out-of-range",
        ValueError,
        INDICES_OF_LAYER + r"indices must be in \[0, 2048\), got range \[\d+, 1000000\]",
        edited_indices(lambda indices: set_last(indices, 10**6)),
    ),
    (
        "indices-unsorted",
        ValueError,
        INDICES_OF_LAYER + r"indices must be sorted ascending without duplicates",
        edited_indices(lambda indices: indices.flip(0)),
    ),
    (
        "indices-dtype",
        ValueError,
        INDICES_OF_LAYER + r"indices must be int32 or int64, got torch\.float32",
        edited_indices(lambda indices: indices.float()),
    ),
    (
        "newer-format",
        ValueError,
        rf"format_version {FORMAT_VERSION + 1} is newer than this peft_sparse {re.escape(__version__)} can read "
        rf"\(up to {FORMAT_VERSION}\); the "
        r"adapter was written by peft_sparse 9\.0\.0: upgrade with `pip install -U peft-sparse`",
        newer_format,
    ),
    (
        "nan-merge",
        ValueError,
        r"NaNs detected in the merged weights\. The adapter default seems to be broken",
        broken_values_merge,
    ),
    (
        "tied-merge",
        ValueError,
        r"module 'lm_head': cannot merge adapter\(s\) \['default'\]: this layer's weight is tied to another module "
        r"\(e\.g\. the input embeddings\), which would change too\. Load the base model with tie_word_embeddings=False "
        r"\(or untie the weights\) before adding the adapter, or use the adapter unmerged",
        tied_merge,
    ),
]
ROWS += [(row_id, ValueError, re.escape(message), bad_config(make)) for row_id, (make, message) in DENSITY_ROWS.items()]
NEW_FEATURE_CONFIG_ROWS = {
    "unknown-selection": (
        lambda: SparseConfig(selection="lt_sft"),
        "selection must be one of ('ag', 'ma', 'random', 'sara', 'hft', 'id3', 'lt-sft'), got 'lt_sft'",
    ),
    "unknown-save-dtype": (
        lambda: SparseConfig(save_dtype="int8"),
        "save_dtype must be None (the values' training dtype) or one of ('bfloat16', 'float16', 'float32'), got 'int8'",
    ),
    "s2ft-target-modules": (
        lambda: S2ftConfig(target_modules=["q_proj"]),
        "target_modules is set by S2ftConfig from attention_output_modules, ffn_output_modules and "
        "ffn_input_modules; leave it None, got ['q_proj']",
    ),
    "rosa-mask-rule": (
        lambda: RosaConfig(mask_rule="random"),
        "mask_rule must be one of ('gradient', 'magnitude'), got 'random'",
    ),
}
ROWS += [
    (row_id, ValueError, re.escape(message), bad_config(make))
    for row_id, (make, message) in NEW_FEATURE_CONFIG_ROWS.items()
]
ROWS += [
    (
        "combine-different-modules",
        ValueError,
        re.escape(
            "adapters 'first' and 'second' adapt different modules (e.g. 'model.layers.0.mlp.up_proj' is in only one "
            "of them); add_weighted_adapter needs adapters with the same target modules"
        ),
        combine_different_modules,
    ),
    ("combine-snell", ValueError, r"add_weighted_adapter cannot combine SNELL adapters: .*", combine_snell),
    (
        "export-rank-or-energy",
        ValueError,
        re.escape("give exactly one of rank or energy, got rank=None, energy=None"),
        export_without_rank,
    ),
]


def state_of(model: torch.nn.Module) -> dict:
    """Everything a failed call must leave alone: module types, parameter bits, requires_grad, peft attributes."""
    return {
        "types": [(name, type(module)) for name, module in model.named_modules()],
        "bits": {
            name: tensor.detach().clone().contiguous().reshape(-1).view(torch.uint8)
            for name, tensor in model.state_dict().items()
        },
        "requires_grad": {name: parameter.requires_grad for name, parameter in model.named_parameters()},
        "peft_config": hasattr(model, "peft_config"),
    }


def assert_same_state(before: dict, after: dict) -> None:
    assert after["types"] == before["types"]
    assert after["bits"].keys() == before["bits"].keys()
    assert all(torch.equal(before["bits"][name], bits) for name, bits in after["bits"].items())
    assert after["requires_grad"] == before["requires_grad"]
    assert after["peft_config"] == before["peft_config"]


@pytest.mark.parametrize("exception, message, action", [row[1:] for row in ROWS], ids=[row[0] for row in ROWS])
def test_error_row(tmp_path, saved, monkeypatch, exception, message, action):
    tracked = []

    def track(model):
        tracked.append((model, state_of(model)))
        return model

    with pytest.raises(exception) as raised:
        action(tmp_path, saved, track, monkeypatch)
    assert re.fullmatch(message, str(raised.value)), str(raised.value)
    for model, before in tracked:
        assert_same_state(before, state_of(model))


def test_error_table_lists_every_row():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    table = readme.split("\n## Errors", 1)[1].split("\n## ", 1)[0]
    documented = re.findall(r"^\| `([a-z0-9-]+)` \|", table, flags=re.MULTILINE)
    assert documented == [row[0] for row in ROWS]


def test_failed_load_of_a_second_adapter_keeps_the_first(saved, tmp_path, input_ids):
    model = PeftModel.from_pretrained(make_tiny_llama(), saved["sparse"])
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
    broken = edited_copy(saved["sparse"], tmp_path / "broken", edit_tensors=with_indices(lambda i: set_last(i, 10**6)))
    with pytest.raises(ValueError, match="indices must be in"):
        model.load_adapter(broken, adapter_name="second")
    assert list(model.peft_config) == ["default"]
    layers = [module for module in model.modules() if hasattr(module, "delta_values")]
    assert layers and all(list(layer.delta_values) == ["default"] for layer in layers)
    with torch.no_grad():
        assert torch.equal(model(input_ids=input_ids).logits, expected)


def test_saving_stamps_this_version_over_the_one_read(saved, tmp_path):
    old = edited_copy(saved["sparse"], tmp_path / "old", edit_config=lambda c: {**c, "peft_sparse_version": "0.0.1"})
    model = PeftModel.from_pretrained(make_tiny_llama(), old)
    assert model.peft_config["default"].peft_sparse_version == "0.0.1"
    model.save_pretrained(tmp_path / "resaved")
    config = json.loads((tmp_path / "resaved" / "adapter_config.json").read_text())
    assert (config["peft_sparse_version"], config["format_version"]) == (__version__, FORMAT_VERSION)
    assert __version__ == importlib.metadata.version("peft-sparse")


def test_version_without_an_installed_distribution_is_marked_unknown():
    assert installed_version("peft-sparse") == importlib.metadata.version("peft-sparse")
    assert installed_version("peft-sparse-never-installed") == "0+unknown"
