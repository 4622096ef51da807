"""benchmarks/gpu.py, the one-shot GPU readiness check: its quick CPU mode runs end to end, and it
stays pure PyTorch (the device machine has no Ray, MLflow, boto3 or pyarrow, nor this project
installed)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu.py"
FORBIDDEN = {"ray", "mlflow", "boto3", "pyarrow", "srplatform", "benchmarks"}


def _env() -> dict[str, str]:
    # as on the device machine: the source tree on PYTHONPATH, the project not needed installed
    return dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")


def test_gpu_bench_imports_only_pure_pytorch():
    # Its own imports, read from the source (benchmarks.common pulls in the platform's helpers) ...
    tree = ast.parse(SCRIPT.read_text())
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not roots & FORBIDDEN, f"benchmarks/gpu.py imports {sorted(roots & FORBIDDEN)}"
    # ... and everything loading it drags in, c2disr included.
    code = (
        "import runpy, sys; runpy.run_path(sys.argv[1], run_name='gpu_import_check'); "
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {sorted(FORBIDDEN)!r}))"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(SCRIPT)], env=_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout


@pytest.mark.slow
def test_gpu_bench_quick_cpu(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--out", str(tmp_path)],
        env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"rc {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert (tmp_path / "gpu.md").is_file()
    data = json.loads((tmp_path / "gpu.json").read_text())

    checks = data["correctness"]
    # every arch x variant x scale has the four checks that apply to all models
    assert len({(c["arch"], c["variant"], c["scale"]) for c in checks}) == 3 * 3 * 2
    failed = [c for c in checks if c["passed"] is False]
    assert not failed, failed
    assert sum(c["passed"] is True for c in checks) >= 3 * 3 * 2 * 3
    # n/a only where it is expected: SDPA for models without switchable attention
    assert all(c["check"] == "SDPA vs explicit" for c in checks if c["passed"] is None)
    assert any(c["check"] == "scan reference vs auto" and c["passed"] for c in checks)

    rows = data["throughput"]
    assert rows and all(r.get("images_per_s", 0) > 0 and r["step_ms"] > 0 for r in rows), rows
    assert all(r.get("ms", 0) > 0 for r in data["latency"]), data["latency"]
    assert not data["errors"] and not data["skipped"]

    data_dir = Path(data["meta"]["flags"]["data"])
    training = data["training"]
    if (data_dir / "T91").is_dir() and (data_dir / "Set5").is_dir():
        assert "psnr" in training, training
        for s in (2, 4):
            for kind in ("bicubic", "continuous", "fitted head", "fine-tuned"):
                assert 15 < training["psnr"][f"{kind} x{s}"] < 60, training["psnr"]
        assert training["steps"]["stage 1"] > 0
    else:
        assert "skipped" in training
