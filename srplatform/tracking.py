"""MLflow helpers that never crash or hang training.

    tr = Tracker(resolve_tracking_uri(cfg.tracking.uri))
    run_id = tr.create_run("c2disr", "tiny/pretrain", parent_run_id=parent)   # None if down
    tr.log_metrics(run_id, {"loss": 0.03}, step=10)                          # no-op if down

Every call goes through one guard. When a call fails and the server's health endpoint does not
answer either, one warning is printed (naming the server and the error, never credentials) and
the tracker stops talking to the server for `cooldown` seconds; after that one call probes
again, and a recovered server is used again. A call that fails while the server is healthy (a
rejected request) is dropped alone, with one warning per kind of call. Calls made
while it is down are dropped and counted (`dropped`), and the count is reported at the end.
HTTP requests are bounded by `configure_http()`: a short timeout and at most one retry, instead
of MLflow's defaults (120 s timeout, 7 retries with exponential back-off: about 20 minutes before
a dead server is noticed).

All calls take an explicit `run_id` (MlflowClient, no global active run), so concurrent
fine-tuning runs in threads of one driver do not step on each other. With `background=True`
(what rank 0 of a training run uses) metrics and images are queued and sent by a thread, so a
slow or hung server never stalls a training step; `close()` flushes the queue with a deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from typing import Any

# Defaults applied unless the user set them (seconds / count).
HTTP_TIMEOUT_S = "30"
HTTP_MAX_RETRIES = "1"
HTTP_BACKOFF_FACTOR = "1"
PARENT_TAG = "mlflow.parentRunId"
_MAX_PARAMS_PER_BATCH = 100
_MAX_PARAM_CHARS = 6000


def configure_http(env: dict[str, str] | None = None) -> dict[str, str]:
    """Set MLflow's HTTP timeout/retry variables (and quiet its console output) in `env`
    (default `os.environ`) unless already set; returns the values in effect (to pass on to
    Ray workers)."""
    env = os.environ if env is None else env
    values = {
        "MLFLOW_HTTP_REQUEST_TIMEOUT": HTTP_TIMEOUT_S,
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": HTTP_MAX_RETRIES,
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": HTTP_BACKOFF_FACTOR,
        # Training prints its own progress; MLflow's run URLs and download bars would
        # interleave with it.
        "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }
    out = {}
    for key, default in values.items():
        env.setdefault(key, default)
        out[key] = env[key]
    return out


def resolve_tracking_uri(explicit: str = "") -> str:
    """`cfg.tracking.uri` > `$MLFLOW_TRACKING_URI` > the local stack's server (started when
    needed, see `srplatform.stack.tracking_uri`)."""
    from srplatform.stack import tracking_uri

    return tracking_uri(explicit)


@contextlib.contextmanager
def mlflow_server(uri: str):
    """Point MLflow's process-wide tracking and registry URIs at `uri` for the block, then put
    back what was there (the two globals and the variables MLflow mirrors them into).

    Some MLflow calls ignore the URIs they are given: resolving `models:/NAME@ALIAS` for an
    artifact download builds its own client from the globals, which default to a local
    `./mlflow.db`. Without this, such a call creates that database in the current folder and
    reports "Registered Model ... not found" from it, while the server has the model."""
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved = (tracking_utils._tracking_uri, registry_utils._registry_uri,
             {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")})
    tracking_utils.set_tracking_uri(uri)
    registry_utils.set_registry_uri(uri)
    try:
        yield uri
    finally:
        tracking_utils.set_tracking_uri(saved[0])
        registry_utils._registry_uri = saved[1]
        for key, value in saved[2].items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def redact_uri(uri: str) -> str:
    """The URI without any `user:password@` part (safe to print)."""
    if "@" in uri and "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return uri


def server_reachable(uri: str, timeout: float = 3.0) -> bool:
    """A quick health probe for http(s) servers (`/health`); other schemes count as reachable."""
    if not uri.startswith(("http://", "https://")):
        return True
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
            return resp.status < 500
    except urllib.error.HTTPError as exc:
        return exc.code < 500
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _stringify(value: Any) -> str:
    if isinstance(value, (dict, list, tuple)):
        value = json.dumps(value, sort_keys=True)
    text = str(value)
    return text if len(text) <= _MAX_PARAM_CHARS else text[: _MAX_PARAM_CHARS - 3] + "..."


class Tracker:
    """A guarded MLflow client for one tracking URI (see the module docstring).

    `enabled=False` makes every call a no-op (workers other than rank 0, or tracking off).
    `say` receives human-readable warnings (default: stderr)."""

    def __init__(self, uri: str | None, *, enabled: bool = True, cooldown: float = 60.0,
                 say: Callable[[str], None] | None = None, probe: bool = True,
                 background: bool = False, max_pending: int = 2000):
        self.uri = uri or ""
        self.enabled = bool(enabled and self.uri)
        self.cooldown = cooldown
        self.dropped = 0
        self.failures = 0
        self._say = say or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self._down_until = 0.0
        self._warned = False
        self._failed_calls: set[str] = set()
        self._lock = threading.Lock()
        self._client = None
        self._pending: queue.Queue | None = None
        self._sender: threading.Thread | None = None
        if self.enabled:
            configure_http()
            if probe and not server_reachable(self.uri):
                self._mark_down(f"no answer from {redact_uri(self.uri)}/health")
            if background:
                self._pending = queue.Queue(maxsize=max_pending)
                self._sender = threading.Thread(target=self._send_loop, name="c2d-mlflow", daemon=True)
                self._sender.start()

    # ---- background sending ------------------------------------------------------------
    def _send_loop(self) -> None:
        while True:
            item = self._pending.get()
            try:
                if item is None:
                    return
                self.call(*item)
            finally:
                self._pending.task_done()

    def _submit(self, what: str, fn: Callable[[], Any]) -> None:
        """Queue `fn` for the sender thread (or run it now without one); a full queue drops."""
        if not self.enabled:
            return
        if self._pending is None:
            self.call(what, fn)
            return
        try:
            self._pending.put_nowait((what, fn))
        except queue.Full:
            with self._lock:
                self.dropped += 1

    def close(self, timeout: float = 60.0) -> bool:
        """Send what is queued (waiting at most `timeout` s) and stop the sender; True when
        everything queued was handled. Idempotent; a no-op without background sending."""
        if self._pending is None or self._sender is None:
            return True
        deadline = time.monotonic() + timeout
        while self._pending.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.05)
        done = not self._pending.unfinished_tasks
        try:
            self._pending.put_nowait(None)
        except queue.Full:
            pass
        self._sender.join(timeout=max(0.0, deadline - time.monotonic()) + 1.0)
        if not done:
            with self._lock:
                self.dropped += self._pending.qsize()
        self._sender = None
        return done

    # ---- the guard ---------------------------------------------------------------------
    @property
    def available(self) -> bool:
        return self.enabled and time.monotonic() >= self._down_until

    def _mark_down(self, reason: str) -> None:
        self.failures += 1
        self._down_until = time.monotonic() + self.cooldown
        if not self._warned:
            self._warned = True
            self._say(
                f"warning: MLflow tracking at {redact_uri(self.uri)} is unavailable ({reason}); "
                f"training continues without it, retrying every {self.cooldown:.0f}s"
            )

    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def call(self, what: str, fn: Callable[[], Any], default: Any = None) -> Any:
        """Run `fn()` unless tracking is down or off; on any error warn once and return default."""
        if not self.enabled:
            return default
        with self._lock:
            if time.monotonic() < self._down_until:
                self.dropped += 1
                return default
        try:
            out = fn()
        except Exception as exc:  # noqa: BLE001 - tracking must never stop training
            msg = str(exc).splitlines()[0][:200] if str(exc) else ""
            # An outage stops all calls for a while; a request the server rejected (or a bug in
            # what we send) fails alone, so concurrent runs keep logging. The health probe
            # tells the two apart.
            up = server_reachable(self.uri, timeout=3.0)
            with self._lock:
                self.dropped += 1
                if not up:
                    self._mark_down(f"{what}: {type(exc).__name__}: {msg}")
                elif what not in self._failed_calls:
                    self._failed_calls.add(what)
                    self._say(f"warning: MLflow {what} failed ({type(exc).__name__}: {msg}); "
                              "training continues")
            return default
        if self._warned and self.failures:
            with self._lock:
                if self._warned:
                    self._say(f"MLflow tracking at {redact_uri(self.uri)} is reachable again")
                    self._warned = False
        return out

    def summary(self) -> str:
        """One line for the end of a run when something was dropped ("" otherwise)."""
        if not self.enabled or not self.dropped:
            return ""
        return (f"MLflow tracking at {redact_uri(self.uri)} was unavailable: {self.dropped} "
                "logging call(s) were dropped")

    # ---- runs --------------------------------------------------------------------------
    def experiment_id(self, name: str) -> str | None:
        def get() -> str:
            c = self.client()
            exp = c.get_experiment_by_name(name)
            if exp is not None:
                return exp.experiment_id
            try:
                return c.create_experiment(name)
            except Exception:  # noqa: BLE001 - created concurrently by another process
                exp = c.get_experiment_by_name(name)
                if exp is None:
                    raise
                return exp.experiment_id

        return self.call("get experiment", get)

    def create_run(self, experiment: str, run_name: str, *, tags: Mapping[str, Any] | None = None,
                   parent_run_id: str | None = None) -> str | None:
        """A new run (nested under `parent_run_id` when given); its id, or None when down."""
        exp_id = self.experiment_id(experiment)
        if exp_id is None:
            return None
        all_tags = {k: str(v) for k, v in (tags or {}).items()}
        if parent_run_id:
            all_tags[PARENT_TAG] = parent_run_id
        return self.call("create run", lambda: self.client().create_run(
            exp_id, tags=all_tags, run_name=run_name).info.run_id)

    def run_status(self, run_id: str) -> str | None:
        """The run's status (RUNNING, FINISHED, FAILED, KILLED) or None if unknown/unreachable."""
        return self.call("get run", lambda: self.client().get_run(run_id).info.status)

    def reopen(self, run_id: str) -> bool:
        """Mark a run RUNNING again (a resumed run continues its MLflow run)."""
        return bool(self.call("reopen run", lambda: self.client().update_run(run_id, status="RUNNING") or True))

    def end_run(self, run_id: str | None, status: str = "FINISHED") -> None:
        if run_id:
            self.call("end run", lambda: self.client().set_terminated(run_id, status=status))

    # ---- logging -----------------------------------------------------------------------
    def log_params(self, run_id: str | None, params: Mapping[str, Any]) -> None:
        """Params in batches (MLflow takes at most 100 per call); values stringified."""
        if not run_id:
            return
        from mlflow.entities import Param

        items = [Param(str(k), _stringify(v)) for k, v in params.items()]
        for i in range(0, len(items), _MAX_PARAMS_PER_BATCH):
            chunk = items[i: i + _MAX_PARAMS_PER_BATCH]
            self.call("log params", lambda c=chunk: self.client().log_batch(run_id, params=c))

    def log_metrics(self, run_id: str | None, metrics: Mapping[str, float], step: int) -> None:
        if not run_id or not metrics:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(str(k), float(v), now, int(step)) for k, v in metrics.items()
                 if v is not None]
        self._submit("log metrics", lambda: self.client().log_batch(run_id, metrics=items))

    def log_image(self, run_id: str | None, image, artifact_file: str) -> None:
        """An image (numpy `(H, W, 3)` uint8) as a run artifact at `artifact_file`."""
        if run_id:
            self._submit("log image", lambda: self.client().log_image(run_id, image, artifact_file))

    def set_tags(self, run_id: str | None, tags: Mapping[str, Any]) -> None:
        if not run_id or not tags:
            return
        from mlflow.entities import RunTag

        items = [RunTag(str(k), str(v)) for k, v in tags.items()]
        self.call("set tags", lambda: self.client().log_batch(run_id, tags=items))

    def log_artifact(self, run_id: str | None, local_path: str | os.PathLike[str],
                     artifact_path: str | None = None) -> None:
        if run_id:
            self.call("log artifact", lambda: self.client().log_artifact(
                run_id, os.fspath(local_path), artifact_path))

    def log_text(self, run_id: str | None, text: str, artifact_file: str) -> None:
        if run_id:
            self.call("log text", lambda: self.client().log_text(run_id, text, artifact_file))

    def log_dict(self, run_id: str | None, data: dict[str, Any], artifact_file: str) -> None:
        if run_id:
            self.call("log dict", lambda: self.client().log_dict(run_id, data, artifact_file))

    def in_run(self, run_id: str | None, what: str, fn: Callable[[], Any]) -> Any:
        """Run `fn()` with `run_id` as this thread's active MLflow run (for fluent-API helpers
        such as `mlflow.pyfunc.log_model`). Leaving the fluent context marks the run FINISHED,
        so callers set the final status with `end_run` afterwards. MLflow's active-run stack is
        thread-local, so concurrent threads are independent."""
        if not run_id:
            return None

        def go() -> Any:
            import mlflow

            mlflow.set_tracking_uri(self.uri)
            # start_run(run_id=...) refuses a run outside the process's active experiment (a
            # global that any earlier set_experiment call leaves behind): make them agree.
            mlflow.set_experiment(experiment_id=self.client().get_run(run_id).info.experiment_id)
            with _quiet_mlflow_logs():  # "validating input example" etc.
                with mlflow.start_run(run_id=run_id, nested=True, log_system_metrics=False):
                    return fn()

        return self.call(what, go)


_quiet_lock = threading.Lock()
_quiet_state = {"depth": 0, "level": 0}


@contextlib.contextmanager
def _quiet_mlflow_logs():
    """MLflow's INFO logs off while any thread is inside (nesting- and thread-safe: the level
    is restored when the last one leaves, not by each thread on its own)."""
    import logging

    log = logging.getLogger("mlflow")
    with _quiet_lock:
        if _quiet_state["depth"] == 0:
            _quiet_state["level"] = log.level
            log.setLevel(max(log.level, logging.WARNING))
        _quiet_state["depth"] += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_state["depth"] -= 1
            if _quiet_state["depth"] == 0:
                log.setLevel(_quiet_state["level"])


def flat_metrics(prefix: str, values: Mapping[str, float]) -> dict[str, float]:
    """`{"psnr": 30.1}` with prefix "val_x2_" -> `{"val_x2_psnr": 30.1}`."""
    return {f"{prefix}{k}": float(v) for k, v in values.items()}


def run_ids_alive(tracker: Tracker, run_ids: Iterable[str]) -> bool:
    """True when every id names a run on this tracker's server."""
    return all(tracker.run_status(r) is not None for r in run_ids)
