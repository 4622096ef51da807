"""SRFormer-L (SRFormer-light) with plain / hit / c2d bodies.

Published light setting: embed 60, 4 groups of 6 PSA blocks, 6 heads, window 16, MLP ratio 2
with a ConvFFN (5x5 depthwise conv), pixelshuffledirect, DIV2K mean shift (about 0.85M at x2).
The outer structure is SwinIR's (see swinir.py; same official key layout `layers.i...`).

Permuted self-attention (PSA): inside a window of N = w*w tokens, queries keep all N tokens and
C channels, while keys/values are projected to C/2 channels (C/4 each) and every 2x2 token
patch is folded into the channels, giving N/4 key/value tokens of C channels. Each query at
(y, x) takes its relative-position bias from a (w/2)-window table at (y//2, x//2). This keeps
large windows (16) at the cost of an 8x8 attention map per query.

Shifted-window masks: a key token covers a 2x2 pixel patch, so its region label is the label of
that patch (`psa_mask="exact"`). This is also what today's official code computes: since its
commit bc85758 (2023-07-25, "fix shift_size for the permuted_window_mask") the key-map slices
are `(0, -w/2), (-w/2, -shift/2), (-shift/2, None)`, which give exactly these labels.
`psa_mask="official"` reproduces SRFormer's FIRST commit (6401aa8, 2022-11-26), whose key-map
slices were `(-w/2, -shift)` / `(-w/2, -w/2)` (empty) and mask some valid pairs in the last
window row/column; use it only for weights trained with that code (the difference only touches
those border windows).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from c2disr.models.common import (
    MASK_VALUE,
    ConvFFN,
    ShiftedWindowBlock,
    WindowTransformerBackbone,
    attend,
    relative_position_index,
    shift_region_labels,
    window_partition,
)
from c2disr.models.hier import HierFields, validate_hier

PSA_MASKS = ("exact", "official")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SRFormerConfig(HierFields):
    """SRFormer backbone config (plus the plain/hit/c2d fields of HierFields).

    embed_dim: channels C. depths: blocks per group. num_heads: heads per group.
    window: PSA window (multiple of 4: keys fold 2x2 patches and shifts are window/2).
    mlp_ratio: ConvFFN hidden = int(C * mlp_ratio). ffn_kernel: depthwise conv size.
    qkv_bias: bias on q and kv projections. psa_mask: "exact" (today's official code, the
    default) or "official" (SRFormer's first commit; module docstring).
    """

    embed_dim: int = 60
    depths: tuple[int, ...] = (6, 6, 6, 6)
    num_heads: tuple[int, ...] = (6, 6, 6, 6)
    window: int = 16
    mlp_ratio: float = 2.0
    ffn_kernel: int = 5
    qkv_bias: bool = True
    psa_mask: str = "exact"

    def __post_init__(self):
        if self.embed_dim < 1 or self.mlp_ratio <= 0 or self.ffn_kernel < 1 or self.ffn_kernel % 2 == 0:
            raise ValueError(f"embed_dim, mlp_ratio must be positive and ffn_kernel odd: {self}")
        if self.window < 4 or self.window % 4:
            raise ValueError(f"SRFormer window must be a positive multiple of 4, got {self.window}")
        if self.embed_dim % 4:
            raise ValueError(f"SRFormer embed_dim must be divisible by 4 (K/V fold 2x2 patches), got {self.embed_dim}")
        if self.psa_mask not in PSA_MASKS:
            raise ValueError(f"psa_mask must be one of {PSA_MASKS}, got {self.psa_mask!r}")
        if not self.depths or len(self.depths) != len(self.num_heads):
            raise ValueError(f"depths {self.depths} and num_heads {self.num_heads} must have equal length")
        for h in self.num_heads:
            if h < 1 or self.embed_dim % h:
                raise ValueError(f"num_heads {h} must divide embed_dim {self.embed_dim}")
            if self.variant != "plain" and self.embed_dim % (2 * h):
                raise ValueError(f"variant {self.variant}: 2 * num_heads ({2 * h}) must divide embed_dim")
        validate_hier(self, depths=self.depths, native_window=self.window)


# c2d_unit 8: the schedule (8, 4, 1, 4, 8) gives windows 64/32/8/32/64 as for SwinIR-L. Scaling
# it by SRFormer's own window (16 -> 128/64/16/64/128) costs MORE than HiT-SRF at x4 (58.4G vs
# 57.1G: 128-pixel windows pad a 320x180 input to 384x256), while unit 8 costs 52.2G (-8.6%).
FLAVORS: dict[str, dict] = {
    "light": {"c2d_unit": 8},
    "tiny": {
        "embed_dim": 32,
        "depths": (2, 2),
        "num_heads": (2, 2),
        "window": 8,
        "hier_base_window": 4,
        "hit_ratios": (1.0, 2.0),
        "c2d_schedule": (2.0, 1.0, 2.0),
        "c2d_unit": 4,
    },
}


def make_config(*, flavor: str, variant: str) -> SRFormerConfig:
    if flavor not in FLAVORS:
        raise ValueError(f"unknown flavor {flavor!r} for srformer_l; choose one of {sorted(FLAVORS)}")
    fields = dict(FLAVORS[flavor])
    groups = len(fields.get("depths", SRFormerConfig.depths))
    if variant == "hit":
        fields["depths"] = (len(fields.get("hit_ratios", HierFields.hit_ratios)),) * groups
    elif variant == "c2d":
        fields["depths"] = (len(fields.get("c2d_schedule", HierFields.c2d_schedule)),) * groups
    return SRFormerConfig(variant=variant, **fields)


def psa_mask(h: int, w: int, window: int, shift: int, mode: str, device=None) -> torch.Tensor:
    """`(nW, N, N/4)` additive mask for shifted PSA on an `(h, w)` map (multiples of window)."""
    pw = window // 2
    q_lab = shift_region_labels(h, w, window, shift, device)
    if mode == "exact":
        k_lab = q_lab[::2, ::2]  # a key token is a 2x2 patch; its pixels share one label
    else:  # the official slices on the half-size key map
        rows = torch.arange(h // 2, device=device)
        cols = torch.arange(w // 2, device=device)
        k_lab = 2 * (rows >= h // 2 - pw).long()[:, None] * 3 + 2 * (cols >= w // 2 - pw).long()[None, :]
    q_win = window_partition(q_lab[None, :, :, None], window, window)[0, :, :, 0]  # (nW, N)
    k_win = window_partition(k_lab[None, :, :, None], pw, pw)[0, :, :, 0]  # (nW, N/4)
    diff = q_win[:, :, None] != k_win[:, None, :]
    return torch.zeros(diff.shape, device=device).masked_fill(diff, MASK_VALUE)


class PermutedAttention(nn.Module):
    """PSA `(B, nW, N, C) -> (B, nW, N, C)`, mask `(nW, N, N/4)` or None.

    Fused path: SDPA with the bias (+ mask) as `attn_mask`; `fused = False`: explicit math.
    Parameter names follow the official SRFormer (`q`, `kv`, `proj`, `relative_position_bias_table`).
    """

    def __init__(self, *, dim: int, num_heads: int, window: int, qkv_bias: bool = True):
        super().__init__()
        self.dim, self.num_heads, self.window = dim, num_heads, window
        self.pw = window // 2
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused = True
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim // 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * self.pw - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        # query (y, x) uses the row of its permuted position (y//2, x//2)
        ys = torch.arange(window).repeat_interleave(window)
        xs = torch.arange(window).repeat(window)
        small = relative_position_index(self.pw, self.pw)
        self.register_buffer("aligned_index", small[(ys // 2) * self.pw + xs // 2], persistent=False)

    def position_bias(self) -> torch.Tensor:
        """`(heads, N, N/4)`."""
        n = self.window * self.window
        bias = self.relative_position_bias_table[self.aligned_index.view(-1)]
        return bias.view(n, n // 4, self.num_heads).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, nw, n, c = x.shape
        pw, hd = self.pw, self.head_dim
        q = self.q(x).view(b, nw, n, self.num_heads, hd).transpose(2, 3)  # (B, nW, heads, N, d)
        # fold each 2x2 patch of the C/4-channel K and V maps into C channels (official order)
        kv = self.kv(x).view(b, nw, pw, 2, pw, 2, 2, c // 4).permute(0, 1, 2, 4, 6, 3, 5, 7)
        kv = kv.reshape(b, nw, n // 4, 2, self.num_heads, hd).permute(3, 0, 1, 4, 2, 5)
        k, v = kv[0], kv[1]  # (B, nW, heads, N/4, d)
        bias = self.position_bias()
        if mask is not None:
            bias = bias[None] + mask[:, None]
        out = attend(q, k, v, bias, scale=self.scale, fused=self.fused)
        return self.proj(out.transpose(2, 3).reshape(b, nw, n, c))


class PSABlock(ShiftedWindowBlock):
    """SRFormer block on `(B, H, W, C)`, any H, W: x + PSA(LN(x)) (shifted on odd blocks),
    then x + ConvFFN(LN(x))."""

    def __init__(self, *, dim, num_heads, window, shift, mlp_ratio, ffn_kernel, qkv_bias, mask_mode):
        super().__init__()
        self.window, self.shift, self.mask_mode = window, shift, mask_mode
        self.norm1 = nn.LayerNorm(dim)
        self.attn = PermutedAttention(dim=dim, num_heads=num_heads, window=window, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = ConvFFN(dim=dim, hidden=int(dim * mlp_ratio), kernel=ffn_kernel)

    def make_mask(self, hp: int, wp: int, device) -> torch.Tensor:
        return psa_mask(hp, wp, self.window, self.shift, self.mask_mode, device)


class SRFormerBackbone(WindowTransformerBackbone):
    """Normalised `(B, 3, h, w)` -> features `(B, C, h, w)`; same outer structure as SwinIR."""

    def __init__(self, cfg: SRFormerConfig):
        def make_native(window: int, index: int, heads: int) -> nn.Module:
            return PSABlock(dim=cfg.embed_dim, num_heads=heads, window=window,
                            shift=window // 2 if index % 2 else 0, mlp_ratio=cfg.mlp_ratio,
                            ffn_kernel=cfg.ffn_kernel, qkv_bias=cfg.qkv_bias, mask_mode=cfg.psa_mask)

        super().__init__(cfg, make_native=make_native, ffn="convffn", ffn_kernel=cfg.ffn_kernel)


def build_backbone(cfg: SRFormerConfig) -> SRFormerBackbone:
    return SRFormerBackbone(cfg)


# ours -> official (SRFormer-light and HiT-SRF share this layout)
_RENAMES = (
    (r"^groups\.(\d+)\.body\.blocks\.", r"layers.\1.residual_group.blocks."),
    (r"^groups\.(\d+)\.conv\.", r"layers.\1.conv."),
    (r"^embed_norm\.", r"patch_embed.norm."),
    (r"\.mlp\.dwconv\.", r".mlp.dwconv.depthwise_conv.0."),
)


def official_key_map(cfg: SRFormerConfig) -> dict[str, str | None]:
    """Official SRFormer-light (plain) or HiT-SRF (hit) checkpoint key -> our backbone key."""
    from c2disr.models.checkpoints import derive_key_map

    if cfg.variant == "c2d":
        raise ValueError("srformer_l variant c2d has no published checkpoint (plain: SRFormer-light, hit: HiT-SRF)")
    derived: dict[str, None] = {}
    if cfg.variant == "plain":
        for i, depth in enumerate(cfg.depths):
            for j in range(depth):
                derived[f"layers.{i}.residual_group.blocks.{j}.attn.aligned_relative_position_index"] = None
                if j % 2:
                    derived[f"layers.{i}.residual_group.blocks.{j}.attn_mask"] = None
    return derive_key_map(build_backbone, cfg, _RENAMES, derived)
