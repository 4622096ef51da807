"""MambaIRv2-L: the lightweight MambaIRv2 (Guo et al., CVPR 2025) as a c2disr backbone.

Structure (official ``MambaIRv2Light``, read for facts; written here in our own terms)::

    x (B,3,H,W) normalised -> conv_first -> f (B,C,H,W) -> channels-last -> LayerNorm
      -> groups[i]: body (depth blocks) -> 3x3 conv -> + group input        (residual groups)
      -> LayerNorm -> conv_after_body -> + f -> (B,C,H,W) features

Every block is two residual units of the same shape,
``unit(x) = scale * x + (y + FFN(LN(y)))`` with ``y = x + mixer(LN(x))``:

- ``window``: the mixer is (shifted) window self-attention (odd blocks shift by half a window);
- ``scan``: the mixer is the attentive state-space module (ASSM): a router assigns each token
  one of ``num_tokens`` prompts (a low-rank pool ``prompt_coeffs @ prompt_basis``); tokens are
  re-ordered so tokens with the same prompt are neighbours, a single selective scan runs over
  the re-ordered sequence with the prompt added to its output projection C, and the result
  is put back in raster order.

The FFN is a gated MLP: fc1 -> GELU -> halves (a, b), b -> LayerNorm -> depthwise conv, a * b -> fc2.

Variants (``variant``, see ``hier.py``): only the window unit changes; the scan unit is the same.
``hit``: block i of a group uses spatial-channel correlation (SCC) with window
``hier_base_window * hit_ratios[i]`` (default 4, 8, 16, 32, 64 for the five blocks).
``c2d``: the group is an encoder-decoder over ``c2d_unit * c2d_schedule`` (default 64, 32, 8, 32,
64); windows above the native 16 use SCC, the others window attention; decoder blocks fuse the
output of the encoder block with the same window (concat + Linear).

Two behaviours of the official code are kept on purpose, because the published weights were
trained with them: the prompts are added in *raster* order to the *sorted* sequence
(``prompt_order="raster"``; MambaIR issue #115; ``"sorted"`` aligns each prompt with its token),
and inputs are padded to the window by mirroring with the edge pixel repeated. One is changed:
the official router samples fresh Gumbel noise at inference too, so its outputs vary from run to
run; here eval mode draws that noise from a generator seeded per block (``eval_route_seed``), so
an evaluation repeats exactly and still sees the routing statistics the weights were trained
with. (Noise-free arg-max routing, ``eval_route_seed=None``, costs 0.07 dB on Set5 x2 with the
published weights: 38.20 instead of 38.27 dB.) Training keeps the straight-through Gumbel sample.
"""

from __future__ import annotations

import dataclasses
import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from c2disr.models.common import (
    WindowAttention,
    init_transformer_weights,
    pad_bhwc,
    shifted_window_mask,
    window_partition,
    window_reverse,
)
from c2disr.models.hier import SCC, C2DBody, HierFields, Sequential, c2d_windows, hit_windows, validate_hier
from c2disr.models.scan import selective_scan

__all__ = ["MambaIRv2Config", "MambaIRv2", "FLAVORS", "make_config", "build_backbone", "convert_official_state_dict"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class MambaIRv2Config(HierFields):
    """MambaIRv2 backbone. Defaults are the published light model (``mambairv2_light`` x2..x4).

    in_channels: image channels (3, RGB).
    embed_dim: feature channels C.
    depths: blocks per residual group.
    num_heads: window-attention (and SCC) heads, one entry per group.
    window: native attention window (input is padded to a multiple of it).
    d_state: state size N of the selective scan.
    inner_rank: rank of the prompt pool factorisation (num_tokens x rank) @ (rank x d_state).
    num_tokens: number of prompts the router chooses from.
    ffn_kernel: depthwise kernel of the gated FFN (the official light code hard-codes 5).
    mlp_ratio: hidden width of the FFNs and of the scan's inner width, as a multiple of C.
    qkv_bias: bias of the attention's qkv projection.
    resi_connection: "1conv" (3x3 conv) or "3conv" (bottleneck) at the end of each group.
    prompt_order: "raster" (as the official code and its weights) or "sorted".
    scan_backend: selective-scan backend ("auto", "chunked", "cuda", "reference"); see scan.py.
    scan_chunk: chunk length of the pure-PyTorch scan (speed only).
    eval_route_seed: seed of the router's Gumbel noise in eval mode (repeatable evaluations that
        keep the routing statistics the weights were trained with); None = noise-free arg-max.
    """

    in_channels: int = 3
    embed_dim: int = 48
    depths: tuple[int, ...] = (5, 5, 5, 5)
    num_heads: tuple[int, ...] = (4, 4, 4, 4)
    window: int = 16
    d_state: int = 8
    inner_rank: int = 32
    num_tokens: int = 64
    ffn_kernel: int = 5
    mlp_ratio: float = 1.0
    qkv_bias: bool = True
    resi_connection: str = "1conv"
    prompt_order: str = "raster"
    scan_backend: str = "auto"
    scan_chunk: int = 64
    eval_route_seed: int | None = 0
    # Five blocks per group: HiT's expanding schedule 4..64 and C2D's U-shape 64-32-8-32-64.
    hit_ratios: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)
    c2d_unit: int = 8

    def __post_init__(self):
        for name in ("depths", "hit_ratios", "c2d_schedule"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "num_heads", tuple(self.num_heads))
        if not self.depths or min(self.depths) < 1:
            raise ValueError(f"depths must be non-empty positive integers, got {self.depths}")
        if len(self.num_heads) != len(self.depths):
            raise ValueError(f"num_heads {self.num_heads} needs one entry per group (depths {self.depths})")
        for h in self.num_heads:
            if h < 1 or self.embed_dim % h:
                raise ValueError(f"embed_dim {self.embed_dim} must be divisible by num_heads {h}")
            if self.variant != "plain" and self.embed_dim % (2 * h):
                raise ValueError(f"variant {self.variant}: SCC splits C into Q and V, so 2 * num_heads "
                                 f"({2 * h}) must divide embed_dim {self.embed_dim}")
        positive = ("in_channels", "embed_dim", "window", "d_state", "inner_rank", "num_tokens", "ffn_kernel")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.ffn_kernel % 2 == 0:
            raise ValueError(f"ffn_kernel must be odd (same-size depthwise conv), got {self.ffn_kernel}")
        if self.embed_dim < 3:
            raise ValueError(f"embed_dim must be >= 3 (the router's hidden width is embed_dim // 3), "
                             f"got {self.embed_dim}")
        hidden = int(self.embed_dim * self.mlp_ratio)
        if hidden < 2 or hidden % 2:
            raise ValueError(f"embed_dim * mlp_ratio = {hidden} must be an even width >= 2 "
                             f"(the gated FFN splits it in halves)")
        if self.resi_connection not in ("1conv", "3conv"):
            raise ValueError(f"resi_connection must be '1conv' or '3conv', got {self.resi_connection!r}")
        if self.prompt_order not in ("raster", "sorted"):
            raise ValueError(f"prompt_order must be 'raster' or 'sorted', got {self.prompt_order!r}")
        if self.scan_backend not in ("auto", "chunked", "cuda", "reference"):
            raise ValueError(f"scan_backend must be auto|chunked|cuda|reference, got {self.scan_backend!r}")
        if self.scan_chunk < 2:
            raise ValueError(f"scan_chunk must be >= 2, got {self.scan_chunk}")
        validate_hier(self, depths=self.depths, native_window=self.window)


# Named sizes. "light" is the published model; "tiny" is for tests (seconds on a CPU). The
# variant fields keep their class defaults unless a flavor needs otherwise (tiny's shorter
# groups need shorter schedules).
FLAVORS: dict[str, dict] = {
    "light": {},
    "tiny": {
        "embed_dim": 32, "depths": (3, 3), "num_heads": (2, 2), "window": 8, "d_state": 4,
        "inner_rank": 8, "num_tokens": 8, "hier_base_window": 4,
        "hit_ratios": (1.0, 2.0, 4.0), "c2d_schedule": (4.0, 1.0, 4.0), "c2d_unit": 4,
    },
}


def make_config(*, flavor: str, variant: str) -> MambaIRv2Config:
    """Config for a flavor and variant (registry contract); hit/c2d groups get one block per
    entry of their window schedule."""
    if flavor not in FLAVORS:
        raise ValueError(f"unknown flavor {flavor!r} for mambairv2_l; choose one of {sorted(FLAVORS)}")
    fields = dict(FLAVORS[flavor])
    groups = len(fields.get("depths", MambaIRv2Config.depths))
    if variant == "hit":
        fields["depths"] = (len(fields.get("hit_ratios", MambaIRv2Config.hit_ratios)),) * groups
    elif variant == "c2d":
        fields["depths"] = (len(fields.get("c2d_schedule", MambaIRv2Config.c2d_schedule)),) * groups
    return MambaIRv2Config(variant=variant, **fields)


def build_backbone(cfg: MambaIRv2Config) -> "MambaIRv2":
    return MambaIRv2(cfg)


def symmetric_pad(x: torch.Tensor, mult: int) -> torch.Tensor:
    """Pad ``(B, C, H, W)`` at the bottom/right to multiples of ``mult`` by mirroring with the
    edge pixel repeated (rows h-1, h-1, h-2, ...), as the official MambaIRv2 does, repeating the
    mirror when the pad is longer than the image."""
    for dim in (2, 3):
        target = -(-x.shape[dim] // mult) * mult
        while x.shape[dim] < target:
            x = torch.cat([x, x.flip(dim)], dim)
        x = x.narrow(dim, 0, target)
    return x


class _MaskCache:
    """Shifted-window masks shared by the blocks of one backbone during one forward pass.

    Blocks ask for ``(H, W, window, shift)``; the backbone clears the cache before and after each
    forward, so nothing size-dependent outlives a call (and a state_dict never holds it).
    """

    def __init__(self):
        self._masks: dict[tuple, torch.Tensor] = {}

    def get(self, h: int, w: int, window: int, shift: int, device) -> torch.Tensor:
        key = (h, w, window, shift, str(device))
        if key not in self._masks:
            self._masks[key] = shifted_window_mask(h, w, window, shift, device)
        return self._masks[key]

    def clear(self) -> None:
        self._masks.clear()


class ShiftedWindowAttention(WindowAttention):
    """Window attention on a ``(B, H, W, C)`` map of any size: pad to the window, cyclic shift by
    ``shift`` (0 = none), attend inside windows (masking pixels the shift brought together), undo.
    Keys as the shared ``WindowAttention`` (``qkv``, ``proj``, ``relative_position_bias_table``)."""

    def __init__(self, *, dim: int, num_heads: int, window: int, shift: int, qkv_bias: bool,
                 masks: _MaskCache):
        super().__init__(dim=dim, num_heads=num_heads, window=window, qkv_bias=qkv_bias)
        self.shift = shift
        self._masks = masks

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C) -> (B, H, W, C)
        h, w = x.shape[1:3]
        xp = pad_bhwc(x, self.window, self.window)  # no-op when the backbone already padded
        hp, wp = xp.shape[1:3]
        mask = None
        if self.shift:
            xp = torch.roll(xp, shifts=(-self.shift, -self.shift), dims=(1, 2))
            mask = self._masks.get(hp, wp, self.window, self.shift, x.device)
        out = super().forward(window_partition(xp, self.window, self.window), mask)  # (B, nW, N, C)
        out = window_reverse(out, self.window, self.window, hp, wp)
        if self.shift:
            out = torch.roll(out, shifts=(self.shift, self.shift), dims=(1, 2))
        return out[:, :h, :w]


class PaddedSCC(SCC):
    """HiT's spatial-channel correlation on a ``(B, H, W, C)`` map of any size (pad, correlate, crop)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[1:3]
        return super().forward(pad_bhwc(x, self.window, self.window))[:, :h, :w]


class GatedFFN(nn.Module):
    """``(B, H, W, C) -> (B, H, W, C)``: fc1 -> GELU -> halves (a, b); b -> LayerNorm -> depthwise
    k x k conv; a * b -> fc2. The conv gate gives the FFN local spatial context."""

    def __init__(self, *, dim: int, hidden: int, kernel: int):
        super().__init__()
        half = hidden // 2
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.gate = nn.Module()
        self.gate.norm = nn.LayerNorm(half)
        self.gate.conv = nn.Conv2d(half, half, kernel, padding=kernel // 2, groups=half)
        self.fc2 = nn.Linear(half, dim)
        self.half = half

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.fc1(x))
        a, b = x[..., : self.half], x[..., self.half : 2 * self.half]
        b = self.gate.conv(self.gate.norm(b).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.fc2(a * b)


class ASSM(nn.Module):
    """Attentive state-space module, ``(B, H, W, C) -> (B, H, W, C)`` (see the module docstring).

    Selective-scan parameters in Mamba's form: ``x_proj`` (C' -> dt_rank + 2N, no bias),
    ``dt_proj`` (dt_rank -> C'; its bias is the step bias inside the softplus), ``A_log``
    (A = -exp(A_log), (C', N)), ``D`` (C',). C' = int(C * mlp_ratio).
    """

    def __init__(self, *, dim: int, d_state: int, inner_rank: int, num_tokens: int, mlp_ratio: float,
                 prompt_order: str, scan_backend: str, scan_chunk: int, eval_route_seed: int | None,
                 block_index: int):
        super().__init__()
        self.eval_route_seed, self.block_index = eval_route_seed, block_index
        inner = int(dim * mlp_ratio)
        self.d_state, self.num_tokens, self.inner = d_state, num_tokens, inner
        self.dt_rank = math.ceil(inner / 16)
        self.prompt_order, self.scan_backend, self.scan_chunk = prompt_order, scan_backend, scan_chunk
        self.in_proj = nn.Conv2d(dim, inner, 1)
        self.cpe = nn.Conv2d(inner, inner, 3, padding=1, groups=inner)  # conv position gate
        self.route = nn.Sequential(nn.Linear(dim, dim // 3), nn.GELU(), nn.Linear(dim // 3, num_tokens))
        self.prompt_coeffs = nn.Parameter(torch.empty(num_tokens, inner_rank))
        self.prompt_basis = nn.Parameter(torch.empty(inner_rank, d_state))
        self.x_proj = nn.Linear(inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, inner)
        self.A_log = nn.Parameter(torch.empty(inner, d_state))
        self.D = nn.Parameter(torch.empty(inner))
        self.out_norm = nn.LayerNorm(inner)
        self.out_proj = nn.Linear(inner, dim)

    @torch.no_grad()
    def reset_scan_parameters(self, *, dt_min: float = 1e-3, dt_max: float = 0.1) -> None:
        """Mamba's initialisation (the generic Linear init must not touch these): S4D-real A,
        D = 1, step bias so softplus(bias) is log-uniform in [dt_min, dt_max], small prompts."""
        self.x_proj.reset_parameters()
        std = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(self.inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=1e-4)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.A_log.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).expand(self.inner, -1))
        self.D.fill_(1.0)
        nn.init.uniform_(self.prompt_coeffs, -1 / self.num_tokens, 1 / self.num_tokens)
        nn.init.uniform_(self.prompt_basis, -1 / self.prompt_basis.shape[0], 1 / self.prompt_basis.shape[0])

    def _eval_choice(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, L, 1) prompt index per token at inference: arg-max of the logits plus Gumbel noise
        from a generator seeded by (eval_route_seed, block index), the same for every image of
        the batch; plain arg-max when eval_route_seed is None or on the meta device."""
        if self.eval_route_seed is None or logits.device.type == "meta":
            return logits.argmax(-1, keepdim=True)
        gen = torch.Generator(device=logits.device)
        gen.manual_seed(self.eval_route_seed * 1_000_003 + self.block_index)
        noise = torch.empty(logits.shape[1:], device=logits.device, dtype=logits.dtype)
        noise = -noise.exponential_(generator=gen).log()  # Gumbel(0, 1), (L, T)
        return (logits + noise).argmax(-1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        n = h * w
        tokens = x.reshape(b, n, c)
        logits = F.log_softmax(self.route(tokens), dim=-1)  # (B, L, T)
        if self.training:  # straight-through one-hot sample: the router learns through the prompt
            policy = F.gumbel_softmax(logits, hard=True, dim=-1)
        else:
            policy = torch.zeros_like(logits).scatter_(-1, self._eval_choice(logits), 1.0)
        prompt = policy @ (self.prompt_coeffs @ self.prompt_basis)  # (B, L, N)
        order = torch.argsort(policy.detach().argmax(-1), dim=-1, stable=True)  # group by prompt
        inverse = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=x.device).expand(b, n))

        u = self.in_proj(x.permute(0, 3, 1, 2))  # (B, C', H, W)
        u = u * torch.sigmoid(self.cpe(u))
        u = u.flatten(2).transpose(1, 2)  # (B, L, C')
        u = torch.gather(u, 1, order[..., None].expand(-1, -1, self.inner))
        if self.prompt_order == "sorted":
            prompt = torch.gather(prompt, 1, order[..., None].expand(-1, -1, self.d_state))

        dt, bs, cs = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight)  # (B, L, C'); bias goes inside the softplus
        y = selective_scan(
            u.transpose(1, 2), dt.transpose(1, 2), -torch.exp(self.A_log.float()),
            bs.transpose(1, 2), (cs + prompt).transpose(1, 2), self.D.float(),
            delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
            chunk=self.scan_chunk, backend=self.scan_backend,
        ).to(x.dtype)  # (B, C', L)
        y = self.out_proj(self.out_norm(y.transpose(1, 2)))  # (B, L, C)
        y = torch.gather(y, 1, inverse[..., None].expand(-1, -1, c))
        return y.view(b, h, w, c)


class ResidualUnit(nn.Module):
    """``x -> scale * x + (y + ffn(norm2(y)))`` with ``y = x + mixer(norm1(x))``; the learned
    per-channel ``scale`` (init 1e-4) re-weights the unit's input skip."""

    def __init__(self, *, dim: int, mixer: nn.Module, mixer_name: str, ffn: nn.Module):
        super().__init__()
        self.mixer_name = mixer_name
        self.norm1 = nn.LayerNorm(dim)
        self.add_module(mixer_name, mixer)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = ffn
        self.scale = nn.Parameter(torch.full((dim,), 1e-4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x + getattr(self, self.mixer_name)(self.norm1(x))
        return x * self.scale + y + self.ffn(self.norm2(y))


class MambaIRv2Block(nn.Module):
    """One MambaIRv2 layer, ``(B, H, W, C) -> (B, H, W, C)``: a window unit, then a scan unit."""

    def __init__(self, cfg: MambaIRv2Config, *, num_heads: int, window: int, shift: int, scc: bool,
                 masks: _MaskCache, block_index: int):
        super().__init__()
        dim = cfg.embed_dim
        hidden = int(dim * cfg.mlp_ratio)

        def ffn():
            return GatedFFN(dim=dim, hidden=hidden, kernel=cfg.ffn_kernel)

        if scc:
            attn = PaddedSCC(dim=dim, num_heads=num_heads, window=window, base_window=cfg.hier_base_window)
        else:
            attn = ShiftedWindowAttention(dim=dim, num_heads=num_heads, window=window, shift=shift,
                                          qkv_bias=cfg.qkv_bias, masks=masks)
        self.window = ResidualUnit(dim=dim, mixer=attn, mixer_name="attn", ffn=ffn())
        assm = ASSM(dim=dim, d_state=cfg.d_state, inner_rank=cfg.inner_rank, num_tokens=cfg.num_tokens,
                    mlp_ratio=cfg.mlp_ratio, prompt_order=cfg.prompt_order, scan_backend=cfg.scan_backend,
                    scan_chunk=cfg.scan_chunk, eval_route_seed=cfg.eval_route_seed, block_index=block_index)
        self.scan = ResidualUnit(dim=dim, mixer=assm, mixer_name="assm", ffn=ffn())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scan(self.window(x))


class ResidualGroup(nn.Module):
    """``(B, H, W, C) -> (B, H, W, C)``: body, then a conv on the map, plus the group input."""

    def __init__(self, cfg: MambaIRv2Config, *, index: int, masks: _MaskCache):
        super().__init__()
        dim, depth = cfg.embed_dim, cfg.depths[index]
        heads = cfg.num_heads[index]

        def block(window: int, i: int, *, scc: bool = False) -> MambaIRv2Block:
            # Shift every other block by half a window (not SCC blocks: HiT varies windows instead).
            shift = window // 2 if (i % 2 == 1 and not scc and window > 1) else 0
            return MambaIRv2Block(cfg, num_heads=heads, window=window, shift=shift, scc=scc, masks=masks,
                                  block_index=sum(cfg.depths[:index]) + i)

        if cfg.variant == "plain":
            self.body = Sequential([block(cfg.window, i) for i in range(depth)])
        elif cfg.variant == "hit":
            self.body = Sequential([block(win, i, scc=True) for i, win in enumerate(hit_windows(cfg))])
        else:  # c2d
            wins = c2d_windows(cfg, cfg.window)
            blocks = [block(win, i, scc=win > cfg.window) for i, win in enumerate(wins)]
            self.body = C2DBody(dim=dim, windows=wins, blocks=blocks, mode=cfg.c2d_mode)
        if cfg.resi_connection == "1conv":
            self.conv = nn.Conv2d(dim, dim, 3, padding=1)
        else:
            self.conv = nn.Sequential(
                nn.Conv2d(dim, dim // 4, 3, padding=1), nn.LeakyReLU(0.2, inplace=True),
                nn.Conv2d(dim // 4, dim // 4, 1), nn.LeakyReLU(0.2, inplace=True),
                nn.Conv2d(dim // 4, dim, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x).permute(0, 3, 1, 2)
        return self.conv(y).permute(0, 2, 3, 1) + x


class MambaIRv2(nn.Module):
    """MambaIRv2 backbone (plain / hit / c2d), ``(B, in_channels, H, W) -> (B, embed_dim, H, W)``.

    Input: the normalised image (SRModel subtracts the DIV2K mean), any H, W; it is padded to
    the window inside and the features are cropped back (``crop=False``: returned on the padded
    grid, multiples of the window, as the official forward feeds them to its upsampler before
    cropping its output). Output: features after ``conv_after_body`` and the long residual,
    ready for a head. ``out_channels`` = embed_dim.
    """

    def __init__(self, cfg: MambaIRv2Config):
        super().__init__()
        self.cfg = cfg
        self.out_channels = cfg.embed_dim
        dim = cfg.embed_dim
        self._masks = _MaskCache()
        self.conv_first = nn.Conv2d(cfg.in_channels, dim, 3, padding=1)
        self.embed_norm = nn.LayerNorm(dim)
        self.groups = nn.ModuleList(ResidualGroup(cfg, index=i, masks=self._masks) for i in range(len(cfg.depths)))
        self.norm = nn.LayerNorm(dim)
        if cfg.resi_connection == "1conv":
            self.conv_after_body = nn.Conv2d(dim, dim, 3, padding=1)
        else:
            self.conv_after_body = nn.Sequential(
                nn.Conv2d(dim, dim // 4, 3, padding=1), nn.LeakyReLU(0.2, inplace=True),
                nn.Conv2d(dim // 4, dim // 4, 1), nn.LeakyReLU(0.2, inplace=True),
                nn.Conv2d(dim // 4, dim, 3, padding=1))
        init_transformer_weights(self)
        for m in self.modules():  # modules with their own initialisation, after the generic one
            if isinstance(m, ASSM):
                m.reset_scan_parameters()
            elif isinstance(m, C2DBody):
                m.init_weights()  # skip fusions start as identity on the decoder's own input

    def forward(self, x: torch.Tensor, crop: bool = True) -> torch.Tensor:
        h, w = x.shape[-2:]
        self._masks.clear()
        try:
            x = symmetric_pad(x, self.cfg.window)
            feat = self.conv_first(x)  # (B, C, Hp, Wp)
            t = self.embed_norm(feat.permute(0, 2, 3, 1))  # (B, Hp, Wp, C)
            for group in self.groups:
                t = group(t)
            t = self.norm(t).permute(0, 3, 1, 2)
            out = self.conv_after_body(t) + feat
        finally:
            self._masks.clear()
        return out[:, :, :h, :w] if crop else out


# ----------------------------------------------------------------------------------------------
# Official checkpoint key mapping

_BLOCK_RULES: list[tuple[str, str, str]] = [
    # (official key inside a layer, our key inside a block, shape transform)
    (r"scale1", "window.scale", ""),
    (r"norm1\.(weight|bias)", r"window.norm1.\1", ""),
    (r"wqkv\.(weight|bias)", r"window.attn.qkv.\1", ""),
    (r"win_mhsa\.relative_position_bias_table", "window.attn.relative_position_bias_table", ""),
    (r"win_mhsa\.proj\.(weight|bias)", r"window.attn.proj.\1", ""),
    (r"norm2\.(weight|bias)", r"window.norm2.\1", ""),
    (r"convffn1\.fc(1|2)\.(weight|bias)", r"window.ffn.fc\1.\2", ""),
    (r"convffn1\.sg\.(norm|conv)\.(weight|bias)", r"window.ffn.gate.\1.\2", ""),
    (r"scale2", "scan.scale", ""),
    (r"norm3\.(weight|bias)", r"scan.norm1.\1", ""),
    (r"norm4\.(weight|bias)", r"scan.norm2.\1", ""),
    (r"convffn2\.fc(1|2)\.(weight|bias)", r"scan.ffn.fc\1.\2", ""),
    (r"convffn2\.sg\.(norm|conv)\.(weight|bias)", r"scan.ffn.gate.\1.\2", ""),
    (r"embeddingA\.weight", "scan.assm.prompt_basis", ""),
    (r"assm\.embeddingB\.weight", "scan.assm.prompt_coeffs", ""),
    (r"assm\.in_proj\.0\.(weight|bias)", r"scan.assm.in_proj.\1", ""),
    (r"assm\.CPE\.0\.(weight|bias)", r"scan.assm.cpe.\1", ""),
    (r"assm\.route\.(0|2)\.(weight|bias)", r"scan.assm.route.\1.\2", ""),
    (r"assm\.out_norm\.(weight|bias)", r"scan.assm.out_norm.\1", ""),
    (r"assm\.out_proj\.(weight|bias)", r"scan.assm.out_proj.\1", ""),
    # The official scan stacks K copies of each projection for multi-direction scans; v2 has K=1.
    (r"assm\.selectiveScan\.x_proj_weight", "scan.assm.x_proj.weight", "squeeze0"),
    (r"assm\.selectiveScan\.dt_projs_weight", "scan.assm.dt_proj.weight", "squeeze0"),
    (r"assm\.selectiveScan\.dt_projs_bias", "scan.assm.dt_proj.bias", "squeeze0"),
    (r"assm\.selectiveScan\.A_logs", "scan.assm.A_log", ""),
    (r"assm\.selectiveScan\.Ds", "scan.assm.D", ""),
]

_TOP_RULES: list[tuple[str, str]] = [
    (r"conv_first\.(weight|bias)", r"backbone.conv_first.\1"),
    (r"patch_embed\.norm\.(weight|bias)", r"backbone.embed_norm.\1"),
    (r"layers\.(\d+)\.conv\.(weight|bias)", r"backbone.groups.\1.conv.\2"),
    (r"layers\.(\d+)\.conv\.(\d+)\.(weight|bias)", r"backbone.groups.\1.conv.\2.\3"),  # 3conv
    (r"norm\.(weight|bias)", r"backbone.norm.\1"),
    (r"conv_after_body\.(weight|bias)", r"backbone.conv_after_body.\1"),
    (r"conv_after_body\.(\d+)\.(weight|bias)", r"backbone.conv_after_body.\1.\2"),
    (r"upsample\.0\.(weight|bias)", r"head.upsample.0.\1"),
]

# Derived from the window size, rebuilt by our model as a non-persistent buffer.
_DERIVED_KEYS = ("relative_position_index_SA",)


def convert_official_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map an official MambaIRv2-light state dict (``ckpt['params']``) to SRModel keys.

    Strict: every official key must match a rule (``relative_position_index_SA``, which we
    derive, is dropped by name); an unknown key raises ``KeyError`` listing all of them.
    Official ``layers.i.residual_group.layers.j.*`` become ``backbone.groups.i.body.blocks.j.*``
    (plain variant); ``upsample.0.*`` becomes the pixelshuffledirect ``head.upsample.0.*``.
    Tensors are not copied; ``(1, ...)`` stacks of the K=1 scan projections are squeezed.
    """
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    block_re = re.compile(r"layers\.(\d+)\.residual_group\.layers\.(\d+)\.(.+)")
    for key, value in sd.items():
        if key in _DERIVED_KEYS:
            continue
        new = None
        m = block_re.fullmatch(key)
        if m:
            gi, bi, rest = m.groups()
            for pattern, repl, transform in _BLOCK_RULES:
                if re.fullmatch(pattern, rest):
                    new = f"backbone.groups.{gi}.body.blocks.{bi}." + re.sub(f"^{pattern}$", repl, rest)
                    if transform == "squeeze0":
                        if value.shape[0] != 1:
                            raise ValueError(f"official key {key}: expected a stack of 1 scan direction, "
                                             f"got shape {tuple(value.shape)}")
                        value = value[0]
                    break
        else:
            for pattern, repl in _TOP_RULES:
                if re.fullmatch(pattern, key):
                    new = re.sub(f"^{pattern}$", repl, key)
                    break
        if new is None:
            unknown.append(key)
        elif new in out:
            raise KeyError(f"official keys map twice to {new} (second: {key})")
        else:
            out[new] = value
    if unknown:
        raise KeyError(f"{len(unknown)} official MambaIRv2 key(s) have no mapping: {unknown[:10]}"
                       f"{' ...' if len(unknown) > 10 else ''}; is this a MambaIRv2-light checkpoint?")
    return out
