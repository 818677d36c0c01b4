"""lorakit: LoRA (Low-Rank Adaptation) for PyTorch models.

    h = W0 x + (alpha / r) B A x        W0 frozen (d x k), A (r x k), B (d x r), B starts at 0

Quick tour::

    import lorakit
    cfg = lorakit.LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"])
    lorakit.inject(model, cfg)                  # in place; only A and B train
    print(lorakit.parameter_report(model))
    lorakit.save_adapter(model, "out/sql")      # PEFT's layout: PEFT and vLLM read it
    lorakit.load_adapter(model, "out/js", name="js")
    lorakit.set_adapter(model, "js")            # O(1) switch
"""

from .adapters import (active_adapter, adapter_names, adapter_parameters, delete_adapter, disable_adapters,
                       get_config, merge, set_adapter, set_trainable, unload, unmerge)
from .atomic import FileWriteError
from .config import LoraConfig
from .errors import (AdapterExists, AdapterFormatError, AdapterNotFound, CheckpointError, ConfigError, LoraError,
                     MergedStateError, ShapeMismatch, TargetNotFound, UnsupportedModule)
from .fingerprint import BaseModelMismatch, BaseModelWarning
from .inject import inject
from .io import load_adapter, lora_state_dict, save_adapter
from .layers import LoraAdapter, LoraConv, LoraEmbedding, LoraLayer, LoraLinear, LoraState, SavedModule
from .multi import RowPlan, batch_adapters
from .cache import AdapterCache, adapter_cache
from . import compiled  # noqa: F401  (registers the lorakit:: operators torch.compile runs)
from .report import ParameterReport, parameter_report

__version__ = "0.1.0"

__all__ = [
    "LoraConfig", "inject", "parameter_report", "ParameterReport",
    "save_adapter", "load_adapter", "lora_state_dict",
    "set_adapter", "active_adapter", "adapter_names", "delete_adapter", "disable_adapters",
    "merge", "unmerge", "unload", "get_config", "set_trainable", "adapter_parameters",
    "LoraAdapter", "LoraLayer", "LoraLinear", "LoraEmbedding", "LoraConv", "LoraState", "SavedModule",
    "LoraError", "ConfigError", "TargetNotFound", "UnsupportedModule", "AdapterNotFound", "AdapterExists",
    "ShapeMismatch", "AdapterFormatError", "MergedStateError", "CheckpointError", "FileWriteError",
    "BaseModelMismatch", "BaseModelWarning",
    "batch_adapters", "RowPlan", "adapter_cache", "AdapterCache",
]
