"""add_weighted_adapter: every combination_type against a dense reference, round trips, errors, sources unchanged."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model

import peft_sparse
from peft_sparse.sparse.layer import SparseDeltaLayer
from tests.conftest import SPARSE_DELTA_CONFIGS, VOCAB_SIZE, make_tiny_llama, randomize_values

REPO = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "down_proj"]
WEIGHTS = [1.0, -0.5]


def input_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB_SIZE, (2, 12), generator=torch.Generator().manual_seed(3))


def two_adapter_model(kind: str, seed: int = 0) -> PeftModel:
    """A tiny Llama with adapters "first" (density 0.1) and "second" (density 0.2, other seed), random values."""
    make_config = SPARSE_DELTA_CONFIGS[kind]
    model = get_peft_model(make_tiny_llama(seed), make_config(target_modules=TARGETS, init_seed=1), "first")
    second = make_config(target_modules=TARGETS, init_seed=2)
    second.density = 0.2
    model.add_adapter("second", second)
    randomize_values(model)
    return model


def layers_of(model: PeftModel) -> list[SparseDeltaLayer]:
    return [module for module in model.modules() if isinstance(module, SparseDeltaLayer)]


def top_magnitude(delta: torch.Tensor, count: int) -> torch.Tensor:
    """``delta`` with all but its ``count`` largest |entries| zeroed (brute force: a full sort)."""
    order = delta.abs().flatten().argsort(descending=True)
    kept = torch.zeros(delta.numel(), dtype=torch.bool)
    kept[order[:count]] = True
    return torch.where(kept.view(delta.shape), delta, torch.zeros_like(delta))


def pruned_dense_deltas(layer: SparseDeltaLayer, density: float) -> list[torch.Tensor]:
    return [
        top_magnitude(layer.get_delta_weight(name), int(density * layer.num_values(name)))
        for name in ("first", "second")
    ]


def ties_by_hand(deltas: list[torch.Tensor], weights: list[float], frequency: bool = False) -> torch.Tensor:
    """Elect each entry's sign (by summed values, or by counting signs), average the agreeing weighted entries."""
    signs = [delta.sign() for delta in deltas]
    votes = sum(signs) if frequency else sum(deltas)
    majority = torch.where(votes >= 0, 1.0, -1.0)
    agree = [(sign == majority).float() for sign in signs]
    total = sum(w * delta * mask for w, delta, mask in zip(weights, deltas, agree))
    return total / torch.clamp(sum(agree), min=1.0)


@pytest.mark.parametrize("kind", ["sparse", "lift"])
def test_linear_is_the_weighted_sum_on_the_union_of_indices(kind):
    model = two_adapter_model(kind)
    model.add_weighted_adapter(["first", "second"], WEIGHTS, "both", combination_type="linear")
    for layer in layers_of(model):
        expected = WEIGHTS[0] * layer.get_delta_weight("first") + WEIGHTS[1] * layer.get_delta_weight("second")
        torch.testing.assert_close(layer.get_delta_weight("both"), expected, rtol=0, atol=1e-7)
        union = torch.unique(torch.cat([layer.delta_indices["first"], layer.delta_indices["second"]]))
        assert torch.equal(layer.delta_indices["both"].long(), union)
    counts = model.peft_config["both"].values_per_module
    assert counts == {name: layer.num_values("both") for name, layer in model.base_model.sparse_delta_layers()}
    assert len(counts) == 4


@pytest.mark.parametrize("density", [0.3, 0.7])
def test_magnitude_prune_keeps_each_sources_largest_values(density):
    model = two_adapter_model("sparse")
    model.add_weighted_adapter(["first", "second"], WEIGHTS, "both", "magnitude_prune", density=density)
    for layer in layers_of(model):
        pruned = pruned_dense_deltas(layer, density)
        expected = WEIGHTS[0] * pruned[0] + WEIGHTS[1] * pruned[1]
        torch.testing.assert_close(layer.get_delta_weight("both"), expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("majority_sign_method", ["total", "frequency"])
def test_ties_matches_pruning_sign_election_and_disjoint_mean_by_hand(majority_sign_method):
    model = two_adapter_model("sparse")
    model.add_weighted_adapter(["first", "second"], [1.0, 2.0], "both", combination_type="ties", density=0.5,
                               majority_sign_method=majority_sign_method)  # fmt: skip
    for layer in layers_of(model):
        expected = ties_by_hand(pruned_dense_deltas(layer, 0.5), [1.0, 2.0], majority_sign_method == "frequency")
        torch.testing.assert_close(layer.get_delta_weight("both"), expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("combination_type", ["dare_linear", "dare_ties"])
def test_dare_at_density_one_is_the_unpruned_rule_of_peft_on_dense_deltas(combination_type):
    from peft.utils.merge_utils import dare_linear, dare_ties

    model = two_adapter_model("sparse")
    with pytest.warns(UserWarning, match="no pruning"):
        model.add_weighted_adapter(["first", "second"], WEIGHTS, "both", combination_type=combination_type, density=1.0)
    rule = dare_linear if combination_type == "dare_linear" else dare_ties
    for layer in layers_of(model):
        dense = [layer.get_delta_weight("first"), layer.get_delta_weight("second")]
        with pytest.warns(UserWarning, match="no pruning"):
            expected = rule(dense, torch.tensor(WEIGHTS), 1.0)
        torch.testing.assert_close(layer.get_delta_weight("both"), expected, rtol=0, atol=1e-7)


def test_dare_linear_keeps_random_values_rescaled_reproducibly_by_seed():
    model = two_adapter_model("sparse")
    rng_state = torch.random.get_rng_state()
    for name in ("dare", "again"):
        model.add_weighted_adapter(["first", "second"], WEIGHTS, name, "dare_linear", density=0.5, seed=7)
    assert torch.equal(torch.random.get_rng_state(), rng_state)  # the global generator is left alone
    kept = total = 0
    for layer in layers_of(model):
        assert torch.equal(layer.delta_values["dare"], layer.delta_values["again"])
        first, second = (WEIGHTS[i] * layer.get_delta_weight(name) / 0.5 for i, name in enumerate(("first", "second")))
        # every entry is the rescaled weighted sum of a subset of the sources' values
        candidates = torch.stack([torch.zeros_like(first), first, second, first + second])
        gap = (candidates - layer.get_delta_weight("dare")).abs().min(dim=0).values
        assert gap.max() < 1e-6
        kept += int((layer.get_delta_weight("dare") != 0).sum())
        total += int(((first != 0) | (second != 0)).sum())
    assert 0.4 < kept / total < 0.85  # about 1 - (1 - 0.5)^(sources at the entry)


def snapshot(model: PeftModel, adapter_names: list[str]) -> dict:
    state = {key: tensor.clone() for key, tensor in model.state_dict().items() if any(n in key for n in adapter_names)}
    configs = {name: model.peft_config[name].to_dict() for name in adapter_names}
    return {"tensors": state, "configs": configs}


@pytest.mark.parametrize("combination_type", ["linear", "ties", "dare_linear", "magnitude_prune"])
def test_sources_are_left_unchanged(combination_type):
    model = two_adapter_model("sparse")
    model.set_adapter("first")
    before, logits = snapshot(model, ["first", "second"]), model(input_ids()).logits
    density = None if combination_type == "linear" else 0.5
    model.add_weighted_adapter(["first", "second"], WEIGHTS, "both", combination_type=combination_type, density=density)
    after = snapshot(model, ["first", "second"])
    assert before["configs"] == after["configs"]
    assert before["tensors"].keys() == after["tensors"].keys()
    for key, tensor in before["tensors"].items():
        assert torch.equal(tensor, after["tensors"][key]), key
    assert model.active_adapters == ["first"]
    torch.testing.assert_close(model(input_ids()).logits, logits, rtol=0, atol=0)


def test_composed_adapter_trains_only_itself():
    model = two_adapter_model("sparse")
    model.add_weighted_adapter(["first", "second"], WEIGHTS, "both")
    model.set_adapter("both")
    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert trainable and all(name.endswith(".both") for name in trainable)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    model(input_ids(), labels=input_ids()).loss.backward()
    optimizer.step()
    assert all(not torch.equal(before[name], p) for name, p in model.named_parameters() if p.requires_grad)


FRESH_PROCESS_LOAD = """
import sys, torch, peft_sparse
from peft import PeftModel
sys.path.insert(0, {repo!r})
from tests.conftest import VOCAB_SIZE, make_tiny_llama
ids = torch.randint(0, VOCAB_SIZE, (2, 12), generator=torch.Generator().manual_seed(3))
logits = {{}}
for kind in ("sparse", "lift"):
    model = PeftModel.from_pretrained(make_tiny_llama(), f"{folder}/{{kind}}/both", adapter_name="both")
    logits[kind] = model(ids).logits
    logits[f"{{kind}}-merged"] = model.merge_and_unload()(ids).logits
torch.save(logits, "{folder}/logits.pt")
"""


def test_composed_adapters_save_load_in_a_fresh_process_and_merge(tmp_path):
    expected = {}
    for kind in ("sparse", "lift"):
        model = two_adapter_model(kind)
        model.add_weighted_adapter(["first", "second"], WEIGHTS, "both")
        model.set_adapter("both")
        expected[kind] = model(input_ids()).logits
        model.save_pretrained(tmp_path / kind, selected_adapters=["both"])
        assert json.loads((tmp_path / kind / "both" / "adapter_config.json").read_text())["values_per_module"]
    source = FRESH_PROCESS_LOAD.format(repo=str(REPO), folder=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(source)], cwd=REPO, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = torch.load(tmp_path / "logits.pt")
    for kind, logits in expected.items():
        torch.testing.assert_close(loaded[kind], logits, rtol=0, atol=1e-6)
        torch.testing.assert_close(loaded[f"{kind}-merged"], logits, rtol=0, atol=1e-5)


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (dict(adapters=["first", "nope"]), r"adapters: no adapter named \['nope'\]"),
        (dict(adapters="first"), "adapters must be a non-empty list"),
        (dict(adapter_name="second"), "adapter_name 'second' already exists"),
        (dict(weights=[1.0]), r"weights must be a list with one number per adapter \(2\)"),
        (dict(weights=[1.0, float("nan")]), "weights must be finite numbers"),
        (dict(combination_type="svd"),
         r"combination_type must be one of \('linear', 'ties', 'dare_linear', 'dare_ties', 'magnitude_prune'\) for "
         r"SparseConfig adapters, got 'svd'"),
        (dict(combination_type="cat"), "combination_type must be one of"),
        (dict(combination_type="ties"), r"density must be in \(0, 1\] with combination_type='ties', got None"),
        (dict(combination_type="ties", density=0.0), r"density must be in \(0, 1\]"),
        (dict(combination_type="magnitude_prune", density=1.5), r"density must be in \(0, 1\]"),
        (dict(density=0.5), "density is not used by combination_type='linear'"),
        (dict(combination_type="ties", density=0.5, majority_sign_method="mean"),
         r"majority_sign_method must be one of \('total', 'frequency'\)"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(arguments, message):
    model = two_adapter_model("sparse")
    call = dict(adapters=["first", "second"], weights=WEIGHTS, adapter_name="both") | arguments
    with pytest.raises(ValueError, match=message):
        model.add_weighted_adapter(**call)
    assert set(model.peft_config) == {"first", "second"}


def test_adapters_on_different_modules_are_refused():
    model = get_peft_model(make_tiny_llama(), peft_sparse.SparseConfig(density=0.1, target_modules=TARGETS), "first")
    model.add_adapter("second", peft_sparse.SparseConfig(density=0.1, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="adapters 'first' and 'second' adapt different modules"):
        model.add_weighted_adapter(["first", "second"], WEIGHTS, "both")
    assert set(model.peft_config) == {"first", "second"}


def test_modules_to_save_are_refused():
    config = peft_sparse.SparseConfig(density=0.1, target_modules=["q_proj"], modules_to_save=["lm_head"])
    model = get_peft_model(make_tiny_llama(), config, "first")
    model.add_adapter("second", peft_sparse.SparseConfig(density=0.1, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"adapters \['first'\] have modules_to_save"):
        model.add_weighted_adapter(["first", "second"], WEIGHTS, "both")


def test_values_per_module_must_name_every_target_module():
    with pytest.raises(ValueError, match="values_per_module must be None or a dict of module name -> positive integer"):
        peft_sparse.SparseConfig(values_per_module={"q_proj": 0})
    counts = {"model.layers.0.self_attn.q_proj": 5}
    config = peft_sparse.SparseConfig(target_modules=["q_proj"], values_per_module=counts)
    with pytest.raises(ValueError, match="values_per_module has no count for target module 'model.layers.1.self_attn"):
        get_peft_model(make_tiny_llama(), config)


def test_snell_refuses_with_the_reason_and_the_alternatives():
    config = peft_sparse.SnellConfig(r=2, target_modules=["q_proj"])
    model = get_peft_model(make_tiny_llama(), config, "first")
    model.add_adapter("second", peft_sparse.SnellConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="cannot combine SNELL.*no exact combination exists.*merge_and_unload"):
        model.add_weighted_adapter(["first", "second"], WEIGHTS, "both", combination_type="linear")


# --- SoRA: as LoRA, each gate folded into B ----------------------------------------------------


def sora_model(second_rank: int = 2) -> PeftModel:
    def config(r):
        return peft_sparse.SoraConfig(r=r, alpha=2.0 * r, init_weights=False, gate_init="randn", target_modules=TARGETS)

    torch.manual_seed(0)
    model = get_peft_model(make_tiny_llama(), config(4), "first")
    model.add_adapter("second", config(second_rank))
    return model


def sora_layers(model):
    return [layer for _, layer in model.base_model.sora_layers("first")]


@pytest.mark.parametrize(("combination_type", "svd_rank"), [("cat", None), ("svd", 6)])
def test_sora_cat_and_full_rank_svd_are_exact(combination_type, svd_rank):
    model = sora_model()
    model.add_weighted_adapter(["first", "second"], WEIGHTS, "both", combination_type, svd_rank=svd_rank)
    assert model.peft_config["both"].r == 6 and model.peft_config["both"].alpha == 6.0
    for layer in sora_layers(model):
        expected = WEIGHTS[0] * layer.get_delta_weight("first") + WEIGHTS[1] * layer.get_delta_weight("second")
        torch.testing.assert_close(layer.get_delta_weight("both"), expected, rtol=0, atol=1e-5)
        assert torch.equal(layer.sora_gate["both"], torch.ones(6))


def test_sora_linear_mixes_gated_factors_as_lora_does():
    model = sora_model(second_rank=4)
    model.add_weighted_adapter(["first", "second"], WEIGHTS, "both", combination_type="linear")
    for layer in sora_layers(model):
        scaled = [WEIGHTS[i] * layer.scaling[name] for i, name in enumerate(("first", "second"))]
        a = sum((abs(x) ** 0.5) * (1 if x >= 0 else -1) * layer.sora_A[n] for x, n in zip(scaled, ("first", "second")))
        b = sum(abs(x) ** 0.5 * layer.sora_B[n] * layer.sora_gate[n] for x, n in zip(scaled, ("first", "second")))
        torch.testing.assert_close(layer.get_delta_weight("both"), (b @ a).detach(), rtol=0, atol=1e-5)


def test_sora_errors_name_the_argument():
    model = sora_model()
    with pytest.raises(ValueError, match=r"combination_type='linear' needs adapters of equal rank r, got ranks \[4, 2"):
        model.add_weighted_adapter(["first", "second"], WEIGHTS, "both", combination_type="linear")
    with pytest.raises(ValueError, match="combination_type must be one of .*'cat'.* for SoraConfig adapters, got 'su"):
        model.add_weighted_adapter(["first", "second"], WEIGHTS, "both", combination_type="sum")
    with pytest.raises(ValueError, match="svd_rank is only used with combination_type in"):
        model.add_weighted_adapter(["first", "second"], WEIGHTS, "both", combination_type="cat", svd_rank=3)
    assert set(model.peft_config) == {"first", "second"}


# --- the example -----------------------------------------------------------------------------


def test_compose_example_runs_end_to_end_on_a_tiny_model(tmp_path):
    sys.path.insert(0, str(REPO / "examples"))
    import compose_sparse
    from tests.test_examples import save_tiny_chat_model

    model_dir = save_tiny_chat_model(tmp_path / "tiny")
    results_file = tmp_path / "compose.json"
    results = compose_sparse.main([
        "--model", str(model_dir), "--steps", "2", "--batch-size", "2", "--eval-problems", "2", "--lora-rank", "2",
        "--output-dir", str(tmp_path / "out"), "--results", str(results_file),
    ])  # fmt: skip
    assert json.loads(results_file.read_text())["methods"].keys() == results["methods"].keys()
    sparse, lora = results["methods"]["SFT (SparseConfig)"], results["methods"]["LoRA r=2"]
    assert sparse["trainable_per_adapter"] == lora["trainable_per_adapter"]
    assert set(sparse["scores"]) == {"arithmetic", "capitals", "both-linear"}
    assert set(lora["scores"]) == {"arithmetic", "capitals", "both-cat", "both-linear"}
