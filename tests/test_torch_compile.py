"""``torch.compile(model)`` (default mode, inductor, CPU fp32) trains every method as eager does.

Each case trains the tiny Llama 3 AdamW steps twice, eager and compiled, from the same seed, with
what the method's callback does before and between steps (selection window and prune/regrow for SFT,
frozen slots for SaRA/HFT, the nuclear-norm gradient for SaRA, unmasking for ID3, RoSA's gradient
mask, the gate's L1 gradient and proximal step for SoRA, importance and budget allocation for
SNELLA). Sparse-delta layers (SFT and its selections, LIFT, S2FT, RoSA's sparse part) run eagerly
inside the compiled model (``torch.compiler.disable``: one graph break per layer), so the in-place
delta and its invisibility rules are those of eager. LT-SFT's dense phase is run eagerly before the
compiled sparse phase: it swaps the adapter layers for their base layers, which a compiled model
would have to recompile for, and back.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import pytest
import torch
from peft import get_peft_model

from conftest import VOCAB_SIZE, make_tiny_llama
from peft_sparse import LiftConfig, RosaConfig, S2ftConfig, SnellConfig, SoraConfig, SparseConfig
from peft_sparse.sparse.lottery_ticket import LotteryTicket

STEPS = 3
LOSS_TOLERANCE = 1e-5
# every weight shape of the tiny Llama ([32, 32], [16, 32], [32, 64]) with 6 of its 14 linears: each
# adapted sparse-delta or SNELL layer is a graph break, and fewer graphs keep a cold inductor cache fast
TEST_TARGETS = ("q_proj", "v_proj", "down_proj")
# the sparse-delta family adapts what S2FT trains (o_proj heads, up_proj rows and down_proj columns of FFN
# channels), so S2FT reuses the family's graphs instead of compiling its own (measured: 47 s cold)
SPARSE_DELTA_TARGETS = ("o_proj", "up_proj", "down_proj")


def _no_hook(model, optimizer, step: int) -> None:
    return None


def _no_begin(model) -> None:
    return None


@dataclass(frozen=True)
class CompileCase:
    """A method to train compiled: its config, and what its callback does at train begin and before/after each
    optimizer step (``step`` counts from 0; the Trainer's ``global_step`` after it is ``step + 1``)."""

    family: str  # cases of one family build models of the same structure
    make_config: Callable[[], object]
    before_step: Callable = _no_hook
    after_step: Callable = _no_hook
    begin: Callable = _no_begin  # before the optimizer is built and the first forward
    targets: tuple[str, ...] = TEST_TARGETS
    targets_from_config: bool = False  # S2FT derives its target modules from its *_modules fields


def _open_window(model, optimizer, step: int) -> None:
    if step == 0:
        model.base_model.open_selection_window("default")


def _reselect(model, optimizer, step: int) -> None:
    if step == 1:  # the third step trains new indices
        model.base_model.reselect("default", 0.5, optimizer)


def _gate_l1(model, optimizer, step: int) -> None:
    model.base_model.add_gate_l1_gradient("default", 0.1)


def _gate_proximal_step(model, optimizer, step: int) -> None:
    model.base_model.soft_threshold_gates("default", 0.05)


def _update_importance(model, optimizer, step: int) -> None:
    model.base_model.update_importance("default")


def _allocate(model, optimizer, step: int) -> None:
    model.base_model.allocate("default", step + 1, STEPS)


def _freeze_slots_at_begin(model) -> None:
    model.base_model.update_frozen_slots("default", 0)


def _nuclear_norm_gradient(model, optimizer, step: int) -> None:
    model.base_model.add_nuclear_norm_gradient("default", step)


def _update_frozen_slots(model, optimizer, step: int) -> None:
    if (step + 1) % model.peft_config["default"].reselection_steps == 0:
        model.base_model.update_frozen_slots("default", step + 1)


def _mask_all_and_open_unmasking_window(model) -> None:
    _freeze_slots_at_begin(model)
    _open_due_unmasking_window(model, None, -1)


def _unmask(model, optimizer, step: int) -> None:
    if model.base_model.selection_window_open("default"):
        model.base_model.unmask("default", step + 1, STEPS, optimizer)


def _open_due_unmasking_window(model, optimizer, step: int) -> None:
    if model.base_model.unmasking_due("default", step + 2, STEPS):  # the next optimizer step, 1-based
        model.base_model.open_selection_window("default")


def _dense_phase_and_draw(model) -> None:
    """LT-SFT's dense phase (2 SGD steps of the target weights, eager) and the draw of its indices."""
    ticket = LotteryTicket(model)
    with ticket.dense_phase():
        dense_optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        for _ in range(2):
            model(input_ids=batch(), labels=batch()).loss.backward()
            dense_optimizer.step()
            dense_optimizer.zero_grad()
    ticket.draw()


def _hold_back_sparse_part_and_open_window(model) -> None:
    model.base_model.hold_back_sparse_part("default")  # mask_warmup_steps=0: the window opens at once
    model.base_model.open_selection_window("default")


def _choose_gradient_mask(model, optimizer, step: int) -> None:
    if step + 1 == model.peft_config["default"].mask_step:
        model.base_model.choose_gradient_mask("default", optimizer)


sparse_delta_case = partial(CompileCase, "sparse-delta", targets=SPARSE_DELTA_TARGETS)

CASES = {
    "sft-ag": sparse_delta_case(lambda: SparseConfig(density=0.1, selection="ag"), _open_window, _reselect),
    "sft-ma": sparse_delta_case(lambda: SparseConfig(density=0.1, selection="ma"), _open_window, _reselect),
    "sft-random": sparse_delta_case(lambda: SparseConfig(density=0.1, selection="random")),
    "lift": sparse_delta_case(lambda: LiftConfig(density=0.1, rank=4)),
    # SaRA: nuclear_norm_weight large enough to move the losses; its progressive freeze at step 2
    "sft-sara": sparse_delta_case(
        lambda: SparseConfig(density=0.1, selection="sara", reselection_steps=2, nuclear_norm_weight=0.01),
        _nuclear_norm_gradient,
        _update_frozen_slots,
        _freeze_slots_at_begin,
    ),
    "sft-hft": sparse_delta_case(  # a new frozen half at step 2
        lambda: SparseConfig(density=0.1, selection="hft", reselection_steps=2),
        after_step=_update_frozen_slots,
        begin=_freeze_slots_at_begin,
    ),
    "sft-id3": sparse_delta_case(  # unmasks at every step
        lambda: SparseConfig(density=0.1, selection="id3"),
        _unmask,
        _open_due_unmasking_window,
        _mask_all_and_open_unmasking_window,
    ),
    "sft-lt-sft": sparse_delta_case(  # the sparse phase compiled, after an eager dense phase
        lambda: SparseConfig(density=0.1, selection="lt-sft"), begin=_dense_phase_and_draw
    ),
    "s2ft": sparse_delta_case(  # targets SPARSE_DELTA_TARGETS: o_proj heads, down_proj columns, up_proj rows
        lambda: S2ftConfig(num_heads=1, num_channels=8, ffn_input_modules=["up_proj"]), targets_from_config=True
    ),
    "rosa": CompileCase(  # step 1: LoRA part alone, gradient window; then the mask, and both parts train
        "rosa",
        lambda: RosaConfig(r=4, density=0.1, mask_warmup_steps=0, mask_accumulation_steps=1),
        after_step=_choose_gradient_mask,
        begin=_hold_back_sparse_part_and_open_window,
    ),
    "dsee": CompileCase("rosa", lambda: RosaConfig(r=4, density=0.1, mask_rule="magnitude")),
    "sora": CompileCase("sora", lambda: SoraConfig(r=4), _gate_l1, _gate_proximal_step),
    "snell": CompileCase("snell", lambda: SnellConfig(r=4, sparsity=0.5)),
    "snella": CompileCase(
        "snell",
        lambda: SnellConfig(r=4, sparsity=0.5, allocation="snella", target_sparsity=0.8),
        _update_importance,
        _allocate,
    ),
}


def make_model(case: CompileCase, target_modules=None) -> torch.nn.Module:
    """The tiny Llama with the case's adapter on ``target_modules`` (default: the case's targets)."""
    config = case.make_config()
    if not case.targets_from_config:
        config.target_modules = target_modules or list(case.targets)
    model = get_peft_model(make_tiny_llama(), config)
    return model.train()


def train_steps(model: torch.nn.Module, case: CompileCase, compiled: bool, input_ids: torch.Tensor) -> list[float]:
    """Losses of ``STEPS`` AdamW steps on one batch, through ``torch.compile(model)`` if ``compiled``."""
    case.begin(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    forward = torch.compile(model) if compiled else model
    losses = []
    for step in range(STEPS):
        if step == 1:
            graphs_after_first_step = compiled_graphs()  # eager: no graphs either
        loss = forward(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        case.before_step(model, optimizer, step)
        optimizer.step()
        case.after_step(model, optimizer, step)
        optimizer.zero_grad()
        losses.append(loss.item())
    # what changes between steps (values, SFT's indices, SoRA's gates, SNELLA's kept counts) is not guarded on
    assert compiled_graphs() == graphs_after_first_step, "a later step recompiled"
    if compiled:  # Dynamo captured the model: a silently disabled torch.compile would compare eager with eager
        assert compiled_graphs() > 0, "torch.compile captured no graph"
    return losses


def compiled_graphs() -> int:
    """Graphs Dynamo has captured in this process since the last reset."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def batch() -> torch.Tensor:
    return torch.randint(0, VOCAB_SIZE, (2, 12), generator=torch.Generator().manual_seed(3))


_compiled_family = []


@pytest.fixture
def dynamo_for_family():
    """Reset Dynamo when the family changes; within one, later models reuse the compiled graphs.

    Without the reset, Dynamo would mark the shapes that differ between families as dynamic and
    compile every graph again (measured: SoRA's first step 6 s alone, 68 s after the SFT models).
    """

    def enter(family: str) -> None:
        if _compiled_family != [family]:
            torch._dynamo.reset()
            _compiled_family[:] = [family]

    # a frame past its recompile limit would run eagerly and pass unnoticed: fail instead
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        yield enter


@pytest.mark.parametrize("method", list(CASES))
def test_compiled_training_matches_eager(method, dynamo_for_family):
    case = CASES[method]
    dynamo_for_family(case.family)
    eager_model, compiled_model = make_model(case), make_model(case)
    eager_losses = train_steps(eager_model, case, compiled=False, input_ids=batch())
    compiled_losses = train_steps(compiled_model, case, compiled=True, input_ids=batch())

    torch.testing.assert_close(compiled_losses, eager_losses, rtol=0, atol=LOSS_TOLERANCE)
    assert eager_losses[-1] != eager_losses[0]  # the steps trained something
    compiled_state = {k: v for k, v in compiled_model.state_dict().items() if "default" in k}
    for key, tensor in eager_model.state_dict().items():
        if "default" in key:  # the adapter's trained tensors (and SFT's reselected indices) agree too
            torch.testing.assert_close(compiled_state[key], tensor, rtol=0, atol=1e-5, msg=key)


def test_sora_compiles_to_one_graph(dynamo_for_family):
    dynamo_for_family("explain")
    explanation = torch._dynamo.explain(make_model(CASES["sora"], "all-linear"))(input_ids=batch(), labels=batch())
    assert explanation.graph_break_count == 0
