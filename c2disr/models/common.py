"""Pieces shared by the attention backbones: padding, windows, masks, window attention, FFNs.

Layout conventions in this package:
- Images are `(B, 3, H, W)` float RGB. Inside the transformer bodies, features are channels-last
  `(B, H, W, C)`, so every block carries its own spatial size and LayerNorm acts on the last dim.
- A window of side `w` over a `(B, H, W, C)` map (H, W multiples of w) becomes
  `(B, nW, w*w, C)` tokens (row-major inside a window, windows row-major over the map).
- Everything derived from sizes (relative-position indices, shift masks) is either a
  non-persistent buffer or computed in `forward`, so a state_dict holds no size-dependent tensor
  and a model trained on 64x64 patches runs on any image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# DIV2K RGB mean that the official light models subtract from the [0, 1] input (img_range = 1).
DIV2K_RGB_MEAN = (0.4488, 0.4371, 0.4040)

# Additive mask value the official Swin/SRFormer code uses between shifted regions. A finite
# value (not -inf) keeps a fully masked row finite and reproduces the official outputs.
MASK_VALUE = -100.0


def pad_to_multiple(x: torch.Tensor, mult_h: int, mult_w: int) -> torch.Tensor:
    """Pad `(B, C, H, W)` at the bottom/right so H % mult_h == 0 and W % mult_w == 0.

    Reflect padding as the official models use; when the pad is larger than the map (a 17x23
    input inside a 64-pixel window) reflection is repeated, mirroring the already padded map,
    and a side of length 1 is replicated (reflection is undefined there).
    """
    pad_h = (-x.shape[-2]) % mult_h
    pad_w = (-x.shape[-1]) % mult_w
    while pad_h > 0 or pad_w > 0:
        h, w = x.shape[-2:]
        if (pad_h > 0 and h == 1) or (pad_w > 0 and w == 1):
            rh = pad_h if h == 1 else 0
            rw = pad_w if w == 1 else 0
            x = F.pad(x, (0, rw, 0, rh), mode="replicate")
            pad_h -= rh
            pad_w -= rw
            continue
        step_h, step_w = min(pad_h, h - 1), min(pad_w, w - 1)
        x = F.pad(x, (0, step_w, 0, step_h), mode="reflect")
        pad_h -= step_h
        pad_w -= step_w
    return x


def pad_bhwc(x: torch.Tensor, mult_h: int, mult_w: int) -> torch.Tensor:
    """`pad_to_multiple` for channels-last `(B, H, W, C)` features."""
    if x.shape[1] % mult_h == 0 and x.shape[2] % mult_w == 0:
        return x
    return pad_to_multiple(x.permute(0, 3, 1, 2), mult_h, mult_w).permute(0, 2, 3, 1)


def window_partition(x: torch.Tensor, wh: int, ww: int) -> torch.Tensor:
    """`(B, H, W, C)` -> `(B, nW, wh*ww, C)`; H, W must be multiples of wh, ww."""
    b, h, w, c = x.shape
    x = x.view(b, h // wh, wh, w // ww, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // wh) * (w // ww), wh * ww, c)


def window_reverse(windows: torch.Tensor, wh: int, ww: int, h: int, w: int) -> torch.Tensor:
    """Inverse of `window_partition`: `(B, nW, wh*ww, C)` -> `(B, H, W, C)`."""
    b, c = windows.shape[0], windows.shape[-1]
    x = windows.view(b, h // wh, w // ww, wh, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


def relative_position_index(wh: int, ww: int, device=None) -> torch.Tensor:
    """`(wh*ww, wh*ww)` long: row of the `(2wh-1)*(2ww-1)` bias table for each (query, key) pair.

    Same ordering as the official Swin code, so published bias tables load unchanged.
    """
    coords = torch.stack(
        torch.meshgrid(
            torch.arange(wh, device=device), torch.arange(ww, device=device), indexing="ij"
        )
    ).flatten(1)  # (2, N)
    rel = coords[:, :, None] - coords[:, None, :]  # (2, N, N)
    return (rel[0] + wh - 1) * (2 * ww - 1) + (rel[1] + ww - 1)


def shift_region_labels(h: int, w: int, window: int, shift: int, device=None) -> torch.Tensor:
    """`(h, w)` long labels of the 3x3 regions a cyclic shift by `shift` brings together.

    After `torch.roll(x, -shift)`, the last `window` rows/cols hold pixels from two sides of the
    image; tokens with different labels must not attend to each other (official Swin slices
    `[0, -window) [-window, -shift) [-shift, end)` on each axis).
    """
    rows = torch.arange(h, device=device)
    cols = torch.arange(w, device=device)
    row_lab = (rows >= h - window).long() + (rows >= h - shift).long()
    col_lab = (cols >= w - window).long() + (cols >= w - shift).long()
    return row_lab[:, None] * 3 + col_lab[None, :]


def shifted_window_mask(h: int, w: int, window: int, shift: int, device=None) -> torch.Tensor:
    """`(nW, N, N)` float additive mask (0 or MASK_VALUE) for shifted-window attention."""
    labels = shift_region_labels(h, w, window, shift, device)
    win = window_partition(labels[None, :, :, None], window, window)[0, :, :, 0]  # (nW, N)
    diff = win[:, :, None] != win[:, None, :]
    return torch.zeros(diff.shape, device=device).masked_fill(diff, MASK_VALUE)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, *, scale: float,
           fused: bool) -> torch.Tensor:
    """`softmax(q k^T * scale + bias) v` over the last two dims; `bias` (float, broadcastable to
    the logits) is cast to q's dtype. `fused`: through `F.scaled_dot_product_attention`; else
    the same math written out (a test checks they agree)."""
    bias = bias.to(q.dtype)
    if fused:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    attn = (q * scale) @ k.transpose(-2, -1) + bias
    return attn.softmax(dim=-1) @ v


class WindowAttention(nn.Module):
    """Multi-head self-attention inside square windows with a learned relative-position bias.

    `forward(x (B, nW, N, C), mask (nW, N, N) | None) -> (B, nW, N, C)`. The fused path calls
    `F.scaled_dot_product_attention` with bias (+ mask) as a float `attn_mask`; the explicit path
    (`fused = False`) writes the same math out; a test checks they agree. Parameter names follow
    the official SwinIR (`qkv`, `proj`, `relative_position_bias_table`).
    """

    def __init__(self, *, dim: int, num_heads: int, window: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.num_heads, self.window = dim, num_heads, window
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused = True
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window - 1) ** 2, num_heads)
        )
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer(
            "relative_position_index", relative_position_index(window, window), persistent=False
        )

    def position_bias(self) -> torch.Tensor:
        """`(heads, N, N)` bias gathered from the table."""
        n = self.window * self.window
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, self.num_heads).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, nw, n, c = x.shape
        qkv = self.qkv(x).view(b, nw, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).unbind(0)  # each (B, nW, heads, N, d)
        bias = self.position_bias()  # (heads, N, N)
        if mask is not None:
            bias = bias[None] + mask[:, None]  # (nW, heads, N, N)
        out = attend(q, k, v, bias, scale=self.scale, fused=self.fused)
        out = out.transpose(2, 3).reshape(b, nw, n, c)
        return self.proj(out)


class Mlp(nn.Module):
    """Token MLP `(..., C) -> (..., C)`: fc1 -> GELU -> fc2 (official key names)."""

    def __init__(self, *, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ConvFFN(nn.Module):
    """SRFormer's convolutional FFN on `(B, H, W, C)`: fc1 -> GELU -> (+ GELU(depthwise conv)) -> fc2.

    The depthwise k x k conv adds local spatial mixing to the MLP at little cost.
    """

    def __init__(self, *, dim: int, hidden: int, kernel: int = 5):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.dwconv = nn.Conv2d(hidden, hidden, kernel, padding=kernel // 2, groups=hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.fc1(x))  # (B, H, W, hidden)
        local = self.act(self.dwconv(x.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)
        return self.fc2(x + local)


def set_fused_attention(module: nn.Module, enabled: bool) -> int:
    """Switch every attention submodule with a `fused` flag to SDPA (True) or explicit math.

    Returns how many modules were switched (0 means the model has no switchable attention).
    """
    count = 0
    for m in module.modules():
        if hasattr(m, "fused") and isinstance(m.fused, bool):
            m.fused = enabled
            count += 1
    return count


class ShiftedWindowBlock(nn.Module):
    """Transformer block on `(B, H, W, C)`, any H, W: `x + attn(LN(x))` over windows of
    `window` (cyclically shifted by `shift`, with a region mask), then `x + mlp(LN(x))`.
    Pads to the window and crops back. Subclasses build `norm1`, `attn`, `norm2`, `mlp` and
    define `make_mask(hp, wp, device)`; the mask is derived, cached, never in the state_dict."""

    window: int
    shift: int

    def make_mask(self, hp: int, wp: int, device) -> torch.Tensor:
        raise NotImplementedError

    def _mask(self, hp: int, wp: int, device) -> torch.Tensor:
        key = (hp, wp, str(device))
        cache = getattr(self, "_mask_cache", None)
        if cache is None or cache[0] != key:
            cache = self._mask_cache = (key, self.make_mask(hp, wp, device))
        return cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[1:3]
        win = self.window
        y = pad_bhwc(self.norm1(x), win, win)
        hp, wp = y.shape[1:3]
        mask = None
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
            mask = self._mask(hp, wp, y.device)
        y = window_reverse(self.attn(window_partition(y, win, win), mask), win, win, hp, wp)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + y[:, :h, :w]
        return x + self.mlp(self.norm2(x))


class ResidualGroup(nn.Module):
    """body -> 3x3 conv -> + input, on `(B, H, W, C)` (official RSTB with resi_connection 1conv)."""

    def __init__(self, body: nn.Module, dim: int):
        super().__init__()
        self.body = body
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x).permute(0, 3, 1, 2)
        return x + self.conv(y).permute(0, 2, 3, 1)


class WindowTransformerBackbone(nn.Module):
    """SwinIR's outer structure, shared by SwinIR-L and SRFormer-L: normalised `(B, 3, h, w)`
    -> features `(B, C, h, w)`.

        conv_first 3x3 (3 -> C) -> embed_norm LN -> groups.i (body -> conv 3x3 -> + input)
        -> norm LN -> conv_after_body 3x3 -> + conv_first output

    `make_native(window, index, heads)` builds the backbone's own block (see hier.py's block
    contract); `body_kwargs` go to `hier.build_group_body` (ffn kind and kernel). The plain
    variant pads the image to a multiple of the window (reflection), as the official forward
    does; hit and c2d blocks pad to their own windows.

    `forward(x, crop=True)` crops the features to the input's `(h, w)`; `crop=False` returns
    them on the padded grid `(B, C, hp, wp)` (plain: multiples of the window; hit/c2d: `(h, w)`),
    whose top-left `(h, w)` block is the cropped result. The official forward runs its
    upsampler on the padded grid and crops after it: SRModel does the same with the discrete
    head (see `SRModel.forward`)."""

    def __init__(self, cfg, *, make_native, **body_kwargs):
        from c2disr.models.hier import build_group_body

        super().__init__()
        self.cfg = cfg
        c = cfg.embed_dim
        self.out_channels = c
        self.conv_first = nn.Conv2d(3, c, 3, padding=1)
        self.embed_norm = nn.LayerNorm(c)
        groups = []
        for depth, heads in zip(cfg.depths, cfg.num_heads):
            body = build_group_body(
                cfg, dim=c, depth=depth, num_heads=heads, native_window=cfg.window,
                make_native=lambda window, index, heads=heads: make_native(window, index, heads),
                mlp_ratio=cfg.mlp_ratio, **body_kwargs)
            groups.append(ResidualGroup(body, c))
        self.groups = nn.ModuleList(groups)
        self.norm = nn.LayerNorm(c)
        self.conv_after_body = nn.Conv2d(c, c, 3, padding=1)
        init_transformer_weights(self)

    def forward(self, x: torch.Tensor, crop: bool = True) -> torch.Tensor:
        h, w = x.shape[-2:]
        if self.cfg.variant == "plain":
            x = pad_to_multiple(x, self.cfg.window, self.cfg.window)
        first = self.conv_first(x)
        t = self.embed_norm(first.permute(0, 2, 3, 1))
        for group in self.groups:
            t = group(t)
        t = self.norm(t).permute(0, 3, 1, 2)
        out = self.conv_after_body(t) + first
        return out[:, :, :h, :w] if crop else out


def init_transformer_weights(module: nn.Module) -> None:
    """Official SwinIR/HiT initialisation: Linear weights N(0, 0.02) truncated, zero biases,
    LayerNorm (1, 0); convolutions keep PyTorch's default. Then every submodule with an
    `init_weights()` method (e.g. hier.C2DBody's skip fusions) applies its own."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for m in module.modules():
        if m is not module and callable(getattr(m, "init_weights", None)):
            m.init_weights()
