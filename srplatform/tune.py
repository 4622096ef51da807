"""Ray Tune over the hierarchical-encoding hyperparameters (and learning rates) of a job config.

    result = run_tune(load_config("jobs/configs/tiny.yaml"), "jobs/spaces/tiny.yaml",
                      name="demo", algo="random", trials=4)
    print(result.table())            # trial, params, MACs, PSNR, iterations, status
    result.best_config_path          # <data dir>/tune/demo/best.yaml, for `c2d pipeline --config`

What a trial trains. Each trial is one real training run: `srplatform.train.api.run_stage` (a
Ray Train V2 `TorchTrainer` with its own workers and Ray Data pipeline) on the job config with
the sampled values applied. The default trial (`trial.stage: pretrain`) is a short C2D stage 1
from scratch: the backbone with the continuous head, validated at `trial.scale` (val_psnr =
val_x<scale>_psnr on the config's validation images, raw weights). Stage 1 is where the
hierarchical encoding is learned, it needs no stage-1 weights to start from (which would fix
the architecture), and the continuous head starts from a bilinear residual, so a few dozen CPU
steps already separate good from bad settings by fractions of a dB instead of measuring how
fast a randomly initialised pixel-shuffle head leaves 10 dB. `trial.stage: finetune` instead
fine-tunes the model file `trial.init_from` at the scale (learning-rate style searches only).

Metrics reach Tune through Ray Train's Tune integration: a `TuneReportCallback` (subclassed to
add `val_psnr`, `macs_g` and `params`) in the trial's Train RunConfig (`run_stage(callbacks=...)`)
forwards every `ray.train.report` of rank 0 to the trial: one per `trial.report_every` steps,
each with the validation metrics.

Resources. A trial's own actor asks for a sliver of a CPU (TRIAL_DRIVER_CPU; Tune refuses an
empty request): it only drives its TorchTrainer, whose workers and data tasks hold the CPUs. So
Tune's own resource accounting would let every trial start at once; concurrency is bounded
explicitly instead: at most floor(cluster CPUs / (num_workers x cpus_per_worker +
data.num_cpus_per_task + TRIAL_DRIVER_CPU)) trials (likewise for GPUs) run at once, so every
running trial has room for its workers and at least one data task, and trials beyond that wait
as PENDING in Tune instead of starving each other's training workers.

Early stopping: ASHA on the metric, with `step` (training steps) as its time axis, so a trial
resumed from a checkpoint stays on the same rungs; the space file's grace period is in reports.

Budget and resume: `search.trials` / `--trials` and `search.time_budget_s`. The Tune experiment
lives in `<data dir>/tune/<name>`; running the same command again with the same name restores it
(`Tuner.restore(..., resume_unfinished=True, restart_errored=False)`): finished and rejected
trials are kept, interrupted ones continue from their latest training checkpoint (their runs
live under `<data dir>/tune/<name>/runs/trial_<id>`), and the search goes on with the rest.

Results: one MLflow parent run for the search, one child run per trial (created by the training
run; the search adds `tune.*` params, MACs/params/final metric and the status tag
`c2d.trial_status`: finished / early-stopped / stopped / rejected / error); `best.yaml` (the job
config with the best trial's values, accepted by `c2d pipeline --config` as is); a PSNR-vs-MACs
plot with the Pareto front; the printed table.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from srplatform.config import Config, flatten
from srplatform.errors import UserError
from srplatform.tune_space import SearchSpace, load_space, trial_config_dict, validate_space

SEARCH_RECORD = "_c2d_search.json"  # MLflow parent run of the search
IDENTITY_RECORD = "_c2d_search_identity.json"  # what the search explores (resume check)
LOGGED_RECORD = "_c2d_logged.json"  # trial id -> the status its MLflow run was completed with
ASHA_RECORD = "_c2d_asha.json"  # ASHA's rungs and the trials it stopped early
TUNE_SUBDIR = "experiment"  # Ray Tune's own experiment folder inside the search's folder
BEST_FILE = "best.yaml"
PLOT_FILE = "psnr_vs_macs.png"
TABLE_FILE = "trials.txt"
TRIAL_PREFIX = "trial_"
# A trial's own actor only waits on its TorchTrainer; Tune refuses an empty request, so it asks
# for a sliver of a CPU (counted in `trial_resources`).
TRIAL_DRIVER_CPU = 0.01
STATUSES = ("finished", "early-stopped", "stopped", "rejected", "error", "running", "pending")


class TrialRejected(Exception):
    """A sampled configuration that is not trained: over the MACs budget, or one that does not
    make a valid model. The trial ends as an error whose message says why."""


# --------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class TrialRecord:
    """One trial as the search saw it. `values`: config key -> value it trained with."""

    trial_id: str
    labels: dict[str, Any]  # parameter name -> what the search algorithm chose
    values: dict[str, Any]
    status: str
    metric: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    macs_g: float | None = None
    params: int | None = None
    iterations: int = 0
    step: int = 0
    mlflow_run_id: str | None = None
    error: str | None = None
    pareto: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(kw_only=True)
class TuneResult:
    name: str
    path: str
    metric: str
    algo: str
    trials: list[TrialRecord]
    best: TrialRecord | None = None
    best_config_path: str | None = None
    plot_path: str | None = None
    mlflow_run_id: str | None = None
    interrupted: bool = False
    error: str | None = None  # why the search stopped early, when it crashed (state is kept)
    resumed: bool = False
    max_concurrent: int = 1
    seconds: float = 0.0

    @property
    def pareto(self) -> list[TrialRecord]:
        return [t for t in self.trials if t.pareto]

    def by_status(self, status: str) -> list[TrialRecord]:
        return [t for t in self.trials if t.status == status]

    def table(self) -> str:
        return trials_table(self.trials, self.metric)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["best"] = self.best.trial_id if self.best else None
        return out


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


def trials_table(trials: Sequence[TrialRecord], metric: str) -> str:
    """trial | params | MACs | metric | iterations | status, one row per trial."""
    head = ("trial", "params", "MACs (G)", metric, "iter", "steps", "status")
    rows = [head]
    for t in trials:
        params = " ".join(f"{k.rsplit('.', 1)[-1]}={_fmt_value(v)}" for k, v in t.values.items())
        status = t.status + (" *pareto" if t.pareto else "")
        if t.error and t.status in ("rejected", "error"):
            status += f": {t.error[:70]}"
        rows.append((t.trial_id, params or "-",
                     f"{t.macs_g:.2f}" if t.macs_g is not None else "-",
                     f"{t.metric:.3f}" if t.metric is not None else "-",
                     str(t.iterations), str(t.step), status))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head) - 1)]
    lines = []
    for r in rows:
        lines.append("  ".join([c.ljust(w) for c, w in zip(r[:-1], widths)] + [r[-1]]).rstrip())
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Resources
# --------------------------------------------------------------------------------------


def trial_resources(cfg: Config) -> dict[str, float]:
    """What one trial holds: its training workers, one Ray Data task and its own actor."""
    r = cfg.resources
    return {"CPU": r.num_workers * r.cpus_per_worker + cfg.data.num_cpus_per_task + TRIAL_DRIVER_CPU,
            "GPU": r.num_workers * r.gpus_per_worker}


def concurrency(cluster: dict[str, float], need: dict[str, float], *, planned: int,
                cap: int | None = None) -> int:
    """How many trials fit the cluster at once (at least 1, at most `planned` and `cap`).
    Raises UserError when a single trial does not fit at all."""
    fits = []
    for res, amount in need.items():
        if amount <= 0:
            continue
        have = float(cluster.get(res, 0.0))
        n = int(math.floor(have / amount + 1e-9))
        if n < 1:
            raise UserError(
                f"one trial needs {amount:g} {res} (resources.num_workers x resources."
                f"{'cpus' if res == 'CPU' else 'gpus'}_per_worker"
                + (" + data.num_cpus_per_task" if res == "CPU" else "")
                + f") but the Ray cluster has {have:g}; lower them with --set or use a bigger cluster")
        fits.append(n)
    n = min(fits) if fits else 1
    n = min(n, max(1, planned))
    if cap:
        n = min(n, cap)
    return max(1, n)


# --------------------------------------------------------------------------------------
# Model cost (MACs at the papers' convention)
# --------------------------------------------------------------------------------------


def model_cost(cfg: Config, space: SearchSpace) -> tuple[float, int]:
    """(G MACs, parameters) of the model a trial's result would be deployed as: the discrete
    x`trial.scale` model, counted by `c2disr.complexity.count_macs` at 1280x720 output.
    Raises ValueError/TypeError when the config does not make a valid model."""
    import torch

    from c2disr.complexity import count_macs, count_params, lr_size_for_output
    from c2disr.models import build_from_spec, build_model

    scale = space.trial.scale
    with torch.device("meta"):
        if space.trial.stage == "finetune":
            spec = _init_spec(space.trial.init_from)
            model = build_from_spec(dict(spec, head="discrete", scale=scale, head_overrides={}))
        else:
            m = cfg.model
            model = build_model(m.arch, variant=m.variant, flavor=m.flavor, head="discrete",
                                scale=scale, overrides=m.overrides or None)
    macs = count_macs(model, lr_size_for_output(scale))
    return macs / 1e9, count_params(model)


def _init_spec(init_from: str) -> dict[str, Any]:
    from srplatform.train.loop import load_model_uri

    return dict(load_model_uri(init_from).spec)


# --------------------------------------------------------------------------------------
# The trial
# --------------------------------------------------------------------------------------


def _aliases(metrics: dict[str, Any], scale: int) -> dict[str, float]:
    """`val_psnr`, `val_ssim` (+ `_ema`) for the trial's scale, from `val_x<scale>_*`."""
    out = {}
    for m in ("psnr", "ssim"):
        for e in ("", "_ema"):
            v = metrics.get(f"val_x{scale}_{m}{e}")
            if isinstance(v, (int, float)):
                out[f"val_{m}{e}"] = float(v)
    return out


def _define_c2d_tune_report():
    from ray.tune.integration.ray_train import TuneReportCallback

    class C2DTuneReport(TuneReportCallback):
        """Ray Train's TuneReportCallback (it runs in the Train controller), adding the
        `val_psnr` aliases and the model's cost to every report of rank 0."""

        def __init__(self, scale: int, static: dict[str, float]):
            super().__init__()
            self.scale = scale
            self.static = dict(static)

        def after_report(self, run_context, metrics, checkpoint):
            if metrics:
                first = dict(metrics[0])
                first.update(_aliases(first, self.scale))
                first.update(self.static)
                metrics = [first, *metrics[1:]]
            super().after_report(run_context, metrics, checkpoint)

    return C2DTuneReport


def trial_main(config: dict[str, Any], ctx: dict[str, Any]) -> None:
    """The Tune trainable: one training run of the job config with `config`'s sampled values."""
    from ray import tune

    from srplatform.config import ConfigError
    from srplatform.train.api import DataRef, run_stage

    space: SearchSpace = ctx["space"]
    trial_id = tune.get_context().get_trial_id()
    values = space.decode(config)
    data = trial_config_dict(ctx["base"], space, values)
    data["name"] = TRIAL_PREFIX + trial_id
    try:
        cfg = Config.from_dict(data, source=f"trial {trial_id}")
        macs_g, n_params = model_cost(cfg, space)
    except (ConfigError, ValueError, TypeError) as exc:
        raise TrialRejected(f"invalid configuration: {exc}") from None
    max_macs = space.search.max_macs
    if max_macs is not None and macs_g > max_macs:
        raise TrialRejected(f"{macs_g:.2f} G MACs exceeds the budget of {max_macs:g} G "
                            "(search.max_macs / --max-macs); not trained")
    static = {"macs_g": macs_g, "params": float(n_params)}
    scale = space.trial.scale
    kwargs: dict[str, Any] = dict(
        kind=space.trial.stage, scale=scale if space.trial.stage == "finetune" else None,
        init_from=space.trial.init_from or None, data=DataRef(**ctx["data"]),
        parent_run_id=ctx["parent_run_id"],
        extra_tags={"c2d.tune": ctx["name"], "c2d.trial_id": trial_id})
    result = run_stage(cfg, **kwargs, callbacks=[_lazy("C2DTuneReport")(scale, static)],
                       register=False)  # a trial's model is not a registry candidate
    if result.skipped:
        # The run had finished before the search was interrupted, so nothing was reported in
        # this session: report its final metrics once.
        tune.report({"step": int(result.steps), **result.metrics,
                     **_aliases(result.metrics, scale), **static})


# --------------------------------------------------------------------------------------
# Driver-side helpers
# --------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    tmp.replace(path)


def _define_recording_asha():
    from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

    class RecordingASHA(AsyncHyperBandScheduler):
        """ASHA that keeps its bookkeeping in a JSON file beside the experiment:

        - which trials it stopped early, so the search can tell them from finished ones;
        - the values recorded at each rung. Tune does not save scheduler state with the
          experiment (a restored search gets the scheduler as it was built), so without this
          a resumed search would judge its remaining trials against empty rungs, ignoring
          every trial that finished before the interruption.
        """

        def __init__(self, state_path: str, **kwargs):
            super().__init__(**kwargs)
            self.state_path = state_path
            self._synced = False

        def _sync(self) -> None:
            if self._synced:
                return
            self._synced = True
            state = _read_json(Path(self.state_path)) or {}
            for bracket, rungs in zip(getattr(self, "_brackets", []), state.get("rungs", [])):
                for (milestone, recorded), saved in zip(getattr(bracket, "_rungs", []), rungs):
                    if float(saved.get("milestone", -1)) == float(milestone):
                        for tid, value in saved.get("recorded", {}).items():
                            recorded.setdefault(tid, value)

        def _save(self, stopped_id: str | None = None) -> None:
            p = Path(self.state_path)
            state = _read_json(p) or {}
            stopped = set(state.get("stopped", []))
            if stopped_id:
                stopped.add(stopped_id)
            rungs = [[{"milestone": float(m), "recorded": {k: float(v) for k, v in rec.items()}}
                      for m, rec in getattr(b, "_rungs", [])] for b in getattr(self, "_brackets", [])]
            _write_json(p, {"stopped": sorted(stopped), "rungs": rungs})

        def on_trial_add(self, tune_controller, trial):
            self._sync()
            super().on_trial_add(tune_controller, trial)

        def on_trial_result(self, tune_controller, trial, result):
            self._sync()
            decision = super().on_trial_result(tune_controller, trial, result)
            if decision == TrialScheduler.STOP and result.get(self._time_attr, 0) >= self._max_t:
                # The top rung sits at max_t: the trial has done all its steps, so let its run
                # end by itself (final checkpoint, result, MLflow status) instead of killing it.
                decision = TrialScheduler.CONTINUE
            self._save(trial.trial_id if decision == TrialScheduler.STOP else None)
            return decision

        def on_trial_complete(self, tune_controller, trial, result):
            self._sync()
            super().on_trial_complete(tune_controller, trial, result)
            self._save()

    return RecordingASHA


def _define_session_callbacks():
    from ray.tune import Callback

    class SessionCallbacks(Callback):
        """Forwards every Tune callback hook to the callbacks of the current `run_tune` call.

        Tuner.restore brings back the RunConfig (callbacks included) pickled by the first
        session; this stateless forwarder is what gets pickled, so a resumed search calls the
        callbacks given to the resuming call, not stale copies of the first one's."""

    def make_hook(hook: str):
        def forward(self, *args, **kwargs):
            for cb in list(_SESSION_CALLBACKS):
                getattr(cb, hook)(*args, **kwargs)
        forward.__name__ = hook
        return forward

    for hook in [m for m in dir(Callback) if m.startswith("on_")]:
        setattr(SessionCallbacks, hook, make_hook(hook))
    return SessionCallbacks


# Classes that subclass Ray types are defined on first use (importing this module stays free of
# Ray) and cached as module attributes, so pickles refer to them by name.
_LAZY_CLASSES = {"C2DTuneReport": _define_c2d_tune_report, "RecordingASHA": _define_recording_asha,
                 "SessionCallbacks": _define_session_callbacks}
_SESSION_CALLBACKS: list = []


def __getattr__(name: str) -> Any:
    if name in _LAZY_CLASSES:
        cls = _LAZY_CLASSES[name]()
        cls.__module__ = __name__
        cls.__qualname__ = cls.__name__ = name
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _lazy(name: str) -> type:
    return getattr(sys.modules[__name__], name)


def _make_scheduler(space: SearchSpace, state_path: Path):
    """ASHA on the metric over training steps (see the module docstring), or FIFO."""
    if space.scheduler.type != "asha":
        return None
    t = space.trial
    # Single-objective: metric and mode come from TuneConfig (Tune refuses them twice).
    # Multi-objective: TuneConfig has none, ASHA prunes on the quality metric alone.
    own = {"metric": space.search.metric, "mode": space.mode} if space.multi_objective else {}
    # stop_last_trials=False: a trial that reaches max_t ends by itself (its run writes its
    # final checkpoint and result) instead of being stopped at its last report.
    return _lazy("RecordingASHA")(
        str(state_path), time_attr="step", **own, max_t=t.steps, stop_last_trials=False,
        grace_period=space.scheduler.grace_period * t.report_every,
        reduction_factor=space.scheduler.reduction_factor)


def _make_searcher(space: SearchSpace, max_concurrent: int):
    """(search algorithm, whether TuneConfig.max_concurrent_trials applies to it): Tune wraps
    Searchers in a ConcurrencyLimiter itself, the variant generator limits on its own."""
    s = space.search
    if s.algo in ("random", "grid"):
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(random_state=s.seed, max_concurrent=max_concurrent), False
    from optuna.samplers import TPESampler
    from ray.tune.search.optuna import OptunaSearch

    sampler = TPESampler(seed=s.seed)
    if s.algo == "optuna-mo":
        return OptunaSearch(metric=[s.metric, "macs_g"], mode=[space.mode, "min"], sampler=sampler), True
    return OptunaSearch(metric=s.metric, mode=space.mode, sampler=sampler), True


def _trial_status(trial, stopped: set[str], steps: int) -> str:
    st = trial.status
    if st == "ERROR":
        err = _trial_error(trial) or ""
        return "rejected" if "TrialRejected" in err else "error"
    if st == "TERMINATED":
        last = trial.last_result or {}
        if not last or "step" not in last:
            return "stopped"
        if trial.trial_id in stopped:
            return "early-stopped"
        return "finished" if int(last.get("step", 0)) >= steps else "stopped"
    if st in ("RUNNING", "PAUSED"):
        return "running"
    return "pending"


def _trial_error(trial) -> str | None:
    try:
        err = trial.get_error()
    except Exception:  # noqa: BLE001 - an unreadable error file
        err = None
    return None if err is None else error_summary(str(err), type(err).__name__)


def error_summary(text: str, default: str = "error") -> str:
    """One line for a traceback: `TrialRejected: why` for a rejected trial, else the last
    `SomeError: message` line (with its next line when the message continues there, as in
    Ray's "Training failed due to controller error:" + the reason)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for line in lines:
        if "TrialRejected:" in line:
            return "TrialRejected: " + line.split("TrialRejected:", 1)[1].strip()
    pattern = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\w*:")
    hits = [i for i, ln in enumerate(lines) if pattern.match(ln) and not ln.endswith("(most recent call last):")]
    if hits:
        i = hits[-1]
        msg = lines[i]
        if msg.endswith(":") and i + 1 < len(lines):
            msg += " " + lines[i + 1]
        return msg
    return lines[-1] if lines else default


def pareto_front(points: Sequence[tuple[str, float, float]]) -> set[str]:
    """Ids of the non-dominated points of (id, metric to maximise, MACs to minimise)."""
    front = set()
    for i, (tid, q, c) in enumerate(points):
        dominated = any((q2 >= q and c2 <= c) and (q2 > q or c2 < c)
                        for j, (_, q2, c2) in enumerate(points) if j != i)
        if not dominated:
            front.add(tid)
    return front


def plot_front(records: Sequence[TrialRecord], metric: str, path: Path, title: str) -> Path | None:
    """PSNR (or the metric) against MACs for every trial with both, Pareto front marked."""
    pts = [r for r in records if r.metric is not None and r.macs_g is not None]
    if not pts:
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    colours = {"finished": "tab:blue", "early-stopped": "tab:orange", "stopped": "tab:gray",
               "running": "tab:gray", "error": "tab:red", "rejected": "tab:red"}
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for status in dict.fromkeys(r.status for r in pts):
        sel = [r for r in pts if r.status == status]
        ax.scatter([r.macs_g for r in sel], [r.metric for r in sel], s=36,
                   color=colours.get(status, "tab:gray"), label=status, zorder=3)
    front = sorted((r for r in pts if r.pareto), key=lambda r: r.macs_g)
    if front:
        ax.step([r.macs_g for r in front], [r.metric for r in front], where="post",
                color="black", lw=1.2, zorder=2)
        ax.scatter([r.macs_g for r in front], [r.metric for r in front], s=120,
                   facecolors="none", edgecolors="black", lw=1.5, label="Pareto front", zorder=4)
    for r in pts:
        ax.annotate(r.trial_id.rsplit("_", 1)[-1], (r.macs_g, r.metric), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("MACs (G, 1280x720 output)")
    ax.set_ylabel(f"{metric} (dB)" if "psnr" in metric else metric)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def export_best(cfg: Config, record: TrialRecord, path: Path, name: str) -> Path:
    """The job config with the best trial's values, as YAML that `load_config` accepts."""
    import yaml

    from srplatform.tune_space import set_key

    data = cfg.to_dict()
    for key, value in record.values.items():
        set_key(data, key, value)
    data["name"] = name
    best = Config.from_dict(data, source=f"best trial {record.trial_id}")
    header = (f"# Best trial {record.trial_id} of the search {name.rsplit('-best', 1)[0]!r}"
              + (f": {record.metric:.4f}" if record.metric is not None else "")
              + (f", {record.macs_g:.2f} G MACs" if record.macs_g is not None else "")
              + "\n# Train it: c2d pipeline --config " + str(path) + "\n")
    path.write_text(header + yaml.safe_dump(best.to_dict(), sort_keys=False))
    return path


class _Parent:
    """The search's MLflow parent run (reopened when the search is resumed)."""

    def __init__(self, tracker, record: Path, experiment: str, name: str, tags: dict[str, Any]):
        self.tracker = tracker
        old = _read_json(record) or {}
        run_id = old.get("run_id")
        self.reopened = False
        if run_id and old.get("tracking_uri") == tracker.uri and tracker.run_status(run_id):
            tracker.reopen(run_id)
            self.reopened = True
        else:
            run_id = tracker.create_run(experiment, name, tags=tags)
            if run_id:
                _write_json(record, {"run_id": run_id, "tracking_uri": tracker.uri})
        self.run_id = run_id


def _children(tracker, experiment: str, parent_run_id: str | None) -> dict[str, Any]:
    """trial id -> the child MLflow run the trial's training run created."""
    if not parent_run_id:
        return {}

    def search():
        c = tracker.client()
        exp = c.get_experiment_by_name(experiment)
        if exp is None:
            return []
        return c.search_runs([exp.experiment_id],
                             filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                             max_results=5000)

    runs = tracker.call("search runs", search, default=[]) or []
    return {r.data.tags.get("c2d.trial_id"): r for r in runs if r.data.tags.get("c2d.trial_id")}


_MLFLOW_END = {"finished": "FINISHED", "early-stopped": "KILLED", "stopped": "KILLED",
               "rejected": "FAILED", "error": "FAILED"}


def _log_trial(tracker, experiment: str, parent: str | None, name: str, rec: TrialRecord,
               existing, logged: dict[str, str]) -> str | None:
    """Complete the trial's child run (created by its training run; created here for trials
    that never trained). What a trial ended with is logged once (`logged`: trial id -> status
    already logged, kept across resumed sessions); the Pareto tag is refreshed every time."""
    if not parent:
        return None
    run_id = existing.info.run_id if existing is not None else None
    if run_id is None:
        if rec.status in ("pending", "running"):
            return None
        run_id = tracker.create_run(experiment, f"{name}/{rec.trial_id}", parent_run_id=parent,
                                    tags={"c2d.tune": name, "c2d.trial_id": rec.trial_id})
        if not run_id:
            return None
        tracker.log_params(run_id, dict(rec.values))
    tracker.set_tags(run_id, {"c2d.pareto": rec.pareto, "c2d.trial_id": rec.trial_id, "c2d.tune": name})
    if logged.get(rec.trial_id) == rec.status or rec.status in ("pending", "running"):
        return run_id
    tracker.log_params(run_id, {f"tune.{k}": v for k, v in rec.labels.items()})
    # The training run logged val_x<s>_* itself; add the search's view: the aliases of the
    # optimised scale, the model's cost, how far the trial got.
    metrics = {k: v for k, v in rec.metrics.items() if not k.startswith("val_x")}
    if rec.macs_g is not None:
        metrics["macs_g"] = rec.macs_g
    if rec.params is not None:
        metrics["params"] = float(rec.params)
    metrics["tune_iterations"] = float(rec.iterations)
    tracker.log_metrics(run_id, metrics, step=rec.step)
    tags = {"c2d.trial_status": rec.status}
    if rec.error:
        tags["c2d.trial_error"] = rec.error[:5000]
    tracker.set_tags(run_id, tags)
    end = _MLFLOW_END.get(rec.status)
    if end:
        tracker.end_run(run_id, end)
    if tracker.available:  # a call dropped while the server was down is retried next time
        logged[rec.trial_id] = rec.status
    return run_id


def _identity(cfg: Config, space: SearchSpace) -> dict[str, Any]:
    return {"config": cfg.to_dict(), "space": space.to_dict()}


def _check_identity(path: Path, identity: dict[str, Any], name: str, folder: Path) -> None:
    old = _read_json(path)
    if old is None:
        _write_json(path, identity)
        return
    a, b = flatten(old), flatten(json.loads(json.dumps(identity, default=str)))
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if diff:
        shown = "; ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:5])
        raise UserError(
            f"a search named {name!r} already exists at {folder} with different settings "
            f"({shown}). Running the same name resumes it, so the config, space and budget must "
            f"match: use another --name, or delete {folder} to start over")


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# The search
# --------------------------------------------------------------------------------------


def run_tune(cfg: Config, space_path: str | Path, *, name: str | None = None,
             algo: str | None = None, trials: int | None = None,
             time_budget_s: float | None = None, max_macs: float | None = None,
             metric: str | None = None, max_concurrent: int | None = None,
             callbacks: list | None = None, say: Callable[[str], None] = _say) -> TuneResult:
    """Search the space file's parameters on the job config `cfg` (see the module docstring).

    `algo`, `trials`, `time_budget_s`, `max_macs`, `metric` replace the space file's `search`
    values when given; `max_concurrent` caps the concurrency computed from the cluster.
    `callbacks`: extra Ray Tune callbacks (driver side). Everything is checked before the first
    trial starts (UserError naming the key and file). Returns when the search is done or was
    interrupted (`TuneResult.interrupted`; run again with the same name to continue)."""
    from srplatform.stack import data_dir

    t0 = time.time()
    space = load_space(space_path, algo=algo, trials=trials, time_budget_s=time_budget_s,
                       metric=metric, max_macs=max_macs)
    if max_concurrent is not None:
        if max_concurrent < 1:
            raise UserError(f"max_concurrent must be at least 1, got {max_concurrent}")
        space.search.max_concurrent = max_concurrent
    for w in validate_space(space, cfg):
        say(f"warning: {w}")
    name = name or f"{cfg.name}-tune"
    if not name or any(c in name for c in "/\\ "):
        raise UserError(f"--name must be a non-empty name without slashes or spaces, got {name!r}")
    folder = data_dir() / "tune" / name
    folder.mkdir(parents=True, exist_ok=True)
    _check_identity(folder / IDENTITY_RECORD, _identity(cfg, space), name, folder)

    from srplatform.train.api import prepare_data, ray_session, resolve_images

    with ray_session():
        import ray
        from ray import tune

        from srplatform.tracking import Tracker, resolve_tracking_uri

        # Everything the trials share is resolved once, here: the packed shards, the
        # validation folder, the tracking server, where the trial runs live.
        data = prepare_data(cfg, say=lambda m: say(f"[{name}] {m}"))
        base = cfg.to_dict()
        base["data"]["train"] = data.uri
        if cfg.data.val:
            base["data"]["val"] = resolve_images(cfg.data.val, "data.val")
        try:
            uri = resolve_tracking_uri(cfg.tracking.uri)
        except Exception as exc:  # noqa: BLE001 - the search does not depend on tracking
            say(f"warning: no MLflow tracking ({exc}); the search continues without it")
            uri = ""
        base["tracking"]["uri"] = uri
        from srplatform import storage

        runs = storage.join(cfg.storage, "tune", name) if cfg.storage else (folder / "runs").as_uri()
        base["storage"] = runs
        tracker = Tracker(uri or None, say=say)
        experiment = cfg.tracking.experiment
        parent = _Parent(tracker, folder / SEARCH_RECORD, experiment, name,
                         tags={"c2d.kind": "tune", "c2d.name": name, "c2d.algo": space.search.algo})
        if parent.run_id and not parent.reopened:
            params = {f"config.{k}": v for k, v in flatten(cfg).items()}
            params.update({f"space.{p.name}": {"kind": p.kind, "options": list(p.options),
                                               "low": p.low, "high": p.high} if p.kind != "joint"
                           else {"kind": p.kind, "options": list(p.options)}
                           for p in space.params})
            params.update({f"search.{k}": v for k, v in dataclasses.asdict(space.search).items()})
            params.update({f"trial.{k}": v for k, v in dataclasses.asdict(space.trial).items()})
            params.update({f"scheduler.{k}": v for k, v in dataclasses.asdict(space.scheduler).items()})
            tracker.log_params(parent.run_id, params)
            tracker.log_artifact(parent.run_id, space.path, "space")

        need = trial_resources(cfg)
        conc = concurrency(ray.cluster_resources(), need, planned=space.planned_trials(),
                           cap=space.search.max_concurrent)
        say(f"[{name}] {space.planned_trials()} trial(s) ({space.search.algo}), each "
            f"{space.trial.steps} {space.trial.stage} steps at x{space.trial.scale} needing "
            f"{need['CPU']:g} CPU: up to {conc} at once on {ray.cluster_resources().get('CPU', 0):g} CPUs")

        ctx = {"space": space, "base": base, "data": dataclasses.asdict(data),
               "parent_run_id": parent.run_id, "name": name}
        trainable = tune.with_resources(tune.with_parameters(trial_main, ctx=ctx),
                                        {"cpu": TRIAL_DRIVER_CPU})
        asha_path = folder / ASHA_RECORD
        # Tune's experiment folder is a subfolder: Tune mirrors it from a staging copy (and
        # copies it back on restore), which would overwrite files written beside its own.
        exp_path = str(folder / TUNE_SUBDIR)
        resumed = tune.Tuner.can_restore(exp_path)
        if resumed:
            say(f"[{name}] resuming the search in {folder} (finished trials are kept)")
            tuner = tune.Tuner.restore(exp_path, trainable, resume_unfinished=True,
                                       restart_errored=False)
        else:
            searcher, limit = _make_searcher(space, conc)
            tuner = tune.Tuner(
                trainable,
                param_space=space.param_space(),
                tune_config=tune.TuneConfig(
                    metric=None if space.multi_objective else space.search.metric,
                    mode=None if space.multi_objective else space.mode,
                    search_alg=searcher,
                    scheduler=_make_scheduler(space, asha_path),
                    num_samples=space.num_samples(),
                    max_concurrent_trials=conc if limit else None,
                    time_budget_s=space.search.time_budget_s,
                    trial_dirname_creator=lambda trial: trial.trial_id,
                ),
                run_config=tune.RunConfig(
                    name=TUNE_SUBDIR, storage_path=str(folder),
                    failure_config=tune.FailureConfig(max_failures=0),
                    callbacks=[_lazy("SessionCallbacks")()], verbose=1),
            )
        _SESSION_CALLBACKS[:] = list(callbacks or [])
        t_fit = time.time()
        crashed: str | None = None
        try:
            grid = tuner.fit()
        except Exception as exc:  # noqa: BLE001 - e.g. a trial actor killed for memory
            # Tune saves the experiment as it goes: report what is done and how to go on.
            crashed = error_summary(f"{type(exc).__name__}: {exc}", type(exc).__name__)[:500]
            say(f"[{name}] the search stopped with an error ({crashed}); its state is saved: "
                "run the same command again (same --name) to resume it")
            try:
                grid = tune.Tuner.restore(exp_path, trainable).get_results()
            except Exception:  # noqa: BLE001 - nothing saved yet: the original error is the news
                raise exc from None
        finally:
            _SESSION_CALLBACKS.clear()
        fit_s = time.time() - t_fit

        stopped = set((_read_json(asha_path) or {}).get("stopped", []))
        records = _collect(grid, space, cfg, stopped, say)
        # Interrupted (Ctrl-C): trials left unfinished, or fewer trials than planned without
        # the time budget being spent (the generator creates trials only as slots free up).
        budget_spent = (space.search.time_budget_s is not None
                        and fit_s >= 0.97 * space.search.time_budget_s)
        interrupted = (crashed is not None
                       or any(r.status in ("pending", "running") for r in records)
                       or (len(records) < space.planned_trials() and not budget_spent))
        _mark_pareto(records)
        best = _best(records)
        best_path = None
        if best is not None:
            best_path = str(export_best(cfg, best, folder / BEST_FILE, f"{name}-best"))
        plot = plot_front(records, space.search.metric, folder / PLOT_FILE,
                          f"{name}: {space.search.metric} vs MACs ({len(records)} trials)")
        table = trials_table(records, space.search.metric)
        (folder / TABLE_FILE).write_text(table + "\n")

        children = _children(tracker, experiment, parent.run_id)
        logged_path = folder / LOGGED_RECORD
        logged = _read_json(logged_path) or {}
        for rec in records:
            rec.mlflow_run_id = _log_trial(tracker, experiment, parent.run_id, name, rec,
                                           children.get(rec.trial_id), logged)
        _write_json(logged_path, logged)
        if parent.run_id:
            done = [r for r in records if r.status not in ("pending", "running")]
            summary = {"trials": float(len(records)), "trials_done": float(len(done))}
            for st in STATUSES:
                summary[f"trials_{st.replace('-', '_')}"] = float(len([r for r in records if r.status == st]))
            if best is not None and best.metric is not None:
                summary[f"best_{space.search.metric}"] = best.metric
                if best.macs_g is not None:
                    summary["best_macs_g"] = best.macs_g
            tracker.log_metrics(parent.run_id, summary, step=0)
            tracker.set_tags(parent.run_id, {"c2d.best_trial": best.trial_id if best else "",
                                             "c2d.interrupted": interrupted})
            for p in (best_path, plot, folder / TABLE_FILE):
                if p:
                    tracker.log_artifact(parent.run_id, p)
            tracker.end_run(parent.run_id, "KILLED" if interrupted else "FINISHED")
        if tracker.summary():
            say(tracker.summary())

    result = TuneResult(name=name, path=str(folder), metric=space.search.metric,
                        algo=space.search.algo, trials=records, best=best,
                        best_config_path=best_path, plot_path=str(plot) if plot else None,
                        mlflow_run_id=parent.run_id, interrupted=interrupted, error=crashed,
                        resumed=resumed,
                        max_concurrent=conc, seconds=time.time() - t0)
    return result


def _collect(grid, space: SearchSpace, cfg: Config, stopped: set[str],
             say: Callable[[str], None]) -> list[TrialRecord]:
    """One record per Tune trial, in trial order, with its model cost."""
    # ResultGrid exposes per-trial status only through its analysis object.
    trials = list(getattr(grid, "_experiment_analysis").trials)
    trials.sort(key=lambda t: t.trial_id)
    base = cfg.to_dict()
    metric = space.search.metric
    cost_cache: dict[str, tuple[float | None, int | None]] = {}
    records = []
    for t in trials:
        sampled = {k: v for k, v in (t.config or {}).items() if k in {p.name for p in space.params}}
        values = space.decode(sampled)
        last = dict(t.last_result or {})
        status = _trial_status(t, stopped, space.trial.steps)
        key = json.dumps(values, sort_keys=True, default=str)
        if key not in cost_cache:
            try:
                tcfg = Config.from_dict(trial_config_dict(base, space, values), source="trial")
                cost_cache[key] = model_cost(tcfg, space)
            except Exception:  # noqa: BLE001 - an invalid config has no cost
                cost_cache[key] = (None, None)
        macs_g, n_params = cost_cache[key]
        if isinstance(last.get("macs_g"), (int, float)):
            macs_g = float(last["macs_g"])
        value = last.get(metric)
        metrics = {k: float(v) for k, v in last.items()
                   if k.startswith("val_") and isinstance(v, (int, float))}
        err = _trial_error(t) if status in ("error", "rejected") else None
        if err and err.startswith("TrialRejected: "):
            err = err[len("TrialRejected: "):]
        records.append(TrialRecord(
            trial_id=t.trial_id, labels=sampled, values=values, status=status,
            metric=float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None,
            metrics=metrics, macs_g=macs_g, params=n_params,
            iterations=int(last.get("training_iteration", 0) or 0),
            step=int(last.get("step", 0) or 0), error=err))
    return records


def _mark_pareto(records: list[TrialRecord]) -> None:
    """Mark the Pareto front (metric up, MACs down) among finished trials (all trials with a
    metric when none finished: early-stopped ones trained fewer steps)."""
    pool = [r for r in records if r.status == "finished" and r.metric is not None and r.macs_g is not None]
    if not pool:
        pool = [r for r in records if r.metric is not None and r.macs_g is not None]
    front = pareto_front([(r.trial_id, r.metric, r.macs_g) for r in pool])
    for r in records:
        r.pareto = r.trial_id in front


def _best(records: list[TrialRecord]) -> TrialRecord | None:
    """The finished trial with the highest metric (any trial with a metric if none finished)."""
    pool = [r for r in records if r.status == "finished" and r.metric is not None]
    if not pool:
        pool = [r for r in records if r.metric is not None and r.status not in ("rejected", "error")]
    return max(pool, key=lambda r: r.metric) if pool else None
