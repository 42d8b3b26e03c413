"""Typed run configuration: YAML sections -> nested dataclasses.

A run is described by :class:`TrainConfig`, whose fields are one dataclass per
YAML section (``data``, ``model``, ``head``, ``optim``, ``train``, ``eval``).
:func:`load_config` reads a YAML file, applies command-line overrides and
returns a validated :class:`TrainConfig`:

* unknown sections / keys are errors that name the key and its section and
  suggest the closest valid name;
* every value is checked and coerced against its field annotation (``int``,
  ``float``, ``bool``, ``str``, ``Optional[...]``, ``Literal[...]``,
  ``list[int]``, ``list[str]``); strings are accepted for every type, so YAML
  quirks such as ``lr: 1e-3`` (a string for PyYAML) and command-line values go
  through the same code; ``none`` / ``null`` / ``~`` mean ``None`` for
  ``Optional`` fields;
* each section validates its own ranges in ``__post_init__``;
* overrides are ``--section.key value``, ``--section.key=value`` or a bare
  ``--key`` when the key exists in exactly one section; a ``bool`` override
  without a value means ``true``; lists are ``a,b,c`` or ``[a, b, c]``; a
  value that itself starts with ``--`` needs the ``=`` form.

:meth:`TrainConfig.save_yaml` writes the effective configuration (e.g. next to
checkpoints); loading that file back gives an equal :class:`TrainConfig`.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Mapping, Optional, Sequence, Union

import yaml

__all__ = [
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "HeadConfig",
    "OptimConfig",
    "TrainLoopConfig",
    "EvalConfig",
    "TrainConfig",
    "load_config",
    "parse_overrides",
]

_NULLS = frozenset({"none", "null", "~"})
_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})

# Common alternative spellings -> field name, used only to suggest a fix.
_ALIASES = {
    "learning_rate": "lr",
    "lrate": "lr",
    "wd": "weight_decay",
    "bs": "batch_size",
    "batch": "batch_size",
    "emb_size": "embedding_size",
    "embedding_dim": "embedding_size",
    "scale": "s",
    "num_epochs": "epochs",
    "max_steps": "steps",
    "workers": "num_workers",
    "img_size": "image_size",
    "channels": "in_channels",
    "out_dir": "output_dir",
    "output": "output_dir",
    "warmup": "warmup_steps",
    "clip_grad": "clip_grad_norm",
}


class ConfigError(ValueError):
    """Invalid configuration: unknown key, wrong type, or out-of-range value."""


class _Mismatch(Exception):
    """Internal: a value does not match an annotation (message = what was expected)."""


# --------------------------------------------------------------------------- #
# coercion
# --------------------------------------------------------------------------- #


def _type_name(tp: Any) -> str:
    """Human-readable name of an annotation."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        parts = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in args else "")
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, typing.List):
        return f"list of {_type_name(args[0]) if args else 'any'}"
    return getattr(tp, "__name__", str(tp))


def _closest(word: str, choices: Sequence[str]) -> Optional[str]:
    """Closest of `choices` to `word` (difflib), or None."""
    hits = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return hits[0] if hits else None


def _coerce(value: Any, tp: Any) -> Any:
    """Return `value` converted to annotation `tp`, or raise _Mismatch.

    Longer than a screen on purpose: one flat dispatch over the annotation kinds a config may use
    (Union/Optional, Literal, bool, int, float, str, list/tuple), read top to bottom."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Union:
        if value is None or (isinstance(value, str) and value.strip().lower() in _NULLS):
            if type(None) in args:
                return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg)
            except _Mismatch:
                pass
        raise _Mismatch(_type_name(tp))
    if origin is Literal:
        for choice in args:
            if type(value) is type(choice) and value == choice:
                return choice
            if isinstance(value, str) and value.strip() == str(choice):
                return choice
        hint = _closest(str(value), [str(a) for a in args])
        raise _Mismatch(_type_name(tp) + (f" (did you mean {hint!r}?)" if hint else ""))
    if origin in (list, typing.List):
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                value = yaml.safe_load(text)
            else:
                value = [v.strip() for v in text.split(",")] if text else []
        if not isinstance(value, (list, tuple)):
            raise _Mismatch(_type_name(tp))
        elem = args[0] if args else Any
        out = []
        for i, v in enumerate(value):
            try:
                out.append(_coerce(v, elem))
            except _Mismatch as exc:
                raise _Mismatch(f"{_type_name(tp)} (element {i} = {v!r}: expected {exc})")
        return out
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise _Mismatch("bool")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                try:
                    value = float(value.strip())
                except ValueError:
                    raise _Mismatch("int") from None
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _Mismatch("int")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise _Mismatch("float")
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch("str")
    raise TypeError(f"unsupported config annotation {tp!r}")


def _coerce_key(section: str, key: str, value: Any, tp: Any) -> Any:
    """Coerce one config value; errors name the key, expected type and value."""
    try:
        return _coerce(value, tp)
    except _Mismatch as exc:
        raise ConfigError(
            f"{section}.{key}: expected {exc}, got {value!r} ({type(value).__name__})"
        ) from None


def _check(ok: bool, section: str, key: str, rule: str, value: Any) -> None:
    """Raise ConfigError `section.key must <rule>, got value` unless `ok`."""
    if not ok:
        raise ConfigError(f"{section}.{key} must {rule}, got {value!r}")


# --------------------------------------------------------------------------- #
# sections
# --------------------------------------------------------------------------- #


class _Section:
    """Base of section dataclasses: coerces every field, then validates ranges."""

    section: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = _coerce_key(self.section, f.name, getattr(self, f.name), hints[f.name])
            setattr(self, f.name, value)
        self.validate()

    def validate(self) -> None:
        """Range checks of this section (override in subclasses)."""

    def _at_least(self, name: str, low: float, optional: bool = False) -> None:
        """Check ``self.<name> >= low`` (skipped for None when `optional`)."""
        v = getattr(self, name)
        if optional and v is None:
            return
        _check(v >= low, self.section, name, f"be >= {low}", v)


@dataclass
class DataConfig(_Section):
    """``data:`` section: dataset choice and input pipeline."""

    section: ClassVar[str] = "data"
    dataset: Literal["glyphs", "glyphs_large", "recordio", "folder", "synthetic"] = "glyphs"
    root: Optional[str] = None
    cache_dir: Optional[str] = None  # None: $PARTIALFC_GLYPH_CACHE or ~/.cache/partialfc/glyphs
    image_size: int = 32
    in_channels: int = 1
    heldout_classes: int = 300
    # Validation: this many *training* identities are held back from training and the run evaluates
    # on them (open-set, like the held-out ones) instead of on the held-out identities - for tuning
    # without looking at the held-out figure. 0 = none (train on every training identity).
    val_classes: int = 0
    split_seed: Optional[int] = None  # seed of the held-out / validation split; None: train.seed
    num_workers: int = 0
    augment: bool = True
    hflip: bool = False
    # Glyphs: stroke-weight jitter of the augmentation, blending each image toward its 3x3 dilation
    # or erosion by up to this fraction (0 = off); see launch.data.transforms.BatchRandomAffine.
    stroke_jitter: float = 0.0
    synthetic_classes: int = 64
    synthetic_per_class: int = 8

    def validate(self) -> None:
        for name in ("image_size", "in_channels", "synthetic_per_class"):
            self._at_least(name, 1)
        self._at_least("synthetic_classes", 2)
        self._at_least("heldout_classes", 0)
        self._at_least("val_classes", 0)
        self._at_least("num_workers", 0)
        _check(0.0 <= self.stroke_jitter <= 1.0, "data", "stroke_jitter", "be in [0, 1]", self.stroke_jitter)
        _check(
            self.val_classes == 0 or self.dataset not in ("recordio", "folder"),
            "data", "val_classes", f"be 0 for dataset {self.dataset!r} (no open-set evaluation)",
            self.val_classes,
        )
        _check(
            self.dataset not in ("recordio", "folder") or self.root is not None,
            "data", "root", f"be set for dataset {self.dataset!r}", self.root,
        )


@dataclass
class ModelConfig(_Section):
    """``model:`` section: backbone producing the embeddings."""

    section: ClassVar[str] = "model"
    backbone: str = "cnn_small"
    embedding_size: int = 128
    dropout: float = 0.0
    # NHWC activations and weights: oneDNN's bf16 convolutions on CPUs run ~15-25 % faster in this
    # layout (measured on cnn_small, one thread), and on GPUs it is the tensor-core layout under AMP
    channels_last: bool = False

    def validate(self) -> None:
        self._at_least("embedding_size", 1)
        _check(0.0 <= self.dropout < 1.0, "model", "dropout", "be in [0, 1)", self.dropout)


@dataclass
class HeadConfig(_Section):
    """``head:`` section: margin softmax head and Partial FC sampling."""

    section: ClassVar[str] = "head"
    margin: Literal["arcface", "cosface", "sphereface", "combined", "softmax", "adaface", "curricularface"] = "arcface"
    s: float = 64.0
    m1: float = 1.0
    m2: float = 0.5
    m3: float = 0.0
    m: Optional[float] = None  # adaface (default 0.4) / curricularface (default 0.5) margin
    h: float = 0.333  # adaface: how strongly the norm steers the margin
    t_alpha: float = 0.01  # adaface / curricularface: momentum of the running statistics
    extension: Literal["monotonic", "linear", "none"] = "monotonic"
    straight_through: bool = False
    sample_rate: float = 1.0
    chunk_size: Optional[int] = None
    sparse_grad: bool = False
    seed: int = 0
    sub_centers: int = 1  # sub-center ArcFace: rows per class (any margin); 1 = one row per class
    # certified gradient filtering (PartialFC(grad_filter=eps)): None = exact gradients; eps >= 0 skips the
    # backward's class blocks whose softmax-gradient entries are all below eps (in units of s/N; 1.19e-7 =
    # float32's epsilon); the history logs rank 0's skipped fraction as grad_filter_skipped
    grad_filter: Optional[float] = None
    grad_filter_block: int = 256

    def validate(self) -> None:
        from partialfc import margin_from_config
        try:  # the margin's own checks, in one place
            margin_from_config(self)
        except ValueError as err:
            raise ConfigError(f"head: {err}") from None
        _check(0.0 < self.sample_rate <= 1.0, "head", "sample_rate", "be in (0, 1]", self.sample_rate)
        self._at_least("chunk_size", 1, optional=True)
        self._at_least("sub_centers", 1)
        _check(self.grad_filter is None or 0.0 <= self.grad_filter < float("inf"), "head", "grad_filter",
               "be null or a finite eps >= 0", self.grad_filter)
        self._at_least("grad_filter_block", 1)


@dataclass
class OptimConfig(_Section):
    """``optim:`` section: optimizers, learning-rate schedule, clipping."""

    section: ClassVar[str] = "optim"
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.1
    head_lr: Optional[float] = None
    momentum: float = 0.9
    weight_decay: float = 5e-4
    head_optimizer: Literal["same", "sparse_sgd"] = "same"
    warmup_steps: int = 0
    schedule: Literal["poly", "cosine", "constant"] = "poly"
    poly_power: float = 2.0
    clip_grad_norm: Optional[float] = 5.0
    grad_accum: int = 1

    def validate(self) -> None:
        _check(self.lr > 0, "optim", "lr", "be > 0", self.lr)
        _check(self.head_lr is None or self.head_lr > 0, "optim", "head_lr", "be > 0 or null", self.head_lr)
        _check(0.0 <= self.momentum < 1.0, "optim", "momentum", "be in [0, 1)", self.momentum)
        _check(self.weight_decay >= 0, "optim", "weight_decay", "be >= 0", self.weight_decay)
        self._at_least("warmup_steps", 0)
        _check(self.poly_power > 0, "optim", "poly_power", "be > 0", self.poly_power)
        _check(
            self.clip_grad_norm is None or self.clip_grad_norm > 0,
            "optim", "clip_grad_norm", "be > 0 or null", self.clip_grad_norm,
        )
        self._at_least("grad_accum", 1)


@dataclass
class TrainLoopConfig(_Section):
    """``train:`` section: length of the run, precision, logging, checkpoints."""

    section: ClassVar[str] = "train"
    steps: Optional[int] = None
    epochs: Optional[int] = 2
    batch_size: int = 128  # per rank
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    output_dir: str = "runs/glyphs"
    log_every: int = 10
    ckpt_every: int = 500
    eval_every: int = 0
    resume: Optional[str] = "auto"
    seed: int = 1234
    tensorboard: bool = False
    num_threads: Optional[int] = None

    def validate(self) -> None:
        _check(
            self.steps is not None or self.epochs is not None,
            "train", "steps", "be set when train.epochs is null", self.steps,
        )
        self._at_least("steps", 1, optional=True)
        self._at_least("epochs", 1, optional=True)
        self._at_least("batch_size", 1)
        self._at_least("log_every", 1)
        self._at_least("ckpt_every", 0)
        self._at_least("eval_every", 0)
        self._at_least("num_threads", 1, optional=True)


@dataclass
class EvalConfig(_Section):
    """``eval:`` section: verification pairs, gallery design, .bin benchmarks."""

    section: ClassVar[str] = "eval"
    pairs: int = 3000
    gallery_design: int = 0
    bin_files: list[str] = field(default_factory=list)
    batch_size: int = 256

    def validate(self) -> None:
        self._at_least("pairs", 0)
        self._at_least("gallery_design", 0)
        self._at_least("batch_size", 1)


# --------------------------------------------------------------------------- #
# top level
# --------------------------------------------------------------------------- #


@dataclass
class TrainConfig:
    """Whole run configuration: one attribute per YAML section."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @classmethod
    def sections(cls) -> dict[str, type]:
        """Mapping section name -> section dataclass."""
        hints = typing.get_type_hints(cls)
        return {f.name: hints[f.name] for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls, raw: Optional[Mapping[str, Any]]) -> "TrainConfig":
        """Build from a ``{section: {key: value}}`` mapping (missing keys -> defaults)."""
        raw = {} if raw is None else raw
        if not isinstance(raw, Mapping):
            raise ConfigError(f"config: expected a mapping of sections, got {type(raw).__name__}")
        sections = cls.sections()
        for name in raw:
            if name not in sections:
                raise ConfigError(_unknown_section_message(str(name), sections))
        built = {}
        for name, section_cls in sections.items():
            values = raw.get(name) or {}
            if not isinstance(values, Mapping):
                raise ConfigError(
                    f"section {name!r}: expected a mapping of keys, got {values!r}"
                )
            for key in values:
                _resolve_key_in_section(str(key), name, sections)
            built[name] = section_cls(**values)
        return cls(**built)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain ``{section: {key: value}}`` dict (YAML-serialisable)."""
        return dataclasses.asdict(self)

    def save_yaml(self, path: Union[str, os.PathLike]) -> None:
        """Write the effective configuration as YAML (parent dirs are created)."""
        parent = os.path.dirname(os.fspath(path))
        if parent:
            os.makedirs(parent, exist_ok=True)
        with open(path, "w", encoding="utf-8") as fh:
            yaml.safe_dump(self.to_dict(), fh, sort_keys=False, default_flow_style=False)


def _field_names(section_cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(section_cls)]


def _sections_with_key(key: str, sections: Mapping[str, type]) -> list[str]:
    return [name for name, cls in sections.items() if key in _field_names(cls)]


def _suggest_key(key: str, valid: Sequence[str]) -> Optional[str]:
    """Closest valid key, also matching common alternative spellings."""
    candidates = list(valid) + [a for a, target in _ALIASES.items() if target in valid]
    hit = _closest(key, candidates)
    return _ALIASES.get(hit, hit) if hit is not None and hit not in valid else hit


def _resolve_key_in_section(key: str, section: str, sections: Mapping[str, type]) -> None:
    """Raise a helpful ConfigError if `key` is not a field of `section`."""
    valid = _field_names(sections[section])
    if key in valid:
        return
    msg = f"unknown key {key!r} in section {section!r}"
    hint = _suggest_key(key, valid)
    if hint is not None:
        msg += f"; did you mean {hint!r}?"
    elsewhere = _sections_with_key(key, sections)
    if elsewhere:
        msg += f" ({key!r} is a key of section {', '.join(map(repr, elsewhere))})"
    msg += f"; valid keys: {', '.join(valid)}"
    raise ConfigError(msg)


def _unknown_section_message(name: str, sections: Mapping[str, type]) -> str:
    msg = f"unknown section {name!r}"
    hint = _closest(name, list(sections))
    if hint is not None:
        msg += f"; did you mean {hint!r}?"
    owners = _sections_with_key(name, sections)
    if owners:
        msg += f" ({name!r} is a key; put it under section {owners[0]!r})"
    return msg + f"; valid sections: {', '.join(sections)}"


# --------------------------------------------------------------------------- #
# overrides and loading
# --------------------------------------------------------------------------- #


def _resolve_override(name: str, sections: Mapping[str, type]) -> tuple[str, str]:
    """Map ``section.key`` or a bare ``key`` to ``(section, key)``."""
    name = name.replace("-", "_")
    if "." in name:
        section, key = name.split(".", 1)
        if section not in sections:
            raise ConfigError("override --" + name + ": " + _unknown_section_message(section, sections))
        try:
            _resolve_key_in_section(key, section, sections)
        except ConfigError as exc:
            raise ConfigError(f"override --{name}: {exc}") from None
        return section, key
    owners = _sections_with_key(name, sections)
    if len(owners) == 1:
        return owners[0], name
    if len(owners) > 1:
        opts = ", ".join(f"--{s}.{name}" for s in owners)
        raise ConfigError(f"override --{name} is ambiguous; use one of {opts}")
    dotted = [f"{s}.{k}" for s, cls in sections.items() for k in _field_names(cls)]
    bare = [d.split(".", 1)[1] for d in dotted]
    hint = _suggest_key(name, bare)
    msg = f"override --{name}: no section has key {name!r}"
    if hint is not None:
        owners = _sections_with_key(hint, sections)
        msg += f"; did you mean --{owners[0]}.{hint}?"
    raise ConfigError(msg)


def parse_overrides(overrides: Sequence[str]) -> list[tuple[str, str, Any]]:
    """Parse ``--section.key value`` / ``--section.key=value`` / ``--key value``.

    Returns ``(section, key, coerced_value)`` triples, type-checked against the
    schema of :class:`TrainConfig`. A ``bool`` key given without a value is
    ``True``.
    """
    sections = TrainConfig.sections()
    hints = {name: typing.get_type_hints(cls) for name, cls in sections.items()}
    out: list[tuple[str, str, Any]] = []
    tokens = list(overrides)
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--") or len(tok) == 2:
            raise ConfigError(f"override {tok!r}: expected --section.key value or --section.key=value")
        body = tok[2:]
        if "=" in body:
            name, value = body.split("=", 1)
            i += 1
            section, key = _resolve_override(name, sections)
        else:
            section, key = _resolve_override(body, sections)
            has_value = i + 1 < len(tokens) and not tokens[i + 1].startswith("--")
            if has_value:
                value, i = tokens[i + 1], i + 2
            elif hints[section][key] is bool:
                value, i = "true", i + 1
            else:
                raise ConfigError(f"override {tok}: missing value")
        coerced = _coerce_key(section, key, value, hints[section][key])
        out.append((section, key, coerced))
    return out


def load_config(
    path: Optional[Union[str, os.PathLike]], overrides: Sequence[str] = ()
) -> TrainConfig:
    """Load a YAML run config (or the defaults if `path` is None) and apply overrides.

    Args:
        path: YAML file with top-level section mappings, or None for defaults.
        overrides: command-line tokens, e.g. ``["--optim.lr", "0.05", "--train.steps=100"]``.

    Returns:
        The validated :class:`TrainConfig`.

    Raises:
        ConfigError: unknown section/key, wrong type, or out-of-range value.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        with open(path, encoding="utf-8") as fh:
            loaded = yaml.safe_load(fh)
        if loaded is not None and not isinstance(loaded, Mapping):
            raise ConfigError(f"{path}: expected a mapping of sections at top level")
        raw = {k: dict(v) if isinstance(v, Mapping) else v for k, v in (loaded or {}).items()}
    for section, key, value in parse_overrides(overrides):
        current = raw.get(section)
        if current is None:
            current = raw[section] = {}
        if not isinstance(current, dict):
            continue  # from_dict reports the malformed section
        current[key] = value
    return TrainConfig.from_dict(raw)
