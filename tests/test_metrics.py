"""c2disr.metrics: PSNR/SSIM against values worked out by hand and a plain numpy SSIM."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from c2disr.metrics import psnr, quantize, rgb_to_gray, rgb_to_y, ssim


def _rgb(r, g, b, h=16, w=16):
    return torch.tensor([r, g, b], dtype=torch.float64).view(1, 3, 1, 1).expand(1, 3, h, w)


def test_rgb_to_y_known_values():
    assert rgb_to_y(_rgb(0, 0, 0)).unique().item() == pytest.approx(16 / 255)
    assert rgb_to_y(_rgb(1, 1, 1)).unique().item() == pytest.approx(235 / 255)
    assert rgb_to_y(_rgb(1, 0, 0)).unique().item() == pytest.approx((16 + 65.481) / 255)
    assert rgb_to_y(_rgb(0, 1, 0)).unique().item() == pytest.approx((16 + 128.553) / 255)
    assert rgb_to_y(_rgb(0, 0, 1)).unique().item() == pytest.approx((16 + 24.966) / 255)
    assert rgb_to_y(_rgb(1, 0, 0)).shape == (1, 1, 16, 16)
    with pytest.raises(ValueError, match="RGB"):
        rgb_to_y(torch.zeros(1, 1, 4, 4))


def test_rgb_to_gray_is_full_range_luma():
    assert rgb_to_gray(_rgb(0.4, 0.4, 0.4)).unique().item() == pytest.approx(0.4)
    assert rgb_to_gray(_rgb(1, 0, 0)).unique().item() == pytest.approx(0.299)
    assert rgb_to_gray(_rgb(0, 0, 1)).unique().item() == pytest.approx(0.114)


def test_quantize_rounds_to_uint8_levels_and_clamps():
    x = torch.tensor([-0.2, 0.0, 0.5 / 255, 1.4 / 255, 1.6 / 255, 0.5, 1.0, 1.3])
    q = quantize(x)
    expected = torch.tensor([0, 0, 0, 1, 2, 128, 255, 255]) / 255.0  # 0.5 rounds half to even
    torch.testing.assert_close(q, expected)
    assert q.dtype == x.dtype


def test_psnr_identical_is_inf():
    x = torch.rand(2, 3, 20, 20)
    p = psnr(x, x, crop_border=2)
    assert p.dtype == torch.float64 and p.shape == (2,)
    assert torch.isinf(p).all()


@pytest.mark.parametrize("k", [1, 3, 10])
def test_psnr_uniform_offset_formula(k):
    hr = torch.full((1, 3, 12, 12), 0.5, dtype=torch.float64)
    sr = hr + k / 255
    # RGB: every sample is off by k levels -> MSE = k^2.
    assert psnr(sr, hr, 0, y_channel=False).item() == pytest.approx(20 * math.log10(255 / k))
    # Y: Y moves by k * (65.481 + 128.553 + 24.966) / 255 = k * 219/255 levels.
    assert psnr(sr, hr, 0).item() == pytest.approx(20 * math.log10(255 / (k * 219 / 255)))


def test_psnr_hand_checked_tiny_arrays_and_crop():
    hr = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    sr = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    sr[0, 0, 1, 1] = 2 / 255  # inside the 2x2 centre
    sr[0, 0, 0, 0] = 50 / 255  # on the border, removed by crop_border=1
    # centre MSE = 2^2 / 4 = 1 -> PSNR = 20 log10(255) = 48.1308 dB
    assert psnr(sr, hr, 1, y_channel=False).item() == pytest.approx(48.1308036, abs=1e-6)
    # uncropped: MSE = (4 + 2500) / 16
    assert psnr(sr, hr, 0, y_channel=False).item() == pytest.approx(
        10 * math.log10(255**2 / (2504 / 16))
    )


def test_psnr_gaussian_noise_matches_mse_formula():
    g = torch.Generator().manual_seed(0)
    hr = torch.rand(1, 3, 64, 64, generator=g, dtype=torch.float64)
    noise = torch.randn(1, 3, 64, 64, generator=g, dtype=torch.float64) * 0.02
    sr = hr + noise
    mse = ((noise[..., 4:-4, 4:-4] * 255) ** 2).mean().item()
    assert psnr(sr, hr, 4, y_channel=False).item() == pytest.approx(10 * math.log10(255**2 / mse))


def test_psnr_is_per_image_in_a_batch():
    g = torch.Generator().manual_seed(1)
    hr = torch.rand(3, 3, 24, 24, generator=g)
    sr = (hr + 0.05 * torch.randn(3, 3, 24, 24, generator=g)).clamp(0, 1)
    both = psnr(sr, hr, 3)
    for i in range(3):
        assert both[i].item() == pytest.approx(psnr(sr[i : i + 1], hr[i : i + 1], 3).item())
    assert len(set(both.tolist())) == 3


def _ssim_numpy(a: np.ndarray, b: np.ndarray) -> float:
    """Plain single-channel SSIM on the 0-255 scale, valid positions only, explicit loops."""
    r = np.arange(11) - 5
    g = np.exp(-(r**2) / (2 * 1.5**2))
    g /= g.sum()
    win = np.outer(g, g)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    vals = []
    for i in range(a.shape[0] - 10):
        for j in range(a.shape[1] - 10):
            pa, pb = a[i : i + 11, j : j + 11], b[i : i + 11, j : j + 11]
            ma, mb = (win * pa).sum(), (win * pb).sum()
            va = (win * pa * pa).sum() - ma * ma
            vb = (win * pb * pb).sum() - mb * mb
            cov = (win * pa * pb).sum() - ma * mb
            vals.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_ssim_matches_plain_numpy_reference():
    g = torch.Generator().manual_seed(2)
    hr = torch.rand(1, 3, 20, 23, generator=g, dtype=torch.float64)
    sr = (hr + 0.1 * torch.randn(1, 3, 20, 23, generator=g, dtype=torch.float64)).clamp(0, 1)
    y_sr = rgb_to_y(sr)[0, 0, 2:-2, 2:-2].numpy() * 255
    y_hr = rgb_to_y(hr)[0, 0, 2:-2, 2:-2].numpy() * 255
    assert ssim(sr, hr, 2).item() == pytest.approx(_ssim_numpy(y_sr, y_hr), abs=1e-12)
    per_channel = [_ssim_numpy(sr[0, c].numpy() * 255, hr[0, c].numpy() * 255) for c in range(3)]
    assert ssim(sr, hr, 0, y_channel=False).item() == pytest.approx(np.mean(per_channel), abs=1e-12)


def test_ssim_known_values():
    x = torch.rand(2, 3, 16, 16)
    s = ssim(x, x, 0)
    assert s.dtype == torch.float64 and s.shape == (2,)
    torch.testing.assert_close(s, torch.ones(2, dtype=torch.float64))
    # Two flat images: variances vanish, SSIM = (2 a b + C1) / (a^2 + b^2 + C1) on 0-255 values.
    a, b = 100.0, 120.0
    c1 = (0.01 * 255) ** 2
    hr = torch.full((1, 1, 16, 16), a / 255, dtype=torch.float64)
    sr = torch.full((1, 1, 16, 16), b / 255, dtype=torch.float64)
    assert ssim(sr, hr, 0, y_channel=False).item() == pytest.approx(
        (2 * a * b + c1) / (a * a + b * b + c1), abs=1e-12
    )


def test_bad_input_is_rejected_clearly():
    x = torch.rand(1, 3, 16, 16)
    with pytest.raises(ValueError, match="same"):
        psnr(x, torch.rand(1, 3, 16, 15), 0)
    with pytest.raises(ValueError, match="crop_border"):
        psnr(x, x, 8)
    with pytest.raises(ValueError, match="11x11"):
        ssim(x, x, 3)
    with pytest.raises(TypeError, match="floating"):
        psnr((x * 255).to(torch.uint8), (x * 255).to(torch.uint8), 0)
