"""Ray Jobs API logic behind `c2d submit` and `c2d jobs`.

A submitted job runs `python -m jobs.<name> [--config REL] [--set k=v ...] [extra ...]` on the
cluster, in a copy of this project uploaded as the job's `working_dir`, so a job and a local
`c2d <name> ...` call run the same code with the same arguments.

    plan = plan_submission("pipeline", config="jobs/configs/tiny.yaml", address=addr, ...)
    print(describe(plan))                    # names of forwarded variables, never their values
    client = connect(addr)
    submission_id = submit(client, plan)     # stages an outside config, uploads, cleans up
    status = follow(client, submission_id, sys.stdout.write)

Address resolution: an explicit address > `RAY_ADDRESS` > `RAY_API_SERVER_ADDRESS` > an error
that says how to start or reach a cluster. Ray's client would let the environment override an
explicit address; `connect` hides those variables while it builds the client so the address we
print is the one we use.

Secrets: environment values are forwarded in the runtime environment's `env_vars` and never
printed. Everything this module returns for printing (plans, errors, log text) passes through
`mask`, which replaces the values of secret-looking variables with `****`.

Ray is imported inside the functions that need it, so importing this module is cheap.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import getpass
import os
import re
import secrets as _secrets
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from srplatform.errors import UserError

# Jobs `c2d submit` accepts; each is `jobs/<name>.py`. `selfcheck` verifies a cluster setup.
JOBS = ("pipeline", "pretrain", "finetune", "tune", "eval", "promote", "upscale", "serve", "selfcheck")

DASHBOARD_PORT = 8265

# Forwarded from the submitting environment when set (the settings srplatform.storage and
# MLflow read). `--env NAME` adds more; `--no-forward-env` turns this list off.
FORWARDED_ENV = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "C2D_S3_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
)

# Variables whose values are never shown, forwarded or not.
_SECRET_NAME = re.compile(
    r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|PRIVATE|ACCESS_KEY|API_KEY|AUTH", re.IGNORECASE
)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SUBMISSION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

# Never uploaded with the working_dir: gitignore-style patterns relative to the project root,
# without trailing slashes (Ray matches a directory's own path without one, so "x/" would not
# prune the walk and Ray would visit every file under .venv). Ray also honours .gitignore and
# .rayignore files on its own.
UPLOAD_EXCLUDES = (
    ".venv",
    ".c2d",
    ".git",
    "benchmarks/results",
    "__pycache__",
    ".pytest_cache",
    ".mypy_cache",
    ".ruff_cache",
    ".ipynb_checkpoints",
    "*.egg-info",
    "/build",
    "/dist",
)

# Config files from outside the project are copied here (inside the project, not ignored, so
# they travel with the upload) for the duration of the upload, then removed.
STAGING_DIR = ".c2d-submit"

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")

NO_CLUSTER_HELP = (
    "no Ray cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS.\n"
    "  A cluster on this machine:  ray start --head --dashboard-host=127.0.0.1   "
    "(then --address http://127.0.0.1:8265)\n"
    "  The AWS cluster:            ray up ray-cluster.yaml, then keep "
    "`ray dashboard ray-cluster.yaml` running (an SSH tunnel to the head's dashboard) "
    "and use --address http://127.0.0.1:8265\n"
    "  KubeRay:                    kubectl port-forward svc/<cluster>-head-svc 8265:8265 "
    "(see infra/README.md)"
)


# --------------------------------------------------------------------------------------
# Masking
# --------------------------------------------------------------------------------------


def is_secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(name))


def secret_values(env: Mapping[str, str]) -> list[str]:
    """The values in `env` that must never be shown: secret-looking names, and passwords
    embedded in URLs (`https://user:pass@host`)."""
    out: list[str] = []
    for name, value in env.items():
        if not value:
            continue
        if is_secret_name(name):
            out.append(value)
            continue
        with contextlib.suppress(ValueError):
            password = urlsplit(value).password
            if password:
                out.append(password)
    return out


def mask(text: str, secrets: Iterable[str]) -> str:
    """`text` with every secret value replaced by `****` (longest first, so a secret that
    contains another is masked whole). Values shorter than 4 characters are not searched:
    masking them would garble ordinary text and they protect nothing."""
    for value in sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True):
        text = text.replace(value, "****")
    return text


# --------------------------------------------------------------------------------------
# Address
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Address:
    value: str
    source: str  # "--address", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"


def resolve_address(cli_address: str | None, environ: Mapping[str, str] | None = None) -> Address:
    """--address > RAY_ADDRESS > RAY_API_SERVER_ADDRESS > UserError with setup help.

    `host:8265` without a scheme is taken as the dashboard URL (`http://host:8265`); other
    scheme-less values keep Ray's meaning (a cluster/GCS address such as `127.0.0.1:6379` or
    `auto`, from which Ray looks up the dashboard).
    """
    environ = os.environ if environ is None else environ
    for value, source in (
        (cli_address, "--address"),
        (environ.get("RAY_ADDRESS"), "RAY_ADDRESS"),
        (environ.get("RAY_API_SERVER_ADDRESS"), "RAY_API_SERVER_ADDRESS"),
    ):
        if value and value.strip():
            return Address(_normalise_address(value.strip()), source)
    raise UserError(NO_CLUSTER_HELP)


def _normalise_address(value: str) -> str:
    if "://" in value or value == "auto":
        return value.rstrip("/")
    host, _, port = value.rpartition(":")
    if host and port == str(DASHBOARD_PORT):
        return f"http://{value}"
    return value


@contextlib.contextmanager
def _without_env(*names: str) -> Iterator[None]:
    saved = {n: os.environ.pop(n) for n in names if n in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def connect(address: Address | str):
    """A `JobSubmissionClient` for `address`; UserError (with setup help) when unreachable."""
    addr = address.value if isinstance(address, Address) else address
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError as exc:  # pragma: no cover - ray is a dependency
        raise UserError(f"the Ray Jobs client is not importable ({exc}); pip install 'ray[default]'")
    try:
        # Ray lets RAY_ADDRESS / RAY_API_SERVER_ADDRESS override the address argument.
        with _without_env("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
            return JobSubmissionClient(addr)
    except Exception as exc:  # ConnectionError, requests errors, RuntimeError from GCS lookup
        raise UserError(
            f"cannot reach the Ray Jobs API at {addr}: {explain(exc)}\n"
            "Is the cluster up and its dashboard reachable (the Jobs API is served by the "
            "dashboard, port 8265)?\n" + NO_CLUSTER_HELP.split("\n", 1)[1]
        ) from None


AUTH_HELP = (
    "the cluster requires a Ray authentication token (token auth is on; Ray 2.60 turns it on "
    "for clusters started where ~/.ray/auth_token exists). Export RAY_AUTH_MODE=token and make "
    "that cluster's token available here: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token"
)


def explain(exc: BaseException, limit: int = 300) -> str:
    """One line for an error from the Jobs API; authentication failures get what to do."""
    if type(exc).__name__ == "AuthenticationError" or "authentication token" in str(exc).lower():
        return AUTH_HELP
    return one_line(exc, limit)


def one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------
# Planning a submission
# --------------------------------------------------------------------------------------


def project_root() -> Path:
    """The c2disr checkout to upload: the one this package was imported from (an editable
    install), else the nearest parent of the current directory holding a c2disr pyproject."""
    candidates = [Path(__file__).resolve().parents[1]]
    cwd = Path.cwd().resolve()
    candidates += [cwd, *cwd.parents]
    for root in candidates:
        if _is_project_root(root):
            return root
    raise UserError(
        "cannot find the c2disr project to upload: run `c2d submit` from a checkout of the "
        "project (a directory with pyproject.toml and jobs/)"
    )


def _is_project_root(path: Path) -> bool:
    pyproject = path / "pyproject.toml"
    if not (pyproject.is_file() and (path / "jobs").is_dir() and (path / "srplatform").is_dir()):
        return False
    try:
        return re.search(r'^name\s*=\s*"c2disr"', pyproject.read_text(), re.MULTILINE) is not None
    except OSError:
        return False


def make_submission_id(job: str, now: _dt.datetime | None = None) -> str:
    now = now or _dt.datetime.now()
    return f"c2d-{job}-{now:%Y%m%d-%H%M%S}-{_secrets.token_hex(3)}"


def check_submission_id(value: str) -> str:
    if not _SUBMISSION_ID.match(value):
        raise UserError(
            f"--submission-id {value!r}: use letters, digits, '.', '_' and '-' "
            "(at most 128 characters, starting with a letter or digit)"
        )
    return value


def git_state(root: Path) -> tuple[str, bool]:
    """(commit, dirty) of the checkout; ("unknown", False) without git."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
        return commit, dirty
    except (OSError, subprocess.SubprocessError):
        return "unknown", False


def collect_env(
    names: Sequence[str] = (),
    *,
    forward_defaults: bool = True,
    environ: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The job's `env_vars`: FORWARDED_ENV entries that are set (unless turned off), plus each
    `--env NAME` (value from this environment) or `--env NAME=VALUE`."""
    environ = os.environ if environ is None else environ
    env: dict[str, str] = {}
    if forward_defaults:
        env.update({n: environ[n] for n in FORWARDED_ENV if environ.get(n)})
    for item in names:
        name, sep, value = item.partition("=")
        if not _ENV_NAME.match(name):
            raise UserError(f"--env {name!r}: not a valid environment variable name")
        if not sep:
            if name not in environ:
                raise UserError(
                    f"--env {name}: not set in this environment; export it or pass --env {name}=VALUE"
                )
            value = environ[name]
        env[name] = value
    return env


@dataclass
class ConfigSource:
    """Where the job finds its config: `rel` (relative to the working_dir) and, when the local
    file is outside the uploaded tree, the `local` file to copy to `rel` before uploading."""

    rel: str
    local: Path
    staged: bool


@dataclass
class SubmitPlan:
    job: str
    submission_id: str
    address: Address
    root: Path
    entrypoint: str
    runtime_env: dict
    metadata: dict[str, str]
    num_gpus: float | None = None
    num_cpus: float | None = None
    config: ConfigSource | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def secrets(self) -> list[str]:
        """Values never to print: secret-looking forwarded values and local ones (a Ray
        auth token, say, which is not forwarded but may echo back in an error)."""
        return secret_values(self.runtime_env.get("env_vars", {})) + secret_values(os.environ)


def build_entrypoint(
    job: str, config_rel: str | None, overrides: Sequence[str], extra: Sequence[str]
) -> str:
    """The shell command the cluster runs (Ray runs the entrypoint through a shell)."""
    if job not in JOBS:
        raise UserError(f"unknown job {job!r}; choose one of {', '.join(JOBS)}")
    argv = ["python", "-m", f"jobs.{job}"]
    if config_rel is not None:
        argv += ["--config", config_rel]
    for item in overrides:
        argv += ["--set", item]
    argv += list(extra)
    return shlex.join(argv)


def plan_submission(
    job: str,
    *,
    address: Address,
    config: str | None = None,
    overrides: Sequence[str] = (),
    extra: Sequence[str] = (),
    env: Sequence[str] = (),
    forward_env: bool = True,
    num_gpus: float | None = None,
    num_cpus: float | None = None,
    submission_id: str | None = None,
    root: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> SubmitPlan:
    """Everything `submit` sends, decided up front so it can be shown (`--dry-run`) and tested
    without a cluster. Touches no files."""
    root = (root or project_root()).resolve()
    sid = check_submission_id(submission_id) if submission_id else make_submission_id(job)
    for name, value in (("--gpus", num_gpus), ("--cpus", num_cpus)):
        if value is not None and value < 0:
            raise UserError(f"{name} must be >= 0, got {value}")

    source = None
    if config is not None:
        local = Path(config).expanduser()
        if not local.is_file():
            raise UserError(f"--config {config}: no such file (see jobs/configs/ for samples)")
        local = local.resolve()
        rel = uploaded_relpath(root, local)
        if rel is None:
            source = ConfigSource(f"{STAGING_DIR}/{sid}/{local.name}", local, staged=True)
        else:
            source = ConfigSource(rel, local, staged=False)

    env_vars = collect_env(env, forward_defaults=forward_env, environ=environ)
    entrypoint = build_entrypoint(job, source.rel if source else None, overrides, extra)
    commit, dirty = git_state(root)
    from srplatform import __version__

    metadata = {
        "c2d.job": job,
        "c2d.user": _user(),
        "c2d.git_commit": commit,
        "c2d.git_dirty": str(dirty).lower(),
        "c2d.version": __version__,
    }
    if source is not None:
        metadata["c2d.config"] = str(source.local) if source.staged else source.rel
    runtime_env = {
        "working_dir": str(root),
        "excludes": list(UPLOAD_EXCLUDES),
        "env_vars": env_vars,
    }
    plan = SubmitPlan(
        job=job,
        submission_id=sid,
        address=address,
        root=root,
        entrypoint=entrypoint,
        runtime_env=runtime_env,
        metadata=metadata,
        num_gpus=num_gpus,
        num_cpus=num_cpus,
        config=source,
    )
    plan.notes += _notes(env_vars, dirty)
    return plan


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return "unknown"


def _notes(env_vars: Mapping[str, str], dirty: bool) -> list[str]:
    notes = []
    for name in ("MLFLOW_TRACKING_URI", "C2D_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        value = env_vars.get(name, "")
        with contextlib.suppress(ValueError):
            host = urlsplit(value).hostname or ""
            if host in ("localhost", "::1") or host.startswith("127."):
                notes.append(
                    f"{name} points at this machine's loopback interface: fine for a cluster on "
                    "this machine, unreachable from a remote one"
                )
    if dirty:
        notes.append("the checkout has uncommitted changes; they are uploaded with the job")
    return notes


def uploaded_relpath(root: Path, path: Path) -> str | None:
    """`path` relative to `root` (POSIX) when Ray's working_dir upload will include it, else
    None: outside the root, or excluded by UPLOAD_EXCLUDES or a .gitignore/.rayignore on the
    way (matched with Ray's own pattern matcher). When that matcher is unavailable the answer
    is None, which makes the caller stage a copy: always correct, never wrong-and-missing."""
    try:
        rel = path.resolve().relative_to(root.resolve())
    except ValueError:
        return None
    try:
        from ray._private.runtime_env.packaging import _get_excludes, get_excludes_from_ignore_files
    except ImportError:
        return None
    include_gitignore = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"
    import logging

    quiet = logging.getLogger("c2d.submit.ignorecheck")
    quiet.addHandler(logging.NullHandler())
    quiet.propagate = False
    matchers = [_get_excludes(root, list(UPLOAD_EXCLUDES))]
    current = root
    # Ray walks from the root down; every ignore file on the way applies to what is below it.
    for part in (None, *rel.parts):
        if part is not None:
            current = current / part
            if any(match(current) for match in matchers):
                return None
        if current.is_dir():
            matchers += get_excludes_from_ignore_files(
                current, include_gitignore=include_gitignore, logger=quiet
            )
    return rel.as_posix()


def describe(plan: SubmitPlan) -> str:
    """What will be (or was) submitted, for people: env variable names, never values."""
    env_names = sorted(plan.runtime_env.get("env_vars", {}))
    resources = []
    if plan.num_gpus:
        resources.append(f"{plan.num_gpus:g} GPU")
    if plan.num_cpus is not None:
        resources.append(f"{plan.num_cpus:g} CPU")
    lines = [
        f"submission id: {plan.submission_id}",
        f"cluster:       {plan.address.value}"
        + (f" (from {plan.address.source})" if plan.address.source else ""),
        f"entrypoint:    {plan.entrypoint}",
        f"working_dir:   {plan.root} (without {', '.join(e.strip('/') for e in UPLOAD_EXCLUDES[:4])}, caches)",
    ]
    if plan.config is not None:
        how = f"staged copy of {plan.config.local}" if plan.config.staged else "inside the upload"
        lines.append(f"config:        {plan.config.rel} ({how})")
    lines.append(f"env forwarded: {', '.join(env_names) if env_names else '(none)'} (values not shown)")
    lines.append(f"entrypoint resources: {', '.join(resources) if resources else 'none reserved'}")
    lines.append(
        f"metadata:      job={plan.metadata['c2d.job']} user={plan.metadata['c2d.user']} "
        f"commit={plan.metadata['c2d.git_commit'][:12]}"
        + (" (dirty)" if plan.metadata["c2d.git_dirty"] == "true" else "")
    )
    lines += [f"note: {n}" for n in plan.notes]
    return mask("\n".join(lines), plan.secrets)


# --------------------------------------------------------------------------------------
# Submitting
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def staged_config(plan: SubmitPlan) -> Iterator[None]:
    """Copy an outside config into the upload tree for as long as the upload takes."""
    if plan.config is None or not plan.config.staged:
        yield
        return
    dest = plan.root / plan.config.rel
    if dest.exists():
        raise UserError(f"staging path {dest} already exists; pick another --submission-id")
    dest.parent.mkdir(parents=True)
    try:
        shutil.copy2(plan.config.local, dest)
        yield
    finally:
        shutil.rmtree(dest.parent, ignore_errors=True)
        with contextlib.suppress(OSError):
            (plan.root / STAGING_DIR).rmdir()  # only when no other submission is staging


@contextlib.contextmanager
def quiet_loggers(*names: str, level: int = 40) -> Iterator[None]:
    """Raise the level of Ray's chattier loggers for a while (default ERROR): the packaging
    code logs every ignore file it reads and warns about its own default excludes."""
    import logging

    loggers = [logging.getLogger(n) for n in names]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, old in zip(loggers, saved):
            lg.setLevel(old)


def submit(client, plan: SubmitPlan) -> str:
    """Upload the working_dir and submit; returns the submission id."""
    kwargs = {}
    if plan.num_gpus is not None:
        kwargs["entrypoint_num_gpus"] = plan.num_gpus
    if plan.num_cpus is not None:
        kwargs["entrypoint_num_cpus"] = plan.num_cpus
    try:
        with staged_config(plan), quiet_loggers(
            "ray._private.runtime_env.packaging", "ray._private.runtime_env.working_dir"
        ):
            return client.submit_job(
                entrypoint=plan.entrypoint,
                submission_id=plan.submission_id,
                runtime_env=plan.runtime_env,
                metadata=plan.metadata,
                **kwargs,
            )
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"submission failed: {mask(explain(exc, 600), plan.secrets)}") from None


# --------------------------------------------------------------------------------------
# Following and inspecting
# --------------------------------------------------------------------------------------


class _LineMasker:
    """Masks secrets in streamed text without missing one split across two chunks: holds back
    the unfinished last line until its newline arrives (or the stream ends)."""

    def __init__(self, write: Callable[[str], object], secrets: Iterable[str]):
        self._write = write
        self._secrets = list(secrets)
        self._pending = ""

    def feed(self, chunk: str) -> None:
        text = self._pending + chunk
        head, sep, self._pending = text.rpartition("\n")
        if sep:
            self._write(mask(head + sep, self._secrets))

    def flush(self) -> None:
        if self._pending:
            self._write(mask(self._pending, self._secrets))
            self._pending = ""


def status_of(client, submission_id: str) -> str:
    status = client.get_job_status(submission_id)
    return str(getattr(status, "value", status))


def follow(
    client,
    submission_id: str,
    write: Callable[[str], object],
    *,
    secrets: Iterable[str] = (),
    poll_s: float = 1.0,
    note: Callable[[str], object] | None = None,
) -> str:
    """Stream the job's logs until it ends; returns its final status.

    The server replays a job's log from the start on every connection, so after a dropped
    connection we reconnect and skip what was already written."""
    note = note or (lambda msg: print(msg, file=sys.stderr))
    masker = _LineMasker(write, secrets)
    seen = 0
    while True:
        received = 0

        async def tail() -> None:
            nonlocal received, seen
            async for chunk in client.tail_job_logs(submission_id):
                start, received = received, received + len(chunk)
                if received > seen:
                    masker.feed(chunk[max(seen - start, 0):])
                    seen = received

        error = None
        try:
            with quiet_loggers("ray.dashboard.modules.job.sdk", level=30):
                asyncio.run(tail())
        except Exception as exc:  # a dropped websocket; the job may well still be running
            error = exc
        status = _status_with_retries(client, submission_id)
        deadline = time.monotonic() + 30
        while status not in TERMINAL and time.monotonic() < deadline and error is None:
            time.sleep(poll_s)  # the stream ends a moment before the status turns terminal
            status = _status_with_retries(client, submission_id)
        if status in TERMINAL:
            masker.flush()
            return status
        note(
            f"[c2d] log stream ended early ({one_line(error) if error else 'no reason given'}); "
            f"job is {status}, reconnecting"
        )
        time.sleep(max(poll_s, 2.0))


def _status_with_retries(client, submission_id: str, attempts: int = 5) -> str:
    for i in range(attempts):
        try:
            return status_of(client, submission_id)
        except Exception as exc:
            if i == attempts - 1:
                raise UserError(f"cannot read the status of {submission_id}: {explain(exc)}") from None
            time.sleep(1.0 + i)
    raise AssertionError("unreachable")


def follow_to_stdout(client, submission_id: str, secrets: Iterable[str] = ()) -> int:
    """`follow` for the CLI: logs to stdout, the outcome to stderr; returns the exit status
    (0 SUCCEEDED, 1 FAILED/STOPPED, 130 when the user stops following)."""
    print(f"--- logs of {submission_id} (Ctrl-C stops following, not the job) ---", flush=True)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    try:
        status = follow(client, submission_id, write, secrets=secrets)
    except KeyboardInterrupt:
        print(
            f"\nstopped following; the job keeps running (c2d jobs stop {submission_id} stops it)",
            file=sys.stderr,
        )
        return 130
    print(f"--- {submission_id}: {status} ---", file=sys.stderr)
    return exit_code_for(status)


def exit_code_for(status: str) -> int:
    """0 for SUCCEEDED, 1 for anything else (FAILED, STOPPED)."""
    return 0 if status == "SUCCEEDED" else 1


def job_info(client, submission_id: str):
    try:
        return client.get_job_info(submission_id)
    except Exception as exc:
        raise UserError(
            f"no job {submission_id!r} on this cluster ({explain(exc)}); `c2d jobs list` shows them"
        ) from None


def job_secrets(info) -> list[str]:
    """Secret values this job received plus those of this environment, for masking its logs."""
    env_vars = dict(((getattr(info, "runtime_env", None) or {}).get("env_vars") or {}))
    return secret_values(env_vars) + secret_values(os.environ)


def log_tail(text: str, lines: int) -> str:
    return "\n".join(text.rstrip("\n").splitlines()[-lines:]) if lines > 0 else ""


def format_time(ms: int | None) -> str:
    if not ms:
        return "-"
    return _dt.datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S")


def format_duration(start_ms: int | None, end_ms: int | None) -> str:
    if not start_ms:
        return "-"
    seconds = ((end_ms or time.time() * 1000) - start_ms) / 1000
    if seconds < 120:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def status_text(info) -> str:
    return str(getattr(info.status, "value", info.status))


def format_table(infos: Sequence) -> str:
    """One line per submitted job, newest first."""
    rows = [("SUBMISSION ID", "STATUS", "JOB", "STARTED", "DURATION", "ENTRYPOINT")]
    for info in sorted(infos, key=lambda i: i.start_time or 0, reverse=True):
        entry = info.entrypoint if len(info.entrypoint) <= 60 else info.entrypoint[:57] + "..."
        rows.append(
            (
                info.submission_id or "-",
                status_text(info),
                (info.metadata or {}).get("c2d.job", "-"),
                format_time(info.start_time),
                format_duration(info.start_time, info.end_time),
                entry,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows
    )


def format_status(info) -> str:
    meta = info.metadata or {}
    resources = []
    if getattr(info, "entrypoint_num_gpus", None):
        resources.append(f"{info.entrypoint_num_gpus:g} GPU")
    if getattr(info, "entrypoint_num_cpus", None) is not None:
        resources.append(f"{info.entrypoint_num_cpus:g} CPU")
    lines = [
        f"submission id: {info.submission_id}",
        f"status:        {status_text(info)}",
        f"message:       {info.message or '-'}",
        f"entrypoint:    {info.entrypoint}",
        f"started:       {format_time(info.start_time)}",
        f"ended:         {format_time(info.end_time)}",
        f"duration:      {format_duration(info.start_time, info.end_time)}",
    ]
    if getattr(info, "driver_exit_code", None) is not None:
        lines.append(f"exit code:     {info.driver_exit_code}")
    if resources:
        lines.append(f"resources:     {', '.join(resources)} (entrypoint)")
    if meta:
        shown = ", ".join(
            f"{k.removeprefix('c2d.')}={v}" for k, v in sorted(meta.items()) if k.startswith("c2d.")
        )
        if shown:
            lines.append(f"metadata:      {shown}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# selfcheck: the job that verifies a cluster setup (`python -m jobs.selfcheck`)
# --------------------------------------------------------------------------------------


def selfcheck_main(argv: Sequence[str]) -> int:
    """Reports what a job sees on the cluster and fails when an expectation is not met:
    the config file (with its SHA-256, to compare with the local copy), which forwarded
    variables are set (names only), the Python/torch/CUDA versions, GPUs visible to this
    process and the cluster's resources."""
    import argparse
    import hashlib
    import platform

    parser = argparse.ArgumentParser(prog="python -m jobs.selfcheck", description=selfcheck_main.__doc__)
    parser.add_argument("--config", help="a config file that must be readable here")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--expect-env", action="append", default=[], metavar="NAME",
                        help="fail unless this environment variable is set (its value is not shown)")
    parser.add_argument("--expect-gpus", type=int, default=0, metavar="N",
                        help="fail unless this process sees at least N CUDA devices")
    parser.add_argument("--no-ray", action="store_true", help="do not connect to the Ray cluster")
    args = parser.parse_args(list(argv))

    failures: list[str] = []
    print(f"[selfcheck] cwd: {os.getcwd()}")
    print(f"[selfcheck] python: {platform.python_version()} ({sys.executable})")
    try:
        import c2disr  # noqa: F401
        import srplatform

        print(f"[selfcheck] c2disr/srplatform {srplatform.__version__} from {Path(srplatform.__file__).parent}")
    except Exception as exc:
        failures.append(f"cannot import the project: {exc}")

    if args.config:
        path = Path(args.config)
        if path.is_file():
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            print(f"[selfcheck] config: {args.config} sha256={digest}")
            if args.overrides:
                try:
                    from srplatform.config import load_config

                    load_config(path, args.overrides)
                    print(f"[selfcheck] config with --set {' '.join(args.overrides)}: valid")
                except UserError as exc:
                    failures.append(f"config invalid: {exc}")
        else:
            failures.append(f"config {args.config} not found (cwd {os.getcwd()})")

    for name in sorted(set(FORWARDED_ENV) | set(args.expect_env)):
        state = "set" if os.environ.get(name) else "not set"
        if name in args.expect_env or state == "set":
            print(f"[selfcheck] env {name}: {state}")
        if name in args.expect_env and state != "set":
            failures.append(f"environment variable {name} is not set")

    try:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        print(f"[selfcheck] torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}, devices: {gpus}")
    except Exception as exc:
        gpus = 0
        failures.append(f"cannot import torch: {exc}")
    if gpus < args.expect_gpus:
        failures.append(f"expected at least {args.expect_gpus} GPU(s), this process sees {gpus}")

    if not args.no_ray:
        try:
            import ray

            ray.init(address=os.environ.get("RAY_ADDRESS") or "auto", logging_level="WARNING",
                     log_to_driver=False)
            resources = {k: v for k, v in sorted(ray.cluster_resources().items())
                         if k in ("CPU", "GPU", "memory") or k.startswith("accelerator_type")}
            print(f"[selfcheck] ray {ray.__version__}, nodes: {len(ray.nodes())}, resources: {resources}")
            ray.shutdown()
        except Exception as exc:
            failures.append(f"cannot connect to the Ray cluster: {one_line(exc)}")

    for failure in failures:
        print(f"[selfcheck] FAILED: {failure}", file=sys.stderr)
    if not failures:
        print("[selfcheck] OK")
    return 1 if failures else 0
