"""The memory plan: hand-counted bytes on a tiny config, sharding, the activation formula, the CLI."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from peft_sparse import SnellConfig, SoraConfig, SparseConfig
from peft_sparse.cli import main
from peft_sparse.memory_plan import (
    Budget,
    DecoderShape,
    TrainingSetup,
    decoder_plan,
    human_bytes,
    layer_activation_bytes,
)

TINY = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, vocab_size=100, tie_word_embeddings=True,
)  # fmt: skip
# [out, in] of q, k, v, o, gate, up, down
TINY_TARGETS = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)]
TINY_VALUES = 2 * (41 + 20 + 20 + 41 + 82 + 82 + 82)  # round(0.01 * out * in) per matrix, 2 layers
TINY_LORA_R2 = 2 * 2 * sum(out + inp for out, inp in TINY_TARGETS)  # r * (in + out) per matrix, 2 layers
TINY_PARAMETERS = 2 * (sum(out * inp for out, inp in TINY_TARGETS) + 2 * 64) + 100 * 64 + 64
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture
def tiny() -> DecoderShape:
    return DecoderShape(**TINY)


def test_sft_counts_match_hand_counts(tiny):
    plan = decoder_plan(tiny, "sft", Budget(density=0.01), TrainingSetup(dtype="fp32"), selection="random")
    assert plan.trainable == TINY_VALUES
    assert plan.adapter == TINY_VALUES * (4 + 4)  # fp32 values, int32 indices
    assert plan.gradients == TINY_VALUES * 4
    assert plan.optimizer == TINY_VALUES * 8  # two fp32 AdamW moments
    assert plan.base_weights == TINY_PARAMETERS * 4
    assert plan.selection == 0


def test_lora_counts_match_hand_counts(tiny):
    plan = decoder_plan(tiny, "lora", Budget(lora_rank=2), TrainingSetup())
    assert plan.trainable == TINY_LORA_R2
    assert (plan.adapter, plan.gradients, plan.optimizer) == (TINY_LORA_R2 * 4, TINY_LORA_R2 * 4, TINY_LORA_R2 * 8)
    assert plan.bookkeeping == plan.selection == 0


def test_density_budget_gives_lora_the_nearest_rank(tiny):
    # 736 values over sum(in + out) = 2 * 1024: rank 0.36 rounds to the smallest rank, 1
    assert Budget(density=0.01).rank(tiny.targets) == 1
    assert Budget(density=0.1).rank(tiny.targets) == round(2 * 3687 / 2048)


def test_fsdp_divides_sharded_states_by_world_size(tiny):
    budget, single = Budget(density=0.01), decoder_plan(tiny, "sft", Budget(density=0.01), TrainingSetup())
    sharded = decoder_plan(tiny, "sft", budget, TrainingSetup(world_size=4, strategy="fsdp"))
    assert sharded.base_weights == single.base_weights / 4
    assert sharded.gradients == single.gradients / 4
    assert sharded.optimizer == single.optimizer / 4
    assert sharded.adapter == TINY_VALUES * 4 / 4 + TINY_VALUES * 4  # values sharded, indices (buffers) whole
    assert sharded.gathered_layer == (sum(out * inp for out, inp in TINY_TARGETS) + 2 * 64) * 2
    assert sharded.activations == single.activations


def test_ddp_replicates_and_doubles_gradients_for_its_buckets(tiny):
    single = decoder_plan(tiny, "lora", Budget(lora_rank=2), TrainingSetup())
    replicated = decoder_plan(tiny, "lora", Budget(lora_rank=2), TrainingSetup(world_size=8))
    assert (replicated.base_weights, replicated.optimizer) == (single.base_weights, single.optimizer)
    assert replicated.gradients == 2 * single.gradients
    assert replicated.gathered_layer == 0


def test_lift_workspace_replaces_activations_in_the_peak(tiny):
    plan = decoder_plan(tiny, "lift", Budget(density=0.01), TrainingSetup(seq_len=4))
    assert plan.selection > plan.activations  # 3 fp32 copies of the largest matrix beat 4 tokens
    rest = plan.base_weights + plan.adapter + plan.bookkeeping + plan.gradients + plan.optimizer
    assert plan.total == rest + plan.selection


def _saved_bytes(method: str, dtype: torch.dtype, layers: int, tokens: tuple[int, int], autocast: bool) -> int:
    """Bytes autograd saves in a forward (storages other than parameters counted once)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, "num_hidden_layers": layers})).to(dtype)
    configs = {
        "sft": lambda: SparseConfig(density=0.01, selection="random", target_modules=LLAMA_TARGETS),
        "lora": lambda: LoraConfig(r=2, target_modules=LLAMA_TARGETS),
        "sora": lambda: SoraConfig(r=2, target_modules=LLAMA_TARGETS),
        "snell": lambda: SnellConfig(r=2, target_modules=LLAMA_TARGETS),
    }
    model = get_peft_model(model, configs[method]())
    parameters = {tensor.untyped_storage().data_ptr() for tensor in model.parameters()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    input_ids = torch.randint(0, TINY["vocab_size"], tokens)
    with torch.autocast("cpu", dtype=dtype, enabled=autocast):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(input_ids=input_ids, labels=input_ids)
    return sum(saved.values())


@pytest.mark.parametrize(
    ("dtype", "autocast"), [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)],
    ids=["fp32", "bf16", "bf16-autocast"],
)
@pytest.mark.parametrize("method", ["sft", "lora", "sora", "snell"])
def test_layer_activation_formula_matches_what_autograd_saves(tiny, method, dtype, autocast):
    tokens = (2, 8)
    per_layer = _saved_bytes(method, dtype, 3, tokens, autocast) - _saved_bytes(method, dtype, 2, tokens, autocast)
    expected = layer_activation_bytes(tiny, method, 2, dtype.itemsize, autocast) * tokens[0] * tokens[1]
    per_layer_not_per_token = 0  # SNELL in place saves what SFT saves (its threshold lives on the binding)
    if autocast and method in ("lora", "sora"):  # autocast's 16-bit casts of LoRA's / SoRA's A and B
        per_layer_not_per_token = dtype.itemsize * 2 * sum(out + inp for out, inp in TINY_TARGETS)
    assert per_layer == expected + per_layer_not_per_token


def test_autocast_needs_a_16_bit_base():
    with pytest.raises(ValueError, match="--autocast needs a 16-bit --dtype"):
        TrainingSetup(dtype="fp32", autocast=True)


def test_human_bytes():
    assert [human_bytes(value) for value in (512, 1536, 3 * 2**30, 999.7 * 2**20)] == [
        "512 B", "1.50 KiB", "3.00 GiB", "0.98 GiB",
    ]  # fmt: skip


def _plan_cli(capsys, *args) -> tuple[int, str, str]:
    status = main(["plan", *map(str, args)])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_cli_plans_from_a_config_file_and_from_a_model_folder(tmp_path, capsys):
    LlamaConfig(**TINY).save_pretrained(tmp_path)
    status, from_folder, _ = _plan_cli(capsys, "--config", tmp_path, "--world-size", 8, "--strategy", "fsdp")
    assert status == 0
    header = from_folder.splitlines()[4]
    assert header == "| per device | SFT (ag) | LIFT | SoRA | SNELL | LoRA (peft) |"
    assert "| gathered layer (FSDP/ZeRO-3) |" in from_folder and "**total (peak)**" in from_folder
    status, from_file, _ = _plan_cli(capsys, "--config", tmp_path / "config.json", "--world-size", 8, "--strategy",
                                     "fsdp")  # fmt: skip
    assert status == 0 and from_file.splitlines()[1:] == from_folder.splitlines()[1:]


def test_cli_with_one_method_shows_it_beside_lora(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(LlamaConfig(**TINY).to_dict()))
    status, out, _ = _plan_cli(capsys, "--config", tmp_path, "--method", "snell", "--quantized", "4bit")
    assert status == 0
    assert "| per device | SNELL | LoRA (peft) |" in out


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--config", "missing/config.json"], "--config"),
        (["--method", "dora"], "--method"),
        (["--strategy", "zero2"], "--strategy"),
        (["--density", "0"], "--density"),
        (["--density", "1.5"], "--density"),
        (["--quantized", "3bit"], "--quantized"),
        (["--world-size", "0"], "--world-size"),
    ],
)
def test_cli_errors_name_the_option(tmp_path, capsys, args, option):
    LlamaConfig(**TINY).save_pretrained(tmp_path)
    status, out, err = _plan_cli(capsys, "--config", tmp_path, *args)
    assert status == 2 and out == ""
    assert err.startswith(f"error: {option} must")


def test_config_without_sizes_is_refused(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64}))
    status, _, err = _plan_cli(capsys, "--config", tmp_path)
    assert status == 2
    assert "--config must give integer intermediate_size, num_hidden_layers, num_attention_heads, vocab_size" in err
