"""The search space of `c2d tune`: a YAML file, parsed into typed settings and checked against
the typed job Config before any trial starts. Imports neither Ray nor torch at module level
(`validate_space` builds backbone configs, which imports c2disr, only when called).

A space file (see jobs/spaces/tiny.yaml for a commented sample):

    trial:                      # what one trial trains
      stage: pretrain           # pretrain: the continuous stage from scratch, validated at `scale`
                                # finetune: discrete at `scale`, from the model file `init_from`
      scale: 2                  # val_psnr means val_x<scale>_psnr; MACs are counted at this scale
      steps: 24                 # training steps of one trial (replaces <stage>.steps)
      report_every: 6           # validate + report to Tune every N steps (one Tune iteration)
      init_from: ""             # finetune only
    search:
      algo: random              # random | grid | optuna | optuna-mo   (--algo)
      trials: 4                 # trial budget                         (--trials)
      time_budget_s: null       # wall-clock budget of the whole search (--time-budget-s)
      metric: val_psnr          # maximised                            (--metric)
      max_macs: null            # G MACs at 1280x720 output; bigger models are rejected (--max-macs)
      max_concurrent: null      # cap on concurrent trials (default: what the cluster fits)
      seed: 0
    scheduler:
      type: asha                # asha | fifo
      grace_period: 1           # in reports (validation rounds) before ASHA may stop a trial
      reduction_factor: 2
    params:                     # config keys, written as for --set
      pretrain.lr: {loguniform: [1.0e-4, 2.0e-3]}
      model.overrides.embed_dim: {choice: [16, 32]}
      shape:                    # a name without dots: a joint choice setting several keys at once
        joint:
          - {model.overrides.c2d_schedule: [2, 1, 2], model.overrides.depths: [3, 3]}
          - {model.overrides.c2d_schedule: [2, 1, 1, 2], model.overrides.depths: [4, 4]}

Distributions: `choice: [v, ...]`, `grid: [v, ...]` (every value is tried), `uniform: [low, high]`,
`loguniform: [low, high]` (low > 0), `randint: [low, high]` (integers, both ends included),
`joint: [{key: value, ...}, ...]` (one option sets several keys together, for fields that must
agree, such as a c2d window schedule and the layers per group).

What Tune sees: numbers and strings pass through; an option that is a list or a mapping is
handed to the search algorithm as a short text label (Optuna only accepts scalar categories)
and decoded back to its value inside the trial.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import random
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from srplatform.config import read_yaml
from srplatform.errors import UserError

ALGOS = ("random", "grid", "optuna", "optuna-mo")
STAGES = ("pretrain", "finetune")
SCHEDULERS = ("asha", "fifo")
DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint", "joint")
FINITE = ("choice", "grid", "joint")
# The scales each stage validates at (what `srplatform.train.api.run_stage` asks the loop for):
# the continuous stage at all three discrete scales, a fine-tune at its own scale.
STAGE_VAL_SCALES = {"pretrain": (2, 3, 4)}
# Keys a trial sets itself, or that must stay fixed for the search to make sense.
RESERVED = {
    "name": "each trial is named after its Tune trial id",
    "storage": "trials store their runs under the search's folder",
    "tracking": "trials log to the search's MLflow server as children of its parent run",
    "run.val_every": "set by trial.report_every",
    "run.checkpoint_every": "set by trial.report_every",
    "run.keep_checkpoints": "a trial keeps its latest checkpoint only",
    "pretrain.steps": "set by trial.steps",
    "finetune.steps": "set by trial.steps",
    "finetune.scales": "set by trial.scale",
    "data.train": "the shards are prepared once, before the trials",
    "data.source": "the shards are prepared once, before the trials",
    "resources": "the per-trial resources size the search's concurrency",
}
# How many combinations of representative values `validate_space` builds at most.
MAX_CHECKED_COMBINATIONS = 512


class SpaceError(UserError):
    """The search space file is invalid; the message names the file and the key."""


# --------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (bool, int, float, str))


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


@dataclass(frozen=True)
class Param:
    """One entry of `params`: a config key (or, for `joint`, a group name) and its distribution.

    options: the values of choice / grid, or the `{key: value}` mappings of joint.
    low, high: the bounds of uniform / loguniform / randint (randint includes `high`).
    """

    name: str
    kind: str
    options: tuple[Any, ...] = ()
    low: float = 0.0
    high: float = 0.0

    @property
    def finite(self) -> bool:
        return self.kind in FINITE

    @property
    def keys(self) -> list[str]:
        """The config keys this parameter sets."""
        if self.kind == "joint":
            seen: dict[str, None] = {}
            for opt in self.options:
                seen.update(dict.fromkeys(opt))
            return list(seen)
        return [self.name]

    @property
    def encoded(self) -> bool:
        """True when Tune sees text labels instead of the option values."""
        return self.kind == "joint" or (self.finite and not all(_is_scalar(v) for v in self.options))

    def labels(self) -> list[Any]:
        """The values the search algorithm chooses among (finite kinds only)."""
        if not self.encoded:
            return list(self.options)
        if self.kind == "joint":
            return [" ".join(f"{k.rsplit('.', 1)[-1]}={_compact(v)}" for k, v in opt.items())
                    for opt in self.options]
        return [_compact(v) for v in self.options]

    def representatives(self) -> list[Any]:
        """Values that stand for the whole range in checks: every option, or both bounds."""
        if self.finite:
            return list(self.options)
        if self.kind == "randint":
            return [int(self.low), int(self.high)]
        return [self.low, self.high]

    def decode(self, sampled: Any) -> dict[str, Any]:
        """`{config key: value}` for the value the search algorithm sampled."""
        if self.encoded:
            labels = self.labels()
            try:
                i = labels.index(sampled)
            except ValueError:
                raise SpaceError(f"params.{self.name}: {sampled!r} is not one of its options") from None
            value = self.options[i]
            return dict(value) if self.kind == "joint" else {self.name: value}
        if self.kind == "randint":
            return {self.name: int(sampled)}
        if self.kind in ("uniform", "loguniform"):
            return {self.name: float(sampled)}
        return {self.name: sampled}

    def domain(self, algo: str) -> Any:
        """The Ray Tune search-space object of this parameter for `algo`."""
        from ray import tune

        if self.finite:
            labels = self.labels()
            if algo == "grid" or self.kind == "grid":
                return tune.grid_search(labels)
            return tune.choice(labels)
        if self.kind == "uniform":
            return tune.uniform(self.low, self.high)
        if self.kind == "loguniform":
            return tune.loguniform(self.low, self.high)
        return tune.randint(int(self.low), int(self.high) + 1)  # Tune excludes the upper end


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool):
        raise SpaceError(f"{where}: expected a number, got {value!r}")
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    raise SpaceError(f"{where}: expected a number, got {value!r}")


def parse_param(name: str, spec: Any, source: str) -> Param:
    """One `params` entry: `key: {distribution: arguments}`."""
    where = f"{source}: params.{name}"
    if not isinstance(name, str) or not name or any(not p for p in name.split(".")):
        raise SpaceError(f"{source}: params has an invalid key {name!r}")
    if not isinstance(spec, dict) or len(spec) != 1:
        raise SpaceError(
            f"{where} must be a mapping with exactly one distribution, e.g. "
            f"{{choice: [a, b]}}; one of: {', '.join(DISTRIBUTIONS)}")
    (kind, args), = spec.items()
    if kind not in DISTRIBUTIONS:
        raise SpaceError(f"{where}: unknown distribution {kind!r}; use one of {', '.join(DISTRIBUTIONS)}")
    if kind == "joint" and "." in name:
        raise SpaceError(f"{where}: a joint choice is named by a group name without dots "
                         "(its options name the config keys)")
    if kind in FINITE:
        if not isinstance(args, list):
            raise SpaceError(f"{where}: {kind} takes a list of values, got {args!r}")
        if not args:
            raise SpaceError(f"{where}: {kind} has an empty list of values; give at least one")
        if kind == "joint":
            for i, opt in enumerate(args):
                if not isinstance(opt, dict) or not opt:
                    raise SpaceError(f"{where}: joint option {i} must be a non-empty mapping "
                                     f"{{config.key: value, ...}}, got {opt!r}")
                for k in opt:
                    if not isinstance(k, str) or "." not in k:
                        raise SpaceError(f"{where}: joint option {i} key {k!r} must be a config key "
                                         "such as model.overrides.depths")
        seen: set[str] = set()
        for v in args:
            text = _compact(v)
            if text in seen:
                raise SpaceError(f"{where}: the value {text} is listed twice")
            seen.add(text)
        param = Param(name=name, kind=kind, options=tuple(args))
        labels = param.labels()
        if len(set(map(str, labels))) != len(labels):
            raise SpaceError(f"{where}: two options have the same label {labels}; make them differ")
        return param
    if not isinstance(args, list) or len(args) != 2:
        raise SpaceError(f"{where}: {kind} takes [low, high], got {args!r}")
    low, high = (_number(v, where) for v in args)
    if kind == "randint":
        if not (float(low).is_integer() and float(high).is_integer()):
            raise SpaceError(f"{where}: randint bounds must be integers, got {args!r}")
        low, high = int(low), int(high)
        if low > high:
            raise SpaceError(f"{where}: low {low} is greater than high {high}")
    elif not low < high:
        raise SpaceError(f"{where}: low {low} must be less than high {high} "
                         "(for a single value, drop the key from params or use choice: [value])")
    if kind == "loguniform" and low <= 0:
        raise SpaceError(f"{where}: loguniform needs low > 0, got {low}")
    for v in (low, high):
        if not math.isfinite(v):
            raise SpaceError(f"{where}: bounds must be finite, got {args!r}")
    return Param(name=name, kind=kind, low=low, high=high)


# --------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class TrialSettings:
    stage: str = "pretrain"
    scale: int = 2
    steps: int = 24
    report_every: int = 6
    init_from: str = ""


@dataclass(kw_only=True)
class SearchSettings:
    algo: str = "random"
    trials: int = 4
    time_budget_s: float | None = None
    metric: str = "val_psnr"
    max_macs: float | None = None  # G MACs
    max_concurrent: int | None = None
    seed: int = 0


@dataclass(kw_only=True)
class SchedulerSettings:
    type: str = "asha"
    grace_period: int = 1  # reports
    reduction_factor: float = 2.0


@dataclass(kw_only=True)
class SearchSpace:
    path: str
    trial: TrialSettings = field(default_factory=TrialSettings)
    search: SearchSettings = field(default_factory=SearchSettings)
    scheduler: SchedulerSettings = field(default_factory=SchedulerSettings)
    params: list[Param] = field(default_factory=list)

    # ---- derived ---------------------------------------------------------------------
    @property
    def mode(self) -> str:
        return "max"

    @property
    def multi_objective(self) -> bool:
        return self.search.algo == "optuna-mo"

    def grid_size(self) -> int:
        """How many points the grid distributions span (1 without grid parameters; with
        --algo grid every finite parameter is enumerated)."""
        n = 1
        for p in self.params:
            if p.kind == "grid" or (self.search.algo == "grid" and p.finite):
                n *= len(p.options)
        return n

    def num_samples(self) -> int:
        """Tune's `num_samples`: how often the grid is repeated with fresh random draws."""
        if self.search.algo == "grid":
            return 1
        return max(1, self.search.trials // self.grid_size())

    def planned_trials(self) -> int:
        return self.grid_size() * self.num_samples()

    def param_space(self) -> dict[str, Any]:
        """Tune's `param_space`: one flat entry per parameter (dots kept in the names)."""
        return {p.name: p.domain(self.search.algo) for p in self.params}

    def decode(self, sampled: dict[str, Any]) -> dict[str, Any]:
        """`{config key: value}` for a trial's Tune config."""
        out: dict[str, Any] = {}
        for p in self.params:
            if p.name in sampled:
                out.update(p.decode(sampled[p.name]))
        return out

    def to_dict(self) -> dict[str, Any]:
        """What identifies the search (for the resume check and logging)."""
        return {
            "trial": dataclasses.asdict(self.trial),
            "search": dataclasses.asdict(self.search),
            "scheduler": dataclasses.asdict(self.scheduler),
            "params": [{"name": p.name, "kind": p.kind, "options": list(p.options),
                        "low": p.low, "high": p.high} for p in self.params],
        }


def _section(cls: type, data: Any, name: str, source: str) -> Any:
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise SpaceError(f"{source}: {name} must be a mapping, got {type(data).__name__}")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        import difflib

        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, fields, n=1)
            hints.append(f"{name}.{key}" + (f" (did you mean {name}.{close[0]}?)" if close else ""))
        raise SpaceError(f"{source}: unknown key {', '.join(hints)}; valid keys in {name}: "
                         f"{', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _coerce_setting(hints[key], value, f"{source}: {name}.{key}")
    return cls(**kwargs)


def _coerce_setting(tp: Any, value: Any, where: str) -> Any:
    args = typing.get_args(tp)
    if type(None) in args:
        if value is None:
            return None
        tp = next(a for a in args if a is not type(None))
    if tp is str:
        if not isinstance(value, str):
            raise SpaceError(f"{where} must be a string, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpaceError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        return float(_number(value, where))
    raise TypeError(f"unsupported setting type {tp!r} at {where}")  # a bug in this module


def load_space(path: str | Path, *, algo: str | None = None, trials: int | None = None,
               time_budget_s: float | None = None, metric: str | None = None,
               max_macs: float | None = None) -> SearchSpace:
    """Read and shape-check a space file; the keyword arguments (the CLI flags) replace the
    file's `search` values when given. Checks against a Config: `validate_space`."""
    p = Path(path)
    source = str(p)
    data = read_yaml(p, SpaceError, "search space file", "jobs/spaces/")
    if not isinstance(data, dict) or not data:
        raise SpaceError(f"{p}: empty search space; it needs at least a `params` mapping "
                         "(see jobs/spaces/tiny.yaml)")
    unknown = sorted(set(data) - {"trial", "search", "scheduler", "params"})
    if unknown:
        raise SpaceError(f"{p}: unknown section {', '.join(unknown)}; valid sections: "
                         "trial, search, scheduler, params")
    trial = _section(TrialSettings, data.get("trial"), "trial", source)
    search = _section(SearchSettings, data.get("search"), "search", source)
    scheduler = _section(SchedulerSettings, data.get("scheduler"), "scheduler", source)
    raw_params = data.get("params")
    if raw_params is None or raw_params == {}:
        raise SpaceError(f"{p}: params is empty: name at least one config key to search, "
                         "e.g. pretrain.lr: {loguniform: [1.0e-4, 1.0e-3]}")
    if not isinstance(raw_params, dict):
        raise SpaceError(f"{p}: params must be a mapping of config keys to distributions")
    params = [parse_param(k, v, source) for k, v in raw_params.items()]
    if algo is not None:
        search.algo = algo
    if trials is not None:
        search.trials = trials
    if time_budget_s is not None:
        search.time_budget_s = float(time_budget_s)
    if metric is not None:
        search.metric = metric
    if max_macs is not None:
        search.max_macs = float(max_macs)
    space = SearchSpace(path=source, trial=trial, search=search, scheduler=scheduler, params=params)
    check_settings(space)
    return space


def check_settings(space: SearchSpace) -> None:
    """Checks of the settings alone (no Config needed)."""
    src = space.path
    t, s, sch = space.trial, space.search, space.scheduler
    if t.stage not in STAGES:
        raise SpaceError(f"{src}: trial.stage must be one of {', '.join(STAGES)}, got {t.stage!r}")
    if t.scale not in (2, 3, 4):
        raise SpaceError(f"{src}: trial.scale must be 2, 3 or 4, got {t.scale}")
    if t.steps < 1:
        raise SpaceError(f"{src}: trial.steps must be at least 1, got {t.steps}")
    if not 1 <= t.report_every <= t.steps:
        raise SpaceError(f"{src}: trial.report_every must be in [1, trial.steps={t.steps}], "
                         f"got {t.report_every}")
    if t.stage == "finetune" and not t.init_from:
        raise SpaceError(f"{src}: trial.stage finetune needs trial.init_from (a stage-1 model file)")
    if t.stage == "pretrain" and t.init_from:
        raise SpaceError(f"{src}: trial.init_from is only used with trial.stage finetune")
    if s.algo not in ALGOS:
        raise SpaceError(f"{src}: search.algo (--algo) must be one of {', '.join(ALGOS)}, got {s.algo!r}")
    if s.trials < 1:
        raise SpaceError(f"{src}: the trial budget (search.trials / --trials) must be at least 1, "
                         f"got {s.trials}")
    if s.time_budget_s is not None and s.time_budget_s <= 0:
        raise SpaceError(f"{src}: the time budget (search.time_budget_s / --time-budget-s) must be "
                         f"positive, got {s.time_budget_s:g}; leave it out for no time limit")
    if s.max_macs is not None and s.max_macs <= 0:
        raise SpaceError(f"{src}: search.max_macs (--max-macs, in G) must be positive, got {s.max_macs:g}")
    if s.max_concurrent is not None and s.max_concurrent < 1:
        raise SpaceError(f"{src}: search.max_concurrent must be at least 1, got {s.max_concurrent}")
    if sch.type not in SCHEDULERS:
        raise SpaceError(f"{src}: scheduler.type must be one of {', '.join(SCHEDULERS)}, got {sch.type!r}")
    if sch.type == "asha":
        if sch.grace_period < 1:
            raise SpaceError(f"{src}: scheduler.grace_period must be at least 1 report, got {sch.grace_period}")
        if sch.reduction_factor <= 1:
            raise SpaceError(f"{src}: scheduler.reduction_factor must be greater than 1, "
                             f"got {sch.reduction_factor:g}")
        reports = math.ceil(t.steps / t.report_every)
        if sch.grace_period >= reports:
            raise SpaceError(
                f"{src}: scheduler.grace_period ({sch.grace_period} reports) leaves ASHA no point "
                f"at which to stop a trial of {reports} reports (trial.steps / trial.report_every); "
                "lower it, report more often, or use scheduler.type fifo")
    names = [p.name for p in space.params]
    if len(set(names)) != len(names):
        raise SpaceError(f"{src}: a parameter is listed twice in params")
    owner: dict[str, str] = {}
    for p in space.params:
        for k in p.keys:
            if k in owner:
                raise SpaceError(f"{src}: the key {k} is set by both params.{owner[k]} and "
                                 f"params.{p.name}; set each key in one place")
            owner[k] = p.name
    if s.algo in ("optuna", "optuna-mo"):
        grid = [p.name for p in space.params if p.kind == "grid"]
        if grid:
            raise SpaceError(
                f"{src}: params {', '.join(grid)} use grid, which Optuna cannot sample (it "
                "proposes values itself): use choice with --algo optuna, or --algo grid/random")
    if s.algo == "grid":
        loose = [p.name for p in space.params if not p.finite]
        if loose:
            raise SpaceError(
                f"{src}: --algo grid enumerates every value, but params {', '.join(loose)} are "
                "continuous ranges: give them choice/grid lists, or use --algo random/optuna")
        if s.trials < space.grid_size():
            raise SpaceError(
                f"{src}: the grid has {space.grid_size()} points but the trial budget is "
                f"{s.trials}; raise --trials to {space.grid_size()} or use --algo random")
    elif s.trials < space.grid_size():
        raise SpaceError(
            f"{src}: the grid parameters span {space.grid_size()} points, more than the trial "
            f"budget of {s.trials}; raise --trials or turn some grid lists into choice")


# --------------------------------------------------------------------------------------
# Checks against the job config
# --------------------------------------------------------------------------------------


def metric_names(space: SearchSpace, ema: bool) -> list[str]:
    """The metrics a trial reports that can be optimised: the training loop's
    `val_x<s>_psnr|ssim` (+ `_ema` with EMA weights) for the scales its stage validates at, and
    the `val_psnr|ssim` aliases for `trial.scale`."""
    scales = STAGE_VAL_SCALES.get(space.trial.stage, (space.trial.scale,))
    suffixes = ["", "_ema"] if ema else [""]
    names = [f"val_{m}{e}" for e in suffixes for m in ("psnr", "ssim")]
    names += [f"val_x{s}_{m}{e}" for s in scales for e in suffixes for m in ("psnr", "ssim")]
    return names


def set_key(data: dict[str, Any], key: str, value: Any) -> None:
    """Set `a.b.c` in a nested dict (sections created as needed)."""
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = node[part] = {}
        node = nxt
    node[parts[-1]] = value


def _reserved_reason(key: str) -> str | None:
    for k, why in RESERVED.items():
        if key == k or key.startswith(k + "."):
            return why
    return None


def _check_key(key: str, cfg, archs: list[str], space: SearchSpace) -> None:
    """`key` must name a leaf of the typed Config (or a field of the backbone/head config
    under model.overrides / model.head_overrides)."""
    import difflib

    from srplatform.config import Config, ModelSection

    src = f"{space.path}: params"
    why = _reserved_reason(key)
    if why:
        raise SpaceError(f"{src}: {key} cannot be searched ({why})")
    parts = key.split(".")
    node: type = Config
    for i, part in enumerate(parts):
        fields = {f.name for f in dataclasses.fields(node)}
        prefix = ".".join(parts[:i])
        if part not in fields:
            close = difflib.get_close_matches(part, fields, n=1)
            hint = f" (did you mean {'.'.join(parts[:i] + [close[0]] + parts[i + 1:])}?)" if close else ""
            raise SpaceError(f"{src}: {key} is not a config key{hint}; valid keys in "
                             f"{prefix or 'the top level'}: {', '.join(sorted(fields))}")
        hint_tp = typing.get_type_hints(node)[part]
        if dataclasses.is_dataclass(hint_tp):
            if i == len(parts) - 1:
                raise SpaceError(f"{src}: {key} is a section; name a key inside it ({key}.<key>)")
            node = hint_tp
            continue
        if node is ModelSection and part in ("overrides", "head_overrides"):
            rest = parts[i + 1:]
            if len(rest) != 1:
                raise SpaceError(f"{src}: {key}: name one field, as in model.{part}.<field>")
            if space.trial.stage == "finetune":
                raise SpaceError(f"{src}: {key}: a finetune trial takes its architecture from "
                                 "trial.init_from, so model fields cannot be searched; use "
                                 "trial.stage pretrain")
            _check_model_field(part, rest[0], cfg, archs, key, src)
            return
        if i != len(parts) - 1:
            raise SpaceError(f"{src}: {key}: {'.'.join(parts[:i + 1])} is a value, not a section")
        if parts[0] == "model" and space.trial.stage == "finetune":
            raise SpaceError(f"{src}: {key}: a finetune trial takes its architecture from "
                             "trial.init_from, so model keys cannot be searched")
    return


def _check_model_field(which: str, name: str, cfg, archs: list[str], key: str, src: str) -> None:
    from c2disr.models import make_backbone_config, make_head_config

    if which == "overrides":
        for arch in archs:
            fields = [f.name for f in dataclasses.fields(
                make_backbone_config(arch, variant=cfg.model.variant, flavor=cfg.model.flavor))]
            if name not in fields or name == "variant":
                raise SpaceError(f"{src}: {key}: {name!r} is not a field of the {arch} backbone "
                                 f"config; valid fields: {', '.join(f for f in fields if f != 'variant')}")
    else:
        fields = [f.name for f in dataclasses.fields(make_head_config("continuous", flavor=cfg.model.flavor))]
        if name not in fields:
            raise SpaceError(f"{src}: {key}: {name!r} is not a field of the continuous head config; "
                             f"valid fields: {', '.join(fields)}")


def _combinations(space: SearchSpace, seed: int) -> list[dict[str, Any]]:
    """Representative combinations (all of them when few, else a seeded sample), as
    `{param name: value}` in the parameters' own (decoded) terms."""
    reps = [(p, p.representatives()) for p in space.params]
    total = 1
    for _, r in reps:
        total *= len(r)
    if total <= MAX_CHECKED_COMBINATIONS:
        return [dict(zip([p.name for p, _ in reps], combo))
                for combo in itertools.product(*[r for _, r in reps])]
    rng = random.Random(seed)
    out = []
    # every representative value appears at least once, then random fill
    longest = max(len(r) for _, r in reps)
    for i in range(longest):
        out.append({p.name: r[i % len(r)] for p, r in reps})
    while len(out) < MAX_CHECKED_COMBINATIONS:
        out.append({p.name: rng.choice(r) for p, r in reps})
    return out


def _raw_decode(param: Param, value: Any) -> dict[str, Any]:
    """`{config key: value}` for a representative (already decoded) value."""
    if param.kind == "joint":
        return dict(value)
    return {param.name: value}


def trial_config_dict(base: dict[str, Any], space: SearchSpace, values: dict[str, Any]) -> dict[str, Any]:
    """The config dict of one trial: the base config, the trial settings, the sampled values."""
    import copy

    data = copy.deepcopy(base)
    t = space.trial
    section = data.setdefault(t.stage, {})
    section["steps"] = t.steps
    section["warmup_steps"] = min(int(section.get("warmup_steps", 0)), t.steps)
    if t.stage == "finetune":
        data.setdefault("finetune", {})["scales"] = [t.scale]
    run = data.setdefault("run", {})
    run["val_every"] = t.report_every
    run["checkpoint_every"] = t.report_every
    run["keep_checkpoints"] = 1
    run["log_every"] = max(1, min(int(run.get("log_every", 10)), t.report_every))
    for key, value in values.items():
        set_key(data, key, value)
    # a warm-up longer than a sampled step count would be refused; keep it inside the run
    sec = data[t.stage]
    sec["warmup_steps"] = min(int(sec.get("warmup_steps", 0)), int(sec.get("steps", t.steps)))
    return data


def check_combination(base: dict[str, Any], space: SearchSpace, values: dict[str, Any]):
    """Build the trial Config (and, for a pretrain trial, the backbone and head configs) of
    one combination. Returns the Config; raises ConfigError / ValueError / TypeError."""
    from srplatform.config import Config

    data = trial_config_dict(base, space, values)
    cfg = Config.from_dict(data, source=f"{space.path} (a trial config)")
    if space.trial.stage == "pretrain":
        from c2disr.models import make_backbone_config, make_head_config

        m = cfg.model
        make_backbone_config(m.arch, variant=m.variant, flavor=m.flavor, overrides=m.overrides or None)
        make_head_config("continuous", flavor=m.flavor, overrides=m.head_overrides or None)
    return cfg


def validate_space(space: SearchSpace, cfg) -> list[str]:
    """Check the space against the job config before any trial starts.

    Raises SpaceError naming the key and the space file when a key does not exist, a value
    has the wrong type, a parameter value fails with every combination of the others, no
    combination makes a valid config/model, or the metric is one no trial reports. Returns
    warnings (e.g. some combinations are invalid: those trials are rejected without training).
    """
    from srplatform.config import ConfigError

    src = space.path
    archs = [cfg.model.arch]
    for p in space.params:
        if p.name == "model.arch" and p.finite:
            archs = [str(v) for v in p.options]
    for p in space.params:
        for key in p.keys:
            _check_key(key, cfg, archs, space)

    ema_values = [getattr(cfg, space.trial.stage).ema_decay]
    for p in space.params:
        if f"{space.trial.stage}.ema_decay" in p.keys:
            ema_values = [v.get(f"{space.trial.stage}.ema_decay") if isinstance(v, dict) else v
                          for v in p.representatives()]
    ema = all(v is not None and float(v) > 0 for v in ema_values)
    names = metric_names(space, ema)
    if space.search.metric not in names:
        extra = "" if ema else " (EMA metrics need <stage>.ema_decay > 0 in every trial)"
        raise SpaceError(f"{src}: metric {space.search.metric!r} (search.metric / --metric) is not "
                         f"reported by a {space.trial.stage} trial; choose one of "
                         f"{', '.join(names)}{extra}")

    base = cfg.to_dict()
    combos = _combinations(space, space.search.seed)
    by_param = {p.name: p for p in space.params}
    ok_values: dict[str, set[str]] = {p.name: set() for p in space.params}
    first_error: dict[tuple[str, str], str] = {}
    failures, total = [], 0
    for combo in combos:
        total += 1
        values: dict[str, Any] = {}
        for name, value in combo.items():
            values.update(_raw_decode(by_param[name], value))
        try:
            check_combination(base, space, values)
        except TypeError as exc:  # an unknown field: never valid
            raise SpaceError(f"{src}: {exc}") from None
        except (ConfigError, ValueError) as exc:
            msg = str(exc)
            failures.append(msg)
            for name, value in combo.items():
                first_error.setdefault((name, _compact(value)), msg)
            continue
        for name, value in combo.items():
            ok_values[name].add(_compact(value))
    if failures and len(failures) == total:
        raise SpaceError(f"{src}: no combination of the params gives a valid trial config; "
                         f"for example: {failures[0]}")
    for p in space.params:
        for value in p.representatives():
            text = _compact(value)
            if text not in ok_values[p.name]:
                raise SpaceError(f"{src}: params.{p.name} = {text} gives an invalid trial config "
                                 f"with every checked combination of the other params: "
                                 f"{first_error.get((p.name, text), '?')}")
    warnings = []
    if failures:
        warnings.append(f"{len(failures)} of {total} checked combinations of the params are invalid "
                        f"(e.g. {failures[0]}); such trials are rejected without training")
    return warnings
