"""LoraConfig: what to adapt and how, and its exact round trip with PEFT's adapter_config.json.

The scale applied to the low-rank update is ``alpha / r`` (the paper), or
``alpha / sqrt(r)`` with rsLoRA (Kalajdzievski 2023, "A Rank Stabilization Scaling
Factor for Fine-Tuning with LoRA"), so that the update's magnitude does not shrink as r
grows.

Per-module overrides follow PEFT: a key of ``rank_pattern`` / ``alpha_pattern`` is a
regular expression matched against the end of a module's dotted path
(``re.match(rf"(.*\\.)?({key})$", path)``); the first matching key wins.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, Optional, Union

from .errors import ConfigError

InitKind = Literal["kaiming", "gaussian"]
AdapterDType = Literal["auto", "float32", "bfloat16", "float16"]
Patterns = Union[list[str], str, None]

_INITS = ("kaiming", "gaussian")

# PEFT fields that change which layers are adapted or what they compute (PEFT marks most as
# "is_lora_variant"); a file that enables one is refused rather than loaded as plain LoRA.
# Fields that only choose an initialisation (init_lora_weights, loftq/eva/corda/lora_ga configs)
# or a training-time backward (velora_config: its eval forward is plain LoRA) do not matter
# when the weights come from the file.
_UNSUPPORTED_PEFT_FIELDS = ("use_dora", "layers_to_transform", "layers_pattern", "layer_replication",
                            "target_parameters", "trainable_token_indices", "lora_bias", "use_qalora",
                            "alora_invocation_tokens", "arrow_config", "use_bdlora", "kasa_config",
                            "monteclora_config")
_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class LoraConfig:
    """How to adapt a model with LoRA.

    Example::

        cfg = LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"])
    """

    r: int = 8
    """Rank of the update: A is (r x k), B is (d x r). An integer >= 1."""
    alpha: float = 8.0
    """Numerator of the scale: scale = alpha / r (alpha / sqrt(r) with use_rslora). Finite, > 0."""
    dropout: float = 0.0
    """Dropout probability on the adapter's input (training mode only). In [0, 1)."""
    target_modules: Patterns = None
    """Which modules to adapt: a list of names matched exactly or as a dotted suffix
    ("q_proj" matches "model.layers.0.self_attn.q_proj"), a string that must fully match
    the module path as a regular expression, or "all-linear" (every nn.Linear and GPT-2
    Conv1D except the output head). None picks well-known names for common models."""
    exclude_modules: Patterns = None
    """Modules never to adapt, with the same matching rules as target_modules."""
    bias: Literal["none"] = "none"
    """Which biases train. Only "none" is supported: biases stay frozen."""
    init: InitKind = "kaiming"
    """Initialisation of A: "kaiming" (Kaiming-uniform, as PEFT) or "gaussian" (N(0, 1/r), as the paper).
    B always starts at zero, so the adapted model starts equal to the base model."""
    use_rslora: bool = False
    """Use the rank-stabilised scale alpha / sqrt(r)."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module rank overrides: {regex matched at the end of the module path: r}."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-module alpha overrides: {regex matched at the end of the module path: alpha}."""
    modules_to_save: Optional[list[str]] = None
    """Modules trained in full and saved with the adapter (e.g. a classifier head)."""
    adapter_dtype: AdapterDType = "auto"
    """dtype of A and B: "auto" follows the base weight's dtype (the fast default);
    "float32" keeps adapter weights in float32 even on a bfloat16 base."""
    base_model_name_or_path: Optional[str] = None
    """Recorded in the saved config so tools know which base the adapter belongs to."""
    task_type: Optional[str] = None
    """PEFT's task type (e.g. "CAUSAL_LM"), recorded in the saved config."""

    def __post_init__(self) -> None:
        problems = []
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            problems.append(f"r must be an integer >= 1, got {self.r!r}")
        if not _positive_number(self.alpha):
            problems.append(f"alpha must be a finite number > 0, got {self.alpha!r}")
        if (isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float))
                or not 0.0 <= self.dropout < 1.0):
            problems.append(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        if self.bias != "none":
            problems.append(f"bias must be 'none' (training biases is not supported yet), got {self.bias!r}")
        if self.init not in _INITS:
            problems.append(f"init must be one of {_INITS}, got {self.init!r}")
        if self.adapter_dtype not in _DTYPES:
            problems.append(f"adapter_dtype must be one of {_DTYPES}, got {self.adapter_dtype!r}")
        if not isinstance(self.use_rslora, bool):
            problems.append(f"use_rslora must be a bool, got {self.use_rslora!r}")
        problems += _check_patterns("target_modules", self.target_modules)
        problems += _check_patterns("exclude_modules", self.exclude_modules)
        if self.modules_to_save is not None and (
                isinstance(self.modules_to_save, str)
                or not all(isinstance(m, str) and m for m in self.modules_to_save)):
            problems.append(f"modules_to_save must be a list of module names, got {self.modules_to_save!r}")
        problems += _check_overrides("rank_pattern", self.rank_pattern, _positive_int, "an integer >= 1")
        problems += _check_overrides("alpha_pattern", self.alpha_pattern, _positive_number, "a finite number > 0")
        if problems:
            raise ConfigError("invalid LoraConfig: " + "; ".join(problems))
        if isinstance(self.target_modules, str) and self.target_modules.lower() == "all-linear":
            self.target_modules = "all-linear"          # PEFT accepts any case
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = sorted(set(self.target_modules))
        if isinstance(self.exclude_modules, (list, tuple, set)):
            self.exclude_modules = sorted(set(self.exclude_modules))
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)

    # -- per-module values ---------------------------------------------------------
    def rank_for(self, path: str) -> int:
        """The rank used for the module at ``path`` (rank_pattern first, then r)."""
        key = _pattern_key(self.rank_pattern, path)
        return self.rank_pattern[key] if key is not None else self.r

    def alpha_for(self, path: str) -> float:
        """The alpha used for the module at ``path`` (alpha_pattern first, then alpha)."""
        key = _pattern_key(self.alpha_pattern, path)
        return self.alpha_pattern[key] if key is not None else self.alpha

    def scale_for(self, path: str) -> float:
        """scale = alpha / r, or alpha / sqrt(r) with rsLoRA, for the module at ``path``."""
        r, alpha = self.rank_for(path), self.alpha_for(path)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def replace(self, **changes: Any) -> "LoraConfig":
        """A validated copy with some fields changed."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return LoraConfig(**values)

    # -- PEFT adapter_config.json ---------------------------------------------------
    def to_peft_dict(self, target_modules: Optional[list[str]] = None, fan_in_fan_out: bool = False
                     ) -> dict[str, Any]:
        """The adapter_config.json content PEFT expects.

        ``target_modules`` (the adapted module names, resolved against a model) replaces
        the patterns, as PEFT does for "all-linear"; exclusions are then already applied.
        ``fan_in_fan_out`` is True when the adapted layers store W transposed (GPT-2 Conv1D),
        which PEFT records so.
        """
        targets = self.target_modules if target_modules is None else sorted(target_modules)
        return {
            "peft_type": "LORA",
            "task_type": self.task_type,
            "base_model_name_or_path": self.base_model_name_or_path,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": targets,
            "exclude_modules": None if target_modules is not None else self.exclude_modules,
            "bias": self.bias,
            "use_rslora": self.use_rslora,
            "use_dora": False,
            "init_lora_weights": True if self.init == "kaiming" else "gaussian",
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "fan_in_fan_out": bool(fan_in_fan_out),
            "modules_to_save": self.modules_to_save,
            "layers_to_transform": None,
            "layers_pattern": None,
            "inference_mode": True,
            "revision": None,
        }

    @classmethod
    def from_peft_dict(cls, d: dict[str, Any], source: str = "adapter_config.json") -> "LoraConfig":
        """Read PEFT's adapter_config.json content; errors name ``source`` and the field."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        peft_type = d.get("peft_type")
        if peft_type != "LORA":
            raise ConfigError(f"{source}: peft_type must be 'LORA', got {peft_type!r}")
        unsupported = [k for k in _UNSUPPORTED_PEFT_FIELDS if d.get(k) not in (None, False, [], {})]
        if unsupported:
            raise ConfigError(f"{source}: LoRA variants lorakit does not support yet are enabled: "
                              + ", ".join(f"{k}={d[k]!r}" for k in unsupported))
        init = d.get("init_lora_weights", True)
        values = dict(
            r=d.get("r", 8),
            alpha=d.get("lora_alpha", 8),
            dropout=d.get("lora_dropout", 0.0),
            target_modules=d.get("target_modules"),
            exclude_modules=d.get("exclude_modules"),
            bias=d.get("bias", "none"),
            init="gaussian" if init == "gaussian" else "kaiming",
            use_rslora=d.get("use_rslora", False),
            rank_pattern=d.get("rank_pattern") or {},
            alpha_pattern=d.get("alpha_pattern") or {},
            modules_to_save=d.get("modules_to_save"),
            base_model_name_or_path=d.get("base_model_name_or_path"),
            task_type=d.get("task_type"),
        )
        if d.get("fan_in_fan_out") not in (None, False, True):
            raise ConfigError(f"{source}: fan_in_fan_out must be a bool, got {d.get('fan_in_fan_out')!r}")
        try:
            return cls(**values)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (lorakit's own names)."""
        return asdict(self)


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _positive_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0)


def _check_patterns(name: str, value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        if value.lower() == "all-linear":
            return []
        try:
            re.compile(value)
        except re.error as e:
            return [f"{name} regex {value!r} does not compile: {e}"]
        return []
    if isinstance(value, (list, tuple, set)) and all(isinstance(v, str) and v for v in value):
        if not value:
            return [f"{name} is an empty list"]
        return []
    return [f"{name} must be a list of module names or a regex string, got {value!r}"]


def _check_overrides(name: str, value: Any, ok, what: str) -> list[str]:
    if not isinstance(value, dict):
        return [f"{name} must be a dict of {{pattern: value}}, got {type(value).__name__}"]
    bad = [f"{k!r}: {v!r}" for k, v in value.items() if not isinstance(k, str) or not ok(v)]
    if bad:
        return [f"{name} values must be {what}: " + ", ".join(bad)]
    problems = []
    for k in value:
        try:
            re.compile(k)
        except re.error as e:
            problems.append(f"{name} key {k!r} is not a valid regex: {e}")
    return problems


def _pattern_key(patterns: dict[str, Any], path: str) -> Optional[str]:
    """PEFT's rule: the first key that matches the end of the dotted path."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", path):
            return key
    return None
