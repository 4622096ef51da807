"""Hierarchical encoding: HiT-style spatial-channel correlation (SCC) and the C2D encoder-decoder.

Two variants of a residual group's body, besides the backbone's own ("plain") blocks:

- ``hit`` (HiT-SR, ECCV 2024): block i of a group uses window ``base * hit_ratios[i]`` (default
  ratios (0.5, 1, 2, 4, 6, 8): windows 4..64 around base 8), and every block replaces window
  self-attention by SCC: queries Q and values V only (from a dual-branch conv, "DFE"), V of a
  window compressed to the base window by a learned linear map over each sub-block, so the
  spatial correlation costs O(window^2 * base^2) per window, i.e. linear in the window area, plus
  a channel correlation branch. Blocks are post-norm: ``x + LN(SCC(x))``, ``x + LN(FFN(x))``.
- ``c2d`` (our reading of C2D-ISR's hierarchical encoding, see ../shared/C2D-METHOD.md): a group
  is an encoder-decoder over a window schedule (default ratios (8, 4, 1, 4, 8) of the backbone's
  window: 64, 32, 8, 32, 64 for SwinIR-L). Windows larger than the backbone's own use SCC blocks
  (linear in window size); the others use the backbone's own block (window attention for SwinIR,
  permuted attention for SRFormer, its own layer for MambaIRv2). Each decoder layer first fuses
  the output of the encoder layer with the same window (concat + 1x1 projection, i.e. a Linear
  on channels-last features). ``c2d_mode="constant"`` keeps full resolution throughout;
  ``"resample"`` runs the smallest-window layers at half resolution (2x2 average pooling down,
  bilinear up; parameter-free) so they see twice the context at a quarter of the cost.
  Default: "constant". Measured by benchmarks/models.py: "resample" has the same parameters
  and 12% fewer MACs (SwinIR-L x4: 45.0G vs 51.4G), but in the quality proxy (tiny SwinIR,
  400 steps on T91 x2) it reached 33.32 dB on Set5 against 33.53 dB for "constant"; SR
  reconstructs detail at full resolution, so the cheaper mode is kept as an option.

Block contract used throughout: a block is an ``nn.Module`` whose ``forward(x)`` takes and returns
channels-last features ``(B, H, W, C)`` of ANY H, W (it pads to its window inside and crops back).

Using these pieces from another backbone (e.g. MambaIRv2):

1. Let the backbone's config dataclass inherit :class:`HierFields` (adds ``variant``,
   ``hier_base_window``, ``hit_ratios``, ``c2d_schedule``, ``c2d_unit``, ``c2d_mode``), and call
   ``validate_hier(cfg, depths=cfg.depths, native_window=cfg.window)`` in ``__post_init__``.
2. For each residual group build its body with :func:`build_group_body`::

       body = build_group_body(
           cfg, dim=C, depth=cfg.depths[i], num_heads=cfg.num_heads[i], native_window=cfg.window,
           ffn="convffn", ffn_kernel=5, mlp_ratio=cfg.mlp_ratio,
           make_native=lambda window, index: MyBlock(dim=C, window=window, ...),
       )

   ``make_native(window, index)`` must return one of the backbone's own blocks following the
   block contract above; for ``plain`` it is called with the backbone window for every index;
   for ``c2d`` it is called for the schedule entries whose window is <= the native window.
   ``body`` maps ``(B, H, W, C) -> (B, H, W, C)``; wrap it in the backbone's usual residual group
   (conv + long skip). SCC blocks use ``ffn`` ("mlp" as HiT-SIR, "convffn" as HiT-SRF) with
   hidden size ``int(C * mlp_ratio)``.
3. For ``hit``, the backbone's depths must equal ``len(hit_ratios)``; for ``c2d`` they must equal
   ``len(c2d_schedule)`` (``validate_hier`` says so by name).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from c2disr.models.common import ConvFFN, Mlp, pad_bhwc, window_partition, window_reverse

VARIANTS = ("plain", "hit", "c2d")
C2D_MODES = ("constant", "resample")


@dataclasses.dataclass(frozen=True, kw_only=True)
class HierFields:
    """Config fields shared by every backbone for the plain / hit / c2d variants.

    variant: "plain" (the published backbone), "hit" (HiT-SR) or "c2d" (C2D hierarchical encoding).
    hier_base_window: HiT base window: unit of ``hit_ratios`` and the size SCC compresses V to.
    hit_ratios: per-block window ratios of a hit group (its length must equal each depth).
    c2d_schedule: per-layer window ratios of a c2d group, in units of ``c2d_unit``.
    c2d_unit: window that the schedule's ratios multiply; 0 means the backbone's own window.
    c2d_mode: "constant" (full resolution) or "resample" (smallest-window layers at half size).
    """

    variant: str = "plain"
    hier_base_window: int = 8
    hit_ratios: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 6.0, 8.0)
    c2d_schedule: tuple[float, ...] = (8.0, 4.0, 1.0, 4.0, 8.0)
    c2d_unit: int = 0
    c2d_mode: str = "constant"


def _windows(unit: int, ratios: Sequence[float], what: str) -> list[int]:
    out = []
    for r in ratios:
        w = unit * r
        if w < 1 or abs(w - round(w)) > 1e-9:
            raise ValueError(f"{what}: ratio {r} x window {unit} = {w} is not a positive integer")
        out.append(int(round(w)))
    return out


def hit_windows(cfg: HierFields) -> list[int]:
    """Windows of the blocks of one hit group: ``hier_base_window * hit_ratios[i]``."""
    return _windows(cfg.hier_base_window, cfg.hit_ratios, "hit_ratios")


def c2d_windows(cfg: HierFields, native_window: int) -> list[int]:
    """Windows of the layers of one c2d group: ``(c2d_unit or native_window) * c2d_schedule[i]``."""
    return _windows(cfg.c2d_unit or native_window, cfg.c2d_schedule, "c2d_schedule")


def validate_hier(cfg: HierFields, *, depths: Sequence[int], native_window: int) -> None:
    """Raise ValueError naming the field when the variant fields are inconsistent."""
    if cfg.variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {cfg.variant!r}")
    if cfg.c2d_mode not in C2D_MODES:
        raise ValueError(f"c2d_mode must be one of {C2D_MODES}, got {cfg.c2d_mode!r}")
    if cfg.hier_base_window < 1:
        raise ValueError(f"hier_base_window must be >= 1, got {cfg.hier_base_window}")
    if cfg.c2d_unit < 0:
        raise ValueError(f"c2d_unit must be >= 0 (0 = backbone window), got {cfg.c2d_unit}")
    if cfg.variant == "hit":
        wins = hit_windows(cfg)
        if any(d != len(wins) for d in depths):
            raise ValueError(
                f"variant hit: depths {tuple(depths)} must all equal len(hit_ratios) = {len(wins)} "
                f"(set depths or hit_ratios so they agree)"
            )
        for w in wins:
            _check_scc_window(w, cfg.hier_base_window)
    if cfg.variant == "c2d":
        wins = c2d_windows(cfg, native_window)
        if any(d != len(wins) for d in depths):
            raise ValueError(
                f"variant c2d: depths {tuple(depths)} must all equal len(c2d_schedule) = "
                f"{len(wins)} (one layer per schedule entry; set depths or c2d_schedule)"
            )
        for w in wins:
            if w > native_window:
                _check_scc_window(w, cfg.hier_base_window)


def _check_scc_window(window: int, base: int) -> None:
    if window > base and window % base:
        raise ValueError(
            f"SCC window {window} must be <= or a multiple of hier_base_window {base} "
            f"(V is compressed block-wise to the base window)"
        )


class DFE(nn.Module):
    """Dual feature extraction `(B, C, H, W) -> (B, C, H, W)`: a conv bottleneck branch (C/5
    channels, 1x1-3x3-1x1, LeakyReLU) gating a 1x1 linear branch by elementwise product."""

    def __init__(self, dim: int):
        super().__init__()
        mid = max(dim // 5, 1)
        self.conv = nn.Sequential(
            nn.Conv2d(dim, mid, 1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(mid, mid, 3, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(mid, dim, 1),
        )
        self.linear = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * self.linear(x)


class DynamicPosBias(nn.Module):
    """MLP from a relative offset (dy, dx) to one bias per head (CrossFormer/HiT style).

    Width ``dim // 4``; three LayerNorm-ReLU-Linear stages without residuals, as HiT-SR.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        pos_dim = max(dim // 4, 1)
        self.pos_proj = nn.Linear(2, pos_dim)

        def stage(out):
            return nn.Sequential(nn.LayerNorm(pos_dim), nn.ReLU(inplace=True), nn.Linear(pos_dim, out))

        self.pos1 = stage(pos_dim)
        self.pos2 = stage(pos_dim)
        self.pos3 = stage(num_heads)

    def forward(self, offsets: torch.Tensor) -> torch.Tensor:
        """`(M, 2)` float offsets -> `(M, heads)`."""
        return self.pos3(self.pos2(self.pos1(self.pos_proj(offsets))))


class SCC(nn.Module):
    """Spatial-channel correlation over square windows, `(B, H, W, C) -> (B, H, W, C)`.

    H and W must be multiples of `window` (SCCBlock pads). Channels split into Q and V (C/2 each,
    `num_heads` heads). Spatial branch: V of each window is reduced block-wise to
    `base x base` tokens (a Linear over the `(window/base)^2` tokens of each block), then
    `out = (Q V_b^T / head_dim + bias) V_b` (no softmax). Channel branch: one head,
    `out = (Q^T V / L) V^T`. The two halves are concatenated and projected. Parameter names
    follow the official HiT-SR (`qv`, `proj`, `spatial_linear`, `pos`).
    """

    def __init__(self, *, dim: int, num_heads: int, window: int, base_window: int):
        super().__init__()
        if dim % (2 * num_heads):
            raise ValueError(f"SCC: dim {dim} must be divisible by 2 * num_heads = {2 * num_heads}")
        self.dim, self.num_heads, self.window = dim, num_heads, window
        self.base = min(window, base_window)
        if window % self.base:
            raise ValueError(f"SCC window {window} is not a multiple of base window {self.base}")
        self.ratio = window // self.base  # side of the sub-block each base token summarises
        self.head_dim = dim // (2 * num_heads)
        self.qv = DFE(dim)
        self.proj = nn.Linear(dim, dim)
        self.spatial_linear = nn.Linear(self.ratio * self.ratio, 1)
        self.pos = DynamicPosBias(dim // 4, num_heads)

    def position_bias(self, device, dtype) -> torch.Tensor:
        """`(heads, L, base*base)`: the official bias (mean of the per-key relative bias over
        the keys each base token summarises), computed by box-averaging the
        `(2w-1) x (2w-1)` table instead of materialising the `(L, L, heads)` tensor."""
        w, r, m = self.window, self.ratio, self.base
        offs = torch.arange(1 - w, w, device=device, dtype=dtype)
        grid = torch.stack(torch.meshgrid(offs, offs, indexing="ij"), dim=-1).view(-1, 2)
        table = self.pos(grid).view(2 * w - 1, 2 * w - 1, self.num_heads).permute(2, 0, 1)
        if r > 1:
            # pooled[u, v] = mean(table[u:u+r, v:v+r]) for the key offsets inside one block
            table = F.avg_pool2d(table[None], kernel_size=r, stride=1)[0]
        q = torch.arange(w, device=device)
        cell = torch.arange(m, device=device)
        idx = q[:, None] - cell[None, :] * r + (w - r)  # (w, m): pooled row for (query, cell)
        bias = table[:, idx[:, None, :, None], idx[None, :, None, :]]  # (heads, w, w, m, m)
        return bias.reshape(self.num_heads, w * w, m * m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w_, c = x.shape
        win, r, m = self.window, self.ratio, self.base
        qv = self.qv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # (B, H, W, C)
        tokens = window_partition(qv, win, win)  # (B, nW, L, C)
        nw, length = tokens.shape[1], tokens.shape[2]
        qv = tokens.view(b * nw, length, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, v = qv[0], qv[1]  # (B*nW, heads, L, d)

        # spatial: compress V block-wise to the base window, then correlate
        vb = v.reshape(b * nw, self.num_heads, m, r, m, r, self.head_dim)
        vb = vb.permute(0, 1, 2, 4, 6, 3, 5).reshape(b * nw, self.num_heads, m * m, self.head_dim, r * r)
        vb = self.spatial_linear(vb).squeeze(-1)  # (B*nW, heads, m*m, d)
        corr = q @ vb.transpose(-2, -1) / self.head_dim + self.position_bias(x.device, x.dtype)
        x_sp = (corr @ vb).transpose(1, 2).reshape(b, nw, length, c // 2)

        # channel: single head over all C/2 channels of the window
        q2 = q.transpose(1, 2).reshape(b * nw, length, c // 2)
        v2 = v.transpose(1, 2).reshape(b * nw, length, c // 2)
        corr_c = q2.transpose(-2, -1) @ v2 / length  # (B*nW, C/2, C/2)
        x_ch = (corr_c @ v2.transpose(-2, -1)).transpose(-2, -1).reshape(b, nw, length, c // 2)

        out = torch.cat(
            [window_reverse(x_sp, win, win, h, w_), window_reverse(x_ch, win, win, h, w_)], dim=-1
        )
        return self.proj(out)


class SCCBlock(nn.Module):
    """HiT-style block `(B, H, W, C) -> (B, H, W, C)`, any H, W: pad to the window, SCC, crop;
    post-norm residuals ``x + LN(SCC(x))`` then ``x + LN(FFN(x))``.

    ffn: "mlp" (HiT-SIR) or "convffn" (HiT-SRF, depthwise `ffn_kernel` conv inside).
    """

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        window: int,
        base_window: int,
        mlp_ratio: float,
        ffn: str = "mlp",
        ffn_kernel: int = 5,
    ):
        super().__init__()
        self.window = window
        self.norm1 = nn.LayerNorm(dim)
        self.correlation = SCC(dim=dim, num_heads=num_heads, window=window, base_window=base_window)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.ffn_kind = ffn
        if ffn == "mlp":
            self.mlp = Mlp(dim=dim, hidden=hidden)
        elif ffn == "convffn":
            self.mlp = ConvFFN(dim=dim, hidden=hidden, kernel=ffn_kernel)
        else:
            raise ValueError(f"ffn must be 'mlp' or 'convffn', got {ffn!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[1:3]
        y = self.correlation(pad_bhwc(x, self.window, self.window))[:, :h, :w]
        x = x + self.norm1(y)
        return x + self.norm2(self.mlp(x))


class Sequential(nn.Module):
    """Blocks applied in order (the plain and hit bodies); keys `blocks.{i}.*`."""

    def __init__(self, blocks: Sequence[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return x


class C2DBody(nn.Module):
    """Encoder-decoder over a window schedule, `(B, H, W, C) -> (B, H, W, C)`.

    The layers before the first smallest-window layer form the encoder, the run of
    smallest-window layers the bottleneck, the rest the decoder. A decoder layer with window w
    is preceded by `fuse.{i}` = Linear(2C -> C) on concat(x, output of the latest unused encoder
    layer with window w), initialised to pass x unchanged (see init_weights). mode "resample":
    the bottleneck runs at half resolution (2x2 average pooling in, bilinear back out).
    """

    def __init__(self, *, dim: int, windows: Sequence[int], blocks: Sequence[nn.Module], mode: str):
        super().__init__()
        if len(windows) != len(blocks) or not blocks:
            raise ValueError("C2DBody needs one block per window (and at least one)")
        if mode not in C2D_MODES:
            raise ValueError(f"c2d_mode must be one of {C2D_MODES}, got {mode!r}")
        self.windows, self.mode = list(windows), mode
        smallest = min(windows)
        self.bottom_start = self.windows.index(smallest)
        end = self.bottom_start
        while end + 1 < len(windows) and windows[end + 1] == smallest:
            end += 1
        self.bottom_end = end  # inclusive
        self.blocks = nn.ModuleList(blocks)
        stack: list[int] = list(range(self.bottom_start))  # encoder layer indices
        self.skip_from: dict[int, int] = {}
        fuse = {}
        for i in range(end + 1, len(windows)):
            match = [j for j in stack if windows[j] == windows[i]]
            if match:
                j = match[-1]
                stack.remove(j)
                self.skip_from[i] = j
                fuse[str(i)] = nn.Linear(2 * dim, dim)
        self.fuse = nn.ModuleDict(fuse)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Fusions start as [I | 0]: pass the decoder's own input, ignore the skip. An untrained
        body is then the plain stack of its blocks (a random fusion would scale the residual
        stream by ~0.02 at every decoder layer); gradients still reach the skip half."""
        for fuse in self.fuse.values():
            dim = fuse.out_features
            fuse.weight.zero_()
            fuse.weight[:, :dim].copy_(torch.eye(dim, device=fuse.weight.device, dtype=fuse.weight.dtype))
            fuse.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        saved: dict[int, torch.Tensor] = {}
        full_size = None
        for i, blk in enumerate(self.blocks):
            if self.mode == "resample" and i == self.bottom_start:
                full_size = x.shape[1:3]
                x = _down2(x)
            if i in self.skip_from:
                x = self.fuse[str(i)](torch.cat([x, saved[self.skip_from[i]]], dim=-1))
            x = blk(x)
            if i < self.bottom_start:
                saved[i] = x
            if self.mode == "resample" and i == self.bottom_end:
                x = _up_to(x, full_size)
        return x


def _down2(x: torch.Tensor) -> torch.Tensor:
    """`(B, H, W, C)` -> `(B, ceil(H/2), ceil(W/2), C)` by 2x2 averaging (odd sizes replicate)."""
    y = x.permute(0, 3, 1, 2)
    if y.shape[-2] % 2 or y.shape[-1] % 2:
        y = F.pad(y, (0, y.shape[-1] % 2, 0, y.shape[-2] % 2), mode="replicate")
    return F.avg_pool2d(y, 2).permute(0, 2, 3, 1)


def _up_to(x: torch.Tensor, size) -> torch.Tensor:
    """Bilinear resize of `(B, h, w, C)` back to `(B, *size, C)`."""
    y = F.interpolate(x.permute(0, 3, 1, 2), size=tuple(size), mode="bilinear", align_corners=False)
    return y.permute(0, 2, 3, 1)


def build_group_body(
    cfg: HierFields,
    *,
    dim: int,
    depth: int,
    num_heads: int,
    native_window: int,
    make_native: Callable[[int, int], nn.Module],
    mlp_ratio: float,
    ffn: str,
    ffn_kernel: int = 5,
) -> nn.Module:
    """The body of one residual group for `cfg.variant` (see the module docstring)."""

    def scc(window: int) -> nn.Module:
        return SCCBlock(
            dim=dim,
            num_heads=num_heads,
            window=window,
            base_window=cfg.hier_base_window,
            mlp_ratio=mlp_ratio,
            ffn=ffn,
            ffn_kernel=ffn_kernel,
        )

    if cfg.variant == "plain":
        return Sequential([make_native(native_window, i) for i in range(depth)])
    if cfg.variant == "hit":
        return Sequential([scc(w) for w in hit_windows(cfg)[:depth]])
    if cfg.variant == "c2d":
        wins = c2d_windows(cfg, native_window)
        blocks = [scc(w) if w > native_window else make_native(w, i) for i, w in enumerate(wins)]
        return C2DBody(dim=dim, windows=wins, blocks=blocks, mode=cfg.c2d_mode)
    raise ValueError(f"variant must be one of {VARIANTS}, got {cfg.variant!r}")
