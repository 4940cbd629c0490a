"""Tiny Trainer runs of every method, shared by the resume and multi-process tests.

As a script it is one rank of the multi-process test:
``torchrun --standalone --nproc_per_node 2 tests/tiny_runs.py OUT_DIR METHOD...`` trains each METHOD
(a key of ``METHODS``) under the Trainer's DDP (gloo on CPU), writes this rank's adapter tensors to
``OUT_DIR/<METHOD>-rank<r>.safetensors``, then resumes the run from its step-3 checkpoint and writes
``OUT_DIR/<METHOD>-resumed-rank<r>.safetensors``. With ``--fsdp METHOD`` it trains METHOD under the
Trainer's FSDP2 instead.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from peft import get_peft_model, get_peft_model_state_dict  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import Trainer, TrainerCallback  # noqa: E402

from peft_sparse import LiftConfig, RosaConfig, S2ftConfig, SnellConfig, SoraConfig, SparseConfig  # noqa: E402
from tests.conftest import make_tiny_llama  # noqa: E402
from tests.test_trainer import repeating_sequences, training_args  # noqa: E402
from trl_callbacks import (  # noqa: E402
    RosaCallback, SnellAllocationCallback, SoraCallback, SparseUpdateCallback, sora_optimizer_cls_and_kwargs,
)  # fmt: skip

TARGETS = ["q_proj", "down_proj"]  # 4 matrices: enough to test, fast

# (config, callback class). `train` runs 4 optimizer steps and saves a checkpoint after step 3. SFT:
# statistics windows over steps 1-2 and 3-4 (2 micro-batches each), so the checkpoint holds a
# half-filled window; LIFT refreshes its mask at steps 2 and 4; SoRA's threshold moves every step, with
# its gates in their own optimizer group (gate_lr 0.2, on the linear schedule as the rest);
# SNELLA re-allocates at steps 2 and 4 from its importance EMAs. SaRA freezes its effective slots at
# step 2 (kept in the checkpoint) under a nuclear-norm penalty; HFT freezes a new half at steps 0, 2, 4.
# ID3 unmasks at steps 1 and 3 (half of its budget each), so the checkpoint holds masked slots.
# RoSA trains LoRA alone for step 1, accumulates gradients over steps 2-3, sets its mask after step 3 (in the
# checkpoint) and trains both parts at step 4; its sparse values get no gradient before (unused under DDP).
# S2FT has no selection steps (a plain TrainerCallback); its slices are columns of o_proj/down_proj, rows of gate_proj.
METHODS = {
    "sparse-ag": (lambda: SparseConfig(target_modules=TARGETS, density=0.1, selection="ag", reselection_steps=2, selection_accumulation_steps=2, reselection_rate_schedule="constant"), SparseUpdateCallback),
    "sparse-ma": (lambda: SparseConfig(target_modules=TARGETS, density=0.1, selection="ma", reselection_steps=2, selection_accumulation_steps=2, reselection_rate_schedule="constant"), SparseUpdateCallback),
    "sparse-sara": (lambda: SparseConfig(target_modules=TARGETS, density=0.1, selection="sara", reselection_steps=2, nuclear_norm_weight=0.5), SparseUpdateCallback),
    "sparse-hft": (lambda: SparseConfig(target_modules=TARGETS, density=0.1, selection="hft", hft_granularity="entry", reselection_steps=2), SparseUpdateCallback),
    "sparse-id3": (lambda: SparseConfig(target_modules=TARGETS, density=0.1, selection="id3", reselection_steps=2), SparseUpdateCallback),
    "lift": (lambda: LiftConfig(target_modules=TARGETS, density=0.1, rank=4, mask_update_interval=2), SparseUpdateCallback),
    "sora": (lambda: SoraConfig(target_modules=TARGETS, r=4, gate_lr=0.2, xi_schedule="linear", xi_start=0.01, xi_end=0.5), SoraCallback),
    "snella": (lambda: SnellConfig(target_modules=TARGETS, r=4, allocation="snella", sparsity=0.2, target_sparsity=0.8, allocation_interval=2), SnellAllocationCallback),
    "s2ft": (lambda: S2ftConfig(num_heads=1, num_channels=8, ffn_input_modules=["gate_proj"]), TrainerCallback),
    "rosa": (lambda: RosaConfig(target_modules=TARGETS, r=4, density=0.1, mask_warmup_steps=1, mask_accumulation_steps=2), RosaCallback),
}  # fmt: skip


def tiny_trainer(method: str, out_dir: str, per_device_train_batch_size: int = 2, **overrides) -> Trainer:
    """A Trainer for 4 optimizer steps of 2 micro-batches each, checkpoint at step 3 (SoRA: its gate group)."""
    make_config, callback = METHODS[method]
    model = get_peft_model(make_tiny_llama(), make_config())
    args = training_args(
        out_dir, max_steps=4, per_device_train_batch_size=per_device_train_batch_size,
        gradient_accumulation_steps=2, learning_rate=5e-2, save_strategy="steps", save_steps=3,
        ddp_broadcast_buffers=False, **overrides,  # no DDP re-sync of the indices buffers: ranks must agree alone
    )  # fmt: skip
    optimizer = sora_optimizer_cls_and_kwargs(args) if method == "sora" else None
    return Trainer(model=model, args=args, train_dataset=repeating_sequences(32), callbacks=[callback()],
                   optimizer_cls_and_kwargs=optimizer)  # fmt: skip


def train(method: str, out_dir: str, per_device_train_batch_size: int = 2, resume_from=None, **overrides):
    """Trains ``tiny_trainer``'s run; returns the trained PeftModel."""
    trainer = tiny_trainer(method, out_dir, per_device_train_batch_size, **overrides)
    trainer.train(resume_from_checkpoint=resume_from)
    return trainer.model


def save_adapter(model: torch.nn.Module, path: str) -> None:
    save_file({name: tensor.contiguous() for name, tensor in get_peft_model_state_dict(model).items()}, path)


FSDP_ARGS = {"use_cpu": True, "fsdp": True, "fsdp_config": {"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}}  # fmt: skip


def main(out_dir: str, methods: list[str]) -> None:
    if methods[0] == "--fsdp":  # the Trainer's FSDP2 (through accelerate), gloo on CPU
        train(methods[1], os.path.join(out_dir, methods[1]), **FSDP_ARGS)
        return
    rank = int(os.environ["RANK"])  # set by torchrun; the Trainer initializes the process group
    for method in methods:
        run_dir = os.path.join(out_dir, method)
        save_adapter(train(method, run_dir), os.path.join(out_dir, f"{method}-rank{rank}.safetensors"))
        resumed = train(method, run_dir, resume_from=os.path.join(run_dir, "checkpoint-3"))
        save_adapter(resumed, os.path.join(out_dir, f"{method}-resumed-rank{rank}.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
    if torch.distributed.is_initialized():  # stop gloo's threads before exit: left running, they abort it now and then
        torch.distributed.destroy_process_group()
