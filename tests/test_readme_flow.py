"""The README's flow, as a new user runs it: `c2d pipeline` -> `c2d eval` of `@candidate` ->
`c2d promote` -> `c2d upscale` of `@champion`, with no MLflow or AWS variable exported.

The only setting is C2D_HOME, where the session's stack runs: every command must find the
tracking server through the documented order (--tracking-uri, then $MLFLOW_TRACKING_URI, then the
running local stack), for tracking, registry and artifact calls alike, and none may create a
local MLflow database in the folder it runs in (MLflow's default when no URI reaches it).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from .conftest import link_images

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
# Its own registered name (no other test registers SRFormer-L), so the promotion below is
# decided by this test's model alone.
NAME = "c2disr-srformer_l-c2d-x2"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "AWS_")) and k != "C2D_S3_ENDPOINT_URL"}
    env["PYTHONUNBUFFERED"] = "1"
    return env  # C2D_HOME (the session's, set in conftest) is kept


def _c2d(cwd: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "srplatform", *args], cwd=cwd, env=_env(),
                         capture_output=True, text=True, timeout=timeout)
    text = out.stdout + out.stderr
    # Signs that a call reached MLflow's default local store instead of the server.
    assert "Creating initial MLflow database" not in text, text[-3000:]
    assert not (cwd / "mlflow.db").exists() and not (cwd / "mlruns").exists(), text[-3000:]
    return out


def test_pipeline_eval_promote_upscale_with_nothing_exported(stack, tmp_path, shared_data):
    assert os.environ.get("C2D_HOME") and stack["mlflow"]["tracking_uri"]
    src = link_images(shared_data / "T91", tmp_path / "t16", count=16, min_side=64)
    bench = tmp_path / "bench"
    bench.mkdir()
    for name in ("baby.png", "bird.png", "butterfly.png"):
        with Image.open(shared_data / "Set5" / name) as im:
            im.convert("RGB").crop((64, 64, 160, 160)).save(bench / name)
    work = tmp_path / "work"  # where the user runs the commands
    work.mkdir()

    out = _c2d(work, "pipeline", "--config", str(REPO / "jobs/configs/tiny.yaml"),
               "--set", "name=readme-flow", "--set", "model.arch=srformer_l",
               "--set", f"data.source={src}", "--set", f"data.val={shared_data / 'Set5'}",
               "--set", "data.val_max_images=1", "--set", "data.patch=16",
               "--set", "pretrain.steps=40", "--set", "finetune.steps=10",
               "--set", "finetune.scales=[2]", "--set", "run.val_every=40",
               "--set", "run.checkpoint_every=20")
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert NAME in out.stdout  # the summary names the registered model and its version

    out = _c2d(work, "eval", "--model", f"models:/{NAME}@candidate", "--data", str(bench),
               "--scales", "2", "--quiet")
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "bench" in out.stdout and "not found" not in out.stderr
    assert "logged to MLflow run" in out.stderr  # tracking also found the running stack
    # The explicit flag takes the same path.
    out = _c2d(work, "eval", "--model", f"models:/{NAME}@candidate", "--data", str(bench),
               "--scales", "2", "--quiet", "--no-mlflow",
               "--tracking-uri", stack["mlflow"]["tracking_uri"])
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]

    out = _c2d(work, "promote", NAME, "--data", str(bench))
    text = out.stdout + out.stderr
    assert "bicubic" in out.stdout, text[-3000:]
    if out.returncode == 1:  # a few steps of training may not beat bicubic: refused, and why
        assert "does not beat bicubic" in out.stdout, text[-3000:]
        out = _c2d(work, "promote", NAME, "--data", str(bench), "--force",
                   "--reason", "README flow test")
        assert "FORCED" in out.stdout, (out.stdout + out.stderr)[-3000:]
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "champion: none -> v" in out.stdout

    src_png, dst_png = bench / "bird.png", work / "bird_x2.png"
    out = _c2d(work, "upscale", "--model", f"models:/{NAME}@champion", str(src_png), str(dst_png))
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    with Image.open(dst_png) as im:
        assert im.size == (192, 192)
