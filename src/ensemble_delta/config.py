"""The typed config tree. The YAML files in configs/ mirror it one to one.

Every knob has one default here, with its unit in the comment. Loading validates loudly:
an unknown key, a wrong type, a value out of range or an unknown choice raises UserError
naming the YAML path and the valid choices.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from .errors import UserError

FREEZES = ("head", "layer4", "layer3", "full")
AUGMENTS = ("flip", "crop", "color")
OPTIMIZERS = ("sgd", "adamw")
DATASETS = ("mnist-subset", "mnist", "imagenette", "folder", "synthetic")
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
METHODS = ("ensemble", "ties", "task_arithmetic", "weight_average", "distill")
RULES = ("prob_norm", "logit_softmax", "mean_prob")


def _range(lo=None, hi=None, lo_open=False):
    return {"range": (lo, hi, lo_open)}


@dataclass
class DataConfig:
    name: Literal["mnist-subset", "mnist", "imagenette", "folder", "synthetic"] = "mnist-subset"
    root: str = "data"  # where datasets are downloaded or found; for `folder`, the tree with train/ and val/
    download: bool = True  # mnist / imagenette: fetch with torchvision's loader when not under root
    image_size: int = field(default=32, metadata=_range(8, 1024))  # pixels, square, after resizing
    test_fraction: float = field(default=0.2, metadata=_range(0.05, 0.5))  # mnist-subset only: share held out as test
    val_fraction: float = field(default=0.1, metadata=_range(0.0, 0.5))  # carved from train (stratified); never trained on
    negatives: Literal["balanced", "all"] = "balanced"  # one-vs-rest negatives per specialist
    split_seed: int = 0  # seed of the stratified splits and the negative sampling
    synthetic_train: int = field(default=9469, metadata=_range(10))  # synthetic only: images in train (Imagenette's size)
    synthetic_test: int = field(default=3925, metadata=_range(10))  # synthetic only: images in test


@dataclass
class ModelConfig:
    arch: Literal["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"] = "resnet18"
    # imagenet (= IMAGENET1K_V2) | imagenet_v1 | none (seeded random init) | pretrain | a checkpoint path
    weights: str = "pretrain"
    init_seed: int = 0  # seed of the random init for `none` and `pretrain`


@dataclass
class Strategy:
    freeze: Literal["head", "layer4", "layer3", "full"] = "full"
    augment: list[Literal["flip", "crop", "color"]] = field(default_factory=list)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = field(default=0.01, metadata=_range(0.0, 10.0, lo_open=True))  # learning rate per step
    momentum: float = field(default=0.9, metadata=_range(0.0, 1.0))  # sgd only
    weight_decay: float = field(default=0.0, metadata=_range(0.0, 1.0))
    epochs: int = field(default=2, metadata=_range(1, 1000))
    batch_size: int = field(default=64, metadata=_range(1, 65536))  # images per step
    seed: int = 0  # order of batches and augmentation draws (added to the class index)


@dataclass
class PretrainConfig:
    """Training of the `pretrain` base: a 10-class classifier from a seeded random init."""

    epochs: int = field(default=3, metadata=_range(1, 1000))
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = field(default=0.05, metadata=_range(0.0, 10.0, lo_open=True))
    momentum: float = field(default=0.9, metadata=_range(0.0, 1.0))
    weight_decay: float = field(default=5e-4, metadata=_range(0.0, 1.0))
    batch_size: int = field(default=128, metadata=_range(1, 65536))
    augment: list[Literal["flip", "crop", "color"]] = field(default_factory=list)
    seed: int = 0


@dataclass
class MergeConfig:
    density: float = field(default=0.2, metadata=_range(0.0, 1.0, lo_open=True))  # TIES: share of entries kept per vector
    ties_lambda: Union[float, Literal["auto"]] = 1.0  # TIES scale of the merged vector; auto = grid on validation
    task_arithmetic_lambda: Union[float, Literal["auto"]] = 0.3  # scale of the summed task vectors
    lambda_grid: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5])  # for `auto`
    bn_recalibrate: bool = True  # re-estimate BatchNorm running statistics after merging
    bn_batches: int = field(default=20, metadata=_range(1, 10000))  # training batches used for that
    bn_batch_size: int = field(default=128, metadata=_range(1, 65536))


@dataclass
class DistillConfig:
    epochs: int = field(default=3, metadata=_range(1, 1000))
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = field(default=0.02, metadata=_range(0.0, 10.0, lo_open=True))
    momentum: float = field(default=0.9, metadata=_range(0.0, 1.0))
    weight_decay: float = field(default=0.0, metadata=_range(0.0, 1.0))
    batch_size: int = field(default=128, metadata=_range(1, 65536))
    temperature: float = field(default=2.0, metadata=_range(0.0, 100.0, lo_open=True))  # on the teacher's log-odds
    hard_weight: float = field(default=0.0, metadata=_range(0.0, 1.0))  # weight of the true labels' loss (0 = pure KD)
    freeze: Literal["head", "layer4", "layer3", "full"] = "full"
    augment: list[Literal["flip", "crop", "color"]] = field(default_factory=list)
    seed: int = 0


@dataclass
class EvalConfig:
    methods: list[Literal["ensemble", "ties", "task_arithmetic", "weight_average", "distill"]] = field(
        default_factory=lambda: list(METHODS)
    )
    rules: list[Literal["prob_norm", "logit_softmax", "mean_prob"]] = field(default_factory=lambda: list(RULES))
    batch_size: int = field(default=256, metadata=_range(1, 65536))  # images per forward when scoring


@dataclass
class RuntimeConfig:
    device: str = "auto"  # auto (cuda if present) | cpu | cuda | cuda:N
    devices: int = field(default=1, metadata=_range(0, 64))  # GPUs to spread specialists over (0 = all visible)
    bf16: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    channels_last: bool = True  # on CUDA
    compile: bool = False  # torch.compile the trained part (CUDA only; slow to start)
    threads: int = field(default=0, metadata=_range(0, 256))  # CPU threads for torch (0 = torch's default)


@dataclass
class Config:
    name: str = "mnist-subset"  # run name: results/<name>/
    out_root: str = "results"  # parent of the run directory
    num_classes: int = field(default=10, metadata=_range(2, 1000))
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    # one per class, or a list cycled over the classes
    strategies: list[Strategy] = field(default_factory=lambda: [Strategy()])
    merge: MergeConfig = field(default_factory=MergeConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def strategy(self, c: int) -> Strategy:
        """The strategy of class c's specialist (the list is cycled)."""
        return self.strategies[c % len(self.strategies)]

    @property
    def run_dir(self) -> Path:
        return Path(self.out_root) / self.name


# ----------------------------------------------------------------------------- parsing


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is list:
        return "a list of " + _describe(typing.get_args(tp)[0])
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _coerce(value: Any, tp, path: str):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise UserError(f"{path}: {value!r} is not valid; choose one of {', '.join(map(str, choices))}")
        return value
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, path)
            except UserError:
                continue
        raise UserError(f"{path}: {value!r} is not valid; expected {_describe(tp)}")
    if origin is list:
        if value is None:
            value = []
        if not isinstance(value, list):
            value = [value] if isinstance(value, (str, dict)) else value
        if not isinstance(value, list):
            raise UserError(f"{path}: expected {_describe(tp)}, got {value!r}")
        (inner,) = typing.get_args(tp)
        return [_coerce(v, inner, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise UserError(f"{path}: expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config type {tp} at {path}")  # a bug in this file, not user input


def _check_range(value, meta: dict, path: str) -> None:
    if "range" not in meta or not isinstance(value, (int, float)):
        return
    lo, hi, lo_open = meta["range"]
    bad = (lo is not None and (value <= lo if lo_open else value < lo)) or (hi is not None and value > hi)
    if bad:
        lo_s = "" if lo is None else (f"> {lo}" if lo_open else f">= {lo}")
        hi_s = "" if hi is None else f"<= {hi}"
        raise UserError(f"{path}: {value!r} is out of range; it must be {' and '.join(s for s in (lo_s, hi_s) if s)}")


def _build(cls, raw: Any, path: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{path or 'config'}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        where = f"{path}.{unknown[0]}" if path else unknown[0]
        raise UserError(f"{where}: unknown key; valid keys here are {', '.join(fields)}")
    kwargs = {}
    for name, value in raw.items():
        sub = f"{path}.{name}" if path else name
        v = _coerce(value, hints[name], sub)
        _check_range(v, fields[name].metadata, sub)
        kwargs[name] = v
    return cls(**kwargs)


def _validate(cfg: Config) -> None:
    if not cfg.strategies:
        raise UserError("strategies: the list is empty; give at least one strategy (it is cycled over the classes)")
    if len(cfg.strategies) > cfg.num_classes:
        raise UserError(f"strategies: {len(cfg.strategies)} given for {cfg.num_classes} classes; give at most one per class")
    w = cfg.model.weights
    if w not in ("imagenet", "imagenet_v1", "none", "pretrain") and not (w.endswith(".safetensors") or w.endswith(".pt") or w.endswith(".pth")):
        raise UserError(
            f"model.weights: {w!r} is not valid; choose imagenet, imagenet_v1, none, pretrain or a checkpoint path (.safetensors, .pt, .pth)"
        )
    if not cfg.eval.methods:
        raise UserError("eval.methods: the list is empty; choose from " + ", ".join(METHODS))
    if not cfg.eval.rules:
        raise UserError("eval.rules: the list is empty; choose from " + ", ".join(RULES))
    if any(not 0 < x <= 10 for x in cfg.merge.lambda_grid) or not cfg.merge.lambda_grid:
        raise UserError("merge.lambda_grid: give a non-empty list of scales in (0, 10]")
    for key in ("ties_lambda", "task_arithmetic_lambda"):
        v = getattr(cfg.merge, key)
        if v != "auto" and not 0 < v <= 10:
            raise UserError(f"merge.{key}: {v!r} is out of range; it must be > 0 and <= 10, or auto")


def from_dict(raw: Any) -> Config:
    """Build and validate a Config from a parsed YAML mapping."""
    cfg = _build(Config, raw, "")
    _validate(cfg)
    return cfg


def load_config(path: str | Path) -> Config:
    """Read a YAML config; any problem is a one-line UserError naming the file and the fix."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"config {path} not found: pass --dataset NAME for configs/NAME.yaml or --config PATH to a YAML file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{path}: malformed YAML{where}; fix the syntax (indentation, colons, quotes)") from None
    try:
        return from_dict(raw)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def config_hash(cfg: Config, *, sections: tuple[str, ...] | None = None) -> str:
    """A short stable hash of the resolved config (or of some of its sections).

    Stages hash only the sections their outputs depend on, so changing, say, the report
    does not retrain the specialists. The run name and output root never count.
    """
    d = to_dict(cfg)
    d.pop("name")
    d.pop("out_root")
    d["runtime"] = {}  # where it runs does not change what it computes (up to float noise)
    if sections is not None:
        d = {k: d[k] for k in sections}
    return hash_of(d)


def hash_of(obj: Any) -> str:
    """A short stable hash of plain data (dicts, lists, numbers, strings)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]
