"""PSNR and SSIM as super-resolution papers report them (the BasicSR convention).

The one PSNR and the one SSIM of the project; everything that reports a quality number calls
these. The convention (see ../shared/data/README.md):

* images are `(B, 3, H, W)` float RGB in [0, 1]; evaluation code rounds the model output to uint8
  levels first (`quantize`), because published numbers are measured on saved 8-bit images;
* `crop_border` pixels are removed from every side (SR papers use crop_border = scale);
* with `y_channel=True` (the default) both images go to the Y channel of BT.601 YCbCr,
  Y = 16 + 65.481 R + 128.553 G + 24.966 B (RGB in [0, 1], Y in [16, 235] on the 0-255 scale),
  kept as float (not rounded), as BasicSR does;
* metrics are computed on the 0-255 scale in float64.

Grayscale originals (Set14's bridge.png) are the exception the published tables make: the MATLAB
scripts behind them measure a single-channel image on its own values, not on Y (which would
compress its range to [16, 235] and raise its PSNR by 20 log10(255/219) = 1.32 dB). Evaluation code
therefore measures such images on `rgb_to_gray` (full-range BT.601 luma, equal to the gray value
for a replicated gray image) with `y_channel=False`; c2disr.evaluate does this.

PSNR = 10 log10(255^2 / MSE) per image (inf for identical images).
SSIM (Wang et al. 2004): 11x11 Gaussian window with sigma 1.5, C1 = (0.01 * 255)^2,
C2 = (0.03 * 255)^2, local statistics only where the window fits in the image ('valid'), mean of
the SSIM map; with several channels the mean over channels.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

__all__ = ["rgb_to_y", "rgb_to_gray", "quantize", "psnr", "ssim"]

# BT.601 luma for RGB in [0, 1], giving Y on the 0-255 scale before the /255.
_Y_WEIGHTS = (65.481, 128.553, 24.966)
_Y_OFFSET = 16.0


def rgb_to_y(x: torch.Tensor) -> torch.Tensor:
    """BT.601 luma: `(B, 3, H, W)` float [0, 1] RGB -> `(B, 1, H, W)` in [16/255, 235/255].

    Not rounded; computed in the input's dtype (use float64 for metrics).
    """
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"rgb_to_y: expected (B, 3, H, W) RGB, got shape {tuple(x.shape)}")
    w = torch.tensor(_Y_WEIGHTS, dtype=x.dtype, device=x.device)
    # einsum contracts the channel axis as a matmul: many times faster than (x * w).sum(1) on CPU
    return (torch.einsum("bchw,c->bhw", x, w).unsqueeze(1) + _Y_OFFSET) / 255.0


def rgb_to_gray(x: torch.Tensor) -> torch.Tensor:
    """Full-range BT.601 luma: `(B, 3, H, W)` float [0, 1] RGB -> `(B, 1, H, W)` in [0, 1].

    L = 0.299 R + 0.587 G + 0.114 B, i.e. (Y - 16/255) * 255/219: the same weights as `rgb_to_y`
    without the studio-range offset, so a gray image replicated to RGB maps back to its values.
    """
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"rgb_to_gray: expected (B, 3, H, W) RGB, got shape {tuple(x.shape)}")
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    # Written around G so that R = G = B gives back exactly G (no float residue): a gray image
    # compared with itself must score inf dB, not 300.
    return g + (_Y_WEIGHTS[0] / 219.0) * (r - g) + (_Y_WEIGHTS[2] / 219.0) * (b - g)


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Clamp to [0, 1] and round to the 256 uint8 levels; stays float in [0, 1].

    What saving a model's output as an 8-bit PNG does (round half to even, as torch.round;
    BasicSR's `.round()` on numpy does the same).
    """
    return torch.round(x.clamp(0.0, 1.0) * 255.0) / 255.0


def _prepare(
    sr: torch.Tensor, hr: torch.Tensor, crop_border: int, y_channel: bool, name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate, crop, convert to Y if asked; returns float64 tensors on the 0-255 scale."""
    for label, t in (("sr", sr), ("hr", hr)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name}: {label} must be a floating torch.Tensor in [0, 1]")
    if sr.dim() == 3:
        sr = sr.unsqueeze(0)
    if hr.dim() == 3:
        hr = hr.unsqueeze(0)
    if sr.dim() != 4 or sr.shape != hr.shape:
        raise ValueError(
            f"{name}: sr and hr must have the same (B, C, H, W) shape, got {tuple(sr.shape)} "
            f"and {tuple(hr.shape)}"
        )
    if crop_border < 0:
        raise ValueError(f"{name}: crop_border must be >= 0, got {crop_border}")
    h, w = sr.shape[-2:]
    if h <= 2 * crop_border or w <= 2 * crop_border:
        raise ValueError(
            f"{name}: crop_border={crop_border} leaves nothing of a {h}x{w} image"
        )
    sr = sr.to(torch.float64)
    hr = hr.to(torch.float64)
    if crop_border:
        sr = sr[..., crop_border:-crop_border, crop_border:-crop_border]
        hr = hr[..., crop_border:-crop_border, crop_border:-crop_border]
    if y_channel:
        if sr.shape[1] != 3:
            raise ValueError(
                f"{name}: y_channel=True needs 3-channel RGB input, got {sr.shape[1]} channels"
            )
        sr, hr = rgb_to_y(sr), rgb_to_y(hr)
    return sr * 255.0, hr * 255.0


def psnr(
    sr: torch.Tensor, hr: torch.Tensor, crop_border: int, y_channel: bool = True
) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, per image.

    Args:
        sr, hr: `(B, 3, H, W)` (or `(3, H, W)`) float RGB in [0, 1], same shape. Not quantized
            here: callers that follow the published convention pass `quantize(sr)`. With
            `y_channel=False` any channel count is accepted (e.g. `(B, 1, H, W)` gray).
        crop_border: pixels removed from each side before measuring (the SR scale, by convention).
        y_channel: measure on BT.601 Y (default) instead of all RGB channels.

    Returns:
        `(B,)` float64 tensor on the inputs' device; `inf` where the images are identical.
    """
    a, b = _prepare(sr, hr, crop_border, y_channel, "psnr")
    mse = (a - b).pow(2).mean(dim=(1, 2, 3))
    return 10.0 * torch.log10((255.0**2) / mse)  # mse == 0 -> inf, as in BasicSR


@functools.lru_cache(maxsize=8)
def _gaussian_1d(size: int, sigma: float, device: str) -> torch.Tensor:
    """Normalised float64 Gaussian taps (OpenCV's getGaussianKernel for sigma > 0), `(size,)`."""
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    g = torch.exp(-(r**2) / (2.0 * sigma**2))
    return (g / g.sum()).to(device)


def _filter_valid(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """2-D Gaussian filter of `(N, 1, H, W)` as two 1-D passes, 'valid' positions only.

    The 11x11 window is the outer product of `g` with itself, so two passes give the same values
    as one 2-D convolution at a fraction of the cost (float64 convolutions are slow on CPU).
    """
    k = g.numel()
    x = F.conv2d(x, g.view(1, 1, k, 1))
    return F.conv2d(x, g.view(1, 1, 1, k))


def ssim(
    sr: torch.Tensor, hr: torch.Tensor, crop_border: int, y_channel: bool = True
) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) as BasicSR computes it, per image.

    Args:
        sr, hr: `(B, 3, H, W)` (or `(3, H, W)`) float RGB in [0, 1], same shape, at least 11x11
            after cropping. With `y_channel=False` any channel count is accepted.
        crop_border: pixels removed from each side first.
        y_channel: measure on BT.601 Y (default); otherwise the mean over the channels.

    Returns:
        `(B,)` float64 tensor; 1.0 for identical images.
    """
    a, b = _prepare(sr, hr, crop_border, y_channel, "ssim")
    size, sigma = 11, 1.5
    if a.shape[-2] < size or a.shape[-1] < size:
        raise ValueError(
            f"ssim: images must be at least {size}x{size} after cropping, got "
            f"{a.shape[-2]}x{a.shape[-1]}"
        )
    c1 = (0.01 * 255.0) ** 2
    c2 = (0.03 * 255.0) ** 2
    bsz, ch, h, w = a.shape
    # Channels are independent: fold them into the batch and filter with one window.
    a = a.reshape(bsz * ch, 1, h, w)
    b = b.reshape(bsz * ch, 1, h, w)
    g = _gaussian_1d(size, sigma, str(a.device))
    # One filtering of the five stacked maps; no padding = 'valid' (BasicSR filters with OpenCV
    # and then drops the 5-pixel border, which is the same thing).
    stats = _filter_valid(torch.cat([a, b, a * a, b * b, a * b], dim=0), g)
    n = bsz * ch
    mu1, mu2, e11, e22, e12 = stats.split(n, dim=0)
    mu1_sq, mu2_sq, mu12 = mu1 * mu1, mu2 * mu2, mu1 * mu2
    sigma1_sq = e11 - mu1_sq
    sigma2_sq = e22 - mu2_sq
    sigma12 = e12 - mu12
    ssim_map = ((2 * mu12 + c1) * (2 * sigma12 + c2)) / (
        (mu1_sq + mu2_sq + c1) * (sigma1_sq + sigma2_sq + c2)
    )
    return ssim_map.reshape(bsz, ch, -1).mean(dim=2).mean(dim=1)

