"""Tiny models built from configs (no downloads) shared by the tests."""

from __future__ import annotations

import os
import subprocess
import sys

# Triton decides when `triton.language` is imported whether its library functions (tl.sum,
# tl.zeros, ...) run on its CPU interpreter, and peft imports triton: so import it here, first,
# with TRITON_INTERPRET=1, then restore the variable. Tests then take the torch path on CPU unless
# they use the `triton_interpreter` fixture (our kernels read the variable at launch).
_interpret_setting = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
try:
    import triton.language  # noqa: F401
except ImportError:  # Triton is optional; kernel tests skip without it
    pass
finally:
    if _interpret_setting is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _interpret_setting

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from peft_sparse import LiftConfig, SparseConfig  # importing peft_sparse registers the methods
from peft_sparse.sparse import SparseDeltaLayer

VOCAB_SIZE = 64


def make_tiny_llama(seed: int = 0, intermediate_size: int = 64) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def make_tied_llama(seed: int = 0) -> LlamaForCausalLM:
    """One-layer Llama whose output head shares its weight with the input embeddings."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def make_tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB_SIZE, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(config).eval()


def make_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def randomize_values(model: nn.Module, seed: int = 1, scale: float = 0.1) -> None:
    """Give every sparse delta non-zero values, so outputs differ from the base model."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, SparseDeltaLayer):
                for parameter in module.delta_values.values():
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)


def run_child(code: str, *args) -> None:
    """Run ``code`` in a fresh Python process with ``args`` as ``sys.argv[1:]``; it must exit 0 and print CHILD-OK."""
    result = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "CHILD-OK" in result.stdout


def assert_same_adapter(actual: dict, expected: dict, atol: float = 1e-6) -> None:
    """Adapter state dicts with the same keys, identical indices and values within ``atol``."""
    assert actual.keys() == expected.keys()
    for key, tensor in expected.items():
        if key.endswith("_indices"):
            assert torch.equal(actual[key], tensor), key
        else:
            torch.testing.assert_close(actual[key], tensor, rtol=0, atol=atol, msg=key)


# One factory per sparse-delta method, for tests that every such method must pass.
SPARSE_DELTA_CONFIGS = {
    "sparse": lambda **kwargs: SparseConfig(density=0.1, **kwargs),
    "lift": lambda **kwargs: LiftConfig(density=0.1, rank=4, **kwargs),
}


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB_SIZE, (2, 12), generator=torch.Generator().manual_seed(3))


@pytest.fixture
def triton_interpreter(monkeypatch):
    """Run our Triton kernels on CPU tensors, through Triton's interpreter, for one test."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
