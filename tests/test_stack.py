"""The embedded stack starts real servers; runs and objects written through them read back."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.integration


def test_mlflow_run_round_trip(mlflow_uri, tmp_path):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=mlflow_uri)
    exp = client.create_experiment(f"stack-test-{time.time_ns()}")
    run = client.create_run(exp)
    client.log_param(run.info.run_id, "alpha", "0.5")
    client.log_metric(run.info.run_id, "psnr", 30.25, step=3)
    art = tmp_path / "note.txt"
    art.write_text("artifact body")
    client.log_artifact(run.info.run_id, str(art))
    client.set_terminated(run.info.run_id)
    got = client.get_run(run.info.run_id)
    assert got.data.params["alpha"] == "0.5"
    assert got.data.metrics["psnr"] == pytest.approx(30.25)
    local = client.download_artifacts(run.info.run_id, "note.txt", str(tmp_path / "dl"))
    assert open(local).read() == "artifact body"


def test_s3_object_round_trip_and_auth(s3_server):
    import boto3
    from botocore.exceptions import ClientError

    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint_url, region_name=s3_server.region,
                      aws_access_key_id=s3_server.access_key, aws_secret_access_key=s3_server.secret_key)
    s3.put_object(Bucket=s3_server.bucket, Key="stack-test/hello.bin", Body=b"\x00\x01payload")
    body = s3.get_object(Bucket=s3_server.bucket, Key="stack-test/hello.bin")["Body"].read()
    assert body == b"\x00\x01payload"
    ak, sk = s3_server.bad_credentials()
    bad = boto3.client("s3", endpoint_url=s3_server.endpoint_url, region_name=s3_server.region,
                       aws_access_key_id=ak, aws_secret_access_key=sk)
    with pytest.raises(ClientError):
        bad.get_object(Bucket=s3_server.bucket, Key="stack-test/hello.bin")


def test_state_file_is_private_and_servers_on_loopback(stack):
    from srplatform import stack as stack_mod

    path = stack_mod.state_path()
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert stack["mlflow"]["tracking_uri"].startswith("http://127.0.0.1:")
    assert stack["s3"]["endpoint_url"].startswith("http://127.0.0.1:")


def test_status_does_not_print_secrets(stack):
    out = subprocess.run([sys.executable, "-m", "srplatform", "stack", "status"],
                         capture_output=True, text=True, env=os.environ)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "healthy" in out.stdout
    assert stack["s3"]["secret_key"] not in out.stdout + out.stderr


def test_up_down_leaves_no_process_and_reports_crash(tmp_path):
    """A separate stack in its own home: up, kill one server (crash), status says so, down."""
    from srplatform import stack as stack_mod

    root = tmp_path / "home"
    root.mkdir()
    state = stack_mod.up(root=root, s3=True, quiet=True)
    pids = [state["mlflow"]["pid"], state["s3"]["pid"]]
    try:
        assert all(st.healthy for st in stack_mod.check(state))
        # Idempotent: a second `up` reuses the running servers.
        again = stack_mod.up(root=root, s3=True, quiet=True)
        assert again["mlflow"]["pid"] == pids[0]
        # A crashed server is reported, not ignored.
        os.killpg(os.getpgid(pids[1]), 9)
        deadline = time.time() + 10
        while time.time() < deadline and stack_mod._alive(pids[1]):
            time.sleep(0.1)
        states = {st.name: st.state for st in stack_mod.check(stack_mod.read_state(root))}
        assert states == {"mlflow": "healthy", "s3": "crashed"}
    finally:
        stack_mod.down(root=root, quiet=True)
    assert stack_mod.read_state(root) is None
    for pid in pids:
        assert not stack_mod._alive(pid)
    # No process of the mlflow group is left either (gunicorn/uvicorn workers).
    leftovers = subprocess.run(["pgrep", "-f", str(root)], capture_output=True, text=True).stdout.split()
    assert leftovers == [], f"processes left behind: {leftovers}"


def _group(pgid: int) -> list[int]:
    """Live processes of process group `pgid` (read from /proc, independent of the code under test)."""
    out = []
    for proc in os.listdir("/proc"):
        if proc.isdigit():
            try:
                with open(f"/proc/{proc}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                out.append(int(proc))
    return out


def test_down_after_a_crashed_mlflow_server_stops_what_it_left_behind(tmp_path, capsys):
    """Killing only the MLflow server's main process leaves its uvicorn app serving (and, with
    job execution on, a job runner and huey consumers). `down` must stop the whole group."""
    from srplatform import stack as stack_mod

    root = tmp_path / "home"
    root.mkdir()
    state = stack_mod.up(root=root, s3=False, quiet=True)
    leader = state["mlflow"]["pid"]
    try:
        deadline = time.time() + 20  # the app server is spawned after the leader starts
        while time.time() < deadline and len(_group(leader)) < 2:
            time.sleep(0.2)
        children = [p for p in _group(leader) if p != leader]
        assert children, "expected the MLflow server to run its app in a child process"
        os.kill(leader, 9)
        deadline = time.time() + 10
        while time.time() < deadline and stack_mod._alive(leader):
            time.sleep(0.1)
        assert not stack_mod._alive(leader)
        assert any(stack_mod._alive(p) for p in children), "the crash left nothing behind"
    finally:
        stopped = stack_mod.down(root=root)
    assert stopped == ["mlflow"]
    assert "had crashed" in capsys.readouterr().err
    assert _group(leader) == []
    assert not any(stack_mod._alive(p) for p in children)
