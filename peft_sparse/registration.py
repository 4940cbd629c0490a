"""The one place that teaches peft our PeftTypes.

peft keeps method names in the ``PeftType`` enum; ``aenum.extend_enum`` adds real
members (so ``isinstance``/``.value``/``PeftType("SPARSE")`` work), then
``register_peft_method`` fills peft's config/tuner/prefix mappings. Importing
``peft_sparse`` runs this once; running it again changes nothing.
"""

from __future__ import annotations

from aenum import extend_enum
from peft.utils import register_peft_method
from peft.utils.peft_types import PeftType

PEFT_TYPE_NAMES = ("SPARSE",)

for _name in PEFT_TYPE_NAMES:
    if _name not in PeftType.__members__:
        extend_enum(PeftType, _name, _name)


def register_methods() -> None:
    """Register every peft_sparse method with peft (idempotent)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    from .tuners.sparse import SparseConfig, SparseModel

    for name, config_cls, model_cls in (("sparse", SparseConfig, SparseModel),):
        if PeftType[name.upper()] in PEFT_TYPE_TO_CONFIG_MAPPING:
            continue
        register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=model_cls.prefix)
