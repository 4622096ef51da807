"""The one config path: YAML file -> typed, validated Config -> `--set a.b=c` overrides ->
flat params for logging -> plain dict for Ray workers -> Config again.

Every section is a keyword-only dataclass. Unknown keys and wrong types raise `ConfigError`
naming the key and the file, so a typo in a YAML file fails at once instead of being ignored.

    cfg = load_config("jobs/configs/tiny.yaml", ["train.steps=50", "model.arch=srformer_l"])
    flatten(cfg)                 # {"model.arch": "srformer_l", ...} for MLflow params
    Config.from_dict(cfg.to_dict()) == cfg
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from srplatform.errors import UserError


class ConfigError(UserError):
    """A config file or override is invalid; the message names the key and the source."""


# --------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class ModelSection:
    """Which network to train. `overrides` are fields of the backbone's config dataclass
    (validated by c2disr when the model is built); `head_overrides` likewise for the head."""

    arch: str = "swinir_l"  # swinir_l | srformer_l | mambairv2_l
    variant: str = "c2d"  # plain | hit | c2d
    flavor: str = "tiny"  # light (published size) | tiny (CPU tests)
    overrides: dict[str, Any] = field(default_factory=dict)
    head_overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class DataSection:
    """Where training pairs come from and how they are made."""

    # WebDataset shards (file://, s3://). When the manifest there is missing and `source` is
    # set, the shards are packed from `source` first.
    train: str = ""
    source: str = ""  # folder / glob / s3:// prefix of HR images to pack into `train`
    val: str = "Set5"  # benchmark folder (name under ../shared/data, or a path)
    val_max_images: int = 0  # 0 = all images of the folder
    patch: int = 48  # LR patch side p; the HR patch is round(p * s)
    batch_size: int = 16  # per worker
    scale_min: float = 1.0
    scale_max: float = 4.0
    num_cpus_per_task: float = 0.25  # Ray Data map tasks (fractional so training fits beside)
    shard_size_mb: int = 64
    # Every worker's batches a pure function of the shards and the seed, run after run (each
    # worker then reads every shard's bytes; see srplatform.data.pipeline). benchmarks/reference.py
    # turns it on to train a plain PyTorch loop on exactly the platform's batches.
    deterministic: bool = False


@dataclass(kw_only=True)
class OptimSection:
    """Optimisation settings of one stage. The step count, not epochs, drives the schedule."""

    steps: int = 1000
    lr: float = 2e-4
    optimizer: str = "adam"  # adam | adamw
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    weight_decay: float = 0.0
    schedule: str = "cosine"  # cosine | multistep | constant
    milestones: list[int] = field(default_factory=list)  # multistep, in steps
    gamma: float = 0.5
    warmup_steps: int = 0
    grad_clip: float = 0.0  # 0 = off
    ema_decay: float = 0.999  # 0 = off
    loss: str = "l1"  # l1 | l2
    l2_steps: int = 0  # the first steps train with L2 whatever `loss` says (see optim.stage_loss)


@dataclass(kw_only=True)
class PretrainSection(OptimSection):
    """Stage 1: continuous-scale pretraining with the implicit head."""

    steps: int = 2000
    # L1 from a zero residual stays at the bilinear base; an L2 start gets the residual going.
    l2_steps: int = 100


@dataclass(kw_only=True)
class FinetuneSection(OptimSection):
    """Stage 2: one discrete-scale fine-tuning run per scale, launched concurrently."""

    scales: list[int] = field(default_factory=lambda: [2, 3, 4])
    steps: int = 1000
    lr: float = 1e-4
    # How the fresh pixel-shuffle head starts: "lstsq" = ridge least-squares fit on the frozen
    # stage-1 features of the first `head_fit_batches` batches of every worker (summed over
    # workers; with the bilinear residual it starts at the continuous model's quality);
    # "random" = PyTorch's default init (the plain recipe).
    head_init: str = "lstsq"
    head_fit_batches: int = 16
    # The discrete model's base: "bilinear" (the continuous head's base, so the stage-1
    # backbone keeps its job) or "none" (the published pixelshuffledirect: mean RGB only).
    residual: str = "bilinear"
    # Learning rate of the new head's parameters relative to `lr` (the backbone keeps `lr`).
    head_lr_mult: float = 1.0


@dataclass(kw_only=True)
class ResourcesSection:
    """Per training run. On a 2-CPU laptop keep workers fractional so Ray Data tasks fit."""

    num_workers: int = 2
    cpus_per_worker: float = 0.5
    gpus_per_worker: float = 0.0
    max_failures: int = 2  # worker failures retried from the latest checkpoint


@dataclass(kw_only=True)
class RunSection:
    """Bookkeeping: checkpoints, validation, logging."""

    checkpoint_every: int = 200
    val_every: int = 200
    log_every: int = 10
    keep_checkpoints: int = 2
    bf16: bool = True  # autocast on CUDA only


@dataclass(kw_only=True)
class TrackingSection:
    """MLflow. An empty `uri` means: the local stack's server, else MLFLOW_TRACKING_URI."""

    uri: str = ""
    experiment: str = "c2disr"


@dataclass(kw_only=True)
class Config:
    """A whole job: one continuous pretraining stage and its discrete fine-tunes."""

    name: str = "c2disr"  # run name; re-running the same name resumes it
    seed: int = 0
    storage: str = ""  # runs' checkpoints: file:// or s3://; empty = <data dir>/runs
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    pretrain: PretrainSection = field(default_factory=PretrainSection)
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
    resources: ResourcesSection = field(default_factory=ResourcesSection)
    run: RunSection = field(default_factory=RunSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)

    # ---- conversions -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-safe dict (what Ray workers receive)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "<dict>") -> "Config":
        cfg = _build(cls, data, prefix="", source=source)
        validate(cfg, source=source)
        return cfg

    def replace(self, overrides: list[str], *, source: str = "--set") -> "Config":
        data = self.to_dict()
        for item in overrides:
            apply_override(data, item)
        return Config.from_dict(data, source=source)

    def digest(self) -> str:
        """A short stable hash of the whole config (for registry tags)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------

ARCHS = ("swinir_l", "srformer_l", "mambairv2_l")
VARIANTS = ("plain", "hit", "c2d")
FLAVORS = ("light", "tiny")


class _DuplicateKey(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping holding the same key twice (PyYAML's own loaders
    keep the last value silently, so a repeated key would quietly override the first)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    first: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges are not keys
            continue
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        try:
            if key in first:
                raise _DuplicateKey(f"duplicate key {key!r} on line {line} (first on line {first[key]})")
        except TypeError:  # an unhashable key: construct_mapping reports it
            continue
        first[key] = line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def read_yaml(path: Path, error: type[Exception], what: str, samples: str) -> Any:
    """The parsed content of a YAML file (None when empty); `error` names the file when it is
    missing ("`what` <path> does not exist (see `samples` for samples)"), not UTF-8 text, or
    not valid YAML (a key repeated in one mapping included, with its line)."""
    if not path.is_file():
        raise error(f"{what} {path} does not exist (see {samples} for samples)")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise error(f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} on line {line}): "
                    "save it as UTF-8") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML: {exc}") from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (or the defaults when `path` is None), then apply `--set` overrides."""
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        p = Path(path)
        source = str(p)
        loaded = read_yaml(p, ConfigError, "config file", "jobs/configs/")
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections, got {type(loaded).__name__}")
        data = loaded
    for item in overrides or []:
        apply_override(data, item)
    src = source if not overrides else f"{source} with --set {' '.join(overrides)}"
    return Config.from_dict(data, source=src)


def apply_override(data: dict[str, Any], item: str) -> None:
    """Apply one `a.b=c` override to a nested dict in place; the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    key, _, raw = item.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node = nxt
    node[parts[-1]] = value


def flatten(cfg: Config | dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flat `{"section.key": value}` for MLflow params. Lists and dicts become JSON strings."""
    data = cfg.to_dict() if isinstance(cfg, Config) else cfg
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and key not in ("overrides", "head_overrides"):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, (list, dict)):
            out[name] = json.dumps(value, sort_keys=True)
        else:
            out[name] = value
    return out


# --------------------------------------------------------------------------------------
# Typed construction
# --------------------------------------------------------------------------------------


def _build(cls: type, data: Any, *, prefix: str, source: str) -> Any:
    where = prefix.rstrip(".") or "the top level"
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {where} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        import difflib

        hints_txt = []
        for key in unknown:
            close = difflib.get_close_matches(key, fields, n=1)
            hints_txt.append(f"{prefix}{key}" + (f" (did you mean {prefix}{close[0]}?)" if close else ""))
        raise ConfigError(
            f"{source}: unknown key {', '.join(hints_txt)}; "
            f"valid keys in {where}: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, key=f"{prefix}{name}", source=source)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, *, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, prefix=f"{key}.", source=source)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
            try:
                return _coerce(arg, value, key=key, source=source)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is list:
        if not isinstance(value, list):
            raise _type_error(key, "a list", value, source)
        (item_tp,) = typing.get_args(tp)
        return [_coerce(item_tp, v, key=f"{key}[{i}]", source=source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _type_error(key, "a mapping", value, source)
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise _type_error(key, "true or false", value, source)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(key, "an integer", value, source)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML reads 2e-4 (no dot) as a string: accept numeric strings for floats only.
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            raise _type_error(key, "a number", value, source)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _type_error(key, "a string", value, source)
        return value
    raise TypeError(f"config type {tp!r} of {key} is not supported")  # a bug in this module


def _type_error(key: str, want: str, value: Any, source: str) -> ConfigError:
    return ConfigError(f"{source}: {key} must be {want}, got {value!r} ({type(value).__name__})")


def validate(cfg: Config, *, source: str) -> None:
    """Checks across fields, with messages that name the key."""

    def bad(key: str, msg: str) -> None:
        raise ConfigError(f"{source}: {key} {msg}")

    if cfg.model.arch not in ARCHS:
        bad("model.arch", f"must be one of {', '.join(ARCHS)}, got {cfg.model.arch!r}")
    if cfg.model.variant not in VARIANTS:
        bad("model.variant", f"must be one of {', '.join(VARIANTS)}, got {cfg.model.variant!r}")
    if cfg.model.flavor not in FLAVORS:
        bad("model.flavor", f"must be one of {', '.join(FLAVORS)}, got {cfg.model.flavor!r}")
    d = cfg.data
    if d.patch < 4:
        bad("data.patch", f"must be at least 4, got {d.patch}")
    if d.batch_size < 1:
        bad("data.batch_size", f"must be at least 1, got {d.batch_size}")
    if not (1.0 <= d.scale_min <= d.scale_max):
        bad("data.scale_min", f"and data.scale_max must satisfy 1 <= min <= max, got {d.scale_min}, {d.scale_max}")
    if d.num_cpus_per_task <= 0:
        bad("data.num_cpus_per_task", "must be positive")
    for name in ("pretrain", "finetune"):
        st: OptimSection = getattr(cfg, name)
        if st.steps < 0:
            bad(f"{name}.steps", f"must be >= 0, got {st.steps}")
        if st.lr <= 0:
            bad(f"{name}.lr", f"must be positive, got {st.lr}")
        if st.optimizer not in ("adam", "adamw"):
            bad(f"{name}.optimizer", f"must be adam or adamw, got {st.optimizer!r}")
        if st.schedule not in ("cosine", "multistep", "constant"):
            bad(f"{name}.schedule", f"must be cosine, multistep or constant, got {st.schedule!r}")
        if len(st.betas) != 2:
            bad(f"{name}.betas", "must be two numbers")
        if not 0 <= st.ema_decay < 1:
            bad(f"{name}.ema_decay", "must be in [0, 1)")
        if st.loss not in ("l1", "l2"):
            bad(f"{name}.loss", f"must be l1 or l2, got {st.loss!r}")
        if st.l2_steps < 0:
            bad(f"{name}.l2_steps", f"must be >= 0, got {st.l2_steps}")
        if st.warmup_steps < 0 or st.warmup_steps > max(st.steps, 0):
            bad(f"{name}.warmup_steps", f"must be in [0, steps], got {st.warmup_steps}")
    if cfg.finetune.head_init not in ("lstsq", "random"):
        bad("finetune.head_init", f"must be lstsq or random, got {cfg.finetune.head_init!r}")
    if cfg.finetune.head_fit_batches < 1:
        bad("finetune.head_fit_batches", f"must be >= 1, got {cfg.finetune.head_fit_batches}")
    if cfg.finetune.residual not in ("bilinear", "none"):
        bad("finetune.residual", f"must be bilinear or none, got {cfg.finetune.residual!r}")
    if not cfg.finetune.head_lr_mult > 0:
        bad("finetune.head_lr_mult", f"must be positive, got {cfg.finetune.head_lr_mult}")
    if not cfg.finetune.scales or any(s not in (2, 3, 4) for s in cfg.finetune.scales):
        bad("finetune.scales", f"must be a non-empty subset of [2, 3, 4], got {cfg.finetune.scales}")
    if len(set(cfg.finetune.scales)) != len(cfg.finetune.scales):
        bad("finetune.scales", "has duplicates")
    r = cfg.resources
    if r.num_workers < 1:
        bad("resources.num_workers", "must be at least 1")
    if r.cpus_per_worker <= 0 and r.gpus_per_worker <= 0:
        bad("resources.cpus_per_worker", "and gpus_per_worker cannot both be 0")
    for key in ("checkpoint_every", "val_every", "log_every"):
        if getattr(cfg.run, key) < 1:
            bad(f"run.{key}", "must be at least 1")
    if cfg.run.keep_checkpoints < 1:
        bad("run.keep_checkpoints", "must be at least 1")
    if not cfg.name or any(c in cfg.name for c in "/\\ "):
        bad("name", f"must be a non-empty name without slashes or spaces, got {cfg.name!r}")
    problem = model_problem(cfg.model.arch, cfg.model.variant, cfg.model.flavor,
                            json.dumps(cfg.model.overrides, sort_keys=True, default=str),
                            json.dumps(cfg.model.head_overrides, sort_keys=True, default=str))
    if problem:
        given = ", ".join([f"model.overrides.{k}={v!r}" for k, v in cfg.model.overrides.items()]
                          + [f"model.head_overrides.{k}={v!r}" for k, v in cfg.model.head_overrides.items()])
        bad("model", f"({given}) does not make a valid {cfg.model.arch} ({cfg.model.variant}, "
                     f"{cfg.model.flavor}): {problem}")


@functools.lru_cache(maxsize=64)
def model_problem(arch: str, variant: str, flavor: str, overrides: str, head_overrides: str) -> str:
    """Why the stage-1 model of these settings cannot be built ("" when it can). It is built on
    PyTorch's meta device (shapes only, no memory, well under a second), so that a bad
    `model.overrides` value fails when the config is read, not in a Ray worker minutes later."""
    ov, hov = json.loads(overrides), json.loads(head_overrides)
    if not ov and not hov:
        return ""  # the published configurations build (tested); skip the torch import
    import torch

    from c2disr.models import build_model

    try:
        with torch.device("meta"):
            build_model(arch, variant=variant, flavor=flavor, head="continuous",
                        overrides=ov or None, head_overrides=hov or None)
    except (TypeError, ValueError, KeyError, AssertionError, RuntimeError) as exc:
        return str(exc)
    return ""
