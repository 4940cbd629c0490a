"""``torch.compile(model)`` (default mode, inductor, CPU fp32) trains every method as eager does.

Each case trains the tiny Llama 3 AdamW steps twice, eager and compiled, from the same seed, with
what the method's callback does between steps (selection window and prune/regrow for SFT, the
gate's L1 gradient and proximal step for SoRA, importance and budget allocation for SNELLA).
Sparse-delta layers (SFT, LIFT) run eagerly inside the compiled model (``torch.compiler.disable``:
one graph break per layer), so the in-place delta and its invisibility rules are those of eager.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from peft import get_peft_model

from conftest import VOCAB_SIZE, make_tiny_llama
from peft_sparse import LiftConfig, SnellConfig, SoraConfig, SparseConfig

STEPS = 3
LOSS_TOLERANCE = 1e-5
# every weight shape of the tiny Llama ([32, 32], [16, 32], [32, 64]) with 6 of its 14 linears: each
# adapted sparse-delta or SNELL layer is a graph break, and fewer graphs keep a cold inductor cache fast
TEST_TARGETS = ["q_proj", "v_proj", "down_proj"]


def _no_hook(model, optimizer, step: int) -> None:
    return None


@dataclass(frozen=True)
class CompileCase:
    """A method to train compiled: its config, and what its callback does before/after each optimizer step."""

    family: str  # cases of one family build models of the same structure
    make_config: Callable[[], object]
    before_step: Callable = _no_hook
    after_step: Callable = _no_hook


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


CASES = {
    "sft-ag": CompileCase("sparse-delta", lambda: SparseConfig(density=0.1, selection="ag"), _open_window, _reselect),
    "sft-ma": CompileCase("sparse-delta", lambda: SparseConfig(density=0.1, selection="ma"), _open_window, _reselect),
    "sft-random": CompileCase("sparse-delta", lambda: SparseConfig(density=0.1, selection="random")),
    "lift": CompileCase("sparse-delta", lambda: LiftConfig(density=0.1, rank=4)),
    "sora": CompileCase("sora", lambda: SoraConfig(r=4), _gate_l1, _gate_proximal_step),
    "snell": CompileCase("snell", lambda: SnellConfig(r=4, sparsity=0.5)),
    "snella": CompileCase(
        "snell",
        lambda: SnellConfig(r=4, sparsity=0.5, allocation="snella", target_sparsity=0.8),
        _update_importance,
        _allocate,
    ),
}


def make_model(case: CompileCase, target_modules=TEST_TARGETS) -> torch.nn.Module:
    config = case.make_config()
    config.target_modules = target_modules
    model = get_peft_model(make_tiny_llama(), config)
    return model.train()


def train_steps(model: torch.nn.Module, case: CompileCase, compiled: bool, input_ids: torch.Tensor) -> list[float]:
    """Losses of ``STEPS`` AdamW steps on one batch, through ``torch.compile(model)`` if ``compiled``."""
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
