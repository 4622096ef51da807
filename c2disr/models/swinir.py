"""SwinIR-L (lightweight SwinIR, "SwinIR-S" in its repository) with plain / hit / c2d bodies.

Published light setting: embed 60, 4 residual groups of 6 Swin blocks, 6 heads, window 8,
MLP ratio 2, pixelshuffledirect upsampler, DIV2K mean shift (about 0.91M params at x2).
Structure (official key names in brackets where ours differ):

    conv_first 3x3 (3 -> C)
    embed_norm LayerNorm              [patch_embed.norm]
    groups.i: body (blocks) -> conv 3x3 -> + input        [layers.i.residual_group.blocks.j / layers.i.conv]
    norm LayerNorm -> conv_after_body 3x3 -> + conv_first output  -> features (B, C, h, w)

A Swin block: x + W-MSA(LN(x)) with a cyclic shift of window/2 on odd blocks, then x + MLP(LN(x)).
The plain model pads the (normalised) image to a multiple of the window with reflection, as the
official forward does; the discrete head runs on the padded features and its output is cropped
(the official order), while `SRModel.features` crops the features back for the continuous head;
hit and c2d blocks pad to their own windows.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from c2disr.models.common import (
    Mlp,
    ShiftedWindowBlock,
    WindowAttention,
    WindowTransformerBackbone,
    shifted_window_mask,
)
from c2disr.models.hier import HierFields, validate_hier


@dataclasses.dataclass(frozen=True, kw_only=True)
class SwinIRConfig(HierFields):
    """SwinIR backbone config (plus the plain/hit/c2d fields of HierFields).

    embed_dim: channels C. depths: blocks per residual group (hit/c2d: one per window of the
    schedule). num_heads: heads per group. window: Swin window (the "native" window).
    mlp_ratio: MLP hidden = int(C * mlp_ratio). qkv_bias: bias in the qkv projection.
    """

    embed_dim: int = 60
    depths: tuple[int, ...] = (6, 6, 6, 6)
    num_heads: tuple[int, ...] = (6, 6, 6, 6)
    window: int = 8
    mlp_ratio: float = 2.0
    qkv_bias: bool = True

    def __post_init__(self):
        if self.embed_dim < 1 or self.window < 1 or self.mlp_ratio <= 0:
            raise ValueError(f"embed_dim, window and mlp_ratio must be positive: {self}")
        if not self.depths or len(self.depths) != len(self.num_heads):
            raise ValueError(
                f"depths {self.depths} and num_heads {self.num_heads} must be non-empty and of equal length"
            )
        for h in self.num_heads:
            if h < 1 or self.embed_dim % h:
                raise ValueError(f"num_heads {h} must divide embed_dim {self.embed_dim}")
            if self.variant != "plain" and self.embed_dim % (2 * h):
                raise ValueError(
                    f"variant {self.variant}: SCC splits C into Q and V, so 2 * num_heads ({2 * h}) "
                    f"must divide embed_dim {self.embed_dim}"
                )
        validate_hier(self, depths=self.depths, native_window=self.window)


# Flavor -> field values; variants then set depths to their schedule length.
FLAVORS: dict[str, dict] = {
    "light": {},
    "tiny": {
        "embed_dim": 32,
        "depths": (2, 2),
        "num_heads": (2, 2),
        "window": 4,
        "hier_base_window": 4,
        "hit_ratios": (1.0, 2.0),
        "c2d_schedule": (2.0, 1.0, 2.0),
    },
}


def make_config(*, flavor: str, variant: str) -> SwinIRConfig:
    if flavor not in FLAVORS:
        raise ValueError(f"unknown flavor {flavor!r} for swinir_l; choose one of {sorted(FLAVORS)}")
    fields = dict(FLAVORS[flavor])
    groups = len(fields.get("depths", SwinIRConfig.depths))
    if variant == "hit":
        fields["depths"] = (len(fields.get("hit_ratios", HierFields.hit_ratios)),) * groups
    elif variant == "c2d":
        fields["depths"] = (len(fields.get("c2d_schedule", HierFields.c2d_schedule)),) * groups
    return SwinIRConfig(variant=variant, **fields)


class SwinBlock(ShiftedWindowBlock):
    """Swin transformer block on `(B, H, W, C)`, any H, W (pads to the window, crops back)."""

    def __init__(self, *, dim: int, num_heads: int, window: int, shift: int, mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim=dim, num_heads=num_heads, window=window, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim=dim, hidden=int(dim * mlp_ratio))

    def make_mask(self, hp: int, wp: int, device) -> torch.Tensor:
        return shifted_window_mask(hp, wp, self.window, self.shift, device)


class SwinIRBackbone(WindowTransformerBackbone):
    """Normalised `(B, 3, h, w)` -> features `(B, C, h, w)` (see the module docstring)."""

    def __init__(self, cfg: SwinIRConfig):
        def make_native(window: int, index: int, heads: int) -> nn.Module:
            return SwinBlock(dim=cfg.embed_dim, num_heads=heads, window=window,
                             shift=window // 2 if index % 2 else 0, mlp_ratio=cfg.mlp_ratio,
                             qkv_bias=cfg.qkv_bias)

        super().__init__(cfg, make_native=make_native, ffn="mlp")


def build_backbone(cfg: SwinIRConfig) -> SwinIRBackbone:
    return SwinIRBackbone(cfg)


# Renames between our backbone keys and the official SwinIR / HiT-SIR ones (ours -> official).
_RENAMES = (
    (r"^groups\.(\d+)\.body\.blocks\.", r"layers.\1.residual_group.blocks."),
    (r"^groups\.(\d+)\.conv\.", r"layers.\1.conv."),
    (r"^embed_norm\.", r"patch_embed.norm."),
)


def official_key_map(cfg: SwinIRConfig) -> dict[str, str | None]:
    """Official SwinIR-S (plain) or HiT-SIR (hit) checkpoint key -> our backbone key."""
    from c2disr.models.checkpoints import derive_key_map

    if cfg.variant == "c2d":
        raise ValueError("swinir_l variant c2d has no published checkpoint (plain: SwinIR-S, hit: HiT-SIR)")
    derived: dict[str, None] = {}
    if cfg.variant == "plain":
        for i, depth in enumerate(cfg.depths):
            for j in range(depth):
                derived[f"layers.{i}.residual_group.blocks.{j}.attn.relative_position_index"] = None
                if j % 2:
                    derived[f"layers.{i}.residual_group.blocks.{j}.attn_mask"] = None
    return derive_key_map(build_backbone, cfg, _RENAMES, derived)
