"""Reconstruction heads: features `(B, C, h, w)` -> RGB residual in the backbone's normalised space.

- :class:`PixelShuffleDirect` (discrete): one 3x3 conv to `3 * s^2` channels + PixelShuffle(s), as the
  published light models (`upsample.0.weight` in their checkpoints is our `head.upsample.0.weight`).
- :class:`ContinuousHead` (HIIF-L, our reading in ../shared/C2D-METHOD.md): arbitrary output size.
  For each HR query (pixel centre in [-1, 1], order (y, x)) it concatenates the 4 nearest LR
  feature vectors weighted by the area of the opposite sub-rectangle (bilinear weights), the
  relative cell `2/scale`, and a hierarchical code of the sub-pixel offset; level 0 is an MLP
  to `width`, then Galerkin-type linear attention over all queries of the image, then one more
  MLP per level, the last to 3 channels. SRModel adds the bilinear upsampling of the input.

Because linear attention mixes ALL queries of an image (through `K^T V / Q`), rendering a large
image in query chunks is done in passes: pass b accumulates block b's `K^T V` over all chunks,
and a final pass computes the outputs; the result equals the unchunked computation.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn


DISCRETE_RESIDUALS = ("none", "bilinear")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DiscreteHeadConfig:
    """pixelshuffledirect (the scale is given to build_model).

    residual: what the head's output is added to. "none": the mean RGB only, as the published
    light models (their checkpoints load into this form). "bilinear": the bilinear upsampling
    of the input, the same base as the continuous head; C2D's stage 2 uses it so the backbone
    keeps the job it learned in stage 1 (predicting detail over bilinear) and a head fitted on
    its features starts at the continuous model's quality instead of ~1-2 dB below bicubic.
    """

    residual: str = "none"

    def __post_init__(self):
        if self.residual not in DISCRETE_RESIDUALS:
            raise ValueError(f"discrete head: residual must be one of {DISCRETE_RESIDUALS}, "
                             f"got {self.residual!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ContinuousHeadConfig:
    """HIIF-L head.

    width: channels of the feature conv, the MLPs and the attention (HIIF: 256).
    levels: number of hierarchical levels (MLPs); the last outputs RGB (HIIF: 6, HIIF-L: 3).
    attn_blocks: linear attention blocks after level 0 (HIIF: 2, HIIF-L: 1).
    attn_heads: heads of the linear attention (width must be divisible by it).
    chunk: queries per pass when rendering a full image with `SRModel.forward` (bounds memory).
    """

    width: int = 256
    levels: int = 3
    attn_blocks: int = 1
    attn_heads: int = 16
    chunk: int = 32768

    def __post_init__(self):
        if self.width < 1 or self.levels < 1 or self.attn_blocks < 0 or self.chunk < 1:
            raise ValueError(f"continuous head: width, levels, chunk must be >= 1: {self}")
        if self.attn_heads < 1 or self.width % self.attn_heads:
            raise ValueError(
                f"continuous head: width {self.width} must be divisible by attn_heads {self.attn_heads}"
            )


HEAD_FLAVORS = {
    "light": {},
    "tiny": {"width": 32, "attn_heads": 4},
}


class PixelShuffleDirect(nn.Module):
    """`(B, C, h, w)` -> `(B, 3, h*s, w*s)`: conv3x3 to 3*s^2 channels, PixelShuffle(s).

    SRModel runs it on the backbone's padded feature grid and crops the output to the image
    (`SRModel.head_term`), as the official forward does; a conv over cropped features would
    see zeros instead of the padded features beyond the last row/column."""

    def __init__(self, *, in_channels: int, scale: int, out_channels: int = 3, residual: str = "none"):
        super().__init__()
        if scale < 1:
            raise ValueError(f"scale must be a positive integer, got {scale}")
        if residual not in DISCRETE_RESIDUALS:
            raise ValueError(f"residual must be one of {DISCRETE_RESIDUALS}, got {residual!r}")
        self.scale = scale
        self.residual = residual
        self.upsample = nn.Sequential(
            nn.Conv2d(in_channels, out_channels * scale * scale, 3, padding=1),
            nn.PixelShuffle(scale),
        )

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        return self.upsample(feat)


class LevelMLP(nn.Module):
    """LayerNorm -> Linear -> GELU -> Linear, `(B, Q, in) -> (B, Q, out)`."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


class GalerkinBlock(nn.Module):
    """Linear attention over the queries of one image, `(B, Q, W) -> (B, Q, W)`.

    Per head: `attn = q (LN(k)^T LN(v) / Q)` (no softmax), then `y = x + attn`,
    `out = y + MLP(y)`. `summary(x)` returns the `(B, heads, d, d)` term `LN(k)^T LN(v)` summed
    over x's queries, so a caller can accumulate it over chunks and pass `kv` to `forward`.
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.qkv = nn.Linear(width, 3 * width)
        self.k_norm = nn.LayerNorm(self.head_dim)
        self.v_norm = nn.LayerNorm(self.head_dim)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))

    def _qkv(self, x):
        b, q, w = x.shape
        qkv = self.qkv(x).view(b, q, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv[0], self.k_norm(qkv[1]), self.v_norm(qkv[2])  # (B, heads, Q, d)

    def summary(self, x: torch.Tensor) -> torch.Tensor:
        _, k, v = self._qkv(x)
        return k.transpose(-2, -1) @ v

    def forward(self, x: torch.Tensor, kv: torch.Tensor | None = None) -> torch.Tensor:
        """kv: mean of `summary` over all queries of each image; None = compute from x."""
        b, q, w = x.shape
        qh, k, v = self._qkv(x)
        if kv is None:
            kv = k.transpose(-2, -1) @ v / q
        y = x + (qh @ kv).transpose(1, 2).reshape(b, q, w)
        return y + self.mlp(y)


def hier_code(offset: torch.Tensor, level: int) -> torch.Tensor:
    """Quad-tree cell bits of a sub-pixel offset in [0, 1): `floor(t * 2^(level+1)) mod 2`."""
    return torch.floor(offset * 2 ** (level + 1)).remainder(2)


class ContinuousHead(nn.Module):
    """HIIF-L: `query(feat, coords, cells) -> (B, Q, 3)` in normalised space (no input residual)."""

    def __init__(self, *, in_channels: int, cfg: ContinuousHeadConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.feat_conv = nn.Conv2d(in_channels, w, 3, padding=1)
        self.levels = nn.ModuleList(
            [
                LevelMLP(
                    4 * w + 2 + 2 if n == 0 else w + 2,
                    3 if n == cfg.levels - 1 else w,
                    w,
                )
                for n in range(cfg.levels)
            ]
        )
        self.attn = nn.ModuleList([GalerkinBlock(w, cfg.attn_heads) for _ in range(cfg.attn_blocks)])
        self.reset_output()

    @torch.no_grad()
    def reset_output(self) -> None:
        """Zero the last projection, so a fresh head outputs exactly its bilinear base.

        Why: with PyTorch's default init the residual starts as noise of std ~0.2 (L1 ~0.1
        against ~0.04 for bilinear on T91 patches). The quickest way down for the optimiser is
        then to shrink that projection, and with it every gradient reaching the attention,
        the MLPs and the backbone (their norm fell from 1.8 to 1e-3 in 20 steps): training sat
        on the bilinear base and learned nothing more. From zero the weight gradient of the
        projection is non-zero, the first steps move it along useful directions, and the
        gradients upstream grow instead of dying (`tests/test_training_learns.py`)."""
        last = self.levels[-1].fc2
        last.weight.zero_()
        last.bias.zero_()

    def encode(self, feat: torch.Tensor) -> torch.Tensor:
        """`(B, C, h, w)` backbone features -> `(B, width, h, w)` head features."""
        return self.feat_conv(feat)

    @staticmethod
    def _ensemble(fmap: torch.Tensor, coords: torch.Tensor, cells: torch.Tensor):
        """Level-0 input `(B, Q, 4W + 2)` and the sub-pixel offset `(B, Q, 2)` in [0, 1)."""
        b, c, h, w = fmap.shape
        size = torch.tensor([h, w], device=coords.device, dtype=coords.dtype)
        # continuous LR pixel position: pixel i has its centre at -1 + (2i + 1) / h
        pos = (coords + 1) * size / 2 - 0.5  # (B, Q, 2)
        base = torch.floor(pos)
        t = pos - base  # offset from the upper-left neighbour, in LR pixels
        y0 = base[..., 0].long()
        x0 = base[..., 1].long()
        flat = fmap.flatten(2).transpose(1, 2)  # (B, h*w, C)
        parts = []
        for dy in (0, 1):
            for dx in (0, 1):
                iy = (y0 + dy).clamp(0, h - 1)
                ix = (x0 + dx).clamp(0, w - 1)
                idx = (iy * w + ix).unsqueeze(-1).expand(-1, -1, c)
                f = torch.gather(flat, 1, idx)  # (B, Q, C)
                # weight = area of the sub-rectangle opposite this neighbour
                wy = t[..., 0] if dy else 1 - t[..., 0]
                wx = t[..., 1] if dx else 1 - t[..., 1]
                parts.append(f * (wy * wx).unsqueeze(-1))
        rel_cell = cells * size  # 2 / scale along each axis
        return torch.cat(parts + [rel_cell], dim=-1), t

    def _level0(self, fmap, coords, cells):
        x, t = self._ensemble(fmap, coords, cells)
        return self.levels[0](torch.cat([x, hier_code(t, 0)], dim=-1)), t

    def _finish(self, x, t):
        for n in range(1, len(self.levels)):
            x = self.levels[n](torch.cat([x, hier_code(t, n)], dim=-1))
        return x

    def query(
        self,
        fmap: torch.Tensor,
        coords: torch.Tensor,
        cells: torch.Tensor,
        chunk: int | None = None,
    ) -> torch.Tensor:
        """fmap `(B, W, h, w)` from `encode`; coords, cells `(B, Q, 2)` -> `(B, Q, 3)`.

        chunk: process at most this many queries at a time (multi-pass, exact); None = all.
        """
        n_q = coords.shape[1]
        if chunk is None or n_q <= chunk:
            x, t = self._level0(fmap, coords, cells)
            for blk in self.attn:
                x = blk(x)
            return self._finish(x, t)
        spans = [(s, min(s + chunk, n_q)) for s in range(0, n_q, chunk)]
        kvs: list[torch.Tensor] = []
        for bi, blk in enumerate(self.attn):
            acc = None
            for s, e in spans:
                x, _ = self._level0(fmap, coords[:, s:e], cells[:, s:e])
                for j in range(bi):
                    x = self.attn[j](x, kvs[j])
                part = blk.summary(x)
                acc = part if acc is None else acc + part
            kvs.append(acc / n_q)
        outs = []
        for s, e in spans:
            x, t = self._level0(fmap, coords[:, s:e], cells[:, s:e])
            for j, blk in enumerate(self.attn):
                x = blk(x, kvs[j])
            outs.append(self._finish(x, t))
        return torch.cat(outs, dim=1)


def make_coords(h: int, w: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """`(h*w, 2)` pixel-centre coordinates in [-1, 1], order (y, x), row-major."""
    ys = -1 + (2 * torch.arange(h, device=device, dtype=dtype) + 1) / h
    xs = -1 + (2 * torch.arange(w, device=device, dtype=dtype) + 1) / w
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).view(-1, 2)


def sample_bilinear(img: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of `img (B, C, h, w)` at `coords (B, Q, 2)` (y, x) -> `(B, Q, C)`,
    border-clamped, pixel centres at -1 + (2i + 1)/h (align_corners=False)."""
    grid = coords.flip(-1).unsqueeze(1)  # grid_sample wants (x, y): (B, 1, Q, 2)
    out = F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out[:, :, 0].transpose(1, 2)
