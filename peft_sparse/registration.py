"""The one place that teaches peft our PeftTypes.

peft keeps method names in the ``PeftType`` enum; ``aenum.extend_enum`` adds real
members (so ``isinstance``/``.value``/``PeftType("SPARSE")`` work), then
``register_peft_method`` fills peft's config/tuner/prefix mappings. Importing
``peft_sparse`` runs this once; running it again changes nothing.
"""

from __future__ import annotations

import importlib

from aenum import extend_enum
from peft.utils import register_peft_method
from peft.utils.peft_types import PeftType

# One row per method: (PeftType name, tuner package, config class, model class).
METHODS: tuple[tuple[str, str, str, str], ...] = (
    ("SPARSE", "peft_sparse.tuners.sparse", "SparseConfig", "SparseModel"),
    ("LIFT", "peft_sparse.tuners.lift", "LiftConfig", "LiftModel"),
    ("SORA", "peft_sparse.tuners.sora", "SoraConfig", "SoraModel"),
    ("SNELL", "peft_sparse.tuners.snell", "SnellConfig", "SnellModel"),
    ("S2FT", "peft_sparse.tuners.s2ft", "S2ftConfig", "S2ftModel"),
    ("ROSA", "peft_sparse.tuners.rosa", "RosaConfig", "RosaModel"),
)

for _name, *_ in METHODS:
    if _name not in PeftType.__members__:
        extend_enum(PeftType, _name, _name)


def register_methods() -> None:
    """Register every peft_sparse method with peft (idempotent)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    for name, package, config_name, model_name in METHODS:
        if PeftType[name] in PEFT_TYPE_TO_CONFIG_MAPPING:
            continue
        tuner = importlib.import_module(package)
        model_cls = getattr(tuner, model_name)
        register_peft_method(
            name=name.lower(), config_cls=getattr(tuner, config_name), model_cls=model_cls, prefix=model_cls.prefix
        )
