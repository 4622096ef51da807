"""Inputs that are not a multiple of the window: the published discrete models must give the
official outputs on every pixel, the last LR row and column included.

The official forwards of SwinIR (`network_swinir.py`), SRFormer (`srformer_arch.py`) and
MambaIRv2-light (`mambairv2light_arch.py`) pad the image at the bottom/right to a multiple of
the window, run the WHOLE network on the padded image (conv_first, body, conv_after_body and the
pixelshuffledirect upsampler) and crop the output to `h*s x w*s` at the very end. So the 3x3
upsampler conv sees the padded features beyond the last real row/column, not zeros.

Oracle: on a window-multiple input the official forward pads and crops nothing, and our model
equals it there (component tests, the MambaIRv2 checkpoint's Set5 score). Hence the official
output for an input `x` of any size is `ours(pad(x))[..., :h*s, :w*s]`, with `pad` the official
padding written out below (reflection for SwinIR/SRFormer; mirror with the edge repeated for
MambaIRv2). The benchmark protocol's border crop (s HR pixels) hides a wrong order; the full
output of `c2d upscale` does not.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from c2disr.models import build_model, fit_discrete_head, load_published, to_discrete

SHARED = Path(os.environ.get("C2D_SHARED", Path(__file__).resolve().parents[2] / "shared"))
CHECKPOINT = SHARED / "weights" / "mambairv2_lightSR_x2.pth"

# official light windows: SwinIR-S 8, SRFormer-light 16, MambaIRv2-light 16
WINDOW = {"swinir_l": 8, "srformer_l": 16, "mambairv2_l": 16}
ARCHS = sorted(WINDOW)
H, W = 45, 37  # a multiple of neither 8 nor 16


def official_pad(arch: str, x: torch.Tensor, window: int) -> torch.Tensor:
    """The padding of the official forward, bottom/right to a multiple of `window`."""
    h, w = x.shape[-2:]
    hp, wp = -(-h // window) * window, -(-w // window) * window
    if arch == "mambairv2_l":
        # concatenate the flipped image and cut (rows h-1, h-1, h-2, ... follow row h-1)
        x = torch.cat([x, torch.flip(x, [2])], 2)[:, :, :hp, :]
        return torch.cat([x, torch.flip(x, [3])], 3)[:, :, :, :wp]
    # check_image_size: F.pad(..., 'reflect') (rows h-2, h-3, ... follow row h-1)
    return F.pad(x, (0, wp - w, 0, hp - h), mode="reflect")


def official_output(model, arch: str, lr: torch.Tensor) -> torch.Tensor:
    """Pad -> the network on the padded image (no padding inside) -> crop, as the official code."""
    h, w = lr.shape[-2:]
    s = model.scale
    padded = official_pad(arch, lr, WINDOW[arch])
    assert padded.shape[-2] % WINDOW[arch] == 0 and padded.shape[-1] % WINDOW[arch] == 0
    return model(padded)[..., : h * s, : w * s]


def _light(arch: str, scale: int, **kw):
    torch.manual_seed(0)
    model = build_model(arch, scale=scale, **kw).double().eval()
    assert model.backbone.cfg.window == WINDOW[arch]
    return model


@pytest.mark.parametrize("scale", [2, 4])
@pytest.mark.parametrize("arch", ARCHS)
def test_non_multiple_size_equals_official_pad_run_crop(arch, scale):
    model = _light(arch, scale)
    torch.manual_seed(1)
    lr = torch.rand(1, 3, H, W, dtype=torch.float64)
    with torch.no_grad():
        ours = model(lr)
        want = official_output(model, arch, lr)
    assert ours.shape == want.shape == (1, 3, H * scale, W * scale)
    diff = (ours - want).abs()
    # the last LR row/column (the last `scale` HR rows/cols) is where the two orders differ
    assert float(diff.max()) < 1e-10, (float(diff.max()), float((diff > 1e-10).double().mean()))


def test_official_mambairv2_checkpoint_on_a_non_multiple_size():
    if not CHECKPOINT.is_file():
        pytest.skip(f"official MambaIRv2-light x2 checkpoint not found at {CHECKPOINT} (set C2D_SHARED)")
    model = load_published(build_model("mambairv2_l", scale=2), CHECKPOINT).eval()
    torch.manual_seed(2)
    lr = torch.rand(1, 3, H, W)
    with torch.no_grad():
        ours = model(lr)
        want = official_output(model, "mambairv2_l", lr)
    assert float((ours - want).abs().max()) < 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_bilinear_residual_and_continuous_head_on_a_non_multiple_size(arch):
    """`residual="bilinear"`: the same head term as the published form (head on the padded
    features, cropped), plus the bilinear upsampling of the UN-padded input. The continuous
    head queries the features cropped to the image (its coordinates are relative to it)."""
    torch.manual_seed(0)
    plain = build_model(arch, flavor="tiny", scale=3).double().eval()
    bil = to_discrete(plain, 3, residual="bilinear").eval()
    bil.head.load_state_dict(plain.head.state_dict())
    lr = torch.rand(1, 3, 13, 11, dtype=torch.float64)
    with torch.no_grad():
        up = F.interpolate(lr, scale_factor=3, mode="bilinear", align_corners=False)
        torch.testing.assert_close(bil(lr) - up, plain(lr) - plain.rgb_mean.double(), atol=1e-12, rtol=0)
        full = plain.features(lr, crop=False)
        assert full.shape[-2] >= 13 and full.shape[-1] >= 11
        torch.testing.assert_close(plain.features(lr), full[..., :13, :11], atol=0, rtol=0)
    cont = build_model(arch, flavor="tiny", head="continuous").double().eval()
    with torch.no_grad():
        fmap = cont.head.encode(cont.features(lr))
        assert fmap.shape[-2:] == (13, 11)
        out = cont(lr, out_size=(26, 22))
    assert out.shape == (1, 3, 26, 22) and torch.isfinite(out).all()


def test_head_fit_on_a_non_multiple_size_is_exact():
    """The closed-form head fit sees the features the head sees (padded grid, cropped after)."""
    torch.manual_seed(0)
    teacher = build_model("swinir_l", flavor="tiny", scale=2).double().eval()
    with torch.no_grad():
        for p in teacher.head.parameters():
            p.normal_(0, 0.05)
        lr = torch.rand(2, 3, 13, 11, dtype=torch.float64)
        hr = teacher(lr)
    student = build_model("swinir_l", flavor="tiny", scale=2).double().eval()
    student.backbone.load_state_dict(teacher.backbone.state_dict())
    err = fit_discrete_head(student, lr, hr, ridge=1e-12)
    assert err < 1e-7
