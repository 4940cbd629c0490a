"""TRL's SFTTrainer wraps a model with SparseConfig itself and trains it with SparseUpdateCallback."""

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from trl import SFTConfig, SFTTrainer

from peft_sparse import SparseConfig
from peft_sparse.sparse import SparseDeltaLayer
from tests.conftest import make_tiny_llama
from trl_callbacks import SparseUpdateCallback

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def character_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(["<pad>", "<eos>", *LETTERS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>")


def alphabet_runs(count: int = 64, length: int = 12) -> Dataset:
    generator = torch.Generator().manual_seed(0)
    starts = torch.randint(0, len(LETTERS), (count,), generator=generator).tolist()
    texts = ["".join(LETTERS[(start + i) % len(LETTERS)] for i in range(length)) for start in starts]
    return Dataset.from_list([{"text": text} for text in texts])


def test_sft_trainer_trains_sparse_adapter(tmp_path):
    args = SFTConfig(
        output_dir=str(tmp_path), max_steps=24, per_device_train_batch_size=8, learning_rate=1e-1,
        logging_steps=4, save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=make_tiny_llama(), args=args, train_dataset=alphabet_runs(), processing_class=character_tokenizer(),
        peft_config=SparseConfig(density=0.1, reselection_steps=8, selection_accumulation_steps=2),
        callbacks=[SparseUpdateCallback()],
    )
    assert any(isinstance(module, SparseDeltaLayer) for module in trainer.model.modules())
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < losses[0] - 0.2
    assert any(entry.get("sparse/churn", 0) > 0 for entry in trainer.state.log_history)
    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
