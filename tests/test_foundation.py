"""The project's invariants: layout, import discipline, CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO

TOP_LEVEL = ["c2disr", "srplatform", "jobs", "tests", "benchmarks", "infra"]


def test_no_top_level_package_shadows_stdlib():
    names = [p.name for p in REPO.iterdir() if p.is_dir() and not p.name.startswith(".")]
    names += [p.stem for p in REPO.glob("*.py")]
    shadowing = sorted(n for n in names if n in sys.stdlib_module_names)
    assert not shadowing, f"top-level names shadow standard-library modules: {shadowing}"


def test_layout_exists():
    for name in TOP_LEVEL + ["pyproject.toml", "ray-cluster.yaml", "README.md", ".ci/run"]:
        assert (REPO / name).exists(), f"{name} is missing from the repository root"


def test_import_c2disr_pulls_no_platform_dependency():
    # A fresh interpreter: what `import c2disr` (and its models) drags in.
    code = (
        "import sys, c2disr, c2disr.ops.resize, c2disr.metrics\n"
        "try:\n    import c2disr.models\nexcept ImportError:\n    pass\n"
        "bad = [m for m in ('ray', 'mlflow', 'boto3', 'pyarrow', 'srplatform') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "", f"import c2disr imported {out.stdout.strip()}"


def test_cli_help_lists_every_subcommand():
    from srplatform.cli import COMMANDS

    out = subprocess.run([sys.executable, "-m", "srplatform", "--help"], capture_output=True, text=True, check=True)
    for name in ["stack", "data", "pretrain", "finetune", "pipeline", "tune", "eval", "promote",
                 "upscale", "submit", "model"]:
        assert name in COMMANDS
        assert f"    {name}" in out.stdout, f"`c2d --help` does not list {name}"


@pytest.mark.parametrize("name", __import__("srplatform.cli", fromlist=["COMMANDS"]).COMMANDS)
def test_every_subcommand_has_help(name):
    out = subprocess.run([sys.executable, "-m", "srplatform", name, "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert len(out.stdout) > 200, f"`c2d {name} --help` says too little"


def test_cli_help_is_fast_and_light():
    code = "import sys; from srplatform.cli import build_parser; build_parser(); print(','.join(m for m in ('ray','mlflow','torch','boto3') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"building the CLI imported {out.stdout.strip()}"
