"""Driver side of training: Ray Train runs for both C2D stages, the fan-out, resume, MLflow.

    result = run_pipeline(cfg)                    # stage 1, then one stage-2 run per scale
    pre = run_pretrain(cfg)                       # stage 1 alone
    fin = run_finetune(cfg, pre.model_path, [2, 4])   # stage 2 from a stage-1 model file
    one = run_stage(cfg, kind="finetune", scale=2, init_from=...)   # what a Tune trial calls

Every stage is one Ray Train V2 run (`TorchTrainer`) of `srplatform.train.loop`. Its storage is
`<storage>/<name>/<stage>` (`pretrain`, `finetune-x2`, ...; `storage` = `cfg.storage`, default
`file://<data dir>/runs`, or `s3://` through the pyarrow filesystem of `srplatform.storage`).
Besides Ray's own files, the driver keeps three small records there:

    _c2d_identity.json   what the run trains (model, data, stage settings); a re-run with a
                         different config under the same name is refused instead of mixed
    _c2d_tracking.json   the MLflow run id, so a resumed run continues its MLflow run
    _c2d_result.json     written when the stage finished: a re-run returns it at once

Resume: worker failures are retried by Ray Train from the latest checkpoint
(`FailureConfig(max_failures)`); a re-run of the same command with the same name after the
driver died finds Ray Train's run snapshot in the same storage folder, `get_checkpoint()`
returns the latest checkpoint and the step count continues. A pipeline re-run skips finished
stages.

Fan-out: each scale's `trainer.fit()` runs in its own driver thread (Ray Train V2 supports fit
from non-main threads, it is how Tune runs trainers); the runs share the cluster's resources
through Ray's scheduler, so with too few CPUs for all of them some wait for others. A failing
scale is reported with its error; the others finish.

MLflow: the pipeline (or a standalone fine-tuning job) is a parent run; each stage is a child
run (`mlflow.parentRunId`). The driver logs params, the config (YAML), the data manifest
reference, the final weights and (fine-tuned stages) the MLflow model; rank 0 of each run logs
metrics and comparison images while it trains.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from srplatform.config import Config, flatten
from srplatform.errors import UserError

IDENTITY_FILE = "_c2d_identity.json"
TRACKING_FILE = "_c2d_tracking.json"
RESULT_FILE = "_c2d_result.json"
PIPELINE_FILE = "_c2d_pipeline.json"
# At most this many data epochs are chained into one run's dataset (see `plan_epochs`).
MAX_EPOCHS_PER_RUN = 64
# Newest stored checkpoints a (re)started run may resume from, should the newest not load.
RESUME_CANDIDATES = 3
_say_lock = threading.Lock()


def _say(msg: str) -> None:
    with _say_lock:
        print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class StageResult:
    """One finished (or failed) training run.

    checkpoint_uri: the final checkpoint directory (file:// or s3://).
    model_path: the stage's model file (`{"spec", "state_dict"}`, EMA weights when EMA is on):
        a local path for file:// storage, else its s3:// URI.
    metrics: final validation metrics (val_x{s}_psnr / _ssim, with _ema for the EMA weights)
        and the last training loss.
    registered_model: a fine-tuned stage's model version in the MLflow registry,
        "c2disr-<arch>-<variant>-x<scale>:<version>" (`srplatform.registry.ensure_registered`).
    """

    name: str
    kind: str
    scale: int | None = None
    checkpoint_uri: str = ""
    model_path: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    steps: int = 0
    seconds: float = 0.0
    resumed_from: list[int] = field(default_factory=list)
    skipped: bool = False  # True when the stage was already complete and not run again
    error: str | None = None
    registered_model: str = ""  # "NAME:VERSION" of a fine-tuned model in the MLflow registry

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "StageResult":
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass(kw_only=True)
class PipelineResult:
    name: str
    pretrain: StageResult
    finetune: dict[int, StageResult] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.pretrain.ok and bool(self.finetune) and all(r.ok for r in self.finetune.values())

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "pretrain": self.pretrain.to_dict(),
                "finetune": {str(s): r.to_dict() for s, r in self.finetune.items()},
                "mlflow_run_id": self.mlflow_run_id, "seconds": self.seconds, "ok": self.ok}


def summary_table(results: list[StageResult]) -> str:
    """A plain-text table of stage results (what the commands print at the end). Per scale the
    headline PSNR/SSIM is that of the weights that are kept, saved and registered (the EMA when
    it is on; the raw weights' PSNR follows in brackets), then bicubic on the same images, the
    kept weights' gain over bicubic, and the registered model version."""
    rows = [("run", "steps", "val PSNR / SSIM", "bicubic", "gain dB", "time", "status", "registered",
             "model")]
    for r in results:
        s = r.scale
        keys = [f"val_x{s}"] if s else sorted({k.rsplit("_", 1)[0] for k in r.metrics
                                               if k.startswith("val_x") and k.endswith("_psnr")})
        vals, bics, gains = [], [], []
        for k in keys:
            tag = k.replace("val_", "")
            raw = r.metrics.get(f"{k}_psnr")
            if raw is None:
                continue
            ema = r.metrics.get(f"{k}_psnr_ema")
            p = raw if ema is None else ema
            q = r.metrics.get(f"{k}_ssim" if ema is None else f"{k}_ssim_ema", float("nan"))
            vals.append(f"{tag} {p:.2f}/{q:.4f}" + (f" (raw {raw:.2f})" if ema is not None else ""))
            b = r.metrics.get(f"{k}_psnr_bicubic")
            bics.append(f"{tag} {b:.2f}" if b is not None else "-")
            gains.append(f"{tag} {p - b:+.2f}" if b is not None else "-")
        status = "ok" if r.ok else f"FAILED: {r.error}"
        if r.ok and r.skipped:
            status = "ok (already done)"
        if r.ok and r.resumed_from:
            status += f" (resumed at {', '.join(map(str, r.resumed_from))})"
        registered = r.registered_model.replace(":", " v", 1) if r.registered_model else "-"
        rows.append((r.name, str(r.steps), "; ".join(vals) or "-", "; ".join(bics) or "-",
                     "; ".join(gains) or "-", f"{r.seconds:.0f}s", status, registered,
                     r.model_path or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for row in rows:
        cells = [c.ljust(w) for c, w in zip(row[:-1], widths)] + [row[-1]]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Locations
# --------------------------------------------------------------------------------------


def storage_root(cfg: Config) -> str:
    """Where runs live: `cfg.storage`, default `file://<data dir>/runs`."""
    from srplatform import storage
    from srplatform.stack import data_dir

    return str(storage.parse_uri(cfg.storage or (data_dir() / "runs").as_uri()))


def stage_key(kind: str, scale: int | None) -> str:
    return "pretrain" if kind == "pretrain" else f"finetune-x{int(scale)}"


def stage_label(cfg: Config, kind: str, scale: int | None) -> str:
    return f"{cfg.name}/" + ("pretrain" if kind == "pretrain" else f"x{int(scale)}")


def shared_candidates(name: str) -> list[Path]:
    """Where a bare dataset name (T91, Set5) is looked for: `$C2D_SHARED/data`, the `shared`
    folder beside the repository, and beside the working directory."""
    import srplatform

    roots = []
    if os.environ.get("C2D_SHARED"):
        roots.append(Path(os.environ["C2D_SHARED"]).expanduser() / "data")
    roots.append(Path(srplatform.__file__).resolve().parents[2] / "shared" / "data")
    roots.append(Path.cwd().resolve().parent / "shared" / "data")
    return [r / name for r in dict.fromkeys(roots)]  # each place once (cwd may be the repo)


def resolve_images(value: str, key: str) -> str:
    """A folder/glob/URI of images as given, or a bare name resolved under the shared data."""
    if "://" in value or any(c in value for c in "*?["):
        return value
    if Path(value).expanduser().exists():  # absolute: Ray workers may run in another directory
        return str(Path(value).expanduser().resolve())
    if "/" not in value:
        for cand in shared_candidates(value):
            if cand.is_dir():
                return str(cand)
    tried = ", ".join(str(c) for c in shared_candidates(value)) if "/" not in value else value
    raise UserError(f"{key}={value!r}: no such folder (looked at {tried}); give a folder, a glob, "
                    "an s3:// prefix, or set C2D_SHARED to the folder holding data/")


def check_local_inputs(cfg: Config) -> None:
    """Fail in a second, before Ray or the stack start, when `data.val` or (with no `data.train`)
    `data.source` names a local folder or shared set that is not there. URIs and globs are left
    to the data plane (they may only resolve on the cluster)."""
    if cfg.data.val:
        resolve_images(cfg.data.val, "data.val")
    if cfg.data.source and not cfg.data.train:
        resolve_images(cfg.data.source, "data.source")


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class DataRef:
    """The training shards a run reads, and the manifest that describes them."""

    uri: str
    manifest_uri: str
    manifest_sha256: str
    samples: int
    shards: int


def source_name(source: str) -> str:
    """The folder name of an image source ("T91", "s3://b/imgs/*.png" -> "imgs")."""
    parts = [p for p in source.split("://", 1)[-1].split("/") if p and not any(c in p for c in "*?[")]
    return parts[-1] if parts else "data"


def prepare_data(cfg: Config, *, say: Callable[[str], None] = _say) -> DataRef:
    """The shard URI of `cfg.data` (default `file://<data dir>/shards/<source name>`), packed
    from `cfg.data.source` first when its manifest is missing."""
    from srplatform import storage
    from srplatform.data.pack import MANIFEST, pack, read_manifest
    from srplatform.stack import data_dir

    d = cfg.data
    uri = d.train
    if not uri:
        if not d.source:
            raise UserError("data.train and data.source are both empty: set data.train to packed "
                            "shards (file:// or s3://) or data.source to a folder of HR images")
        uri = (data_dir() / "shards" / source_name(d.source)).as_uri()
    manifest = read_manifest(uri)
    if manifest is None:
        if not d.source:
            raise UserError(f"data.train={uri}: no {MANIFEST} there (not a complete pack). Pack "
                            "images with `c2d data pack SRC DEST`, or set data.source to pack "
                            "them automatically")
        src = resolve_images(d.source, "data.source")
        need = max(round(d.patch * d.scale_max), d.patch * max(cfg.finetune.scales))
        say(f"packing {src} into {uri} (min side {need}) ...")
        manifest = pack(src, uri, shard_size_mb=float(d.shard_size_mb), min_size=need,
                        progress=False)
    m_uri = storage.join(uri, MANIFEST)
    sha = hashlib.sha256(storage.read_bytes(m_uri)).hexdigest()
    return DataRef(uri=str(storage.parse_uri(uri)), manifest_uri=m_uri, manifest_sha256=sha,
                   samples=int(manifest.get("samples", 0)), shards=len(manifest.get("shards", [])))


def plan_epochs(*, samples: int, batch_size: int, workers: int, steps_left: int) -> tuple[int, int]:
    """(epochs, crops): how many data epochs to chain into a run's dataset, and how many
    independent crops of each image every epoch gives, so the run lasts `steps_left` steps on
    fresh pairs.

    Each worker gets an equal share of every epoch and drops its last partial batch, so an
    epoch of one crop per image gives floor(floor(samples / workers) / batch_size) steps. One
    epoch of margin covers samples skipped at run time. At most MAX_EPOCHS_PER_RUN epochs are
    chained (a bounded Ray Data graph); a longer run takes more crops per image per epoch
    instead (e.g. DIV2K, 800 images, 4 workers x 16: 12 steps an epoch, so 500k steps take
    651 crops per image over 64 epochs)."""
    per_epoch = (samples // max(1, workers)) // max(1, batch_size)
    if per_epoch < 1:
        raise UserError(
            f"the training data has {samples} images: too few for data.batch_size={batch_size} "
            f"on resources.num_workers={workers} (each worker needs a full batch per epoch)")
    needed = math.ceil(steps_left / per_epoch) + 1
    if needed <= MAX_EPOCHS_PER_RUN:
        return max(1, needed), 1
    crops = math.ceil(steps_left / (per_epoch * (MAX_EPOCHS_PER_RUN - 1)))
    return min(MAX_EPOCHS_PER_RUN, math.ceil(steps_left / (per_epoch * crops)) + 1), crops


# --------------------------------------------------------------------------------------
# Small records in run storage
# --------------------------------------------------------------------------------------


def _read_json(uri: str) -> dict[str, Any] | None:
    from srplatform import storage

    if not storage.exists(uri):
        return None
    try:
        return json.loads(storage.read_bytes(uri))
    except json.JSONDecodeError:
        return None


def _write_json(uri: str, data: dict[str, Any]) -> None:
    from srplatform import storage

    storage.write_bytes(uri, json.dumps(data, indent=2, sort_keys=True).encode())


def stage_identity(cfg: Config, kind: str, scale: int | None) -> dict[str, Any]:
    """The settings that define what a stage trains; a resumed run must match them."""
    section = cfg.pretrain if kind == "pretrain" else cfg.finetune
    sec = {k: v for k, v in asdict(section).items() if k != "scales"}
    data = {k: getattr(cfg.data, k) for k in ("train", "source", "patch", "batch_size")}
    if kind == "pretrain":
        data.update(scale_min=cfg.data.scale_min, scale_max=cfg.data.scale_max)
    return {"kind": kind, "scale": scale, "seed": cfg.seed, "model": asdict(cfg.model),
            "data": data, "section": sec}


def _check_identity(stage_uri: str, identity: dict[str, Any], label: str,
                    say: Callable[[str], None] | None = None) -> None:
    """Record what the run at `stage_uri` trains, or check that a re-run trains the same thing.
    A run that left no checkpoint and no result (it failed before its first checkpoint) has
    nothing to resume: new settings replace its record instead of locking the name."""
    from srplatform import storage

    uri = storage.join(stage_uri, IDENTITY_FILE)
    old = _read_json(uri)
    if old is None:
        _write_json(uri, identity)
        return
    a, b = flatten(old), flatten(identity)
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if diff and not stored_checkpoints(stage_uri, limit=1) \
            and not storage.exists(storage.join(stage_uri, RESULT_FILE)):
        if say:
            say(f"settings changed since an earlier attempt that saved nothing "
                f"({', '.join(diff[:4])}{', ...' if len(diff) > 4 else ''}); starting afresh")
        _write_json(uri, identity)
        return
    if diff:
        shown = "; ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:6])
        raise UserError(
            f"run {label} already exists at {stage_uri} with different settings ({shown}). "
            "Re-running the same name resumes it, so the settings must match: use another "
            f"--name, or delete {stage_uri} to start over")


def stored_checkpoints(stage_uri: str, limit: int | None = None) -> list[tuple[str, dict[str, Any]]]:
    """The checkpoints of a run folder that have their `meta.json`, newest first, as
    (directory URI, meta); at most `limit` of them (only those are read)."""
    from srplatform import storage
    from srplatform.train.loop import CHECKPOINT_PREFIX, META_FILE

    if not storage.exists(stage_uri):
        return []
    base = str(storage.parse_uri(stage_uri)).rstrip("/") + "/"
    metas = []
    for e in storage.list_files(stage_uri, allow_empty=True):
        rel = e.uri[len(base):].split("/") if e.uri.startswith(base) else []
        if len(rel) == 2 and rel[0].startswith(CHECKPOINT_PREFIX) and rel[1] == META_FILE:
            metas.append(e.uri)
    out = []
    for uri in sorted(metas, reverse=True):  # zero-padded step numbers sort as numbers
        if limit is not None and len(out) >= limit:
            break
        meta = _read_json(uri)
        if meta and "step" in meta:
            out.append((uri.rsplit("/", 1)[0], meta))
    return out


def latest_checkpoint(stage_uri: str) -> tuple[str, dict[str, Any]] | None:
    """The newest complete checkpoint of a run folder (`checkpoint_<step>/meta.json`)."""
    found = stored_checkpoints(stage_uri, limit=1)
    return found[0] if found else None


def _display_path(uri: str) -> str:
    from srplatform import storage

    local = storage.local_path(uri)
    return str(local) if local is not None else uri


# --------------------------------------------------------------------------------------
# Ray
# --------------------------------------------------------------------------------------


# Console lines of a local Ray that say nothing a user of this platform can act on:
# - the raylet's "N PYTHON worker processes have been started ... Kx the maximum expected startup
#   concurrency": expected here, since Ray Data tasks take fractional CPUs and RAY_SYSTEM_CONFIG
#   keeps idle workers alive (see srplatform.data.pipeline); it repeats as the pool grows.
_RAY_NOISE = ("PYTHON worker processes have been started on node",)
# - "Token authentication is enabled for this Ray cluster ...", logged by this module at every
#   start of a local Ray.
_RAY_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


def _quiet_ray_console() -> None:
    """Keep Ray's known noise out of normal output (C2D_RAY_LOGS=1 shows everything).

    Ray relays raylet warnings to the driver's stdout itself, whatever `log_to_driver` says
    (`ray._private.worker.print_to_stdstream`); this drops the lines in `_RAY_NOISE` there and
    passes every other one (a task killed for memory, say) unchanged. A Ray without that hook
    is left alone."""
    try:
        from ray._private import worker as ray_worker
    except ImportError:  # pragma: no cover - a Ray that moved its internals
        return
    original = getattr(ray_worker, "print_to_stdstream", None)
    if original is None or getattr(original, "_c2d_quiet", False):
        return

    def print_to_stdstream(data, *args, **kwargs):
        if data.get("pid") == "raylet":
            lines = [ln for ln in data.get("lines", []) if not any(n in str(ln) for n in _RAY_NOISE)]
            if not lines:
                return None
            data = dict(data, lines=lines)
        return original(data, *args, **kwargs)

    print_to_stdstream._c2d_quiet = True
    ray_worker.print_to_stdstream = print_to_stdstream


@contextlib.contextmanager
def ray_session() -> Iterator[None]:
    """Use the connected Ray, else join `$RAY_ADDRESS`, else start a local Ray with this
    machine's CPUs; what this function started or joined it also stops/leaves at the end."""
    import ray

    from srplatform.tracking import configure_http

    configure_http()  # before ray.init, so local workers inherit the short MLflow timeouts
    if ray.is_initialized():
        yield
        return
    from ray.train.v2._internal.constants import is_v2_enabled

    if not is_v2_enabled():
        raise UserError("this platform uses the Ray Train V2 API: unset RAY_TRAIN_V2_ENABLED "
                        "(or set it to 1)")
    address = os.environ.get("RAY_ADDRESS")
    # Worker output (Ray Data/Train internals, deprecation notices) is not forwarded unless
    # C2D_RAY_LOGS=1: our progress lines come through a queue, worker errors come back as
    # exceptions, and everything stays in Ray's session logs.
    forward = os.environ.get("C2D_RAY_LOGS", "") not in ("", "0", "false")
    kwargs: dict[str, Any] = {"logging_level": "WARNING", "log_to_driver": forward}
    if not forward:
        _quiet_ray_console()
    if address:
        ray.init(address=address, **kwargs)
    else:
        from srplatform.data.pipeline import RAY_SYSTEM_CONFIG

        # A new local Ray turns token authentication on and logs a WARNING saying so at every
        # start (while RAY_AUTH_MODE is unset). Auth stays as Ray sets it; only the notice goes.
        logging.getLogger(_RAY_AUTH_LOGGER).setLevel(logging.ERROR)

        # address="local": a Ray of our own even when another one runs on this machine. The
        # system config keeps idle Ray Data task workers alive (see the pipeline module).
        for attempt in (1, 2):
            try:
                ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False,
                         _system_config=RAY_SYSTEM_CONFIG, **kwargs)
                break
            except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception here
                # On an overloaded machine the raylet can miss Ray's 30 s start-up window;
                # a second start usually makes it.
                if attempt == 2 or "timed out during startup" not in str(exc):
                    raise
                _say("warning: the local Ray did not start in time; trying once more")
                ray.shutdown()
    try:
        yield
    finally:
        ray.shutdown()


@contextlib.contextmanager
def _printer(printer, on_event) -> Iterator[Any]:
    from srplatform.train.progress import ProgressPrinter

    if printer is not None:
        yield printer
        return
    with ProgressPrinter(on_event=on_event) as pr:
        yield pr


def _run_storage(root: str, name: str) -> tuple[str, Any]:
    """RunConfig's (storage_path, storage_filesystem) for runs under `<root>/<name>`."""
    from srplatform import storage

    u = storage.parse_uri(storage.join(root, name))
    if u.scheme == "file":
        Path(u.key).mkdir(parents=True, exist_ok=True)
        return u.key, None
    fs, path = storage.filesystem(u)
    return path, fs


def _checkpoint_uri(root: str, checkpoint) -> str:
    from srplatform import storage

    if storage.parse_uri(root).scheme == "s3":
        return "s3://" + checkpoint.path.lstrip("/")
    return "file://" + checkpoint.path


# --------------------------------------------------------------------------------------
# MLflow on the driver
# --------------------------------------------------------------------------------------


def make_tracker(cfg: Config, *, say: Callable[[str], None] = _say):
    """A guarded MLflow client for the config's tracking URI (see `srplatform.tracking`).
    A URI that cannot be resolved (the local stack fails to start) leaves tracking off."""
    from srplatform.tracking import Tracker, resolve_tracking_uri

    try:
        uri = resolve_tracking_uri(cfg.tracking.uri)
    except Exception as exc:  # noqa: BLE001 - training does not depend on tracking
        say(f"warning: no MLflow tracking ({exc}); training continues without it")
        return Tracker(None, say=say)
    return Tracker(uri, say=say)


def _config_yaml(cfg: Config) -> str:
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def _open_run(tracker, *, record_uri: str, experiment: str, run_name: str,
              parent_run_id: str | None, tags: dict[str, Any]) -> tuple[str | None, bool]:
    """The MLflow run recorded at `record_uri` (reopened) or a new one; (run id, resumed)."""
    old = _read_json(record_uri) or {}
    run_id = old.get("run_id")
    if run_id and old.get("tracking_uri") == tracker.uri and tracker.run_status(run_id):
        tracker.reopen(run_id)
        return run_id, True
    run_id = tracker.create_run(experiment, run_name, tags=tags, parent_run_id=parent_run_id)
    if run_id:
        _write_json(record_uri, {"run_id": run_id, "tracking_uri": tracker.uri})
    return run_id, False


def _log_run_setup(tracker, run_id: str | None, cfg: Config, data: DataRef | None,
                   extra_params: dict[str, Any]) -> None:
    if not run_id:
        return
    params = flatten(cfg)
    params.update(extra_params)
    if data is not None:
        params.update({"data.manifest_uri": data.manifest_uri,
                       "data.manifest_sha256": data.manifest_sha256,
                       "data.samples": data.samples})
    tracker.log_params(run_id, params)
    tracker.log_text(run_id, _config_yaml(cfg), "config.yaml")
    if data is not None:
        tracker.log_dict(run_id, asdict(data), "data_manifest.json")


def _local_copy(uri: str, tmp: str, name: str) -> Path:
    from srplatform import storage

    local = storage.local_path(uri)
    if local is not None:
        return local
    path = Path(tmp) / name
    path.write_bytes(storage.read_bytes(uri))
    return path


def _log_final(tracker, run_id: str | None, result: StageResult, cfg: Config, data: DataRef,
               parent_run_id: str | None = None, register: bool = True) -> None:
    """Weights as artifacts; a fine-tuned model also as an MLflow model, registered as a new
    version (alias `candidate`) of `c2disr-<arch>-<variant>-x<scale>`."""
    if not run_id or not tracker.available:
        return
    from srplatform import storage
    from srplatform.train.loop import EMA_FILE, MODEL_FILE

    with tempfile.TemporaryDirectory(prefix="c2d-final-") as tmp:
        files = {}
        for fname in (MODEL_FILE, EMA_FILE):
            uri = storage.join(result.checkpoint_uri, fname)
            if storage.exists(uri):
                files[fname] = _local_copy(uri, tmp, fname)
                tracker.log_artifact(run_id, files[fname], "weights")
        tracker.set_tags(run_id, {"c2d.checkpoint_uri": result.checkpoint_uri,
                                  "c2d.model_path": result.model_path,
                                  "c2d.steps": result.steps})
        if result.kind != "finetune":
            return
        chosen = files.get(EMA_FILE) or files.get(MODEL_FILE)
        if chosen is None:
            return

        def log_model():
            import numpy as np

            from c2disr.evaluate import load_model
            from srplatform.mlmodel import log_sr_model

            model = load_model(chosen)
            example = np.random.default_rng(0).random((1, 3, 16, 16), dtype=np.float32)
            meta = {"c2disr_scale": result.scale, "c2disr_run": result.name,
                    "c2disr_config_digest": cfg.digest(),
                    "c2disr_data_manifest": data.manifest_uri,
                    "c2disr_data_manifest_sha256": data.manifest_sha256,
                    "c2disr_weights": "ema" if chosen.name == EMA_FILE else "raw",
                    **{f"c2disr_{k}": v for k, v in result.metrics.items()}}
            return log_sr_model(model, name="model", input_example=example, metadata=meta)

        if tracker.in_run(run_id, "log model", log_model) is None or not register:
            return

        def register():
            from srplatform.registry import ensure_registered

            mv = ensure_registered(
                run_id, arch=cfg.model.arch, variant=cfg.model.variant, scale=int(result.scale),
                metrics=result.metrics, config_hash=cfg.digest(),
                manifest_hash=data.manifest_sha256 or "", parent_run_id=parent_run_id,
                tracking_uri=tracker.uri)
            return f"{mv.name}:{mv.version}"

        result.registered_model = tracker.in_run(run_id, "register model", register) or ""


# --------------------------------------------------------------------------------------
# One stage
# --------------------------------------------------------------------------------------


def run_stage(cfg: Config, *, kind: str, scale: int | None = None, init_from: str | None = None,
              data: DataRef | None = None, tracker=None, parent_run_id: str | None = None,
              printer=None, on_event: Callable[[dict], None] | None = None,
              extra_tags: dict[str, Any] | None = None, callbacks: list | None = None,
              register: bool = True) -> StageResult:
    """Run one training stage to completion (or resume it) and return its result.

    kind: "pretrain" (continuous head) or "finetune" (discrete at `scale`, from the model file
    `init_from`: a path, file:// or s3:// URI). `data`, `tracker`, `printer`: shared by the
    pipeline; made here when None. `on_event`: called on the driver with every progress event
    of this run (dicts with "kind": start/train/val/checkpoint/end, "step", metrics), e.g. for a
    Ray Tune trial. `callbacks`: Ray Train `UserCallback`s for the run's RunConfig (they see
    every `ray.train.report`: each validation and each checkpoint step). `register`: register a
    fine-tuned model in the MLflow registry (default). Raises on failure (the MLflow run is
    marked FAILED).
    """
    if kind not in ("pretrain", "finetune"):
        raise ValueError(f"unknown stage kind {kind!r}")
    if kind == "finetune" and (scale is None or not init_from):
        raise UserError("a fine-tuning stage needs a scale and the stage-1 model (--from)")
    with ray_session(), _printer(printer, on_event) as pr:
        tracker = tracker or make_tracker(cfg)
        return _run_stage(cfg, kind=kind, scale=scale, init_from=init_from, data=data,
                          tracker=tracker, parent_run_id=parent_run_id, printer=pr,
                          extra_tags=extra_tags or {}, callbacks=callbacks, register=register)


def _run_stage(cfg: Config, *, kind: str, scale: int | None, init_from: str | None,
               data: DataRef | None, tracker, parent_run_id: str | None, printer,
               extra_tags: dict[str, Any], callbacks: list | None = None,
               register: bool = True) -> StageResult:
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from srplatform import storage
    from srplatform.data.pipeline import ray_train_datasets
    from srplatform.train.loop import EMA_FILE, META_FILE, MODEL_FILE, StageSpec, loop_config, \
        train_loop_per_worker

    t_start = time.time()
    root = storage_root(cfg)
    key = stage_key(kind, scale)
    label = stage_label(cfg, kind, scale)
    stage_uri = storage.join(root, cfg.name, key)
    identity = stage_identity(cfg, kind, scale)
    _check_identity(stage_uri, identity, label, say=lambda m: printer.say(label, m))

    done = _read_json(storage.join(stage_uri, RESULT_FILE))
    if done:
        res = StageResult.from_dict(done)
        res.skipped = True
        printer.say(label, f"already complete ({res.steps} steps): {_display_path(res.checkpoint_uri)}")
        return res

    data = data or prepare_data(cfg, say=lambda m: printer.say(label, m))
    section = cfg.pretrain if kind == "pretrain" else cfg.finetune
    stored = stored_checkpoints(stage_uri, limit=RESUME_CANDIDATES)
    latest = stored[0] if stored else None
    start_step = int(latest[1].get("step", 0)) if latest else 0
    start_epoch = int(latest[1].get("epoch", -1)) + 1 if latest else 0

    # Stage 2 reads its initial weights from the run's own storage, so every worker (on any
    # node) can reach them and a resumed run keeps the weights it started from.
    init_uri = ""
    if kind == "finetune":
        init_uri = storage.join(stage_uri, "init", MODEL_FILE)
        if not storage.exists(init_uri):
            src_local = storage.local_path(init_from)
            if src_local is not None and not Path(src_local).is_file():
                raise UserError(f"--from {init_from}: no such model file")
            payload = src_local.read_bytes() if src_local is not None else storage.read_bytes(init_from)
            storage.write_bytes(init_uri, payload)

    # MLflow run: continued when this stage ran before under the same tracking server.
    tags = {"c2d.stage": kind, "c2d.name": cfg.name, "c2d.storage": stage_uri,
            "c2d.arch": cfg.model.arch, "c2d.variant": cfg.model.variant, **extra_tags}
    if scale is not None:
        tags["c2d.scale"] = scale
    run_id, reopened = _open_run(tracker, record_uri=storage.join(stage_uri, TRACKING_FILE),
                                 experiment=cfg.tracking.experiment, run_name=label,
                                 parent_run_id=parent_run_id, tags=tags)
    if not reopened:
        _log_run_setup(tracker, run_id, cfg, data,
                       {"stage.kind": kind, "stage.scale": scale or "", "stage.init_from": init_from or ""})

    val_folder = ""
    if cfg.data.val:
        val_folder = resolve_images(cfg.data.val, "data.val")
    val_scales = [int(scale)] if kind == "finetune" else [2, 3, 4]
    spec = StageSpec(kind=kind, run_name=label, scale=scale, init_uri=init_uri,
                     val_folder=val_folder, val_scales=val_scales,
                     mlflow_uri=tracker.uri if run_id else "", mlflow_run_id=run_id or "",
                     resume_from=[[u, int(m["step"])] for u, m in stored])

    # Progress comes from our own lines; Ray Data's bars and plan dumps would drown them.
    data_ctx = ray.data.DataContext.get_current()
    data_ctx.enable_progress_bars = False
    data_ctx.print_on_execution_start = False
    workers = cfg.resources.num_workers
    epochs, crops = plan_epochs(samples=data.samples, batch_size=cfg.data.batch_size, workers=workers,
                                steps_left=max(0, section.steps - start_step))
    datasets, data_config = ray_train_datasets(
        data.uri, workers=workers, deterministic=cfg.data.deterministic,
        patch=cfg.data.patch, batch_size=cfg.data.batch_size,
        scale_min=cfg.data.scale_min, scale_max=cfg.data.scale_max,
        fixed_scale=int(scale) if kind == "finetune" else None,
        seed=cfg.seed + (0 if kind == "pretrain" else 1000 * int(scale)),
        epoch=start_epoch, epochs=epochs, crops=crops, num_cpus=cfg.data.num_cpus_per_task)

    storage_path, filesystem = _run_storage(root, cfg.name)
    res_per_worker = {"CPU": cfg.resources.cpus_per_worker}
    if cfg.resources.gpus_per_worker > 0:
        res_per_worker["GPU"] = cfg.resources.gpus_per_worker
    from srplatform.tracking import configure_http

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config(cfg.to_dict(), spec, printer.queue),
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, use_gpu=cfg.resources.gpus_per_worker > 0,
            resources_per_worker=res_per_worker),
        run_config=ray.train.RunConfig(
            name=key, storage_path=storage_path, storage_filesystem=filesystem,
            failure_config=ray.train.FailureConfig(max_failures=cfg.resources.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            callbacks=list(callbacks or []),
            worker_runtime_env={"env_vars": configure_http(dict(os.environ))},
            logging_config=ray.train.LoggingConfig(log_level="WARNING")),
        datasets=datasets,
        dataset_config=data_config,
    )
    if start_step:
        printer.say(label, f"found checkpoint at step {start_step} in {_display_path(latest[0])}")
    try:
        result = trainer.fit()
    except BaseException:
        tracker.end_run(run_id, "FAILED" if not isinstance(sys.exc_info()[1], KeyboardInterrupt) else "KILLED")
        raise
    if result.checkpoint is None:
        tracker.end_run(run_id, "FAILED")
        raise RuntimeError(f"{label}: training ended without a checkpoint")
    ckpt_uri = _checkpoint_uri(root, result.checkpoint)
    meta = _read_json(storage.join(ckpt_uri, META_FILE)) or {}
    model_uri = storage.join(ckpt_uri, EMA_FILE if meta.get("ema") else MODEL_FILE)
    metrics = {k: float(v) for k, v in (result.metrics or {}).items()
               if k.startswith("val_") and isinstance(v, (int, float))}
    last_train = printer.latest(label, "train")
    if last_train:
        metrics["loss"] = float(last_train["loss"])
    out = StageResult(name=label, kind=kind, scale=scale, checkpoint_uri=ckpt_uri,
                      model_path=_display_path(model_uri), metrics=metrics,
                      mlflow_run_id=run_id, steps=int(meta.get("step", section.steps)),
                      seconds=time.time() - t_start,
                      resumed_from=list(printer.resumes.get(label, [])))
    _log_final(tracker, run_id, out, cfg, data, parent_run_id, register)
    tracker.end_run(run_id, "FINISHED")
    _write_json(storage.join(stage_uri, RESULT_FILE), out.to_dict())
    return out


# --------------------------------------------------------------------------------------
# Stages and the pipeline
# --------------------------------------------------------------------------------------


def run_pretrain(cfg: Config, *, on_event: Callable[[dict], None] | None = None) -> StageResult:
    """Stage 1 alone: continuous-scale pretraining (its own MLflow run, no parent)."""
    check_local_inputs(cfg)
    return run_stage(cfg, kind="pretrain", on_event=on_event)


def run_finetune(cfg: Config, init_from: str, scales: list[int] | None = None, *,
                 data: DataRef | None = None, tracker=None, parent_run_id: str | None = None,
                 printer=None, on_event: Callable[[dict], None] | None = None
                 ) -> dict[int, StageResult]:
    """Stage 2: one discrete fine-tuning run per scale from the stage-1 weights `init_from`
    (anything `resolve_init` takes), all launched at once. Waits for all; a failed scale
    carries its error in `.error`.

    Without `parent_run_id` a parent MLflow run for this fine-tuning job is created."""
    scales = [int(s) for s in (scales or cfg.finetune.scales)]
    if not scales or any(s not in (2, 3, 4) for s in scales) or len(set(scales)) != len(scales):
        raise UserError(f"scales must be distinct values from 2, 3, 4; got {scales}")
    check_local_inputs(cfg)
    init_from = resolve_init(init_from, cfg)  # runs:/, run ids, checkpoint folders -> a model file
    with ray_session(), _printer(printer, on_event) as pr:
        tracker = tracker or make_tracker(cfg)
        data = data or prepare_data(cfg, say=lambda m: pr.say(cfg.name, m))
        own_parent = None
        if parent_run_id is None:
            from srplatform import storage

            own_parent, _ = _open_run(
                tracker, record_uri=storage.join(storage_root(cfg), cfg.name, "_c2d_finetune.json"),
                experiment=cfg.tracking.experiment, run_name=f"{cfg.name}/finetune",
                parent_run_id=None, tags={"c2d.kind": "finetune", "c2d.name": cfg.name})
            _log_run_setup(tracker, own_parent, cfg, data, {"stage.init_from": init_from})
            parent_run_id = own_parent
        results = _fan_out(cfg, scales, init_from, data=data, tracker=tracker,
                           parent_run_id=parent_run_id, printer=pr)
        if own_parent:
            _log_parent_summary(tracker, own_parent, results)
            tracker.end_run(own_parent, "FINISHED" if all(r.ok for r in results.values()) else "FAILED")
        return results


def _fan_out(cfg: Config, scales: list[int], init_from: str, *, data: DataRef, tracker,
             parent_run_id: str | None, printer) -> dict[int, StageResult]:
    def one(s: int) -> StageResult:
        try:
            return _run_stage(cfg, kind="finetune", scale=s, init_from=init_from, data=data,
                              tracker=tracker, parent_run_id=parent_run_id, printer=printer,
                              extra_tags={})
        except Exception as exc:  # noqa: BLE001 - one scale's failure must not stop the others
            msg = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            printer.say(stage_label(cfg, "finetune", s), f"FAILED: {msg}")
            return StageResult(name=stage_label(cfg, "finetune", s), kind="finetune", scale=s,
                               error=msg)

    pool = ThreadPoolExecutor(max_workers=len(scales), thread_name_prefix="c2d-finetune")
    try:
        futures = {s: pool.submit(one, s) for s in scales}
        return {s: f.result() for s, f in futures.items()}
    finally:
        # On Ctrl-C do not wait here for the runs: leaving `ray_session` stops (or leaves) Ray,
        # which ends them; their checkpoints let the same command resume.
        pool.shutdown(wait=False, cancel_futures=True)


def _log_parent_summary(tracker, run_id: str | None, results: dict[int, StageResult]) -> None:
    metrics = {}
    for s, r in results.items():
        for k in (f"val_x{s}_psnr", f"val_x{s}_ssim", f"val_x{s}_psnr_ema", f"val_x{s}_ssim_ema",
                  f"val_x{s}_psnr_bicubic", f"val_x{s}_gain_db", f"val_x{s}_gain_db_ema"):
            if k in r.metrics:
                metrics[k] = r.metrics[k]
    tracker.log_metrics(run_id, metrics, step=0)


def run_pipeline(cfg: Config, *, on_event: Callable[[dict], None] | None = None) -> PipelineResult:
    """Both stages in one job: stage 1, then the stage-2 fan-out from its model file, under one
    parent MLflow run. A re-run with the same name skips finished stages and resumes the rest."""
    from srplatform import storage

    t0 = time.time()
    check_local_inputs(cfg)
    with ray_session(), _printer(None, on_event) as pr:
        tracker = make_tracker(cfg, say=lambda m: pr.say(cfg.name, m))
        data = prepare_data(cfg, say=lambda m: pr.say(cfg.name, m))
        parent, reopened = _open_run(
            tracker, record_uri=storage.join(storage_root(cfg), cfg.name, PIPELINE_FILE),
            experiment=cfg.tracking.experiment, run_name=cfg.name, parent_run_id=None,
            tags={"c2d.kind": "pipeline", "c2d.name": cfg.name})
        if not reopened:
            _log_run_setup(tracker, parent, cfg, data, {})
        try:
            pre = _run_stage(cfg, kind="pretrain", scale=None, init_from=None, data=data,
                             tracker=tracker, parent_run_id=parent, printer=pr, extra_tags={})
        except Exception:
            tracker.end_run(parent, "FAILED")
            raise
        fin = _fan_out(cfg, list(cfg.finetune.scales), pre.model_path, data=data, tracker=tracker,
                       parent_run_id=parent, printer=pr)
        _log_parent_summary(tracker, parent, fin)
        result = PipelineResult(name=cfg.name, pretrain=pre, finetune=fin, mlflow_run_id=parent,
                                seconds=time.time() - t0)
        tracker.set_tags(parent, {"c2d.ok": result.ok})
        tracker.end_run(parent, "FINISHED" if result.ok else "FAILED")
        if tracker.summary():
            pr.say(cfg.name, tracker.summary())
        return result


# --------------------------------------------------------------------------------------
# --from
# --------------------------------------------------------------------------------------


def resolve_init(source: str, cfg: Config) -> str:
    """The stage-1 model file behind `c2d finetune --from`:

    - a model file (path, file:// or s3:// URI);
    - a checkpoint directory (its model_ema.pt, else model.pt) or a run folder (its newest
      checkpoint);
    - `runs:/RUN_ID` or a bare MLflow run id: the run's recorded checkpoint (tag
      `c2d.checkpoint_uri`), else its `weights/` artifact;
    - `runs:/RUN_ID/PATH` or `models:/...`: that MLflow artifact / model.
    Remote MLflow artifacts are downloaded under the data directory.
    """
    import re

    from srplatform import storage
    from srplatform.train.loop import EMA_FILE, MODEL_FILE

    src = source.strip()
    if re.fullmatch(r"[0-9a-f]{32}", src):
        src = f"runs:/{src}"
    if src.startswith(("runs:/", "models:/")):
        return _resolve_mlflow_init(src, cfg)
    u = storage.parse_uri(src)
    if storage.is_file(u):
        return str(u)
    for fname in (EMA_FILE, MODEL_FILE):
        if storage.exists(u.join(fname)):
            return str(u.join(fname))
    latest = latest_checkpoint(str(u))
    if latest:
        for fname in (EMA_FILE, MODEL_FILE):
            cand = storage.join(latest[0], fname)
            if storage.exists(cand):
                return cand
    raise UserError(f"--from {source}: not a model file, checkpoint directory or run folder "
                    "(expected model.pt / model_ema.pt or checkpoint_*/ inside)")


def _resolve_mlflow_init(src: str, cfg: Config) -> str:
    from srplatform import storage
    from srplatform.stack import data_dir
    from srplatform.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(cfg.tracking.uri)
    dst = data_dir() / "downloads" / hashlib.sha256(src.encode()).hexdigest()[:16]
    dst.mkdir(parents=True, exist_ok=True)
    rest = src[len("runs:/"):] if src.startswith("runs:/") else ""
    if src.startswith("runs:/") and "/" not in rest.strip("/"):
        run_id = rest.strip("/")
        from mlflow import MlflowClient

        try:
            run = MlflowClient(tracking_uri=uri).get_run(run_id)
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"--from {src}: cannot read MLflow run {run_id} at {uri} ({exc})") from None
        ckpt = run.data.tags.get("c2d.checkpoint_uri")
        if ckpt:
            return resolve_init(ckpt, cfg)
        src = f"runs:/{run_id}/weights"
    import mlflow.artifacts

    from srplatform.tracking import mlflow_server

    try:
        with mlflow_server(uri):  # models:/ URIs are resolved from MLflow's globals
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=src, dst_path=str(dst),
                                                             tracking_uri=uri, registry_uri=uri))
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"--from {src}: cannot download it from {uri} ({exc})") from None
    if local.is_dir() and (local / "MLmodel").is_file():
        from srplatform.mlmodel import resolve_model_file

        return str(resolve_model_file(str(local), str(dst)))
    return resolve_init(str(local), cfg)
