"""The embedded local stack: an MLflow tracking server and an S3-compatible endpoint on loopback.

`c2d stack up` starts both as child processes in their own sessions, picks free ports and
records everything in `<data dir>/stack.json` (mode 0600: it holds the S3 keys). `status` reads
that file and checks each server's health; `down` stops exactly the processes `up` started.
Ray is not part of the stack: jobs start a local Ray with `ray.init()` or join `RAY_ADDRESS`.

- MLflow: `mlflow server` with a SQLite backend under the data directory, the model registry,
  and artifacts proxied by the server (`--serve-artifacts`) into `<data dir>/mlartifacts`, so
  they are durable on local disk and reachable by any process that can reach the server.
- S3: moto's server mode with request signing enforced. On start the stack creates an IAM
  user with S3 access and a fresh key pair (moto lets the first few requests through
  unauthenticated exactly for this bootstrap); any other key is rejected like on AWS. moto
  keeps objects in memory, so the durable default store is `file://` under the data directory.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from srplatform.errors import UserError

STATE_FILE = "stack.json"
DEFAULT_BUCKET = "c2disr"
_BOOTSTRAP_REQUESTS = 3  # create_user, put_user_policy, create_access_key


def data_dir() -> Path:
    """Where the platform keeps its state: `$C2D_HOME`, default `./.c2d` (created on demand)."""
    root = Path(os.environ.get("C2D_HOME", ".c2d")).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return root


def state_path(root: Path | None = None) -> Path:
    return (root or data_dir()) / STATE_FILE


def read_state(root: Path | None = None) -> dict[str, Any] | None:
    """The running stack's state (URLs, ports, S3 keys), or None when it is not up."""
    path = state_path(root)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _write_state(state: dict[str, Any], root: Path) -> None:
    path = state_path(root)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(state, fh, indent=2)
    os.replace(tmp, path)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child counts as dead.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except OSError:
        return True


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return 200 <= resp.status < 500
    except urllib.error.HTTPError as exc:
        return exc.code < 500
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _log_tail(path: str | Path, lines: int = 15) -> str:
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


@dataclass
class ServiceStatus:
    name: str
    url: str
    pid: int
    running: bool
    healthy: bool
    log: str

    @property
    def state(self) -> str:
        if self.healthy:
            return "healthy"
        return "unhealthy" if self.running else "crashed"


# --------------------------------------------------------------------------------------
# Starting
# --------------------------------------------------------------------------------------


def _spawn(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    fh = open(log, "ab")
    # Own session: a Ctrl-C in the user's terminal does not kill the servers, and `down`
    # can stop the whole process group (mlflow runs worker processes).
    return subprocess.Popen(
        cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True, env=env, close_fds=True,
    )


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, name: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with code {proc.returncode} during start:\n{_log_tail(log)}")
        if _http_ok(url):
            return
        time.sleep(0.3)
    raise RuntimeError(f"{name} did not become healthy at {url} within {timeout:.0f}s:\n{_log_tail(log)}")


def start_mlflow(root: Path, host: str = "127.0.0.1", port: int | None = None, timeout: float = 120) -> dict[str, Any]:
    port = port or free_port(host)
    log = root / "logs" / "mlflow.log"
    artifacts = root / "mlartifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--host", host, "--port", str(port),
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", artifacts.as_uri(),
        "--serve-artifacts",
        "--workers", "1",
    ]
    env = dict(os.environ)
    # The server must not inherit a client-side tracking URI or S3 endpoint of the caller.
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL"):
        env.pop(key, None)
    # MLflow's job execution (GenAI scorer jobs, trace roll-ups: nothing this platform uses)
    # runs a job runner and seven polling huey consumers beside the server: processes and CPU
    # that a 2-core machine needs for training. Off unless the user turns it on.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    proc = _spawn(cmd, log, env)
    uri = f"http://{host}:{port}"
    try:
        _wait_healthy(f"{uri}/health", proc, log, "mlflow server", timeout)
    except Exception:
        _kill_group(proc.pid)
        raise
    return {"pid": proc.pid, "port": port, "host": host, "tracking_uri": uri, "log": str(log),
            "backend": f"sqlite:///{root / 'mlflow.db'}", "artifacts": artifacts.as_uri()}


def start_s3(root: Path, host: str = "127.0.0.1", port: int | None = None, timeout: float = 60,
             region: str = "us-east-1", bucket: str = DEFAULT_BUCKET) -> dict[str, Any]:
    port = port or free_port(host)
    log = root / "logs" / "s3.log"
    env = dict(os.environ)
    env["INITIAL_NO_AUTH_ACTION_COUNT"] = str(_BOOTSTRAP_REQUESTS)
    cmd = [sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)]
    proc = _spawn(cmd, log, env)
    url = f"http://{host}:{port}"
    try:
        _wait_healthy(f"{url}/moto-api/", proc, log, "S3 endpoint (moto)", timeout)
        keys = _bootstrap_s3(url, region, bucket)
    except Exception:
        _kill_group(proc.pid)
        raise
    return {"pid": proc.pid, "port": port, "host": host, "endpoint_url": url, "region": region,
            "bucket": bucket, "log": str(log), **keys}


def _bootstrap_s3(url: str, region: str, bucket: str) -> dict[str, str]:
    import boto3

    anon = secrets.token_hex(8)
    iam = boto3.client("iam", endpoint_url=url, region_name=region,
                       aws_access_key_id=anon, aws_secret_access_key=anon)
    iam.create_user(UserName="c2disr")
    policy = {"Version": "2012-10-17",
              "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    iam.put_user_policy(UserName="c2disr", PolicyName="s3-all", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="c2disr")["AccessKey"]
    s3 = boto3.client("s3", endpoint_url=url, region_name=region,
                      aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"])
    s3.create_bucket(Bucket=bucket)
    return {"access_key": key["AccessKeyId"], "secret_key": key["SecretAccessKey"]}


def up(*, root: Path | None = None, host: str = "127.0.0.1", s3: bool = True,
       mlflow_port: int | None = None, s3_port: int | None = None, quiet: bool = False) -> dict[str, Any]:
    """Start the stack, or return the running one's state when every service is healthy."""
    root = root or data_dir()
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    state = read_state(root)
    if state:
        statuses = check(state)
        wanted = {"mlflow"} | ({"s3"} if s3 else set())
        if all(st.healthy for st in statuses if st.name in wanted) and wanted <= {st.name for st in statuses}:
            say(f"stack already up (state in {state_path(root)})")
            return state
        say("stack state found but not every service is healthy: restarting it")
        down(root=root, quiet=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        say(f"warning: binding servers to {host}: they are reachable from other machines")
    state = {"root": str(root), "started_at": time.time(), "host": host}
    try:
        say("starting MLflow tracking server ...")
        state["mlflow"] = start_mlflow(root, host, mlflow_port)
        _write_state(state, root)
        say(f"  MLflow  {state['mlflow']['tracking_uri']}")
        if s3:
            say("starting S3 endpoint (moto) ...")
            state["s3"] = start_s3(root, host, s3_port)
            _write_state(state, root)
            say(f"  S3      {state['s3']['endpoint_url']}  bucket s3://{state['s3']['bucket']}")
    except Exception:
        down(root=root, quiet=True)
        raise
    return state


# --------------------------------------------------------------------------------------
# Inspecting and stopping
# --------------------------------------------------------------------------------------


def check(state: dict[str, Any]) -> list[ServiceStatus]:
    out = []
    if "mlflow" in state:
        m = state["mlflow"]
        running = _alive(m["pid"])
        out.append(ServiceStatus("mlflow", m["tracking_uri"], m["pid"], running,
                                 running and _http_ok(m["tracking_uri"] + "/health"), m["log"]))
    if "s3" in state:
        s = state["s3"]
        running = _alive(s["pid"])
        out.append(ServiceStatus("s3", s["endpoint_url"], s["pid"], running,
                                 running and _http_ok(s["endpoint_url"] + "/moto-api/"), s["log"]))
    return out


def _terminate(pids: list[int], timeout: float = 10.0) -> list[int]:
    """SIGTERM `pids`, wait up to `timeout` (reaping our own children so they do not linger as
    zombies), then SIGKILL what is left and wait again. Returns the pids still alive."""
    left = list(pids)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in left:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while left and time.monotonic() < deadline:
            for pid in left:
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass
            left = [p for p in left if _alive(p)]
            if left:
                time.sleep(0.1)
        if not left:
            break
    return left


def _kill_group(pid: int, timeout: float = 10.0) -> None:
    """Stop a server that failed to start: its whole group when it leads one (see `_spawn`)."""
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return
    _terminate(_group_members(pgid) if pgid == pid else [pid], timeout)


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is `pgid`."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(proc.name))
    return out


# What the processes of each server's group run: the server itself and, for MLflow, the
# uvicorn app, its job runner and huey consumers (all Python processes of the mlflow package).
_GROUP_MARKERS = {"mlflow": ("mlflow", "uvicorn", "huey"), "s3": ("moto",)}


def _ours(pid: int, name: str, root: Path) -> bool:
    cmd = _cmdline(pid)
    return any(m in cmd for m in _GROUP_MARKERS[name]) or str(root) in cmd


def _stop_service(name: str, svc: dict[str, Any], root: Path) -> tuple[str, list[str]]:
    """Stop one server's whole process group, also when its leader has already died (a crashed
    MLflow server leaves uvicorn serving, its job runner and huey consumers behind). Each
    server runs in its own session (`_spawn`), so its group id is the leader's pid. Only
    processes whose command lines are a server's are signalled. Returns (what happened, the
    processes that survived as "pid cmdline")."""
    members = [p for p in _group_members(svc["pid"]) if _ours(p, name, root)]
    if not members:
        return "not running", []
    leader_alive = svc["pid"] in members
    members = _terminate(members)
    survivors = [f"{p} {_cmdline(p)[:120]}" for p in members]
    what = "stopped" if leader_alive else "had crashed; stopped the processes it left behind"
    return what, survivors


def down(*, root: Path | None = None, quiet: bool = False) -> list[str]:
    """Stop the processes `up` started, each server's whole process group (verified by their
    command lines), remove the state, and report any process that survived. Returns the names
    of the services that were stopped."""
    root = root or data_dir()
    state = read_state(root)
    stopped: list[str] = []
    if not state:
        if not quiet:
            print("stack is not up", file=sys.stderr)
        return stopped
    survivors: list[str] = []
    for name in _GROUP_MARKERS:
        svc = state.get(name)
        if not svc:
            continue
        what, left = _stop_service(name, svc, Path(state.get("root") or root))
        survivors += left
        if what == "not running":
            if not quiet:
                print(f"{name} (pid {svc['pid']}) was not running", file=sys.stderr)
            continue
        stopped.append(name)
        if not quiet and what != "stopped":
            print(f"{name} {what}", file=sys.stderr)
    state_path(root).unlink(missing_ok=True)
    if survivors:
        print("warning: these processes survived SIGKILL (stop them by hand):\n  "
              + "\n  ".join(survivors), file=sys.stderr)
    if not quiet:
        print(f"stopped: {', '.join(stopped) or 'nothing'}", file=sys.stderr)
    return stopped


# --------------------------------------------------------------------------------------
# For jobs
# --------------------------------------------------------------------------------------


def ensure_stack(*, s3: bool = False, quiet: bool = False) -> dict[str, Any]:
    """The running local stack, started when needed (jobs call this when no cluster is named)."""
    return up(s3=s3, quiet=quiet)


def tracking_uri(explicit: str = "") -> str:
    """MLflow URI: explicit > $MLFLOW_TRACKING_URI > the local stack (started if needed)."""
    if explicit:
        return explicit
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return ensure_stack()["mlflow"]["tracking_uri"]


def masked(secret: str) -> str:
    return secret[:4] + "…" if secret else ""


def remove_data(root: Path | None = None) -> None:
    """Delete the data directory (after `down`)."""
    root = root or data_dir()
    if read_state(root):
        raise UserError("the stack is still up: run `c2d stack down` first")
    shutil.rmtree(root, ignore_errors=True)
