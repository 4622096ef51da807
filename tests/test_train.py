"""Integration tests of Ray Train runs: real Ray (local, and a two-node cluster on this
machine), the real MLflow server and S3 endpoint of the embedded stack, tiny models on CPU.

- a pipeline (continuous pretraining, then x2/x3 fine-tuning fanned out) tracked in MLflow;
- a training worker killed mid-run resumes from its last checkpoint (S3 storage);
- the driver killed mid-run, the same command re-run: the step count continues;
- a two-node cluster run, with the tracking server unreachable.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from srplatform.config import load_config

pytestmark = [pytest.mark.integration]
slow = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "jobs" / "configs" / "tiny.yaml"
# Small and fast: 16 training images, 2 workers x batch 4, small patches, quick validation.
BASE = [
    "model.flavor=tiny", "data.patch=16", "data.batch_size=4", "data.scale_max=4.0",
    "data.val_max_images=2", "resources.num_workers=2", "resources.cpus_per_worker=0.25",
    "resources.max_failures=2", "run.log_every=2", "pretrain.warmup_steps=2",
]


@pytest.fixture(scope="module")
def train_shards(tmp_path_factory, shared_data):
    """16 T91 images (all at least 64 px, the largest HR patch here) packed once."""
    from srplatform.data.pack import pack

    from .conftest import link_images

    src = link_images(shared_data / "T91", tmp_path_factory.mktemp("t91"), count=16, min_side=64)
    dest = tmp_path_factory.mktemp("shards") / "t16"
    pack(str(src), dest.as_uri(), min_size=64, progress=False)
    return dest.as_uri()


@pytest.fixture(scope="module")
def val_folder(shared_data):
    return str(shared_data / "Set5")


def _cfg(name, shards, val, extra=()):
    return load_config(TINY, [*BASE, f"name={name}", f"data.train={shards}", f"data.val={val}", *extra])


@pytest.fixture(scope="module")
def ray_local():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    from srplatform.data.pipeline import RAY_SYSTEM_CONFIG

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level="WARNING", _system_config=RAY_SYSTEM_CONFIG)
    yield
    ray.shutdown()


# ----------------------------------------------------------------------------- driver restart


def _wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _session_pids(sid: int) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if os.getsid(int(p.name)) == sid:
                    out.append(int(p.name))
            except (ProcessLookupError, PermissionError):
                pass
    return out


@slow
def test_driver_killed_then_rerun_continues_the_step_count(tmp_path, train_shards, mlflow_uri):
    """`c2d pretrain` is killed (driver, its local Ray and workers) after its first checkpoint;
    the same command again resumes there: the step count continues, the MLflow run too."""
    from mlflow import MlflowClient

    name = "restart"
    out_json = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "srplatform.cli", "pretrain", "--config", str(TINY), "--name", name,
           "--json", str(out_json)]
    for item in [*BASE, f"data.train={train_shards}", "data.val=", "pretrain.steps=24",
                 "run.checkpoint_every=6", f"tracking.uri={mlflow_uri}"]:
        cmd += ["--set", item]
    env = dict(os.environ)
    log1 = open(tmp_path / "first.log", "wb")
    first = subprocess.Popen(cmd, stdout=log1, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
                             start_new_session=True)
    run_dir = Path(os.environ["C2D_HOME"]) / "runs" / name / "pretrain"
    try:
        # "saved" is printed once Ray Train committed the checkpoint, i.e. it is complete on
        # storage (a kill while its files are still being copied may leave nothing to resume;
        # tests/test_train_unit.py covers the torn and the uncommitted cases).
        log_path = tmp_path / "first.log"
        _wait_for(lambda: re.search(r"checkpoint checkpoint_\d+ saved", log_path.read_text(errors="replace"))
                  or first.poll() is not None, 300, "the first checkpoint")
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        # Ray's processes die with their driver; make sure nothing of that session lingers.
        deadline = time.monotonic() + 30
        while _session_pids(first.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in _session_pids(first.pid):
            os.kill(pid, signal.SIGKILL)
        log1.close()
    saved = sorted(int(json.loads(p.read_text())["step"]) for p in run_dir.glob("checkpoint_*/meta.json"))
    assert saved and saved[-1] < 24, saved
    assert not out_json.exists()

    second = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    text = second.stdout + second.stderr
    assert second.returncode == 0, text[-4000:]
    result = json.loads(out_json.read_text())
    assert result["steps"] == 24
    assert result["resumed_from"] and result["resumed_from"][0] >= saved[-1] > 0
    assert f"resuming at step {result['resumed_from'][0]}/24" in text
    # One MLflow run across both drivers: its loss history spans the restart.
    client = MlflowClient(mlflow_uri)
    history = sorted({m.step for m in client.get_metric_history(result["mlflow_run_id"], "loss")})
    assert history[0] <= saved[-1] and history[-1] == 24
    assert client.get_run(result["mlflow_run_id"]).info.status == "FINISHED"


# ----------------------------------------------------------------------------- pipeline


@slow
def test_pipeline_tracks_parent_children_metrics_and_artifacts(ray_local, tmp_path, train_shards, val_folder,
                                                              mlflow_uri):
    from mlflow import MlflowClient

    from srplatform.train.api import run_pipeline

    cfg = _cfg("pipe", train_shards, val_folder, [
        "pretrain.steps=24", "pretrain.lr=1e-3", "finetune.steps=6", "finetune.scales=[2, 3]",
        "run.checkpoint_every=12", "run.val_every=24", "data.val_max_images=1",
        f"tracking.uri={mlflow_uri}"])
    result = run_pipeline(cfg)
    assert result.ok, result.to_dict()
    assert result.pretrain.steps == 24 and sorted(result.finetune) == [2, 3]
    assert all(r.steps == 6 for r in result.finetune.values())
    for s, r in result.finetune.items():
        assert Path(r.model_path).is_file() and f"finetune-x{s}" in r.checkpoint_uri
        assert r.metrics[f"val_x{s}_psnr"] > 0
        assert r.registered_model.startswith(f"c2disr-swinir_l-c2d-x{s}:"), r.registered_model

    client = MlflowClient(mlflow_uri)
    parent = client.get_run(result.mlflow_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["c2d.kind"] == "pipeline"
    assert parent.data.params["pretrain.steps"] == "24"
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_name = {c.info.run_name: c for c in children}
    assert set(by_name) == {"pipe/pretrain", "pipe/x2", "pipe/x3"}

    pre = by_name["pipe/pretrain"]
    assert pre.info.run_id == result.pretrain.mlflow_run_id
    for key in ("loss", "lr", "images_per_s", "data_wait_frac", "val_x2_psnr", "val_x4_ssim",
                "val_x3_psnr_ema"):
        assert key in pre.data.metrics, key
    ref = json.loads(Path(client.download_artifacts(pre.info.run_id, "data_manifest.json",
                                                    str(tmp_path))).read_text())
    assert ref["manifest_sha256"] == pre.data.params["data.manifest_sha256"]
    assert ref["uri"] == train_shards.rstrip("/") and ref["samples"] == 16
    # Every logged loss is there and finite. (Whether training learns is asserted against
    # bicubic in test_training_learns.py: 24 steps from a head that starts at its bilinear
    # base do not move a noisy, scale-mixed loss by a margin worth asserting.)
    losses = [m.value for m in sorted(client.get_metric_history(pre.info.run_id, "loss"), key=lambda m: m.step)]
    assert len(losses) == 12 and all(math.isfinite(v) for v in losses), losses
    # Bicubic on the same validation images is tracked beside the model, with the gain.
    for s in (2, 3, 4):
        bic = pre.data.metrics[f"val_x{s}_psnr_bicubic"]
        assert 15 < bic < 50
        assert pre.data.metrics[f"val_x{s}_gain_db"] == pytest.approx(pre.data.metrics[f"val_x{s}_psnr"] - bic)
    for s in (2, 3):
        assert f"val_x{s}_psnr_bicubic" in by_name[f"pipe/x{s}"].data.metrics

    def artifacts(run_id, path=""):
        out = []
        for a in client.list_artifacts(run_id, path):
            out += artifacts(run_id, a.path) if a.is_dir else [a.path]
        return out

    pre_files = artifacts(pre.info.run_id)
    assert {"config.yaml", "data_manifest.json", "weights/model.pt", "weights/model_ema.pt"} <= set(pre_files)
    assert any(p.startswith("comparisons/x4") and p.endswith(".png") for p in pre_files)
    for s in (2, 3):
        child = by_name[f"pipe/x{s}"]
        files = artifacts(child.info.run_id)
        assert "weights/model_ema.pt" in files and any(f.startswith("comparisons/x") for f in files)
        # MLflow 3 keeps a logged model as its own entity, linked to the run as an output.
        logged = client.get_run(child.info.run_id).outputs.model_outputs
        assert len(logged) == 1 and client.get_logged_model(logged[0].model_id).name == "model"
        assert child.data.tags["c2d.scale"] == str(s)
        assert f"val_x{s}_psnr" in child.data.metrics and f"val_x{s}_psnr" in parent.data.metrics
    # The logged MLflow model is the fine-tuned discrete model.
    from srplatform.mlmodel import load_sr_model

    model = load_sr_model(f"runs:/{by_name['pipe/x3'].info.run_id}/model", tracking_uri=mlflow_uri)
    assert model.scale == 3 and not model.continuous

    # Re-running the finished pipeline trains nothing and returns the same results.
    again = run_pipeline(cfg)
    assert again.pretrain.skipped and all(r.skipped for r in again.finetune.values())
    assert again.finetune[2].checkpoint_uri == result.finetune[2].checkpoint_uri


# ----------------------------------------------------------------------------- worker failure


@slow
def test_killed_worker_resumes_from_last_checkpoint_on_s3(ray_local, tmp_path, train_shards, stack, s3_server):
    """Rank 0's process is SIGKILLed right after its first checkpoint reached S3; Ray Train
    restarts the worker group from that checkpoint and the run finishes. Every checkpoint
    reported before and after the failure is complete and loadable."""
    from srplatform import storage
    from srplatform.stack import free_port
    from srplatform.train.api import run_stage
    from srplatform.train.loop import load_state

    root = f"s3://{s3_server.bucket}/runs"
    cfg = _cfg("killed", train_shards, "", [
        f"storage={root}", "pretrain.steps=16", "run.checkpoint_every=4", "run.keep_checkpoints=10",
        f"tracking.uri=http://127.0.0.1:{free_port()}"])
    events, state = [], {}

    def on_event(ev):
        events.append(ev)
        if ev["kind"] == "start":
            state.setdefault("pid", ev["pid"])
        if ev["kind"] == "checkpoint" and "killed_after" not in state:
            os.kill(state["pid"], signal.SIGKILL)  # a training worker of this run
            state["killed_after"] = ev["step"]

    result = run_stage(cfg, kind="pretrain", on_event=on_event)
    assert result.ok and result.steps == 16
    assert result.resumed_from and result.resumed_from[0] >= state["killed_after"] >= 4
    starts = [e for e in events if e["kind"] == "start"]
    assert len(starts) == 2 and starts[0]["resumed_from"] is None
    assert starts[1]["resumed_from"] == result.resumed_from[0] and starts[1]["pid"] != state["pid"]
    steps = []
    for e in storage.list_files(storage.join(root, "killed", "pretrain"), allow_empty=True):
        if e.name == "state.pt":
            d = tmp_path / e.uri.rsplit("/", 2)[1]
            d.mkdir()
            (d / "state.pt").write_bytes(storage.read_bytes(e.uri))
            steps.append(int(load_state(d)["step"]))
    assert sorted(steps) == [4, 8, 12, 16]
    assert result.checkpoint_uri.startswith("s3://") and result.checkpoint_uri.endswith("checkpoint_0000016")


@slow
def test_diverged_run_stops_with_a_clear_error_before_checkpointing(ray_local, tmp_path, train_shards):
    """Adam at lr 0.5 makes the loss NaN within a few steps: the run stops on every rank with an
    error that says so and what to change, and no checkpoint of the diverged model is written."""
    import ray.train

    from srplatform.stack import free_port
    from srplatform.train.api import run_stage

    root = tmp_path.as_uri()
    cfg = _cfg("diverge", train_shards, "", [
        f"storage={root}", "pretrain.steps=12", "pretrain.lr=0.5", "run.checkpoint_every=6",
        "resources.max_failures=0", f"tracking.uri=http://127.0.0.1:{free_port()}"])
    with pytest.raises(ray.train.TrainingFailedError, match="training diverged") as info:
        run_stage(cfg, kind="pretrain")
    text = str(info.value)
    assert "pretrain.lr" in text
    at = int(re.search(r"not finite at step (\d+)", text).group(1))
    saved = [int(p.name.split("_")[1]) for p in (tmp_path / "diverge" / "pretrain").glob("checkpoint_*")]
    assert all(s < at for s in saved), (saved, at)


# ----------------------------------------------------------------------------- two nodes


@slow
def test_two_node_cluster_without_tracking_server(train_shards, val_folder, capfd):
    """Workers placed on two Ray nodes (one CPU each, 0.75 CPU per worker); the MLflow server
    is unreachable: training finishes and says tracking was unavailable."""
    import ray
    from ray.cluster_utils import Cluster

    from srplatform.stack import free_port
    from srplatform.train.api import run_stage

    if ray.is_initialized():
        ray.shutdown()
    from srplatform.data.pipeline import RAY_SYSTEM_CONFIG

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False, "_system_config": RAY_SYSTEM_CONFIG})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False, logging_level="WARNING")
        dead = f"http://127.0.0.1:{free_port()}"
        cfg = _cfg("twonode", train_shards, val_folder, [
            "pretrain.steps=8", "run.checkpoint_every=4", "run.val_every=8", "data.val_max_images=1",
            "resources.cpus_per_worker=0.75", f"tracking.uri={dead}"])
        events = []
        t0 = time.monotonic()
        result = run_stage(cfg, kind="pretrain", on_event=events.append)
        assert result.ok and result.steps == 8 and result.mlflow_run_id is None
        start = [e for e in events if e["kind"] == "start"][0]
        assert start["world"] == 2 and start["nodes"] == 2
        assert time.monotonic() - t0 < 400
        err = capfd.readouterr().err
        assert "is unavailable" in err and "training continues" in err
    finally:
        ray.shutdown()
        cluster.shutdown()


# ----------------------------------------------------------------------------- --from


def test_finetune_from_resolves_mlflow_runs(tmp_path, mlflow_uri):
    """`c2d finetune --from` accepts a run id / runs:/RUN_ID (the run's recorded checkpoint, else
    its weights artifact) and runs:/RUN_ID/PATH; no Ray needed."""
    from mlflow import MlflowClient

    from c2disr.evaluate import save_model
    from c2disr.models import build_model
    from srplatform.train.api import resolve_init

    cfg = load_config(TINY, [f"tracking.uri={mlflow_uri}"])
    ckpt = tmp_path / "checkpoint_0000010"
    ckpt.mkdir()
    save_model(ckpt / "model_ema.pt", build_model("swinir_l", variant="c2d", flavor="tiny", head="continuous"))
    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("from-test") or client.get_experiment(client.create_experiment("from-test"))
    with_tag = client.create_run(exp.experiment_id, tags={"c2d.checkpoint_uri": ckpt.as_uri()}).info.run_id
    assert resolve_init(with_tag, cfg) == (ckpt / "model_ema.pt").as_uri()
    assert resolve_init(f"runs:/{with_tag}", cfg) == (ckpt / "model_ema.pt").as_uri()

    plain = client.create_run(exp.experiment_id).info.run_id
    client.log_artifact(plain, str(ckpt / "model_ema.pt"), "weights")
    got = resolve_init(f"runs:/{plain}", cfg)
    assert got.endswith("model_ema.pt") and Path(got.removeprefix("file://")).read_bytes() == \
        (ckpt / "model_ema.pt").read_bytes()
    assert resolve_init(f"runs:/{plain}/weights/model_ema.pt", cfg).endswith("model_ema.pt")
    from srplatform.errors import UserError

    with pytest.raises(UserError, match="cannot"):
        resolve_init("runs:/0123456789abcdef0123456789abcdef", cfg)
