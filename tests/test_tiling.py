"""c2disr.tiling: tiled inference equals whole-image inference when the overlap covers the
receptive field, for odd sizes, batches and tiles larger than the image."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from c2disr.ops.resize import imresize
from c2disr.tiling import tile_starts, tiled_forward


class _TinySR(nn.Module):
    """Three 3x3 convs (receptive field radius 3 LR pixels) + pixel shuffle."""

    def __init__(self, scale: int):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.GELU(),
            nn.Conv2d(8, 8, 3, padding=1), nn.GELU(),
            nn.Conv2d(8, 3 * scale * scale, 3, padding=1),
        )
        self.up = nn.PixelShuffle(scale)

    def forward(self, x):
        return self.up(self.body(x))


@pytest.mark.parametrize("scale,hw,tile,overlap,batch", [
    (2, (37, 53), 16, 12, 1),
    (3, (29, 31), 16, 12, 3),
    (4, (20, 41), 20, 12, 2),
])
def test_tiled_equals_whole_image(scale, hw, tile, overlap, batch):
    model = _TinySR(scale).eval()
    lr = torch.rand(2, 3, *hw, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = model(lr)
        tiled = tiled_forward(model, lr, scale, tile=tile, overlap=overlap, batch=batch)
    assert tiled.shape == whole.shape == (2, 3, hw[0] * scale, hw[1] * scale)
    torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-5)


def test_too_small_overlap_shows_seams():
    # The check above can fail: with no overlap the tiles lack context at their inner edges.
    model = _TinySR(2).eval()
    lr = torch.rand(1, 3, 33, 33, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (tiled_forward(model, lr, 2, tile=16, overlap=0) - model(lr)).abs().max()
    assert diff > 1e-3


def test_bicubic_tiled_matches_whole():
    # Bicubic upscaling reads 2 LR pixels either side: overlap 8 suffices.
    lr = torch.rand(1, 3, 45, 38, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    tiled = tiled_forward(lambda t: imresize(t, 3), lr, 3, tile=16, overlap=8)
    torch.testing.assert_close(tiled, imresize(lr, 3), rtol=0, atol=1e-12)


def test_tile_larger_than_image_is_one_call():
    calls = []

    def fn(t):
        calls.append(tuple(t.shape))
        return torch.nn.functional.interpolate(t, scale_factor=2, mode="nearest")

    lr = torch.rand(1, 3, 10, 13)
    out = tiled_forward(fn, lr, 2, tile=64, overlap=8)
    assert calls == [(1, 3, 10, 13)]
    torch.testing.assert_close(out, fn(lr))


def test_weights_cover_every_pixel_and_blend_to_identity():
    # A per-pixel map blended from many overlapping tiles must come back unchanged everywhere
    # (normalised weights, no pixel left with zero weight), for awkward overlaps too.
    lr = torch.rand(1, 1, 50, 23, dtype=torch.float64)
    for tile, overlap in [(8, 6), (10, 3), (7, 1), (16, 15)]:
        out = tiled_forward(lambda t: t.repeat_interleave(2, -1).repeat_interleave(2, -2), lr, 2,
                            tile=tile, overlap=overlap)
        torch.testing.assert_close(out, lr.repeat_interleave(2, -1).repeat_interleave(2, -2))


def test_tile_starts_cover_and_end_at_edge():
    assert tile_starts(10, 16, 4) == [0]
    assert tile_starts(37, 16, 12) == [0, 4, 8, 12, 16, 20, 21]
    for length, tile, ov in [(100, 32, 8), (33, 16, 0), (17, 16, 15)]:
        s = tile_starts(length, tile, ov)
        assert s[0] == 0 and s[-1] + tile == length
        assert all(b - a <= tile - ov for a, b in zip(s, s[1:]))


def test_bad_arguments():
    lr = torch.rand(1, 3, 8, 8)
    with pytest.raises(ValueError, match="overlap"):
        tiled_forward(lambda t: t, lr, 2, tile=8, overlap=8)
    with pytest.raises(ValueError, match="scale"):
        tiled_forward(lambda t: t, lr, 1.5, tile=8, overlap=2)
    with pytest.raises(ValueError, match="expected"):
        tiled_forward(lambda t: t, torch.rand(1, 3, 20, 20), 2, tile=8, overlap=2)
