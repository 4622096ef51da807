"""c2disr.ops.resize.imresize against a plain float64 re-derivation of MATLAB's bicubic imresize."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from c2disr.ops.resize import imresize


# ----------------------------------------------------------------------------- reference
# Written independently of the module, one output sample at a time, straight from MATLAB's
# documented algorithm (imresize.m: contributions(), cubic(), symmetric padding).
def _ref_kernel(x: float) -> float:
    a = -0.5
    ax = abs(x)
    if ax <= 1:
        return (a + 2) * ax**3 - (a + 3) * ax**2 + 1
    if ax <= 2:
        return a * ax**3 - 5 * a * ax**2 + 8 * a * ax - 4 * a
    return 0.0


def _ref_mirror(k: int, n: int) -> int:
    """1-based index k (any integer) -> 1-based index in [1, n] with symmetric padding."""
    while k < 1 or k > n:
        if k < 1:
            k = 1 - k  # 0 -> 1, -1 -> 2
        if k > n:
            k = 2 * n + 1 - k  # n+1 -> n, n+2 -> n-1
    return k


def _ref_axis(v: np.ndarray, out_len: int, scale: float, antialias: bool) -> np.ndarray:
    """Resize a 1-D float64 signal."""
    n = len(v)
    width = 4.0
    shrink = antialias and scale < 1
    if shrink:
        width = width / scale
    out = np.zeros(out_len)
    for x in range(1, out_len + 1):
        u = x / scale + 0.5 * (1 - 1 / scale)
        left = math.floor(u - width / 2)
        ws, ks = [], []
        for j in range(math.ceil(width) + 2):
            k = left + j
            d = u - k
            ws.append(scale * _ref_kernel(scale * d) if shrink else _ref_kernel(d))
            ks.append(_ref_mirror(k, n))
        total = sum(ws)
        out[x - 1] = sum(w / total * v[k - 1] for w, k in zip(ws, ks))
    return out


def _ref_imresize(img: np.ndarray, out_hw, scale_hw, antialias=True) -> np.ndarray:
    """img (C, H, W) float64. MATLAB order: smaller scale first, rows first on ties."""
    sh, sw = scale_hw
    oh, ow = out_hw

    def rows(a):
        return np.stack(
            [
                np.stack([_ref_axis(a[c, :, j], oh, sh, antialias) for j in range(a.shape[2])], 1)
                for c in range(a.shape[0])
            ]
        )

    def cols(a):
        return np.stack(
            [
                np.stack([_ref_axis(a[c, i, :], ow, sw, antialias) for i in range(a.shape[1])], 0)
                for c in range(a.shape[0])
            ]
        )

    return cols(rows(img)) if sh <= sw else rows(cols(img))


# ----------------------------------------------------------------------------- tests
SCALES = [2, 3, 4, 0.5, 1 / 3, 0.25, 1.7, 3.3, 0.37]


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("path", ["matmul", "gather"])
def test_matches_reference(scale, path):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 13, 17, generator=g, dtype=torch.float64)
    y = imresize(x, scale, path=path)
    oh, ow = math.ceil(13 * scale - 1e-9), math.ceil(17 * scale - 1e-9)
    assert y.shape == (2, oh, ow)
    ref = _ref_imresize(x.numpy(), (oh, ow), (scale, scale))
    np.testing.assert_allclose(y.numpy(), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("antialias", [True, False])
def test_explicit_size_uses_per_axis_scale(antialias):
    x = torch.rand(1, 3, 11, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = imresize(x, size=(5, 20), antialias=antialias)
    assert y.shape == (1, 3, 5, 20)
    ref = _ref_imresize(x[0].numpy(), (5, 20), (5 / 11, 20 / 9), antialias=antialias)
    np.testing.assert_allclose(y[0].numpy(), ref, rtol=0, atol=1e-12)


def test_antialias_only_matters_when_downscaling():
    x = torch.rand(1, 1, 16, 16, dtype=torch.float64)
    assert torch.equal(imresize(x, 2.5), imresize(x, 2.5, antialias=False))
    assert not torch.allclose(imresize(x, 0.5), imresize(x, 0.5, antialias=False))


@pytest.mark.parametrize(
    "hw,scale", [((48, 48), 0.25), ((255, 171), 1 / 3), ((7, 5), 1.7), ((100, 30), 3.3),
                 ((37, 64), 0.37), ((1, 9), 2)]
)
def test_output_shape_is_ceil(hw, scale):
    x = torch.zeros(1, 3, *hw)
    h, w = imresize(x, scale).shape[-2:]
    # Integer products must not be bumped by float noise (255 * (1/3) is 85, not 86).
    exact = [hw[0] * scale, hw[1] * scale]
    assert (h, w) == tuple(round(e) if abs(e - round(e)) < 1e-9 else math.ceil(e) for e in exact)


def test_identity_at_scale_one():
    x = torch.rand(2, 3, 10, 7)
    assert torch.equal(imresize(x, 1), x)
    assert torch.equal(imresize(x, size=(10, 7)), x)
    assert imresize(x, 1).data_ptr() != x.data_ptr()  # a copy, not the caller's tensor


def test_one_axis_identity_other_resized():
    x = torch.rand(1, 1, 10, 8, dtype=torch.float64)
    y = imresize(x, size=(10, 16))
    ref = _ref_imresize(x[0].numpy(), (10, 16), (1.0, 2.0))
    np.testing.assert_allclose(y[0].numpy(), ref, atol=1e-12)


def test_batch_consistency_and_3d_input():
    x = torch.rand(4, 3, 21, 19)
    y = imresize(x, 0.37)
    for i in range(4):
        torch.testing.assert_close(imresize(x[i], 0.37), y[i], rtol=0, atol=1e-6)


def test_constant_image_stays_constant():
    # Rows of weights sum to 1 everywhere, including at the mirrored borders.
    x = torch.full((1, 3, 9, 14), 0.3, dtype=torch.float64)
    for s in (0.25, 0.37, 1.7, 4):
        torch.testing.assert_close(imresize(x, s), torch.full_like(imresize(x, s), 0.3))


def test_dtype_and_device_preserved():
    x = torch.rand(1, 3, 8, 8, dtype=torch.float32)
    assert imresize(x, 2).dtype == torch.float32
    assert imresize(x.double(), 2).dtype == torch.float64


@pytest.mark.parametrize("path", ["matmul", "gather"])
def test_gradient_flows(path):
    x = torch.rand(1, 2, 6, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: imresize(t, 1.7, path=path), (x,))
    assert torch.autograd.gradcheck(lambda t: imresize(t, 0.37, path=path), (x,))


def test_matmul_and_gather_paths_agree_float32():
    x = torch.rand(2, 3, 50, 41)
    for s in (0.25, 1 / 3, 2, 1.7):
        torch.testing.assert_close(
            imresize(x, s, path="matmul"), imresize(x, s, path="gather"), rtol=0, atol=1e-5
        )


def test_round_trip_of_smooth_image_is_close():
    # A smooth image survives /2 then x2 nearly unchanged: catches gross index-mapping errors
    # (a half-pixel shift alone costs far more than this tolerance).
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
    img = (0.5 + 0.4 * torch.sin(3 * xx) * torch.cos(2 * yy))[None, None].double()
    back = imresize(imresize(img, 0.5), 2)
    assert (back - img)[..., 4:-4, 4:-4].abs().max() < 2e-3


def test_bad_input_raises_clear_errors():
    with pytest.raises(TypeError, match="floating"):
        imresize(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="exactly one"):
        imresize(torch.zeros(1, 3, 4, 4), 2, size=(8, 8))
    with pytest.raises(ValueError, match="exactly one"):
        imresize(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="positive"):
        imresize(torch.zeros(1, 3, 4, 4), -2)
    with pytest.raises(ValueError, match="shape"):
        imresize(torch.zeros(4, 4), 2)
