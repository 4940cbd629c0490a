"""SNELL / SNELLA: config, kernels, threshold, memory-lean gradients, Triton kernels, peft round trips, budgets."""

import math
import re

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import Trainer, TrainingArguments

from peft_sparse import SnellConfig
from peft_sparse.tuners.snell import SnellLinear
from peft_sparse.tuners.snell.allocation import ImportanceTracker, allocate_budget, scheduled_budget
from peft_sparse.tuners.snell.threshold import keep_threshold, split_point
from tests.conftest import VOCAB_SIZE, make_tiny_gpt2, make_tiny_llama
from trl_callbacks import SnellAllocationCallback
from triton_kernels.snell_matmul import (
    KERNELS,
    KernelSpec,
    kernel_entries,
    kernel_matrix,
    snell_delta_matmul,
    snell_delta_matmul_reference,
    snell_delta_matmul_triton,
    snell_factor_grads,
    snell_factor_grads_reference,
)
from triton_kernels._dispatch import use_triton


def random_factors(groups, num_in, num_out, width, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(groups, num_in, width, generator=generator, dtype=dtype)
    b = torch.randn(groups, num_out, width, generator=generator, dtype=dtype)
    return a, b


def dense_reference(x, a, b, threshold, spec):
    """SNELL as the paper's design computes it: cdist kernel, mask, autograd keeps everything."""
    kernel = 0
    for group in range(a.shape[0]):
        if spec.name == "linear":
            values, sign = b[group] @ a[group].T, 1
        else:
            distance = torch.cdist(b[group], a[group])
            values = distance if spec.name == "distance_diff" else torch.exp(-spec.gamma * distance**2)
            sign = (-1) ** group
        kernel = kernel + sign * spec.scale * values
    magnitude = kernel.detach().abs()
    delta = torch.where(magnitude >= threshold, kernel * magnitude if spec.magnitude else kernel, 0.0)
    return x @ delta.T


def threshold_between_entries(a, b, spec, num_kept):
    """A threshold half-way between two neighbouring |K| values, so no entry sits on it."""
    ordered = kernel_matrix(a, b, spec).abs().flatten().sort(descending=True).values
    return (ordered[num_kept - 1] + ordered[num_kept]) / 2


# --- config --------------------------------------------------------------------------------------

BAD_VALUES = [
    ("r", 0), ("r", 2.0), ("kernel_groups", 0), ("kernel", "cosine"), ("kernel_scale", 0.0), ("rbf_gamma", -1.0),
    ("sparsity", 1.0), ("sparsity", -0.1), ("sparsity", "0.5"), ("dropout", 1.0), ("magnitude_competition", 1),
    ("delta_in_place", "yes"),
    ("init_weights", None), ("threshold_sample_size", 0), ("target_modules", 5), ("exclude_modules", 7),
    ("allocation", "adalora"),
]  # fmt: skip


@pytest.mark.parametrize("field, value", BAD_VALUES)
def test_bad_value_raises_value_error_naming_the_field_and_the_value(field, value):
    with pytest.raises(ValueError, match=rf"^{field} .*got {re.escape(repr(value))}( \(a \w+\))?$"):
        SnellConfig(**{field: value})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(r=30, kernel_groups=4), r"r must be a multiple of kernel_groups \(4\), got 30"),
        (dict(r=33, kernel_groups=3), r"kernel_groups must be even for kernel='distance_diff' \(groups come in"),
        (dict(magnitude_competition=True), "magnitude_competition=True needs init_weights=False"),
        (dict(target_sparsity=0.9), "target_sparsity needs allocation='snella'"),
        (dict(allocation="snella"), "target_sparsity must be set when allocation='snella', got None"),
        (dict(allocation="snella", target_sparsity=1.5), r"target_sparsity must be in \[0, 1\), got 1.5"),
        (dict(allocation="snella", target_sparsity=0.9, allocation_interval=0), "allocation_interval must be a pos"),
        (dict(allocation="snella", target_sparsity=0.9, importance_beta=1.0), r"importance_beta must be in \(0, 1\)"),
    ],
)
def test_inconsistent_settings_are_rejected_at_config_time(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SnellConfig(**kwargs)


def test_valid_configs_construct():
    assert SnellConfig(kernel="linear", kernel_groups=1, r=3).kernel_groups == 1
    config = SnellConfig(allocation="snella", target_sparsity=0.95, init_weights=False, magnitude_competition=True)
    assert config.peft_type == "SNELL"


# --- kernels ------------------------------------------------------------------------------------


def test_kernels_match_hand_computed_values():
    a = torch.tensor([[[0.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [2.0, 2.0]]])  # [H=2, in=2, d=2]
    b = torch.tensor([[[3.0, 4.0]], [[0.0, 1.0]]])  # [H=2, out=1, d=2]
    # group 0: ||(0,0)-(3,4)|| = 5, ||(1,0)-(3,4)|| = sqrt(20); group 1: 0 and sqrt(5)
    expected_distance = [[0.1 * 5 - 0.1 * 0, 0.1 * math.sqrt(20) - 0.1 * math.sqrt(5)]]
    expected_rbf = [[0.5 * (math.exp(-0.5 * 25) - 1), 0.5 * (math.exp(-0.5 * 20) - math.exp(-0.5 * 5))]]
    expected_linear = [[2.0 * (0 + 1), 2.0 * (3 + 2)]]  # <a_i^0, b^0> + <a_i^1, b^1>
    cases = {
        "distance_diff": (KernelSpec("distance_diff", 0.1), expected_distance),
        "rbf": (KernelSpec("rbf", 0.5, gamma=0.5), expected_rbf),
        "linear": (KernelSpec("linear", 2.0), expected_linear),
    }
    for spec, expected in cases.values():
        torch.testing.assert_close(kernel_matrix(a, b, spec), torch.tensor(expected), rtol=1e-6, atol=1e-6)
        entries = kernel_entries(a, b, torch.tensor([0, 0]), torch.tensor([0, 1]), spec)
        torch.testing.assert_close(entries, torch.tensor(expected[0]), rtol=1e-6, atol=1e-6)


def test_linear_kernel_at_sparsity_zero_is_a_lora_delta(input_ids):
    snell = get_peft_model(
        make_tiny_llama(), SnellConfig(r=4, kernel="linear", kernel_scale=0.5, sparsity=0.0, init_weights=False)
    )
    lora = get_peft_model(make_tiny_llama(), LoraConfig(r=4, lora_alpha=2, target_modules="all-linear"))  # 2/4
    with torch.no_grad():
        for name, module in snell.base_model.model.named_modules():
            if isinstance(module, SnellLinear):
                a, b = module.snell_input_factors["default"], module.snell_output_factors["default"]
                lora_layer = lora.base_model.model.get_submodule(name)
                # concatenate the groups: A_cat [in, r], B_cat [out, r]; LoRA's A is [r, in], B is [out, r]
                lora_layer.lora_A["default"].weight.copy_(a.permute(1, 0, 2).reshape(a.shape[1], 4).T)
                lora_layer.lora_B["default"].weight.copy_(b.permute(1, 0, 2).reshape(b.shape[1], 4))
                torch.testing.assert_close(module.get_delta_weight("default"), lora_layer.get_delta_weight("default"))
    torch.testing.assert_close(snell(input_ids).logits, lora(input_ids).logits, rtol=1e-5, atol=1e-5)


# --- threshold -----------------------------------------------------------------------------------


def test_exact_threshold_keeps_the_requested_count():
    a, b = random_factors(2, 53, 37, 2, dtype=torch.float32)
    spec = KernelSpec("distance_diff", 0.1)
    for sparsity in (0.0, 0.5, 0.9, 0.999):
        num_kept = 37 * 53 - round(sparsity * 37 * 53)
        tau = keep_threshold(a, b, spec, num_kept, sample_size=None)
        assert int((kernel_matrix(a, b, spec).abs() >= tau).sum()) == num_kept, sparsity


def test_split_point_works_above_the_torch_quantile_limit():
    values = torch.rand(4096 * 11008, generator=torch.Generator().manual_seed(0))  # 45M > 2^24 entries
    num_kept = round(0.1 * values.numel())
    assert abs(int((values >= split_point(values, num_kept)).sum()) - num_kept) <= 1  # +-1: ties in rand()


def test_split_point_keeps_every_tie():
    assert float(split_point(torch.tensor([0.0, 1.0, 1.0, 2.0]), 2)) == 0.5  # both 1.0s kept
    assert float(split_point(torch.zeros(5), 2)) == 0.0  # the all-zero initial delta keeps everything


def test_sampled_threshold_is_within_its_documented_error():
    a, b = random_factors(2, 1000, 700, 4, dtype=torch.float32)
    spec = KernelSpec("rbf", 0.1)
    num_entries, sample_size, fraction = 700_000, 16384, 0.1
    tau = keep_threshold(a, b, spec, round(fraction * num_entries), sample_size=sample_size, sample_seed=3)
    kept_fraction = float((kernel_matrix(a, b, spec).abs() >= tau).float().mean())
    assert abs(kept_fraction - fraction) < 4 * math.sqrt(fraction * (1 - fraction) / sample_size)
    again = keep_threshold(a, b, spec, round(fraction * num_entries), sample_size=sample_size, sample_seed=3)
    assert torch.equal(tau, again)  # fixed positions: the same threshold every step


def test_zero_initial_delta_keeps_every_entry_so_all_factors_get_gradients():
    layer = SnellLinear(nn.Linear(12, 10), "default", SnellConfig(r=4, sparsity=0.9))
    assert torch.count_nonzero(layer.get_delta_weight("default")) == 0
    layer(torch.randn(3, 12)).square().sum().backward()
    assert bool((layer.snell_input_factors["default"].grad != 0).all())


# --- memory-lean gradients -----------------------------------------------------------------------


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("magnitude", [False, True])
@pytest.mark.parametrize("chunk_entries", [2**20, 50])  # one chunk; 2 rows of K at a time
def test_custom_gradient_equals_autograd_through_the_dense_reference(kernel, magnitude, chunk_entries, monkeypatch):
    monkeypatch.setattr("triton_kernels.snell_matmul.CHUNK_ENTRIES", chunk_entries)
    spec = KernelSpec(kernel, 0.3, gamma=0.7, magnitude=magnitude)
    a, b = random_factors(2, 21, 17, 3)
    x = torch.randn(2, 13, 21, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    tau = threshold_between_entries(a, b, spec, num_kept=150)
    outputs, grads = [], []
    for function in (snell_delta_matmul, dense_reference):
        leaves = [t.clone().requires_grad_() for t in (x, a, b)]
        y = function(*leaves, tau, spec)
        grads.append(torch.autograd.grad(y, leaves, torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)))
        outputs.append(y)
    torch.testing.assert_close(outputs[0], outputs[1])
    for ours, reference in zip(*grads):
        torch.testing.assert_close(ours, reference)


def test_backward_keeps_no_out_by_in_tensor():
    num_out, num_in, tokens = 64, 96, 8
    a, b = random_factors(2, num_in, num_out, 4, dtype=torch.float32)
    spec = KernelSpec("distance_diff", 0.1, magnitude=True)
    tau = keep_threshold(a, b, spec, 600)
    saved = {}
    for name, function in (("snell", snell_delta_matmul), ("dense", dense_reference)):
        sizes = []
        leaves = [t.clone().requires_grad_() for t in (torch.randn(tokens, num_in), a, b)]
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            function(*leaves, tau, spec).sum().backward()
        saved[name] = max(sizes)
    assert saved["snell"] < num_out * num_in <= saved["dense"]


# --- Triton kernels (Triton's CPU interpreter) ---------------------------------------------------


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("magnitude", [False, True])
def test_triton_kernels_match_the_torch_reference(triton_interpreter, kernel, magnitude):
    spec = KernelSpec(kernel, 0.3, gamma=0.7, magnitude=magnitude)
    a, b = random_factors(2, 70, 75, 3, dtype=torch.float32)  # awkward sizes: 2 partial tiles per dimension
    x = torch.randn(37, 70, generator=torch.Generator().manual_seed(2))
    tau = threshold_between_entries(a, b, spec, num_kept=1500)
    results = []
    for function in (snell_delta_matmul_triton, snell_delta_matmul_reference):
        leaves = [t.clone().requires_grad_() for t in (x, a, b)]
        y = function(*leaves, tau, spec)
        results.append((y, *torch.autograd.grad(y, leaves, torch.cos(torch.arange(y.numel())).view_as(y))))
    for ours, reference in zip(*results):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_kernels_take_16_bit_activations_as_the_reference_does(triton_interpreter, dtype):
    spec = KernelSpec("distance_diff", 0.3)
    a, b = random_factors(2, 70, 75, 3, dtype=torch.float32)
    x = torch.randn(37, 70, generator=torch.Generator().manual_seed(2)).to(dtype)
    tau = threshold_between_entries(a, b, spec, num_kept=1500)
    grad_output = torch.cos(torch.arange(37 * 75.0)).view(37, 75).to(dtype)
    results = []
    for function in (snell_delta_matmul_triton, snell_delta_matmul_reference):
        leaves = [t.clone().requires_grad_() for t in (x, a, b)]
        y = function(*leaves, tau, spec)
        results.append((y, *torch.autograd.grad(y, leaves, grad_output)))
    for ours, reference in zip(*results):
        assert ours.dtype == reference.dtype
        torch.testing.assert_close(ours.float(), reference.float(), rtol=2e-2, atol=2e-2)


def test_additive_layer_dispatches_to_triton_under_the_interpreter(triton_interpreter, monkeypatch, input_ids):
    config = SnellConfig(r=4, sparsity=0.5, init_weights=False, delta_in_place=False)
    model = get_peft_model(make_tiny_llama(), config)
    expected = model(input_ids).logits
    calls = []
    monkeypatch.setattr(
        "triton_kernels.snell_matmul.snell_delta_matmul_triton",
        lambda *args: calls.append(1) or snell_delta_matmul_reference(*args),
    )
    torch.testing.assert_close(model(input_ids).logits, expected, rtol=1e-5, atol=1e-4)
    assert len(calls) == 14  # 7 linears x 2 decoder layers


@pytest.mark.parametrize("kernel", KERNELS)
def test_in_place_factor_gradients_by_triton_match_the_torch_reference(triton_interpreter, kernel):
    a, b = random_factors(2, 24, 40, 3, dtype=torch.float32)
    spec = KernelSpec(kernel, 0.3, gamma=0.2)
    tau = threshold_between_entries(a, b, spec, 200)
    generator = torch.Generator().manual_seed(1)
    x, grad_output = torch.randn(9, 24, generator=generator), torch.randn(9, 40, generator=generator)
    assert use_triton(x)
    for ours, reference in zip(
        snell_factor_grads(x, grad_output, a, b, tau, spec),
        snell_factor_grads_reference(x, grad_output, a, b, tau, spec),
    ):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-4)


# --- in place ------------------------------------------------------------------------------------


def logits_and_factor_grads(model: nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    output = model(input_ids=input_ids, labels=input_ids)
    output.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return output.logits.detach(), grads


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("make_base", [make_tiny_llama, make_tiny_gpt2])
def test_in_place_forward_and_factor_gradients_equal_the_additive_path(kernel, make_base, input_ids):
    magnitude = kernel == "rbf"  # the competition's |K| factor, on one kernel
    results = {}
    for in_place in (True, False):
        torch.manual_seed(0)
        config = SnellConfig(r=4, kernel=kernel, sparsity=0.7, init_weights=False, magnitude_competition=magnitude,
                             threshold_sample_size=None, delta_in_place=in_place)  # fmt: skip
        model = get_peft_model(make_base(), config)
        results[in_place] = logits_and_factor_grads(model, input_ids)
        layers = [m for m in model.modules() if isinstance(m, SnellLinear)]
        assert all(bool(layer._written) == in_place for layer in layers)
    (logits, grads), (additive_logits, additive_grads) = results[True], results[False]
    torch.testing.assert_close(logits, additive_logits, rtol=1e-5, atol=1e-5)
    assert grads.keys() == additive_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], additive_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_in_place_training_follows_the_additive_path_and_writes_only_the_kept_entries(input_ids):
    losses = {}
    for in_place in (True, False):
        torch.manual_seed(0)
        config = SnellConfig(r=4, sparsity=0.8, init_weights=False, threshold_sample_size=None, delta_in_place=in_place)
        model = get_peft_model(make_tiny_llama(), config)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses[in_place] = []
        for _ in range(3):
            loss = model(input_ids=input_ids, labels=input_ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[in_place].append(loss.item())
        if in_place:
            model(input_ids=input_ids)  # writes the delta of the last values
            for layer in (m for m in model.modules() if isinstance(m, SnellLinear)):
                assert layer._written["default"].indices.numel() == layer.num_kept("default")
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-5, atol=1e-6)


def test_a_new_kept_count_is_written_by_the_next_forward(input_ids):
    model = trained_snell(SnellConfig(r=4, sparsity=0.5, threshold_sample_size=None))
    layer = next(m for m in model.modules() if isinstance(m, SnellLinear))
    pristine = layer.pristine_weight()
    model(input_ids)
    layer.set_num_kept("default", 11)  # what SNELLA does between steps
    model(input_ids)
    assert layer._written["default"].indices.numel() == 11
    torch.testing.assert_close(layer.get_base_layer().weight, pristine + layer.get_delta_weight("default"), rtol=0, atol=0)


@pytest.mark.parametrize("config_kwargs", [dict(dropout=0.1), dict(delta_in_place=False)])
def test_dropout_or_delta_in_place_false_keeps_the_weight_pristine(config_kwargs, input_ids):
    model = get_peft_model(make_tiny_llama(), SnellConfig(r=4, sparsity=0.5, init_weights=False, **config_kwargs))
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    pristine = dict(make_tiny_llama().named_parameters())
    for name, parameter in model.base_model.model.named_parameters():
        if not parameter.requires_grad:
            assert torch.equal(parameter, pristine[name.replace("base_layer.", "")]), name


# --- peft behaviour ------------------------------------------------------------------------------


def trained_snell(config: SnellConfig, make_base=make_tiny_llama, steps: int = 2) -> nn.Module:
    """A SNELL model after a few AdamW steps, so its delta is non-zero and sparse."""
    model = get_peft_model(make_base(), config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, VOCAB_SIZE, (2, 10), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.mark.parametrize("kernel", KERNELS)
def test_zero_initialisation_leaves_the_base_model_unchanged(kernel, input_ids):
    base_logits = make_tiny_llama()(input_ids).logits
    model = get_peft_model(make_tiny_llama(), SnellConfig(r=4, kernel=kernel, sparsity=0.5))
    torch.testing.assert_close(model(input_ids).logits, base_logits)


@pytest.mark.parametrize("make_base", [make_tiny_llama, make_tiny_gpt2])
def test_save_load_merge_and_disable_round_trips(tmp_path, input_ids, make_base):
    model = trained_snell(SnellConfig(r=4, sparsity=0.8, threshold_sample_size=64), make_base)
    layer = next(m for m in model.modules() if isinstance(m, SnellLinear))
    layer.set_num_kept("default", 77)  # a SNELLA-style per-layer budget must survive saving
    logits = model(input_ids).logits
    base_logits = make_base()(input_ids).logits
    assert not torch.allclose(logits, base_logits, atol=1e-4)
    with model.disable_adapter():
        torch.testing.assert_close(model(input_ids).logits, base_logits)

    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_base(), tmp_path)
    torch.testing.assert_close(loaded(input_ids).logits, logits)
    loaded_layer = next(m for m in loaded.modules() if isinstance(m, SnellLinear))
    assert loaded_layer.num_kept("default") == 77

    pristine = loaded_layer.pristine_weight()  # the forward above wrote the delta into the weight
    loaded.merge_adapter()
    torch.testing.assert_close(loaded(input_ids).logits, logits, rtol=1e-5, atol=1e-5)
    loaded.unmerge_adapter()
    assert torch.equal(loaded_layer.get_base_layer().weight, pristine)  # bit-exact
    merged = loaded.merge_and_unload()
    assert not any(isinstance(m, SnellLinear) for m in merged.modules())
    torch.testing.assert_close(merged(input_ids).logits, logits, rtol=1e-5, atol=1e-5)


def test_multiple_adapters_switch_and_delete(input_ids):
    model = trained_snell(SnellConfig(r=4, sparsity=0.5))
    first = model(input_ids).logits
    model.add_adapter("other", SnellConfig(r=8, kernel="rbf", sparsity=0.7, init_weights=False))
    model.set_adapter("other")
    other = model(input_ids).logits
    assert not torch.allclose(first, other, atol=1e-5)
    model.set_adapter("default")
    torch.testing.assert_close(model(input_ids).logits, first)
    model.delete_adapter("other")
    assert not any("other" in name for name, _ in model.named_parameters())


# --- SNELLA --------------------------------------------------------------------------------------


def test_cubic_schedule_endpoints_and_midpoint():
    kwargs = dict(initial=1000, target=200, total_steps=20, warmup_steps=2, final_steps=4)
    assert scheduled_budget(step=2, **kwargs) == 1000
    assert scheduled_budget(step=9, **kwargs) == int(200 + 800 * 0.5**3)  # progress (9 - 2) / 14
    assert scheduled_budget(step=17, **kwargs) == 200


def test_allocation_is_proportional_capped_and_sums_exactly():
    counts = allocate_budget(1000, {"a": 1.0, "b": 2.0, "c": 7.0}, {"a": 500, "b": 500, "c": 400})
    assert counts == {"a": 200, "b": 400, "c": 400}
    assert sum(allocate_budget(997, {"a": 1.0, "b": 1.0, "c": 1.0}, {"a": 999, "b": 999, "c": 999}).values()) == 997
    assert allocate_budget(30, {"a": 0.0, "b": 0.0}, {"a": 10, "b": 20}) == {"a": 10, "b": 20}


def test_importance_tracker_smooths_importance_and_uncertainty():
    tracker = ImportanceTracker(importance_beta=0.5, uncertainty_beta=0.75)
    parameter = torch.tensor([2.0], requires_grad=True)
    for gradient in (1.0, 3.0):
        parameter.grad = torch.tensor([gradient])
        tracker.update({"p": parameter})
    importance = 0.5 * (0.5 * 2) + 0.5 * 6  # |theta * grad| = 2, then 6
    uncertainty = 0.75 * (0.25 * abs(2 - 1)) + 0.25 * abs(6 - importance)
    assert tracker.score(["p"]) == pytest.approx(importance * uncertainty)


def test_snella_budgets_follow_the_schedule_inside_the_trainer(tmp_path):
    config = SnellConfig(
        r=4, allocation="snella", sparsity=0.2, target_sparsity=0.9, allocation_interval=2, threshold_sample_size=None
    )
    model = get_peft_model(make_tiny_llama(), config)
    ids = torch.randint(0, VOCAB_SIZE, (16, 10), generator=torch.Generator().manual_seed(0))
    dataset = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=2, learning_rate=1e-2,
        logging_steps=2, report_to=[], save_strategy="no", use_cpu=True,
    )  # fmt: skip
    callbacks = [SnellAllocationCallback(log_layer_sparsity=True)]
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=callbacks)
    trainer.train()
    sizes = [layer.num_entries for _, layer in model.base_model.snell_layers("default")]
    initial = sum(size - round(0.2 * size) for size in sizes)
    target = sum(size - round(0.9 * size) for size in sizes)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logs] == [2, 4, 6, 8]
    for entry in logs:
        expected = int(target + (initial - target) * (1 - entry["step"] / 8) ** 3)
        assert entry["snella/budget"] == expected
        layer_keys = [key for key in entry if key.startswith("snella/sparsity/")]
        assert len(layer_keys) == 14
    sparsities = model.base_model.layer_sparsity()
    assert len(set(round(value, 6) for value in sparsities.values())) > 1  # budgets differ by importance
