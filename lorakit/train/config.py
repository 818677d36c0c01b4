"""The training configuration: typed dataclasses, read from YAML and/or command-line flags.

    model:   {model: null, dtype: float32, device: auto}
    lora:    {r: 8, alpha: 16, dropout: 0.0, target_modules: [q_proj, v_proj]}
    data:    {train_file: train.jsonl, valid_file: null, max_length: 512, packing: false}
    optim:   {lr: 2.0e-4, schedule: cosine, warmup_steps: 10, batch_size: 8, grad_accum: 1}
    run:     {out_dir: runs/exp, steps: 200, eval_every: 50, save_every: 100, keep_last: 2}

Precedence: defaults < the YAML file < flags. Every field is also a flag named after it
(``--lr``, ``--batch-size``, ``--target-modules q_proj v_proj``); field names are unique
across sections so flags need no prefix. Validation runs in each section's
``__post_init__`` and names the field as ``section.field``; all problems are reported at once.
"""

from __future__ import annotations

import argparse
import math
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Optional, Union

from ..errors import ConfigError

Format = Literal["auto", "text", "prompt_completion", "messages", "alpaca"]
Schedule = Literal["cosine", "linear", "constant"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
DType = Literal["float32", "bfloat16", "float16"]


def _f(default: Any = None, help: str = "", factory: Any = None):
    """A dataclass field carrying its flag help text."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelSection:
    """Which base model to adapt."""

    model: Optional[str] = _f(None, "base model: a HF folder, a .gguf file or a hub id (default: the embedded "
                                    "SmolLM2-135M-Instruct)")
    dtype: DType = _f("float32", "dtype of the base weights")
    device: str = _f("auto", "'auto' (CUDA when present, else CPU), 'cpu', 'cuda', 'cuda:1', ...")

    def problems(self) -> list[str]:
        return _check_choice(self, "model", "dtype")


@dataclass
class LoraSection:
    """The adapter: see lorakit.LoraConfig for the meaning of each field."""

    r: int = _f(8, "rank of the update")
    alpha: float = _f(16.0, "scale numerator: scale = alpha / r")
    dropout: float = _f(0.0, "dropout on the adapter input, in [0, 1)")
    target_modules: Union[list[str], str, None] = _f(None, "modules to adapt: names, 'all-linear', or one regex "
                                                           "(default: the attention query and value)")
    use_rslora: bool = _f(False, "rank-stabilised scale alpha / sqrt(r)")
    adapter_name: str = _f("default", "name of the adapter on the model")

    def problems(self) -> list[str]:
        out = []
        if not _int_at_least(self.r, 1):
            out.append(f"lora.r must be an integer >= 1, got {self.r!r}")
        if not _number(self.alpha) or self.alpha <= 0:
            out.append(f"lora.alpha must be a number > 0, got {self.alpha!r}")
        if not _number(self.dropout) or not 0 <= self.dropout < 1:
            out.append(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        return out

    def to_lora_config(self, base_name: Optional[str] = None):
        """The lorakit.LoraConfig this section describes (task type CAUSAL_LM)."""
        from ..config import LoraConfig
        targets = self.target_modules
        if isinstance(targets, list) and len(targets) == 1 and targets[0] == "all-linear":
            targets = "all-linear"
        return LoraConfig(r=self.r, alpha=float(self.alpha), dropout=float(self.dropout), target_modules=targets,
                          use_rslora=self.use_rslora, base_model_name_or_path=base_name, task_type="CAUSAL_LM")


@dataclass
class DataSection:
    """Where the examples come from and how they become token sequences."""

    train_file: Optional[str] = _f(None, "training data, JSONL (required)")
    valid_file: Optional[str] = _f(None, "validation data, JSONL (default: a split of the training file)")
    valid_fraction: float = _f(0.05, "fraction of train_file held out for validation when valid_file is unset")
    format: Format = _f("auto", "JSONL record format (auto: detected per file from the first record's keys)")
    max_length: int = _f(512, "maximum tokens per sequence")
    packing: bool = _f(False, "pack examples into max_length blocks (else pad each batch to its longest)")
    truncation: Literal["right", "drop"] = _f("right", "examples over max_length: cut the end, or drop them")

    def problems(self) -> list[str]:
        out = _check_choice(self, "format", "truncation")
        if not self.train_file:
            out.append("data.train_file is required (a JSONL file; flag --train-file)")
        if not _number(self.valid_fraction) or not 0 <= self.valid_fraction < 1:
            out.append(f"data.valid_fraction must be in [0, 1), got {self.valid_fraction!r}")
        if not _int_at_least(self.max_length, 2):
            out.append(f"data.max_length must be an integer >= 2, got {self.max_length!r}")
        return out


@dataclass
class OptimSection:
    """AdamW over the adapter parameters, with warmup and a decay schedule."""

    lr: float = _f(2e-4, "peak learning rate")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    betas: list[float] = _f(help="AdamW betas", factory=lambda: [0.9, 0.999])
    schedule: Schedule = _f("cosine", "decay after warmup: cosine / linear (to min_lr_ratio * lr) or constant")
    warmup_steps: int = _f(0, "linear warmup steps from 0 to lr")
    min_lr_ratio: float = _f(0.0, "final lr as a fraction of lr")
    batch_size: int = _f(8, "sequences per micro-batch")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    max_grad_norm: Optional[float] = _f(1.0, "clip the global gradient norm (null: no clipping)")

    def problems(self) -> list[str]:
        out = _check_choice(self, "schedule")
        if not _number(self.lr) or self.lr <= 0:
            out.append(f"optim.lr must be a number > 0, got {self.lr!r}")
        if not _number(self.weight_decay) or self.weight_decay < 0:
            out.append(f"optim.weight_decay must be >= 0, got {self.weight_decay!r}")
        if (not isinstance(self.betas, list) or len(self.betas) != 2
                or not all(_number(b) and 0 <= b < 1 for b in self.betas)):
            out.append(f"optim.betas must be two numbers in [0, 1), got {self.betas!r}")
        if not _int_at_least(self.warmup_steps, 0):
            out.append(f"optim.warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if not _number(self.min_lr_ratio) or not 0 <= self.min_lr_ratio <= 1:
            out.append(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        for name in ("batch_size", "grad_accum"):
            if not _int_at_least(getattr(self, name), 1):
                out.append(f"optim.{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.max_grad_norm is not None and (not _number(self.max_grad_norm) or self.max_grad_norm <= 0):
            out.append(f"optim.max_grad_norm must be > 0 or null, got {self.max_grad_norm!r}")
        return out


@dataclass
class RunSection:
    """How long, where the outputs go, how often to evaluate and checkpoint."""

    out_dir: str = _f("runs/train", "output folder: adapter, checkpoints, metrics, plot, resolved config")
    steps: int = _f(100, "optimizer steps")
    seed: int = _f(0, "seed of the adapter init, dropout and data order")
    eval_every: int = _f(0, "evaluate on the validation set every N steps (0: only at the end)")
    eval_batches: int = _f(0, "validation batches per evaluation (0: all)")
    save_every: int = _f(0, "write a checkpoint every N steps (0: none)")
    keep_last: int = _f(2, "checkpoints kept on disk")
    max_bad_steps: int = _f(5, "a step with a non-finite loss or gradient is skipped; stop after this many in a row")
    resume: bool = _f(False, "continue from the latest checkpoint in out_dir/checkpoints")
    precision: Precision = _f("auto", "auto: bf16 autocast on CUDA when supported, else fp32")
    compile: bool = _f(False, "torch.compile each decoder layer for training (the first steps compile)")
    progress: bool = _f(True, "show a progress bar")

    def problems(self) -> list[str]:
        out = _check_choice(self, "precision")
        for name, low in (("steps", 1), ("eval_every", 0), ("eval_batches", 0), ("save_every", 0),
                          ("keep_last", 1), ("max_bad_steps", 1)):
            if not _int_at_least(getattr(self, name), low):
                out.append(f"run.{name} must be an integer >= {low}, got {getattr(self, name)!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            out.append(f"run.seed must be an integer, got {self.seed!r}")
        return out


SECTIONS = {"model": ModelSection, "lora": LoraSection, "data": DataSection, "optim": OptimSection,
            "run": RunSection}


@dataclass
class TrainConfig:
    """Everything ``lorakit train`` needs; ``TrainConfig.load(yaml, flags)`` builds one."""

    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    run: RunSection = field(default_factory=RunSection)

    def __post_init__(self) -> None:
        problems = [p for name in SECTIONS for p in getattr(self, name).problems()]
        if problems:
            raise ConfigError("invalid training config: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "TrainConfig":
        """Build from {section: {field: value}}; unknown keys and wrong types are errors naming them."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping of sections {list(SECTIONS)}, got {type(data).__name__}")
        unknown = [k for k in data if k not in SECTIONS]
        problems = [f"unknown section {k!r} (sections: {list(SECTIONS)})" for k in unknown]
        built = {}
        for name, section in SECTIONS.items():
            values = data.get(name) or {}
            if not isinstance(values, dict):
                problems.append(f"section {name!r} must be a mapping, got {type(values).__name__}")
                continue
            names = {f.name for f in fields(section)}
            problems += [f"unknown key {name}.{k} (keys: {sorted(names)})" for k in values if k not in names]
            hints = typing.get_type_hints(section)
            coerced = {}
            for k, v in values.items():
                if k in names:
                    try:
                        coerced[k] = coerce(v, hints[k], f"{name}.{k}")
                    except ConfigError as e:
                        problems.append(str(e))
            built[name] = coerced
        if problems:
            raise ConfigError(f"{source}: " + "; ".join(problems))
        try:
            return cls(**{name: SECTIONS[name](**built[name]) for name in SECTIONS})
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def load(cls, yaml_path: Optional[str] = None, overrides: Optional[dict[str, dict[str, Any]]] = None
             ) -> "TrainConfig":
        """Defaults, then the YAML file, then ``overrides`` ({section: {field: value}}, e.g. from flags)."""
        data: dict[str, Any] = {}
        source = "flags"
        if yaml_path:
            data = read_yaml(yaml_path)
            source = f"{yaml_path} + flags" if overrides else str(yaml_path)
        for section, values in (overrides or {}).items():
            data.setdefault(section, {})
            if not isinstance(data[section], dict):
                raise ConfigError(f"{yaml_path}: section {section!r} must be a mapping")
            data[section].update(values)
        return cls.from_dict(data, source)

    def to_dict(self) -> dict[str, Any]:
        return {name: asdict(getattr(self, name)) for name in SECTIONS}

    def to_yaml(self) -> str:
        import yaml
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ------------------------------------------------------------------------------ YAML and flags
def read_yaml(path: str) -> dict[str, Any]:
    """The YAML file as a dict; unreadable or malformed files are ConfigErrors naming the file."""
    import yaml
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file: {e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections {list(SECTIONS)}, got {type(data).__name__}")
    return data


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config field (``--batch-size``), default SUPPRESS so only given flags override."""
    for section_name, section in SECTIONS.items():
        group = parser.add_argument_group(f"{section_name} ({section.__doc__.strip().splitlines()[0]})")
        hints = typing.get_type_hints(section)
        for f in fields(section):
            flag = "--" + f.name.replace("_", "-")
            kwargs: dict[str, Any] = dict(dest=f"{section_name}.{f.name}", default=argparse.SUPPRESS,
                                          help=f"{f.metadata.get('help', '')} [{section_name}.{f.name}]")
            hint = hints[f.name]
            if hint is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs["metavar"] = f.name.upper()
                if _is_list(hint):
                    kwargs["nargs"] = "+"
            choices = _literal_choices(hint)
            if choices:
                kwargs["choices"] = choices
                kwargs.pop("metavar", None)
            group.add_argument(flag, **kwargs)


def flag_overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The flags given on the command line as {section: {field: value}} (still strings)."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in vars(args).items():
        section, _, name = key.partition(".")
        if section in SECTIONS and name:
            out.setdefault(section, {})[name] = value
    return out


def coerce(value: Any, hint: Any, where: str) -> Any:
    """Convert a YAML or flag value to the field's type; a ConfigError names ``where`` otherwise."""
    options = typing.get_args(hint) if typing.get_origin(hint) is Union else (hint,)
    if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
        if type(None) in options:
            return None
        raise ConfigError(f"{where} cannot be null")
    errors = []
    for opt in options:
        if opt is type(None):
            continue
        try:
            return _coerce_one(value, opt)
        except (TypeError, ValueError) as e:
            errors.append(str(e))
    raise ConfigError(f"{where}: {value!r} is not a valid {_type_name(hint)}")


def _coerce_one(value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ValueError(f"not one of {typing.get_args(hint)}")
        return value
    if origin is list:
        (inner,) = typing.get_args(hint)
        items = value if isinstance(value, (list, tuple)) else None
        if items is None:
            raise TypeError("not a list")
        return [_coerce_one(v, inner) for v in items]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise TypeError("not a bool")
    if hint is int:
        if isinstance(value, bool):
            raise TypeError("bool is not an int")
        if isinstance(value, int):
            return value
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise TypeError("not an int")
    if hint is float:
        if isinstance(value, bool):
            raise TypeError("bool is not a float")
        out = float(value)          # YAML reads 1e-3 as a string; float() parses it
        if not math.isfinite(out):
            raise ValueError("not finite")
        return out
    if hint is str:
        if not isinstance(value, str):
            raise TypeError("not a string")
        return value
    raise TypeError(f"unsupported type {hint}")


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "choice among " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin is Union:
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if origin is list:
        return f"list of {_type_name(typing.get_args(hint)[0])}"
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _is_list(hint: Any) -> bool:
    options = typing.get_args(hint) if typing.get_origin(hint) is Union else (hint,)
    return any(typing.get_origin(o) is list for o in options)


def _literal_choices(hint: Any) -> Optional[list]:
    return list(typing.get_args(hint)) if typing.get_origin(hint) is Literal else None


def _check_choice(section: Any, *names: str) -> list[str]:
    out = []
    hints = typing.get_type_hints(type(section))
    sname = next(k for k, v in SECTIONS.items() if v is type(section))
    for name in names:
        value = getattr(section, name)
        choices = _literal_choices(hints[name])
        if choices and value not in choices:
            out.append(f"{sname}.{name} must be one of {choices}, got {value!r}")
        elif not choices and value is not None and not isinstance(value, str):
            out.append(f"{sname}.{name} must be a string, got {value!r}")
    return out


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int_at_least(v: Any, low: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


__all__ = ["TrainConfig", "ModelSection", "LoraSection", "DataSection", "OptimSection", "RunSection",
           "add_flags", "flag_overrides", "read_yaml", "coerce", "SECTIONS"]
