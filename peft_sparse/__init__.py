"""Sparse and sparse-low-rank fine-tuning methods for peft.

``import peft_sparse`` registers the methods, after which ``get_peft_model``,
``PeftModel.from_pretrained`` and ``AutoPeftModelFor*`` handle them like LoRA.
"""

from .registration import register_methods

register_methods()

from .delta_tools import breadcrumbs_merge_adapters, compress_adapter  # noqa: E402
from .export import LoraExport, export_sora_to_lora, export_to_lora  # noqa: E402
from .format_version import FORMAT_VERSION, __version__  # noqa: E402
from .tuners.lift import LiftConfig, LiftModel  # noqa: E402
from .tuners.rosa import RosaConfig, RosaModel  # noqa: E402
from .tuners.s2ft import S2ftConfig, S2ftModel  # noqa: E402
from .tuners.snell import SnellConfig, SnellModel  # noqa: E402
from .tuners.sora import SoraConfig, SoraModel  # noqa: E402
from .tuners.sparse import SparseConfig, SparseModel  # noqa: E402

__all__ = [
    "LiftConfig", "LiftModel", "S2ftConfig", "S2ftModel", "SnellConfig", "SnellModel", "SoraConfig", "SoraModel", "SparseConfig", "SparseModel",
    "RosaConfig", "RosaModel",
    "FORMAT_VERSION", "export_sora_to_lora", "__version__",
    "LoraExport", "export_to_lora", "compress_adapter", "breadcrumbs_merge_adapters",
]
