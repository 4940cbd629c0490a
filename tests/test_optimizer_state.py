"""Optimizer state follows remapped slots: bnb's block-wise 8-bit moments within one requantization, 32-bit exactly."""

import math

import pytest
import torch
from peft import get_peft_model
from transformers import Trainer

from peft_sparse import SparseConfig
from peft_sparse.sparse.optimizer_state import remap_optimizer_state, unwrap_optimizer
from tests.conftest import make_tiny_llama
from tests.test_trainer import repeating_sequences, training_args
from trl_callbacks import SparseUpdateCallback

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes (optional) provides the 8-bit optimizers")
bnb_functional = pytest.importorskip("bitsandbytes.functional")

NUM_SLOTS = 5000  # >= min_8bit_size (4096): 8-bit state; 19 full blocks of 256 and one of 136
# bnb's CPU quantizer finds the nearest code by a binary search on a coarse float grid: it cannot
# resolve |x| / absmax below ~2.2e-5 (it sends 0 to the code 2.125e-5 of the signed map, 1.5625e-5
# of the unsigned one), and elsewhere may pick a neighbour of the nearest code up to that far off
SEARCH_RESOLUTION = 2.5e-5


def stepped_optimizer(optimizer_class, num_slots: int = NUM_SLOTS, steps: int = 3, **kwargs):
    """``(parameter, optimizer)`` after ``steps`` steps on gradients whose scale spans 3 decades across blocks."""
    generator = torch.Generator().manual_seed(0)
    parameter = torch.nn.Parameter(torch.randn(num_slots, generator=generator))
    optimizer = optimizer_class([parameter], lr=1e-2, **kwargs)
    scale = torch.logspace(-3, 0, num_slots)  # blocks get absmax far apart: codes mean nothing across them
    for _ in range(steps):
        parameter.grad = torch.randn(num_slots, generator=generator) * scale
        optimizer.step()
    return parameter, optimizer


def source_positions_for(num_slots: int, drop: torch.Tensor, grown_at: torch.Tensor) -> torch.Tensor:
    """What ``replace_indices`` returns: kept slots in order, -1 for the grown slots, which land at ``grown_at``."""
    kept = torch.ones(num_slots, dtype=torch.bool)
    kept[drop] = False
    source_positions = torch.full((num_slots,), -1, dtype=torch.int64)
    is_kept_slot = torch.ones(num_slots, dtype=torch.bool)
    is_kept_slot[grown_at] = False
    source_positions[is_kept_slot] = torch.arange(num_slots)[kept]
    return source_positions


def random_source_positions(num_slots: int = NUM_SLOTS, replaced: int = 500) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    drop = torch.randperm(num_slots, generator=generator)[:replaced]
    grown_at = torch.randperm(num_slots, generator=generator)[:replaced]
    return source_positions_for(num_slots, drop, grown_at)


def blocksize(state: dict, n: int) -> int:
    """bnb's block size (256 in 0.50): the power of two that splits the slots into ``absmax`` blocks."""
    return 2 ** math.ceil(math.log2(state["state1"].shape[-1] / state[f"absmax{n}"].shape[-1]))


def dequantized(state: dict, n: int) -> torch.Tensor:
    return bnb_functional.dequantize_blockwise(
        state[f"state{n}"], absmax=state[f"absmax{n}"], code=state[f"qmap{n}"], blocksize=blocksize(state, n)
    )


def per_slot(block_values: torch.Tensor, size: int, num_slots: int) -> torch.Tensor:
    return block_values.repeat_interleave(size)[:num_slots]


def remapped(moments: torch.Tensor, source_positions: torch.Tensor) -> torch.Tensor:
    return torch.where(source_positions >= 0, moments[..., source_positions.clamp(min=0)], 0.0)


def nearest_code_error(expected: torch.Tensor, absmax: torch.Tensor, code_map: torch.Tensor) -> torch.Tensor:
    """|x - nearest representable value| per slot: the least error any 8-bit code in the block can have."""
    scaled = expected / absmax.clamp(min=1e-30)
    nearest = code_map[(scaled.unsqueeze(-1) - code_map).abs().argmin(dim=-1)]
    return (nearest * absmax - expected).abs()


@pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")
@pytest.mark.parametrize("optimizer_class", ["AdamW8bit", "PagedAdamW8bit"])
def test_8bit_moments_follow_the_slots_within_one_requantization(optimizer_class):
    parameter, optimizer = stepped_optimizer(getattr(bnb.optim, optimizer_class))
    state = optimizer.state[parameter]
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8
    before = {n: dequantized(state, n) for n in (1, 2)}
    tensors = {name: (value, value.data_ptr()) for name, value in state.items() if torch.is_tensor(value)}
    source_positions = random_source_positions()

    remap_optimizer_state(optimizer, parameter, source_positions)

    for name, (tensor, address) in tensors.items():  # written in place: paged buffers stay where they are
        assert state[name] is tensor and tensor.data_ptr() == address
    grown = source_positions < 0
    for n in (1, 2):
        expected, after, size = remapped(before[n], source_positions), dequantized(state, n), blocksize(state, n)
        padded = torch.nn.functional.pad(expected.abs(), (0, state[f"absmax{n}"].numel() * size - NUM_SLOTS))
        assert torch.equal(state[f"absmax{n}"], padded.view(-1, size).amax(dim=1))  # each block's new max
        absmax = per_slot(state[f"absmax{n}"], size, NUM_SLOTS)
        bound = nearest_code_error(expected, absmax, state[f"qmap{n}"]) + SEARCH_RESOLUTION * absmax
        assert ((after - expected).abs() <= bound * (1 + 1e-6)).all()
        assert torch.equal(after[grown], torch.zeros(int(grown.sum())))


def test_code_zero_of_the_signed_map_is_not_zero():
    """The naive remap (zeroing grown slots' codes) would give them momentum -0.993 * absmax."""
    parameter, optimizer = stepped_optimizer(bnb.optim.AdamW8bit)
    state = optimizer.state[parameter]
    naive = bnb_functional.dequantize_blockwise(
        torch.zeros_like(state["state1"]), absmax=state["absmax1"], code=state["qmap1"], blocksize=blocksize(state, 1)
    )
    assert torch.allclose(naive, -0.993 * per_slot(state["absmax1"], blocksize(state, 1), NUM_SLOTS), rtol=1e-3)
    assert (naive < 0).all()

    source_positions = random_source_positions()
    remap_optimizer_state(optimizer, parameter, source_positions)
    assert torch.equal(dequantized(state, 1)[source_positions < 0], torch.zeros(int((source_positions < 0).sum())))


def test_codes_moved_across_blocks_would_take_the_wrong_scale():
    """Entries shifted by 1000 slots land in blocks of another scale: moving codes is off, remapping is not."""
    parameter, optimizer = stepped_optimizer(bnb.optim.AdamW8bit)
    state = optimizer.state[parameter]
    drop, grown_at = torch.arange(1000), torch.arange(NUM_SLOTS - 1000, NUM_SLOTS)
    source_positions = source_positions_for(NUM_SLOTS, drop, grown_at)  # slot i takes old slot i + 1000
    expected = remapped(dequantized(state, 2), source_positions)
    naive_codes = torch.where(source_positions >= 0, state["state2"][source_positions.clamp(min=0)], 0)
    naive = bnb_functional.dequantize_blockwise(
        naive_codes, absmax=state["absmax2"], code=state["qmap2"], blocksize=blocksize(state, 2)
    )

    remap_optimizer_state(optimizer, parameter, source_positions)

    kept = source_positions >= 0
    naive_error = ((naive - expected).abs() / expected.abs().clamp(min=1e-12))[kept]
    error = ((dequantized(state, 2) - expected).abs() / expected.abs().clamp(min=1e-12))[kept]
    # gradients grow 10^0.6 ~ 4x every 1000 slots, so the second moment's block absmax ~16x
    assert naive_error.median() > 0.8
    assert error.median() < 0.02


def test_blocks_whose_slots_stay_keep_their_codes_bit_for_bit():
    parameter, optimizer = stepped_optimizer(bnb.optim.AdamW8bit)
    state = optimizer.state[parameter]
    before = {name: state[name].clone() for name in ("state1", "state2", "absmax1", "absmax2")}
    size = blocksize(state, 1)
    last_block = (NUM_SLOTS - 1) // size * size
    drop, grown_at = torch.tensor([last_block + 3, last_block + 50]), torch.tensor([last_block + 10, NUM_SLOTS - 1])

    remap_optimizer_state(optimizer, parameter, source_positions_for(NUM_SLOTS, drop, grown_at))

    for n in (1, 2):
        assert torch.equal(state[f"state{n}"][:last_block], before[f"state{n}"][:last_block])
        assert torch.equal(state[f"absmax{n}"][:-1], before[f"absmax{n}"][:-1])
        assert not torch.equal(state[f"state{n}"][last_block:], before[f"state{n}"][last_block:])


def test_32bit_state_of_a_small_parameter_remaps_exactly():
    parameter, optimizer = stepped_optimizer(bnb.optim.AdamW8bit, num_slots=1000)  # < min_8bit_size: 32-bit
    state = optimizer.state[parameter]
    assert state["state1"].dtype == torch.float32 and "absmax1" not in state
    before = {name: state[name].clone() for name in ("state1", "state2")}
    source_positions = random_source_positions(1000, replaced=100)

    remap_optimizer_state(optimizer, parameter, source_positions)

    for name, moments in before.items():
        assert torch.equal(state[name], remapped(moments, source_positions))
    assert state["step"] == 3


def test_code_map_shared_between_parameters_is_left_as_it_is():
    """With 256 slots ``qmap`` [256] has the parameter's shape: it must not be remapped like a moment."""
    parameter, optimizer = stepped_optimizer(bnb.optim.AdamW8bit, num_slots=256, min_8bit_size=0)
    state = optimizer.state[parameter]
    code_maps = {name: state[name].clone() for name in ("qmap1", "qmap2")}

    remap_optimizer_state(optimizer, parameter, random_source_positions(256, replaced=30))

    for name, code_map in code_maps.items():
        assert torch.equal(state[name], code_map)
    assert state["qmap1"] is optimizer.name2qmap["dynamic"]


def both_momenta(state: dict) -> torch.Tensor:
    """AdEMAMix's ``state1`` [2, k] (fast and slow momentum) in float32."""
    if state["state1"].dtype == torch.float32:
        return state["state1"].clone()
    size = blocksize(state, 1)
    rows = [
        bnb_functional.dequantize_blockwise(codes, absmax=absmax, code=state["qmap1"], blocksize=size)
        for codes, absmax in zip(state["state1"], state["absmax1"])
    ]
    return torch.stack(rows)


@pytest.mark.parametrize("optim_bits", [8, 32])
def test_both_ademamix_momenta_follow_the_slots(optim_bits):
    parameter, optimizer = stepped_optimizer(bnb.optim.AdEMAMix, optim_bits=optim_bits)
    state = optimizer.state[parameter]
    assert state["state1"].shape == (2, NUM_SLOTS)
    source_positions = random_source_positions()
    expected = remapped(both_momenta(state), source_positions)

    remap_optimizer_state(optimizer, parameter, source_positions)

    after = both_momenta(state)
    if optim_bits == 32:
        assert torch.equal(after, expected)
    else:  # one rounding: half the widest gap of the signed map (0.0141, next to +-1) times the block's absmax
        assert (after - expected).abs().amax() <= 0.0071 * expected.abs().amax()
    assert torch.equal(after[:, source_positions < 0], torch.zeros(2, int((source_positions < 0).sum())))


@pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")
@pytest.mark.parametrize("optim", ["adamw_bnb_8bit", "paged_adamw_8bit"])
def test_trainer_with_8bit_adamw_trains_through_selection_steps(tmp_path, optim):
    # intermediate 1536: the MLP matrices have 32 * 1536 entries, so 4915 values each (8-bit state);
    # the attention matrices have 102 values each (32-bit state)
    model = get_peft_model(
        make_tiny_llama(intermediate_size=1536),
        SparseConfig(density=0.1, reselection_steps=4, selection_accumulation_steps=2),
    )
    trainer = Trainer(
        model=model, args=training_args(tmp_path, max_steps=12, optim=optim, learning_rate=5e-2),
        train_dataset=repeating_sequences(), callbacks=[SparseUpdateCallback()],
    )  # fmt: skip
    trainer.train()

    dtypes = {state["state1"].dtype for state in unwrap_optimizer(trainer.optimizer).state.values()}
    assert dtypes == {torch.uint8, torch.float32}
    churn = [entry["sparse/churn"] for entry in trainer.state.log_history if "loss" in entry]  # selection steps
    assert len(churn) == 3 and churn[0] > 0
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < losses[0] - 0.2  # 3.94 -> 3.60 (as adamw_torch); moving the codes instead: 3.94 -> 4.14
