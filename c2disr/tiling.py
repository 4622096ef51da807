"""Tiled inference: run an SR model on images of any size in overlapping LR tiles.

Each tile of the LR image is upscaled on its own and the outputs are blended with per-tile weights
that are 0 near a tile's inner edges and rise linearly to 1 across the middle of the overlap
(edges on the image border are not tapered). So:

* a tile contributes nothing within `overlap/4` LR pixels of its inner edges, where its output
  lacks context; hence a model whose receptive field reaches at most `overlap/4` LR pixels gives
  the same output tiled as on the whole image (up to float rounding);
* for models that see further (windowed attention), the linear ramp feathers the remaining
  differences over `overlap/2` pixels instead of leaving a visible seam.

All tiles have the same size (the last row/column of tiles is shifted back to end at the image
edge), so they can be run in batches.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["tile_starts", "tiled_forward"]


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size `min(tile, length)` covering [0, length), consecutive tiles
    overlapping by at least `overlap`; the last tile ends exactly at `length`."""
    if tile >= length:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def _axis_weights(
    start: int, size: int, length: int, overlap: int, scale: int, device, dtype
) -> torch.Tensor:
    """Blend weights `(size*scale,)` of one tile along one axis, in output pixels."""
    # Distance of each output pixel centre from the tile's edges, in LR pixels.
    pos = (torch.arange(size * scale, device=device, dtype=torch.float64) + 0.5) / scale
    ramp_start, ramp_len = overlap / 4.0, overlap / 2.0
    w = torch.ones_like(pos)
    if ramp_len > 0:
        if start > 0:  # inner left/top edge
            w = w * ((pos - ramp_start) / ramp_len).clamp(0.0, 1.0)
        if start + size < length:  # inner right/bottom edge
            w = w * ((size - pos - ramp_start) / ramp_len).clamp(0.0, 1.0)
    return w.to(dtype)


def tiled_forward(
    fn: Callable[[torch.Tensor], torch.Tensor],
    lr: torch.Tensor,
    scale: int,
    *,
    tile: int = 256,
    overlap: int = 32,
    batch: int = 1,
) -> torch.Tensor:
    """Upscale `lr` by running `fn` on overlapping tiles and blending the results.

    Args:
        fn: `(N, C, th, tw)` float -> `(N, C_out, th*scale, tw*scale)` (e.g. an SR model's forward,
            or a lambda giving a continuous model its `out_size`).
        lr: `(B, C, H, W)` float, typically [0, 1] RGB. Any H, W; a tile larger than the image is
            clipped to it (then this is one plain call of `fn`).
        scale: integer upscaling factor of `fn`.
        tile: tile size in LR pixels (square; clipped per axis to the image).
        overlap: LR pixels shared by neighbouring tiles; outputs are exact for receptive fields up
            to `overlap // 4` LR pixels (see the module docstring). Must be < tile.
        batch: how many tiles to pass to `fn` at once (more is faster, uses more memory).

    Returns:
        `(B, C_out, H*scale, W*scale)` in `fn`'s output dtype, on `fn`'s output device.
    """
    if lr.dim() != 4:
        raise ValueError(f"tiled_forward: expected lr (B, C, H, W), got shape {tuple(lr.shape)}")
    if int(scale) != scale or scale < 1:
        raise ValueError(f"tiled_forward: scale must be a positive integer, got {scale!r}")
    if tile < 1 or overlap < 0 or overlap >= tile:
        raise ValueError(
            f"tiled_forward: need tile >= 1 and 0 <= overlap < tile, got tile={tile}, "
            f"overlap={overlap}"
        )
    if batch < 1:
        raise ValueError(f"tiled_forward: batch must be >= 1, got {batch}")
    scale = int(scale)
    bsz, _, h, w = lr.shape
    th, tw = min(tile, h), min(tile, w)
    ys, xs = tile_starts(h, th, overlap), tile_starts(w, tw, overlap)
    if len(ys) == 1 and len(xs) == 1:
        return _checked(fn, lr, scale)

    boxes = [(y, x) for y in ys for x in xs]
    out = weight = None
    for i in range(0, len(boxes), batch):
        group = boxes[i : i + batch]
        # (len(group)*B, C, th, tw): tiles stacked tile-major so each tile's B images stay together
        tiles = torch.cat([lr[..., y : y + th, x : x + tw] for y, x in group], dim=0)
        res = _checked(fn, tiles, scale)
        if out is None:
            out = res.new_zeros(bsz, res.shape[1], h * scale, w * scale)
            weight = res.new_zeros(1, 1, h * scale, w * scale)
        for j, (y, x) in enumerate(group):
            wy = _axis_weights(y, th, h, overlap, scale, res.device, res.dtype)
            wx = _axis_weights(x, tw, w, overlap, scale, res.device, res.dtype)
            wt = wy[:, None] * wx[None, :]  # (th*s, tw*s)
            ys_, xs_ = slice(y * scale, (y + th) * scale), slice(x * scale, (x + tw) * scale)
            out[..., ys_, xs_] += res[j * bsz : (j + 1) * bsz] * wt
            weight[..., ys_, xs_] += wt
    # Every output pixel has positive total weight: of two overlapping tiles, at least one is
    # >= overlap/2 from its inner edge there, past the zero band (tested).
    return out / weight


def _checked(fn, x: torch.Tensor, scale: int) -> torch.Tensor:
    y = fn(x)
    if not isinstance(y, torch.Tensor) or y.dim() != 4:
        raise ValueError(f"tiled_forward: fn must return a (N, C, H, W) tensor, got {type(y).__name__}")
    want = (x.shape[0], x.shape[-2] * scale, x.shape[-1] * scale)
    if (y.shape[0], y.shape[-2], y.shape[-1]) != want:
        raise ValueError(
            f"tiled_forward: fn mapped a tile of shape {tuple(x.shape)} to {tuple(y.shape)}; "
            f"expected (N, C, {want[1]}, {want[2]}) for x{scale}"
        )
    return y
