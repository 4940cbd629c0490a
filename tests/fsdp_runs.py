"""Training loops of every method sharded with FSDP2 ``fully_shard``, shared by the FSDP tests.

As a script it is one rank of the FSDP test:
``torchrun --standalone --nproc_per_node 2 tests/fsdp_runs.py OUT_DIR METHOD...`` shards a tiny Llama
(each decoder layer, then the root), trains each METHOD (a key of ``METHODS``) for ``STEPS`` steps on
this rank's half of a fixed global batch, with the selection steps of the method's config, and on
rank 0 saves the adapter to ``OUT_DIR/<METHOD>`` (gathered, a normal single-process adapter).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from peft import get_peft_model  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

from bench_sft_step import TrainerEvents  # noqa: E402
from peft_sparse import LiftConfig, RosaConfig, S2ftConfig, SnellConfig, SoraConfig, SparseConfig  # noqa: E402
from peft_sparse.sparse.distributed import full_tensor  # noqa: E402
from tests.conftest import VOCAB_SIZE, make_tiny_llama  # noqa: E402
from trl_callbacks import RosaCallback, SparseUpdateCallback  # noqa: E402

STEPS = 4
GLOBAL_BATCH = 4
TARGETS = ["q_proj", "down_proj"]
# SFT opens its statistics window after step 2 and selects at step 4; LIFT refreshes at steps 2 and 4;
# S2FT's slices (columns of o_proj/down_proj, rows of gate_proj) are sharded like any other values.
# The rules driven by a callback run its real hooks (TrainerEvents): ID3 unmasks at every step, HFT
# re-chooses its frozen half and SaRA freezes its effective slots at step 2 (with its nuclear-norm
# term at every step), RoSA chooses its mask from steps 2-3 and trains both parts at step 4.
METHODS = {
    "sparse-ag": lambda **kwargs: SparseConfig(target_modules=TARGETS, density=0.1, selection="ag", reselection_steps=4, selection_accumulation_steps=2, **kwargs),
    "sparse-ma": lambda **kwargs: SparseConfig(target_modules=TARGETS, density=0.1, selection="ma", reselection_steps=4, selection_accumulation_steps=2, **kwargs),
    "lift": lambda **kwargs: LiftConfig(target_modules=TARGETS, density=0.1, rank=4, mask_update_interval=2, **kwargs),
    "sora": lambda **kwargs: SoraConfig(target_modules=TARGETS, r=4, **kwargs),
    "snell": lambda **kwargs: SnellConfig(target_modules=TARGETS, r=4, sparsity=0.5, init_weights=False, **kwargs),
    "s2ft": lambda **kwargs: S2ftConfig(num_heads=1, num_channels=8, ffn_input_modules=["gate_proj"], **kwargs),
    "sparse-id3": lambda **kwargs: SparseConfig(target_modules=TARGETS, density=0.1, selection="id3", **kwargs),
    "sparse-hft": lambda **kwargs: SparseConfig(target_modules=TARGETS, density=0.1, selection="hft", reselection_steps=2, init_weights=False, **kwargs),
    "sparse-sara": lambda **kwargs: SparseConfig(target_modules=TARGETS, density=0.1, selection="sara", reselection_steps=2, **kwargs),
    "rosa": lambda **kwargs: RosaConfig(target_modules=TARGETS, r=2, density=0.1, mask_warmup_steps=1, mask_accumulation_steps=2, **kwargs),
}  # fmt: skip
CALLBACKS = {"sparse-id3": SparseUpdateCallback, "sparse-hft": SparseUpdateCallback,
             "sparse-sara": SparseUpdateCallback, "rosa": RosaCallback}  # fmt: skip


def global_batch() -> torch.Tensor:
    return torch.randint(0, VOCAB_SIZE, (GLOBAL_BATCH, 12), generator=torch.Generator().manual_seed(0))


def train(method: str, model: torch.nn.Module, input_ids: torch.Tensor) -> None:
    """``STEPS`` AdamW steps on ``input_ids``, with the selection steps the method's config asks for."""
    config = model.peft_config["default"]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tuner = model.base_model
    if method in CALLBACKS:
        events = TrainerEvents(CALLBACKS[method](), model, optimizer, max_steps=STEPS)
        events.train_begin()
    for step in range(1, STEPS + 1):
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        if method in CALLBACKS:
            events.pre_optimizer_step()
        optimizer.step()
        optimizer.zero_grad()
        if method in CALLBACKS:
            events.step_end()
        if method in ("sparse-ag", "sparse-ma") and step == STEPS - config.selection_accumulation_steps:
            tuner.open_selection_window("default")
        if method in ("sparse-ag", "sparse-ma") and step == STEPS:
            tuner.reselect("default", config.initial_reselection_rate, optimizer)
        if method == "lift" and step % config.mask_update_interval == 0:
            tuner.reselect("default", 1.0, optimizer)


def shard(model: torch.nn.Module) -> None:
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)


def main(out_dir: str, methods: list[str]) -> None:
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    rows = global_batch().chunk(world_size)[rank]
    for method in methods:
        model = get_peft_model(make_tiny_llama(), METHODS[method]())
        shard(model)
        train(method, model, rows)
        state = {key: full_tensor(tensor) for key, tensor in model.state_dict().items()}  # collective: every rank
        if rank == 0:
            model.save_pretrained(os.path.join(out_dir, method), state_dict=state)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
