"""`c2d model import`: an official checkpoint becomes a model file the other commands accept."""

from __future__ import annotations

import pytest
import torch

from srplatform.cli import main


def test_import_official_mambairv2(shared_dir, tmp_path, capsys):
    ckpt = shared_dir / "weights" / "mambairv2_lightSR_x2.pth"
    if not ckpt.is_file():
        pytest.skip(f"official checkpoint not found at {ckpt}")
    out = tmp_path / "mamba_x2.pt"
    assert main(["model", "import", "--arch", "mambairv2_l", "--scale", "2", str(ckpt), str(out)]) == 0
    assert "774,092 parameters" in capsys.readouterr().out
    from c2disr.evaluate import load_model

    model = load_model(out)
    official = torch.load(ckpt, map_location="cpu", weights_only=True)["params"]
    assert torch.equal(model.state_dict()["head.upsample.0.weight"], official["upsample.0.weight"])


def test_import_mismatch_is_a_clear_error(shared_dir, tmp_path, capsys):
    ckpt = shared_dir / "weights" / "mambairv2_lightSR_x2.pth"
    if not ckpt.is_file():
        pytest.skip(f"official checkpoint not found at {ckpt}")
    rc = main(["model", "import", "--arch", "swinir_l", "--scale", "2", str(ckpt), str(tmp_path / "x.pt")])
    assert rc == 2
    assert "does not match swinir_l" in capsys.readouterr().err
    assert main(["model", "import", "--arch", "swinir_l", "--scale", "2", str(tmp_path / "none.pth"),
                 str(tmp_path / "x.pt")]) == 2
