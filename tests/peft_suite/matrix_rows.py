"""Our rows for peft's ``tests/test_custom_models.py`` matrix, in its own row formats.

``TEST_CASES`` rows are ``(test name, model id, config class, config kwargs)``; the models are
peft's tiny ``MLP`` (``lin0``: Linear 10->20, ``lin1``: Linear 20->2) and ``EmbConv1D``
(``emb``: Embedding, ``conv1d``: transformers Conv1D 5->1, ``lin0``: Linear 10->2). Our methods
adapt Linear and Conv1D only, so no row targets ``emb`` or a Conv2d model. Variants mirror peft's
rows for SHiRA/VeRA/LoRA: a regex string target, single and double targets, ``modules_to_save``,
budgets and ``init_weights=False`` (a non-zero adapter from the start). S2FT derives its targets from
its module roles, so its rows name ``attention_output_modules`` (heads of ``head_dim`` input columns),
``ffn_output_modules`` (channels: input columns) and ``ffn_input_modules`` (the same channels as output
rows: ``lin0`` feeds ``lin1``'s 20 channels) instead of ``target_modules``.

``MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES`` rows are ``(test name, tuner method, config class,
kwargs of adapter 1, kwargs of adapter 2)`` on ``MLP``.
"""

from __future__ import annotations

from peft import LoraConfig

from peft_sparse import LiftConfig, RosaConfig, S2ftConfig, SnellConfig, SoraConfig, SparseConfig

OUR_CONFIG_CLASSES = (SparseConfig, LiftConfig, SoraConfig, SnellConfig, S2ftConfig, RosaConfig)

SPARSE_ROWS = [
    # density 0.1, not the default 0.01: 2 entries of lin0 can both sit on hidden units that ReLU zeroes
    # for the first sample, which test_safe_merge compares
    ("Vanilla MLP 1 SPARSE", "MLP", SparseConfig, {"target_modules": "lin0", "density": 0.1}),
    ("Vanilla MLP 2 SPARSE", "MLP", SparseConfig, {"target_modules": ["lin0"], "density": 0.1}),
    ("Vanilla MLP 3 SPARSE", "MLP", SparseConfig, {"target_modules": ["lin1"], "density": 0.5}),
    ("Vanilla MLP 4 SPARSE", "MLP", SparseConfig, {"target_modules": ["lin0", "lin1"], "density": 0.25}),
    (
        "Vanilla MLP 5 SPARSE",
        "MLP",
        SparseConfig,
        {"target_modules": ["lin0"], "modules_to_save": ["lin1"], "density": 0.1},
    ),
    (
        "Vanilla MLP 6 SPARSE num_tunable_weights",
        "MLP",
        SparseConfig,
        {"target_modules": ["lin0", "lin1"], "num_tunable_weights": 50, "init_weights": False},
    ),
    (
        "Vanilla MLP 7 SPARSE random selection",
        "MLP",
        SparseConfig,
        {"target_modules": ["lin0", "lin1"], "density": 0.25, "selection": "random", "init_weights": False},
    ),
    (
        "Vanilla MLP 8 SPARSE additive",
        "MLP",
        SparseConfig,
        {"target_modules": ["lin0", "lin1"], "density": 0.25, "delta_in_place": False, "init_weights": False},
    ),
    # the other selection rules (their callbacks' steps are not part of peft's tests; the layer is the same)
    (
        "Vanilla MLP 9 SPARSE sara",
        "MLP",
        SparseConfig,
        {"target_modules": ["lin0", "lin1"], "density": 0.25, "selection": "sara", "init_weights": False},
    ),
    (
        "Vanilla MLP 10 SPARSE hft",
        "MLP",
        SparseConfig,
        {"target_modules": ["lin0", "lin1"], "density": 0.25, "selection": "hft", "init_weights": False},
    ),
    ("Vanilla MLP 11 SPARSE id3", "MLP", SparseConfig, {"target_modules": ["lin0", "lin1"], "density": 0.25,
                                                         "selection": "id3"}),  # fmt: skip
    (
        "Vanilla MLP 12 SPARSE lt-sft",
        "MLP",
        SparseConfig,
        {"target_modules": ["lin0", "lin1"], "density": 0.25, "selection": "lt-sft", "init_weights": False},
    ),
    (
        "Embedding + transformers Conv1D 1 SPARSE",
        "EmbConv1D",
        SparseConfig,
        {"target_modules": ["conv1d"], "density": 0.5},
    ),
    (
        "Embedding + transformers Conv1D 2 SPARSE",
        "EmbConv1D",
        SparseConfig,
        {"target_modules": ["conv1d", "lin0"], "density": 0.5, "init_weights": False},
    ),
]

LIFT_ROWS = [
    ("Vanilla MLP 1 LIFT", "MLP", LiftConfig, {"target_modules": "lin0", "rank": 2}),
    ("Vanilla MLP 2 LIFT", "MLP", LiftConfig, {"target_modules": ["lin0"], "density": 0.1, "rank": 4}),
    ("Vanilla MLP 3 LIFT", "MLP", LiftConfig, {"target_modules": ["lin1"], "density": 0.5, "rank": 1}),
    (
        "Vanilla MLP 4 LIFT lora_rank_budget",
        "MLP",
        LiftConfig,
        {"target_modules": ["lin0", "lin1"], "lora_rank_budget": 1, "rank": 0.5},
    ),
    ("Vanilla MLP 5 LIFT", "MLP", LiftConfig, {"target_modules": ["lin0"], "modules_to_save": ["lin1"], "rank": 2}),
    (
        "Vanilla MLP 6 LIFT exact svd",
        "MLP",
        LiftConfig,
        {"target_modules": ["lin0", "lin1"], "density": 0.25, "rank": 2, "svd_method": "exact", "init_weights": False},
    ),
    (
        "Vanilla MLP 7 LIFT additive",
        "MLP",
        LiftConfig,
        {
            "target_modules": ["lin0", "lin1"],
            "density": 0.25,
            "rank": 2,
            "delta_in_place": False,
            "init_weights": False,
        },
    ),
    (
        "Embedding + transformers Conv1D 1 LIFT",
        "EmbConv1D",
        LiftConfig,
        {"target_modules": ["conv1d"], "density": 0.5, "rank": 1},
    ),
    (
        "Embedding + transformers Conv1D 2 LIFT",
        "EmbConv1D",
        LiftConfig,
        {"target_modules": ["conv1d", "lin0"], "density": 0.5, "rank": 1, "init_weights": False},
    ),
]

SORA_ROWS = [
    ("Vanilla MLP 1 SORA", "MLP", SoraConfig, {"target_modules": "lin0", "r": 2}),
    ("Vanilla MLP 2 SORA", "MLP", SoraConfig, {"target_modules": ["lin0"], "r": 4}),
    ("Vanilla MLP 3 SORA", "MLP", SoraConfig, {"target_modules": ["lin1"], "r": 2}),
    (
        "Vanilla MLP 4 SORA",
        "MLP",
        SoraConfig,
        {"target_modules": ["lin0", "lin1"], "r": 4, "alpha": 16.0, "init_weights": False},
    ),
    ("Vanilla MLP 5 SORA", "MLP", SoraConfig, {"target_modules": ["lin0"], "modules_to_save": ["lin1"], "r": 2}),
    (
        "Vanilla MLP 6 SORA dropout randn gates",
        "MLP",
        SoraConfig,
        {"target_modules": ["lin0"], "r": 4, "dropout": 0.1, "gate_init": "randn"},
    ),
    (
        "Vanilla MLP 7 SORA randn gates",
        "MLP",
        SoraConfig,
        # lin1 only: with both layers gated at random, peft's lr=0.5 SGD on y.sum() diverges to NaN
        {"target_modules": ["lin1"], "r": 4, "gate_init": "randn", "init_weights": False},
    ),
    ("Embedding + transformers Conv1D 1 SORA", "EmbConv1D", SoraConfig, {"target_modules": ["conv1d"], "r": 2}),
    (
        "Embedding + transformers Conv1D 2 SORA",
        "EmbConv1D",
        SoraConfig,
        # alpha 2 (scale 1): at scale 4 the gate's extra factor makes peft's lr=0.5 training diverge
        {"target_modules": ["conv1d", "lin0"], "r": 2, "alpha": 2.0, "init_weights": False},
    ),
]

SNELL_ROWS = [
    ("Vanilla MLP 1 SNELL", "MLP", SnellConfig, {"target_modules": "lin0", "r": 4, "sparsity": 0.5}),
    ("Vanilla MLP 2 SNELL", "MLP", SnellConfig, {"target_modules": ["lin0"], "r": 4}),
    ("Vanilla MLP 3 SNELL", "MLP", SnellConfig, {"target_modules": ["lin1"], "r": 4, "sparsity": 0.5}),
    (
        "Vanilla MLP 4 SNELL",
        "MLP",
        SnellConfig,
        {"target_modules": ["lin0", "lin1"], "r": 4, "sparsity": 0.5, "init_weights": False},
    ),
    (
        "Vanilla MLP 5 SNELL",
        "MLP",
        SnellConfig,
        {"target_modules": ["lin0"], "modules_to_save": ["lin1"], "r": 4, "sparsity": 0.5},
    ),
    (
        "Vanilla MLP 6 SNELL rbf",
        "MLP",
        SnellConfig,
        {"target_modules": ["lin0", "lin1"], "r": 4, "sparsity": 0.5, "kernel": "rbf", "init_weights": False},
    ),
    (
        "Vanilla MLP 7 SNELL linear kernel",
        "MLP",
        SnellConfig,
        {
            "target_modules": ["lin0"],
            "r": 4,
            "kernel": "linear",
            "kernel_groups": 1,
            "sparsity": 0.5,
            "init_weights": False,
        },
    ),
    (
        "Vanilla MLP 8 SNELL magnitude competition",
        "MLP",
        SnellConfig,
        {"target_modules": ["lin0"], "r": 4, "sparsity": 0.5, "magnitude_competition": True, "init_weights": False},
    ),
    ("Vanilla MLP 9 SNELL dropout", "MLP", SnellConfig, {"target_modules": ["lin0"], "r": 4, "dropout": 0.1}),
    (
        "Embedding + transformers Conv1D 1 SNELL",
        "EmbConv1D",
        SnellConfig,
        {"target_modules": ["conv1d"], "r": 4, "sparsity": 0.5},
    ),
    (
        "Embedding + transformers Conv1D 2 SNELL",
        "EmbConv1D",
        SnellConfig,
        {"target_modules": ["conv1d", "lin0"], "r": 4, "sparsity": 0.5, "init_weights": False},
    ),
]

ROSA_RANDOM_ON_BOTH_LAYERS = {
    "target_modules": ["lin0", "lin1"],
    "r": 2,
    "lora_alpha": 2,
    "density": 0.25,
    "mask_rule": "magnitude",
    "init_weights": False,
}
ROSA_ROWS = [
    # mask_rule="gradient" (the default) holds the sparse part back until RosaCallback's mask step: those
    # rows test the LoRA part alone; "magnitude" (DSEE) rows have both parts from the start. Rows with
    # init_weights=False on both layers use lora_alpha = r (scale 1), as peft's lr=0.5 training tests
    # drive LoRA's scale 4 to NaN (see LORA_TWIN_ROWS)
    ("Vanilla MLP 1 ROSA", "MLP", RosaConfig, {"target_modules": "lin0", "r": 2, "density": 0.1}),
    ("Vanilla MLP 2 ROSA", "MLP", RosaConfig, {"target_modules": ["lin0"], "r": 4, "density": 0.1,
                                               "mask_rule": "magnitude"}),  # fmt: skip
    ("Vanilla MLP 3 ROSA", "MLP", RosaConfig, {"target_modules": ["lin1"], "r": 1, "density": 0.5,
                                               "mask_rule": "magnitude"}),  # fmt: skip
    ("Vanilla MLP 4 ROSA", "MLP", RosaConfig, ROSA_RANDOM_ON_BOTH_LAYERS),
    (
        "Vanilla MLP 5 ROSA",
        "MLP",
        RosaConfig,
        {"target_modules": ["lin0"], "modules_to_save": ["lin1"], "r": 2, "density": 0.1, "mask_rule": "magnitude"},
    ),
    (
        "Vanilla MLP 6 ROSA additive dropout",
        "MLP",
        RosaConfig,
        {**ROSA_RANDOM_ON_BOTH_LAYERS, "lora_dropout": 0.1, "delta_in_place": False},
    ),
    (
        "Vanilla MLP 7 ROSA gradient mask pending",
        "MLP",
        RosaConfig,
        {"target_modules": ["lin0", "lin1"], "r": 2, "lora_alpha": 2, "density": 0.25, "init_weights": False},
    ),
    (
        "Embedding + transformers Conv1D 1 ROSA",
        "EmbConv1D",
        RosaConfig,
        {"target_modules": ["conv1d"], "r": 1, "density": 0.5, "mask_rule": "magnitude"},
    ),
    (
        "Embedding + transformers Conv1D 2 ROSA",
        "EmbConv1D",
        RosaConfig,
        {"target_modules": ["conv1d", "lin0"], "r": 1, "density": 0.5, "mask_rule": "magnitude", "init_weights": False},
    ),
]

CHANNELS_OF_LIN1 = {"attention_output_modules": [], "ffn_output_modules": ["lin1"]}
COUPLED_LIN0_LIN1 = {**CHANNELS_OF_LIN1, "ffn_input_modules": ["lin0"]}
S2FT_ROWS = [
    ("Vanilla MLP 1 S2FT channels", "MLP", S2ftConfig, {**CHANNELS_OF_LIN1, "num_channels": 4}),
    ("Vanilla MLP 2 S2FT coupled rows", "MLP", S2ftConfig, {**COUPLED_LIN0_LIN1, "num_channels": 4}),
    (
        "Vanilla MLP 3 S2FT heads",
        "MLP",
        S2ftConfig,
        {"attention_output_modules": ["lin0"], "ffn_output_modules": [], "num_heads": 2, "head_dim": 2},
    ),
    (
        "Vanilla MLP 4 S2FT heads and channels",
        "MLP",
        S2ftConfig,
        {
            "attention_output_modules": ["lin0"],
            "ffn_output_modules": ["lin1"],
            "num_heads": 1,
            "head_dim": 5,
            "num_channels": 5,
            "init_weights": False,
        },
    ),
    (
        "Vanilla MLP 5 S2FT",
        "MLP",
        S2ftConfig,
        {
            "attention_output_modules": [],
            "ffn_output_modules": ["lin0"],
            "num_channels": 3,
            "modules_to_save": ["lin1"],
        },
    ),
    (
        "Vanilla MLP 6 S2FT weight_norm additive",
        "MLP",
        S2ftConfig,
        {
            **COUPLED_LIN0_LIN1,
            "num_channels": 6,
            "selection": "weight_norm",
            "delta_in_place": False,
            "init_weights": False,
        },
    ),
    (
        "Vanilla MLP 7 S2FT coupled rows",
        "MLP",
        S2ftConfig,
        {**COUPLED_LIN0_LIN1, "num_channels": 6, "init_weights": False},
    ),
    (
        "Embedding + transformers Conv1D 1 S2FT",
        "EmbConv1D",
        S2ftConfig,
        {"attention_output_modules": [], "ffn_output_modules": ["conv1d"], "num_channels": 2},
    ),
    (
        "Embedding + transformers Conv1D 2 S2FT",
        "EmbConv1D",
        S2ftConfig,
        {
            "attention_output_modules": ["lin0"],
            "ffn_output_modules": ["conv1d"],
            "num_heads": 1,
            "head_dim": 5,
            "num_channels": 2,
            "init_weights": False,
        },
    ),
]

TEST_CASES = SPARSE_ROWS + LIFT_ROWS + SORA_ROWS + SNELL_ROWS + S2FT_ROWS + ROSA_ROWS

# LoRA with the scale and init of SoRA rows that peft's lr=0.5 training tests drive to NaN
# (test_parameters_after_loading_model), run beside peft's LoRA rows to tell the test's
# divergence from SoRA's
LORA_TWIN_ROWS = [
    (
        "Vanilla MLP 4 LoRA twin of SORA",
        "MLP",
        LoraConfig,
        {"target_modules": ["lin0", "lin1"], "r": 4, "lora_alpha": 16, "init_lora_weights": False},
    ),
    (
        "Embedding + transformers Conv1D 2 LoRA twin of SORA",
        "EmbConv1D",
        LoraConfig,
        {"target_modules": ["conv1d", "lin0"], "r": 2, "lora_alpha": 8, "init_lora_weights": False},
    ),
]


def _same_and_different(label: str, tuner_method: str, config_cls, kwargs: dict, second_kwargs: dict) -> list:
    """peft's "<method> Same" / "<method> Different" pair: both adapters on lin0, or lin0 and lin1."""
    first = {"target_modules": ["lin0"], "init_weights": False, **kwargs}
    second = {**first, **second_kwargs}
    return [
        (f"{label} Same", tuner_method, config_cls, first, second),
        (f"{label} Different", tuner_method, config_cls, first, {**second, "target_modules": ["lin1"]}),
    ]


# S2FT has no target_modules: "Same" trains channels of lin0 in both adapters, "Different" of lin0 and lin1
S2FT_ADAPTER = {"attention_output_modules": [], "ffn_output_modules": ["lin0"], "num_channels": 2}

# SFT and LIFT seed their initial values per layer from init_seed, so two adapters built from one
# config are identical; the second adapter gets its own seed, as two adapters in real use would.
MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES = (
    _same_and_different("SPARSE", "sparse", SparseConfig, {"density": 0.5}, {"init_seed": 7})
    + _same_and_different("LIFT", "lift", LiftConfig, {"density": 0.5, "rank": 2}, {"init_seed": 7})
    + _same_and_different("SORA", "sora", SoraConfig, {"r": 2}, {})
    + _same_and_different("SNELL", "snell", SnellConfig, {"r": 4, "sparsity": 0.5}, {})
    + _same_and_different("ROSA", "rosa", RosaConfig, {"r": 2, "density": 0.5, "mask_rule": "magnitude"},
                          {"init_seed": 7})
    + [
        (f"S2FT {kind}", "s2ft", S2ftConfig, {**S2FT_ADAPTER, "init_weights": False}, {**S2FT_ADAPTER, **second})
        for kind, second in [
            ("Same", {"init_weights": False, "init_seed": 7}),
            ("Different", {"init_weights": False, "init_seed": 7, "ffn_output_modules": ["lin1"]}),
        ]
    ]
)
