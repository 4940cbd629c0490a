"""Each callback refuses, at train begin, a model without the methods it drives (instead of training silently)."""

import re

import pytest
from peft import LoraConfig, get_peft_model
from transformers import Trainer

from peft_sparse import LiftConfig, SnellConfig, SoraConfig, SparseConfig
from tests.conftest import make_tiny_llama
from tests.test_trainer import repeating_sequences, training_args
from trl_callbacks import SnellAllocationCallback, SoraCallback, SparseUpdateCallback

TARGETS = ["q_proj"]
MODELS = {  # method -> (config or None for the bare model, what the error says the model has)
    "lora": (lambda: LoraConfig(target_modules=TARGETS), "adapter 'default' (LoraConfig)"),
    "sparse": (lambda: SparseConfig(target_modules=TARGETS, density=0.1), "adapter 'default' (SparseConfig)"),
    "lift": (lambda: LiftConfig(target_modules=TARGETS, density=0.1, rank=4), "adapter 'default' (LiftConfig)"),
    "sora": (lambda: SoraConfig(target_modules=TARGETS, r=2), "adapter 'default' (SoraConfig)"),
    "snell": (lambda: SnellConfig(target_modules=TARGETS, r=4, sparsity=0.5), "adapter 'default' (SnellConfig)"),
    "snella": (lambda: SnellConfig(target_modules=TARGETS, r=4, allocation="snella", target_sparsity=0.8),
               "adapter 'default' (SnellConfig)"),
    "no-adapter": (None, "no peft adapter (a LlamaForCausalLM)"),
}  # fmt: skip
CALLBACKS = {  # callback -> (the methods it names, the models it drives)
    SparseUpdateCallback: ("SparseConfig and LiftConfig", {"sparse", "lift"}),
    SoraCallback: ("SoraConfig", {"sora"}),
    SnellAllocationCallback: ('SnellConfig(allocation="snella")', {"snella"}),
}
WRONG = [(callback, method) for callback, (_, driven) in CALLBACKS.items() for method in MODELS if method not in driven]


@pytest.mark.parametrize("callback_cls, method", WRONG, ids=[f"{c.__name__}-{m}" for c, m in WRONG])
def test_callback_on_a_model_without_its_method_raises_naming_both(tmp_path, callback_cls, method):
    make_config, has = MODELS[method]
    model = make_tiny_llama() if make_config is None else get_peft_model(make_tiny_llama(), make_config())
    args = training_args(tmp_path, max_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=repeating_sequences(8), callbacks=[callback_cls()])
    message = (
        f"{callback_cls.__name__} drives {CALLBACKS[callback_cls][0]} adapters, got a model with {has}; pass the "
        "callback of the model's method (SparseConfig, LiftConfig: SparseUpdateCallback; SoraConfig: SoraCallback; "
        'SnellConfig(allocation="snella"): SnellAllocationCallback; RosaConfig(mask_rule="gradient"): RosaCallback; '
        'SnellConfig(allocation="none"), RosaConfig(mask_rule="magnitude"), LoRA and other peft methods: none)'
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        trainer.train()
