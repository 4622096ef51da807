"""`c2d submit` / `c2d jobs` and the jobs/ entry points.

Unit tests need no cluster. The integration tests start a real local Ray head (with the
dashboard, which serves the Jobs API) on free ports in a private --temp-dir, submit jobs through
the CLI, follow them, read their logs and status, and stop exactly the processes that head
started.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import runpy
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from srplatform import cli
from srplatform import submit as sub
from srplatform.errors import UserError

ROOT = Path(__file__).resolve().parents[1]

# The job the end-to-end test submits with --follow and expects to SUCCEED. Placeholders:
# "{data}" a folder of two small HR images, "{config}" a copy of jobs/configs/tiny.yaml outside
# the project (staged into the upload). When training lands, switch to:
#   SUCCEEDING_JOB = ["pipeline", "--config", "{config}"]
SUCCEEDING_JOB = ["eval", "--", "--model", "bicubic", "--data", "{data}", "--scales", "2", "--no-mlflow"]


# --------------------------------------------------------------------------------------
# Unit tests
# --------------------------------------------------------------------------------------


def test_address_precedence():
    env = {"RAY_ADDRESS": "http://from-env:8265", "RAY_API_SERVER_ADDRESS": "http://api:8265"}
    assert sub.resolve_address("http://cli:8265", env) == sub.Address("http://cli:8265", "--address")
    assert sub.resolve_address(None, env) == sub.Address("http://from-env:8265", "RAY_ADDRESS")
    assert sub.resolve_address(None, {"RAY_API_SERVER_ADDRESS": "http://api:8265"}).source == "RAY_API_SERVER_ADDRESS"
    # host:8265 is the dashboard; other scheme-less values keep Ray's cluster-address meaning
    assert sub.resolve_address("10.0.0.5:8265", {}).value == "http://10.0.0.5:8265"
    assert sub.resolve_address("10.0.0.5:6379", {}).value == "10.0.0.5:6379"


def test_no_address_says_how_to_get_a_cluster():
    with pytest.raises(UserError) as err:
        sub.resolve_address(None, {})
    msg = str(err.value)
    for hint in ("--address", "RAY_ADDRESS", "ray start --head", "ray up ray-cluster.yaml",
                 "ray dashboard ray-cluster.yaml"):
        assert hint in msg


def test_connect_ignores_env_addresses_when_one_is_given(monkeypatch):
    """Ray's client would let RAY_ADDRESS override the address argument; ours must not."""
    seen = {}

    class FakeClient:
        def __init__(self, address):
            seen["address"] = address
            seen["env"] = os.environ.get("RAY_ADDRESS"), os.environ.get("RAY_API_SERVER_ADDRESS")

    import ray.job_submission

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", FakeClient)
    monkeypatch.setenv("RAY_ADDRESS", "http://wrong:8265")
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://wrong2:8265")
    sub.connect(sub.Address("http://right:8265", "--address"))
    assert seen == {"address": "http://right:8265", "env": (None, None)}
    assert os.environ["RAY_ADDRESS"] == "http://wrong:8265"  # restored


def test_connect_failure_is_a_user_error():
    port = _free_port()  # nothing listens there
    with pytest.raises(UserError, match="cannot reach the Ray Jobs API"):
        sub.connect(f"http://127.0.0.1:{port}")


def test_entrypoint_is_the_cli_call_with_shell_quoting():
    ep = sub.build_entrypoint("pipeline", "dir with space/c.yaml", ["a.b=1", "x=it's"], ["--flag", "$HOME", "--", "z"])
    assert ep.startswith("python -m jobs.pipeline ")
    assert shlex.split(ep) == ["python", "-m", "jobs.pipeline", "--config", "dir with space/c.yaml",
                               "--set", "a.b=1", "--set", "x=it's", "--flag", "$HOME", "--", "z"]
    with pytest.raises(UserError):
        sub.build_entrypoint("rm -rf", None, [], [])


def test_submission_ids():
    sid = sub.make_submission_id("pretrain")
    assert re.fullmatch(r"c2d-pretrain-\d{8}-\d{6}-[0-9a-f]{6}", sid)
    assert sub.make_submission_id("pretrain") != sid
    assert sub.check_submission_id("my-run_1.2") == "my-run_1.2"
    for bad in ("../x", "a/b", "", "-x", "a b"):
        with pytest.raises(UserError):
            sub.check_submission_id(bad)


def test_env_forwarding():
    environ = {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "AWS_SECRET_ACCESS_KEY": "s3cr3t-value",
               "AWS_REGION": "", "UNRELATED": "x", "EXTRA": "e"}
    env = sub.collect_env(["EXTRA", "NEW=v=1"], environ=environ)
    assert env == {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "AWS_SECRET_ACCESS_KEY": "s3cr3t-value",
                   "EXTRA": "e", "NEW": "v=1"}  # empty values are not forwarded
    assert sub.collect_env([], forward_defaults=False, environ=environ) == {}
    with pytest.raises(UserError, match="not set"):
        sub.collect_env(["MISSING"], environ=environ)
    with pytest.raises(UserError, match="not a valid"):
        sub.collect_env(["BAD-NAME=1"], environ=environ)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_PASSWORD",
                 "C2D_S3_ENDPOINT_URL", "MLFLOW_TRACKING_URI", "AWS_REGION"):
        assert name in sub.FORWARDED_ENV


def test_mask_secret_names_and_url_passwords():
    env = {"AWS_SECRET_ACCESS_KEY": "abcd1234secret", "AWS_ACCESS_KEY_ID": "AKIAXYZ123",
           "MLFLOW_TRACKING_URI": "https://bob:pa55word@mlflow.example.com", "AWS_REGION": "us-east-1"}
    values = sub.secret_values(env)
    text = "key abcd1234secret id AKIAXYZ123 uri https://bob:pa55word@mlflow.example.com in us-east-1"
    masked = sub.mask(text, values)
    assert "abcd1234secret" not in masked and "AKIAXYZ123" not in masked and "pa55word" not in masked
    assert "us-east-1" in masked and "bob" in masked


def test_line_masker_catches_a_secret_split_across_chunks():
    out = []
    masker = sub._LineMasker(out.append, ["topsecretvalue"])
    for chunk in ("line one\nhere is tops", "ecretvalue and more\ntail without newline"):
        masker.feed(chunk)
    masker.flush()
    text = "".join(out)
    assert "topsecretvalue" not in text and text.count("****") == 1
    assert text.endswith("tail without newline")


def _fake_root(tmp_path: Path) -> Path:
    """A minimal project tree with this project's real .gitignore."""
    root = tmp_path / "proj"
    for d in ("jobs/configs", "srplatform", ".c2d", ".venv/lib", "docs"):
        (root / d).mkdir(parents=True)
    (root / "pyproject.toml").write_text('[project]\nname = "c2disr"\n')
    shutil.copy(ROOT / ".gitignore", root / ".gitignore")
    for f in ("jobs/configs/a.yaml", ".c2d/b.yaml", ".venv/lib/c.yaml", "docs/d.yaml"):
        (root / f).write_text("name: x\n")
    return root


def test_which_configs_travel_with_the_upload(tmp_path):
    root = _fake_root(tmp_path)
    assert sub.uploaded_relpath(root, root / "jobs/configs/a.yaml") == "jobs/configs/a.yaml"
    assert sub.uploaded_relpath(root, root / "docs/d.yaml") == "docs/d.yaml"
    assert sub.uploaded_relpath(root, root / ".c2d/b.yaml") is None  # excluded
    assert sub.uploaded_relpath(root, root / ".venv/lib/c.yaml") is None  # excluded
    (root / "docs/.rayignore").write_text("d.yaml\n")
    assert sub.uploaded_relpath(root, root / "docs/d.yaml") is None  # a nested ignore file
    assert sub.uploaded_relpath(root, tmp_path / "elsewhere.yaml") is None  # outside
    # the staging directory itself must travel, or staged configs would never arrive
    assert sub.uploaded_relpath(root, root / sub.STAGING_DIR / "id" / "c.yaml") is not None


def test_plan_uses_relative_configs_and_stages_outside_ones(tmp_path):
    root = _fake_root(tmp_path)
    addr = sub.Address("http://127.0.0.1:8265", "--address")
    inside = sub.plan_submission("pretrain", address=addr, config=str(root / "jobs/configs/a.yaml"),
                                 root=root, environ={})
    assert not inside.config.staged
    assert shlex.split(inside.entrypoint)[3:5] == ["--config", "jobs/configs/a.yaml"]
    outside_file = tmp_path / "my config.yaml"
    outside_file.write_text("name: outside\n")
    plan = sub.plan_submission("pretrain", address=addr, config=str(outside_file), root=root,
                               environ={}, submission_id="run-1", num_gpus=1, num_cpus=2)
    assert plan.config.staged and plan.config.rel == f"{sub.STAGING_DIR}/run-1/my config.yaml"
    assert shlex.split(plan.entrypoint)[4] == plan.config.rel
    assert plan.runtime_env["working_dir"] == str(root.resolve())
    assert ".venv" in plan.runtime_env["excludes"] and ".git" in plan.runtime_env["excludes"]
    assert plan.metadata["c2d.job"] == "pretrain" and plan.metadata["c2d.config"] == str(outside_file)
    assert {"c2d.user", "c2d.git_commit", "c2d.version"} <= plan.metadata.keys()
    assert all(isinstance(v, str) for v in plan.metadata.values())
    with pytest.raises(UserError, match="no such file"):
        sub.plan_submission("pretrain", address=addr, config=str(tmp_path / "nope.yaml"), root=root)

    # staging: the copy exists exactly while the upload runs, then nothing is left behind
    seen = {}

    class FakeClient:
        def submit_job(self, **kw):
            staged = root / plan.config.rel
            seen["content"] = staged.read_text()
            seen["kw"] = kw
            return kw["submission_id"]

    assert sub.submit(FakeClient(), plan) == "run-1"
    assert seen["content"] == "name: outside\n"
    assert seen["kw"]["entrypoint_num_gpus"] == 1 and seen["kw"]["entrypoint_num_cpus"] == 2
    assert not (root / sub.STAGING_DIR).exists()


def test_submit_failure_is_masked_user_error(tmp_path):
    root = _fake_root(tmp_path)
    plan = sub.plan_submission("eval", address=sub.Address("http://h:8265", "--address"), root=root,
                               environ={"AWS_SECRET_ACCESS_KEY": "leaky-secret-123"})

    class FailingClient:
        def submit_job(self, **kw):
            raise RuntimeError(f"server said no to {kw['runtime_env']}")

    with pytest.raises(UserError) as err:
        sub.submit(FailingClient(), plan)
    assert "leaky-secret-123" not in str(err.value) and "****" in str(err.value)


def test_cli_dry_run_never_prints_secret_values(monkeypatch, capsys, tmp_path):
    secret = "c2d-" + secrets.token_hex(12)
    key_id = "AKIA" + secrets.token_hex(8).upper()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("MY_API_TOKEN", secret + "x")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://u:{secret}@127.0.0.1:5000")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config = tmp_path / "c.yaml"
    shutil.copy(ROOT / "jobs/configs/tiny.yaml", config)
    rc = cli.main(["submit", "pipeline", "--config", str(config), "--set", "pretrain.steps=10",
                   "--env", "MY_API_TOKEN", "--gpus", "1", "--dry-run", "--", "--extra", "--", "x"])
    out, err = capsys.readouterr()
    assert rc == 0
    for value in (secret, key_id):
        assert value not in out + err
    assert "AWS_ACCESS_KEY_ID" in out and "AWS_SECRET_ACCESS_KEY" in out and "MY_API_TOKEN" in out
    entry = next(l for l in out.splitlines() if l.startswith("entrypoint:"))
    argv = shlex.split(entry.split(":", 1)[1])
    assert argv[:3] == ["python", "-m", "jobs.pipeline"]
    assert argv[-5:] == ["--set", "pretrain.steps=10", "--extra", "--", "x"]
    assert "loopback" in out  # the MLflow URI would not be reachable from a remote cluster


def test_cli_checks_the_config_before_submitting(capsys):
    rc = cli.main(["submit", "pipeline", "--config", "jobs/configs/tiny.yaml", "--set",
                   "pretrain.stepz=5", "--address", "http://127.0.0.1:9", "--dry-run"])
    assert rc == 2
    assert "pretrain.stepz" in capsys.readouterr().err


def test_cli_requires_an_address(capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    assert cli.main(["jobs", "list"]) == 2
    assert "ray start --head" in capsys.readouterr().err


class _FakeTailClient:
    """Log chunks over two connections: the first drops after two chunks (as a websocket can),
    the second replays from the start, as Ray's server does."""

    def __init__(self, chunks, final="SUCCEEDED"):
        self.chunks, self.final, self.connections = chunks, final, 0

    async def tail_job_logs(self, sid):
        self.connections += 1
        first = self.connections == 1
        for i, chunk in enumerate(self.chunks):
            if first and i == 2:
                raise RuntimeError("WebSocket connection closed unexpectedly")
            yield chunk

    def get_job_status(self, sid):
        return "RUNNING" if self.connections < 2 else self.final


def test_follow_reconnects_without_repeating_output():
    client = _FakeTailClient(["a1\n", "a2\n", "a3 s3cretval\n", "a4\n"], final="FAILED")
    out, notes = [], []
    status = sub.follow(client, "id", out.append, secrets=["s3cretval"], poll_s=0.01, note=notes.append)
    assert status == "FAILED" and client.connections == 2
    assert "".join(out) == "a1\na2\na3 ****\na4\n"
    assert notes and "reconnecting" in notes[0]
    assert sub.exit_code_for("FAILED") == 1 and sub.exit_code_for("STOPPED") == 1
    assert sub.exit_code_for("SUCCEEDED") == 0


@pytest.mark.parametrize("job", [j for j in sub.JOBS if j != "selfcheck"])
def test_job_entry_points_are_the_cli(job, monkeypatch, capsys):
    """`python -m jobs.<job> ARGS` behaves exactly as `c2d <job> ARGS`."""
    with pytest.raises(SystemExit) as exc:
        cli.main([job, "--help"])
    expected = (exc.value.code, capsys.readouterr())
    monkeypatch.setattr(sys, "argv", [f"jobs/{job}.py", "--help"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_module(f"jobs.{job}", run_name="__main__")
    assert (exc.value.code, capsys.readouterr()) == expected
    assert expected[1].out.startswith(f"usage: c2d {job}")


def test_selfcheck_reports_and_fails_on_unmet_expectations(tmp_path, capsys, monkeypatch):
    config = tmp_path / "c.yaml"
    config.write_text("name: x\n")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "value-not-to-print")
    monkeypatch.delenv("C2D_NEVER_SET_VAR", raising=False)
    rc = sub.selfcheck_main(["--no-ray", "--config", str(config), "--expect-env", "AWS_SECRET_ACCESS_KEY"])
    out = capsys.readouterr().out
    assert rc == 0 and "[selfcheck] OK" in out
    assert hashlib.sha256(config.read_bytes()).hexdigest() in out
    assert "env AWS_SECRET_ACCESS_KEY: set" in out and "value-not-to-print" not in out
    rc = sub.selfcheck_main(["--no-ray", "--expect-env", "C2D_NEVER_SET_VAR", "--expect-gpus", "99"])
    err = capsys.readouterr().err
    assert rc == 1 and "C2D_NEVER_SET_VAR is not set" in err and "expected at least 99 GPU" in err


# --------------------------------------------------------------------------------------
# Integration: a real local Ray head
# --------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, session id), from /proc."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                fields = stat[stat.rindex(")") + 2 :].split()
                out[int(entry)] = (int(fields[1]), int(fields[3]))
    return out


def _stop_session(session: int, grace_s: float = 3.0) -> None:
    """Stop the processes of one `ray start` (started as its own session leader) and their
    descendants, such as job entrypoints that Ray starts in sessions of their own. Never
    touches another Ray instance: `ray stop` would stop every Ray on the machine."""
    procs = _processes()
    mine = {pid for pid, (_, sid) in procs.items() if sid == session}
    grown = True
    while grown:
        children = {pid for pid, (ppid, _) in procs.items() if ppid in mine} - mine
        mine |= children
        grown = bool(children)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in mine:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() and _alive(p) for p in mine):
            time.sleep(0.2)


def _alive(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return False


class Head:
    """A running test head: its Jobs API address and the auth settings clients need."""

    def __init__(self, address: str, token: str):
        self.address = address
        self.token = token
        self.auth_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}

    def client(self):
        """An in-process client that sends the token explicitly: this process's own Ray
        auth settings (global, shared with other tests) are left alone."""
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.address, headers={"Authorization": f"Bearer {self.token}"})


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head with the dashboard (Jobs API) on free ports, its own temp dir and token
    authentication with a token of its own (so ~/.ray/auth_token, which Ray 2.60 would pick up
    otherwise, does not matter)."""
    # Short path: Ray's Unix socket paths under the temp dir must fit in 107 characters.
    temp_dir = Path(tempfile.mkdtemp(prefix="c2dsub", dir="/tmp"))
    ports = set()
    while len(ports) < 7:
        ports.add(_free_port())
    gcs, dash, client_port, agent, agent_grpc, runtime_env, metrics = sorted(ports)
    head = Head(f"http://127.0.0.1:{dash}", secrets.token_hex(32))
    bindir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(PATH=f"{bindir}:{env.get('PATH', '/usr/bin:/bin')}", RAY_USAGE_STATS_ENABLED="0",
               **head.auth_env)
    cmd = [str(bindir / "ray"), "start", "--head", f"--port={gcs}", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dash}", f"--ray-client-server-port={client_port}",
           f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
           "--num-cpus=2", "--num-gpus=0", "--include-dashboard=true", f"--temp-dir={temp_dir}",
           "--disable-usage-stats"]
    proc = subprocess.Popen(cmd, cwd=temp_dir, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=180)
        if proc.returncode != 0:
            pytest.fail(f"ray start failed:\n{out.decode(errors='replace')[-3000:]}")
        deadline = time.monotonic() + 90
        while True:  # the dashboard and the job agent come up after `ray start` returns
            try:
                client = head.client()
                warmup = client.submit_job(entrypoint="true")
                while client.get_job_status(warmup) not in sub.TERMINAL:
                    time.sleep(0.3)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        yield head
    finally:
        _stop_session(proc.pid)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _c2d(*args: str, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """The CLI in a fresh process, so everything it writes (Ray's log lines too) is captured."""
    base = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    base.update(env or {})
    return subprocess.run([sys.executable, "-m", "srplatform", *args], cwd=ROOT, env=base,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def secret_env():
    return {"AWS_SECRET_ACCESS_KEY": "c2dtest-" + secrets.token_hex(16),
            "AWS_ACCESS_KEY_ID": "AKIA" + secrets.token_hex(8).upper()}


@pytest.fixture
def outside_config(tmp_path):
    path = tmp_path / "my run.yaml"  # outside the project, with a space: staging and quoting
    shutil.copy(ROOT / "jobs/configs/tiny.yaml", path)
    return path


@pytest.fixture
def hr_folder(tmp_path):
    import numpy as np
    from PIL import Image

    folder = tmp_path / "hr"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray((rng.random((24, 32, 3)) * 255).astype("uint8")).save(folder / f"img{i}.png")
    return folder


def _assert_no_secret(text: str, secret_env: dict) -> None:
    for value in secret_env.values():
        assert value not in text


@pytest.mark.integration
def test_submit_follow_succeeds_and_logs_are_retrievable(ray_head, secret_env, outside_config, hr_folder):
    sid = sub.make_submission_id("test")
    job = [a.replace("{config}", str(outside_config)).replace("{data}", str(hr_folder))
           for a in SUCCEEDING_JOB]
    cut = job.index("--") if "--" in job else len(job)
    res = _c2d("submit", *job[:cut], "--address", ray_head.address, "--submission-id", sid, "--follow",
               *job[cut:], env={**secret_env, **ray_head.auth_env})
    output = res.stdout + res.stderr
    assert res.returncode == 0, output[-4000:]
    assert f"{sid}: SUCCEEDED" in res.stderr
    _assert_no_secret(output, {**secret_env, "token": ray_head.token})
    assert "AWS_SECRET_ACCESS_KEY" in res.stdout  # named as forwarded, value not shown
    assert not (ROOT / sub.STAGING_DIR / sid).exists(), "the staged config is cleaned up"

    client = ray_head.client()
    info = client.get_job_info(sid)
    assert str(info.status.value) == "SUCCEEDED"
    assert info.metadata["c2d.job"] == job[0] and info.metadata["c2d.git_commit"]
    assert info.runtime_env["env_vars"]["AWS_SECRET_ACCESS_KEY"] == secret_env["AWS_SECRET_ACCESS_KEY"]
    assert shlex.split(info.entrypoint)[:3] == ["python", "-m", f"jobs.{job[0]}"]
    if "{config}" in SUCCEEDING_JOB:  # the outside config went in as a staged relative path
        assert f"{sub.STAGING_DIR}/{sid}/my run.yaml" in shlex.split(info.entrypoint)
    server_logs = client.get_job_logs(sid)
    assert server_logs.strip()

    logs = _c2d("jobs", "logs", sid, "--address", ray_head.address, env={**secret_env, **ray_head.auth_env})
    assert logs.returncode == 0
    assert logs.stdout.strip() and logs.stdout.strip().splitlines()[-1] in server_logs
    _assert_no_secret(logs.stdout + logs.stderr, secret_env)

    listing = _c2d("jobs", "list", "--address", ray_head.address, env=ray_head.auth_env)
    row = next(line for line in listing.stdout.splitlines() if line.startswith(sid))
    assert "SUCCEEDED" in row and job[0] in row
    status = _c2d("jobs", "status", sid, "--address", ray_head.address, env=ray_head.auth_env)
    assert status.returncode == 0 and re.search(r"^status:\s+SUCCEEDED$", status.stdout, re.MULTILINE)


@pytest.mark.integration
def test_failing_job_reports_failed_with_its_log_tail(ray_head, secret_env, outside_config):
    """A selfcheck that must fail (a variable that is never set); its logs also show that the
    staged config arrived byte for byte, that the forwarded secret was set (not its value) and
    that the job's driver could join the token-authenticated cluster."""
    res = _c2d("submit", "selfcheck", "--config", str(outside_config), "--address", ray_head.address,
               "--", "--expect-env", "C2D_TEST_NEVER_SET", env={**secret_env, **ray_head.auth_env})
    assert res.returncode == 0, res.stdout + res.stderr
    sid = re.search(r"^submitted (\S+)$", res.stdout, re.MULTILINE).group(1)

    follow = _c2d("jobs", "logs", sid, "--follow", "--address", ray_head.address, env={**secret_env, **ray_head.auth_env})
    assert follow.returncode == 1
    assert f"{sid}: FAILED" in follow.stderr
    digest = hashlib.sha256(outside_config.read_bytes()).hexdigest()
    assert f"sha256={digest}" in follow.stdout
    assert "env AWS_SECRET_ACCESS_KEY: set" in follow.stdout
    assert re.search(r"^\[selfcheck\] ray .* nodes: 1,", follow.stdout, re.MULTILINE), "the driver joined the cluster"

    status = _c2d("jobs", "status", sid, "--address", ray_head.address, env=ray_head.auth_env)
    assert status.returncode == 0
    assert re.search(r"^status:\s+FAILED$", status.stdout, re.MULTILINE)
    tail = status.stdout.split("--- last", 1)[1]
    assert "environment variable C2D_TEST_NEVER_SET is not set" in tail
    _assert_no_secret(res.stdout + res.stderr + follow.stdout + follow.stderr + status.stdout,
                      {**secret_env, "token": ray_head.token})


@pytest.mark.integration
def test_stop_a_running_job(ray_head):
    client = ray_head.client()
    sid = client.submit_job(entrypoint="sleep 300")
    deadline = time.monotonic() + 60
    while sub.status_of(client, sid) == "PENDING" and time.monotonic() < deadline:
        time.sleep(0.3)
    res = _c2d("jobs", "stop", sid, "--wait", "--timeout", "60", "--address", ray_head.address,
               env=ray_head.auth_env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{sid}: STOPPED" in res.stdout
    missing = _c2d("jobs", "status", "no-such-job", "--address", ray_head.address, env=ray_head.auth_env)
    assert missing.returncode == 2 and "no job 'no-such-job'" in missing.stderr


@pytest.mark.integration
def test_a_missing_auth_token_is_explained(ray_head):
    res = _c2d("jobs", "list", "--address", ray_head.address,
               env={"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": ""})
    assert res.returncode == 2
    assert "RAY_AUTH_MODE=token" in res.stderr


@pytest.mark.slow
def test_submitted_tiny_pipeline_trains_tracks_and_registers(ray_head, mlflow_uri, shared_data, tmp_path):
    """The issue's end-to-end check: `c2d submit pipeline` to a real local head, followed to
    SUCCEEDED; its MLflow parent and child runs exist and its fine-tuned model is registered."""
    import mlflow
    import yaml

    images = tmp_path / "images"
    images.mkdir()
    for path in sorted((shared_data / "T91").glob("*.png"))[:16]:
        shutil.copy(path, images / path.name)
    name = f"submitted-{secrets.token_hex(3)}"
    cfg = yaml.safe_load((ROOT / "jobs/configs/tiny.yaml").read_text())
    cfg.update(name=name, storage=(tmp_path / "runs").as_uri())
    cfg["data"].update(source=str(images), train=(tmp_path / "shards").as_uri(),
                       val=str(shared_data / "Set5"), val_max_images=1, batch_size=2)
    cfg["pretrain"].update(steps=4, warmup_steps=0)
    cfg["finetune"].update(steps=2, scales=[2])
    cfg["resources"].update(num_workers=1, cpus_per_worker=0.25)
    cfg["run"].update(checkpoint_every=2, val_every=4, log_every=2)
    config = tmp_path / "submitted.yaml"
    config.write_text(yaml.safe_dump(cfg))

    sid = sub.make_submission_id("pipeline")
    res = _c2d("submit", "pipeline", "--config", str(config), "--address", ray_head.address,
               "--submission-id", sid, "--follow",
               env={**ray_head.auth_env, "MLFLOW_TRACKING_URI": mlflow_uri}, timeout=900)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    assert f"{sid}: SUCCEEDED" in res.stderr

    client = mlflow.MlflowClient(tracking_uri=mlflow_uri)
    exp = client.get_experiment_by_name(cfg["tracking"]["experiment"] if "tracking" in cfg else "c2disr")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`c2d.name` = '{name}'")
    parents = [r for r in runs if r.data.tags.get("c2d.kind") == "pipeline"]
    assert len(parents) == 1, [r.data.tags for r in runs]
    children = client.search_runs([exp.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    assert len(children) == 2, "one child for the pretrain stage and one for x2"
    child_ids = {r.info.run_id for r in children}
    versions = client.search_model_versions("name = 'c2disr-swinir_l-c2d-x2'")
    mine = [mv for mv in versions if mv.run_id in child_ids]
    assert len(mine) == 1, "the submitted pipeline's x2 model is a registered version"
    assert mine[0].tags.get("parent_run_id") == parents[0].info.run_id


@pytest.mark.integration
@pytest.mark.slow
def test_submit_serve_deploys_on_the_cluster_and_stopping_the_job_takes_it_down(ray_head, tmp_path):
    """`c2d submit serve`: the job joins the cluster, deploys the app on its Serve, answers
    HTTP there; `c2d jobs stop` ends the job and deletes the app."""
    import io
    import json
    import urllib.error
    import urllib.request

    import numpy as np
    import torch
    from PIL import Image

    from c2disr.evaluate import save_model
    from c2disr.models import build_model

    torch.manual_seed(0)
    model_file = tmp_path / "tiny_x2.pt"
    save_model(model_file, build_model("swinir_l", variant="c2d", flavor="tiny", scale=2).eval())
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    res = _c2d("submit", "serve", "--address", ray_head.address, "--", str(model_file),
               "--port", str(port), "--cpus", "0.25", "--poll", "0", env=ray_head.auth_env)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    sid = re.search(r"^submitted (\S+)$", res.stdout, re.MULTILINE).group(1)
    client = ray_head.client()

    def get(path: str, data: bytes | None = None):
        req = urllib.request.Request(url + path, data=data,
                                     headers={"Content-Type": "image/png"} if data else {})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read()

    try:
        deadline = time.monotonic() + 300
        while True:
            status = client.get_job_status(sid)
            assert status not in sub.TERMINAL, client.get_job_logs(sid)[-3000:]
            with contextlib.suppress(OSError, urllib.error.HTTPError):
                if get("/healthz")[0] == 200:
                    break
            assert time.monotonic() < deadline, "the app did not come up:\n" + client.get_job_logs(sid)[-3000:]
            time.sleep(2)
        info = json.loads(get("/model")[1])
        assert info["scale"] == 2
        buf = io.BytesIO()
        Image.fromarray((np.random.default_rng(0).random((20, 28, 3)) * 255).astype("uint8")).save(buf, "PNG")
        code, body = get("/upscale", buf.getvalue())
        assert code == 200
        with Image.open(io.BytesIO(body)) as im:
            assert im.size == (56, 40)
    finally:
        stop = _c2d("jobs", "stop", sid, "--address", ray_head.address, env=ray_head.auth_env)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    deadline = time.monotonic() + 120
    while client.get_job_status(sid) not in sub.TERMINAL:
        assert time.monotonic() < deadline, "the serve job did not stop"
        time.sleep(1)
    gone = False
    while not gone and time.monotonic() < deadline:
        try:
            get("/healthz")
        except (OSError, urllib.error.HTTPError):
            gone = True
        else:
            time.sleep(1)
    assert gone, "the app still answers after its job was stopped"
