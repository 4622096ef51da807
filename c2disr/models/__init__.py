"""Model registry: backbones x variants x heads, built from typed configs.

    model = build_model("swinir_l", variant="c2d", flavor="light", head="discrete", scale=4)
    sr = model(lr)                       # lr (B, 3, h, w) float [0, 1] RGB -> (B, 3, 4h, 4w)
    cont = build_model("swinir_l", head="continuous")
    sr = cont(lr, out_size=(H, W))       # any size
    rgb = cont.query(lr, coords, cells)  # (B, Q, 3), coords/cells (B, Q, 2), order (y, x)

Registry: ``ARCHS`` maps an architecture name to the module that implements its backbone. The
modules are imported lazily (on first use), so a broken or slow backbone module affects only
the models that use it.

Backbone module contract (what ``c2disr.models.<backbone>`` must define):

- ``make_config(*, flavor: str, variant: str) -> cfg``: a frozen, keyword-only dataclass
  instance (unknown names must raise, so YAML typos cannot pass silently) whose class inherits
  ``c2disr.models.hier.HierFields`` (field ``variant`` etc.) and validates itself in
  ``__post_init__`` (raising ValueError naming the field). ``flavor`` is "light" (published size)
  or "tiny" (tests / CPU: forward+backward of a 32x32 input well under a second).
- ``build_backbone(cfg) -> nn.Module``; the module has an int attribute ``out_channels`` and
  ``forward(x)`` takes the NORMALISED input ``(B, 3, h, w)`` (``lr - DIV2K mean``; SRModel does the
  mean shift, as the official models do with img_range 1) of any h, w (pad inside, crop back) and
  returns features ``(B, out_channels, h, w)``: the output of conv_after_body plus the long
  residual from conv_first, exactly what the official light models feed to their upsampler.
  ``forward(x, crop=False)`` returns the same features on the backbone's padded grid
  ``(B, out_channels, hp, wp)``, ``hp >= h``, ``wp >= w``, uncropped: its top-left ``(h, w)``
  block is the ``crop=True`` result. The official forwards pad the image to the window, run the
  whole network INCLUDING the upsampler's 3x3 conv on the padded image and crop the output, so
  the discrete head runs on this grid and SRModel crops after it (see ``SRModel.forward``).
  Size-derived tensors are non-persistent buffers or computed in forward.
- ``official_key_map(cfg) -> dict[str, str | None]`` (for ``load_published``): every key of the
  official checkpoint's backbone part -> our backbone key (without the ``backbone.`` prefix), or
  None for official buffers we derive instead (relative-position indices, attention masks).
  The official upsampler keys (``upsample.0.*``) are handled here, not by the backbone module.
  Alternatively, when tensors need more than renaming, ``convert_official_state_dict(state)``
  returning ``{SRModel key ("backbone.*", "head.*"): tensor}``; load_published checks strictness.

Overrides: ``build_model(..., overrides={"embed_dim": 48, "depths": [4, 4]})`` replaces config
fields; an unknown key raises TypeError naming it and listing the valid keys; a value of the
wrong type raises ValueError naming the key. Lists become tuples; ints are accepted for floats.
"""

from __future__ import annotations

import dataclasses
import importlib
import typing
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from c2disr.models.common import DIV2K_RGB_MEAN
from c2disr.models.heads import (
    HEAD_FLAVORS,
    ContinuousHead,
    ContinuousHeadConfig,
    DiscreteHeadConfig,
    PixelShuffleDirect,
    make_coords,
    sample_bilinear,
)
from c2disr.models.hier import VARIANTS

# The registry: architecture name -> module implementing its backbone (imported lazily).
ARCHS: dict[str, str] = {
    "swinir_l": "c2disr.models.swinir",
    "srformer_l": "c2disr.models.srformer",
    "mambairv2_l": "c2disr.models.mambairv2",
}
FLAVORS = ("light", "tiny")
HEADS = ("discrete", "continuous")
SPEC_KEYS = ("arch", "variant", "flavor", "head", "scale", "overrides", "head_overrides")

__all__ = [
    "ARCHS",
    "FLAVORS",
    "HEADS",
    "VARIANTS",
    "SRModel",
    "backbone_module",
    "build_model",
    "build_from_spec",
    "make_backbone_config",
    "make_head_config",
    "apply_overrides",
    "to_discrete",
    "head_fit_stats",
    "solve_head",
    "param_groups",
    "no_decay",
    "NO_DECAY_NAMES",
    "count_params",
    "count_macs",
    "load_published",
]


def backbone_module(arch: str) -> ModuleType:
    """The module implementing `arch`'s backbone (see the contract above)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHS)}")
    module = importlib.import_module(ARCHS[arch])
    lacking = [name for name in ("make_config", "build_backbone") if not callable(getattr(module, name, None))]
    if lacking:
        raise NotImplementedError(
            f"{ARCHS[arch]} does not implement the backbone contract yet (missing {', '.join(lacking)}); "
            f"see the docstring of c2disr/models/__init__.py"
        )
    return module


# ----------------------------------------------------------------------------- configs


def _coerce(value: Any, hint: Any, key: str, where: str) -> Any:
    origin = typing.get_origin(hint)
    bad = ValueError(f"{where}: key {key!r} expects {hint}, got {value!r} ({type(value).__name__})")
    if hint is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise bad
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise bad
        return value
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise bad
        elem = args[0]
        return tuple(_coerce(v, elem, key, where) for v in value)
    return value


def apply_overrides(cfg, overrides: Mapping[str, Any] | None, *, where: str = "config"):
    """`dataclasses.replace(cfg, **overrides)` with name and type checks (see module docstring)."""
    if not overrides:
        return cfg
    hints = typing.get_type_hints(type(cfg))
    names = [f.name for f in dataclasses.fields(cfg)]
    clean = {}
    for key, value in overrides.items():
        if key not in names:
            raise TypeError(
                f"{where}: unknown key {key!r} for {type(cfg).__name__}; valid keys: {', '.join(names)}"
            )
        if key == "variant":
            raise ValueError(f"{where}: set the variant with build_model(variant=...), not overrides")
        clean[key] = _coerce(value, hints[key], key, where)
    return dataclasses.replace(cfg, **clean)


def make_backbone_config(arch: str, *, variant: str = "plain", flavor: str = "light", overrides=None):
    """The backbone config of `arch` for a variant/flavor with overrides applied."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")
    if flavor not in FLAVORS:
        raise ValueError(f"unknown flavor {flavor!r}; choose one of {FLAVORS}")
    cfg = backbone_module(arch).make_config(flavor=flavor, variant=variant)
    return apply_overrides(cfg, overrides, where=f"{arch} overrides")


def make_head_config(head: str, *, flavor: str = "light", overrides=None):
    """The head config for `head` ("discrete" | "continuous")."""
    if head == "discrete":
        return apply_overrides(DiscreteHeadConfig(), overrides, where="head_overrides")
    if head == "continuous":
        if flavor not in FLAVORS:
            raise ValueError(f"unknown flavor {flavor!r}; choose one of {FLAVORS}")
        base = ContinuousHeadConfig(**HEAD_FLAVORS[flavor])
        return apply_overrides(base, overrides, where="head_overrides")
    raise ValueError(f"unknown head {head!r}; choose one of {HEADS}")


# ----------------------------------------------------------------------------- the model


class SRModel(nn.Module):
    """Mean shift -> backbone -> head (+ mean, or + the bilinear upsampling of the input for the
    continuous head and for a discrete head with `residual="bilinear"`).

    Inputs are `(B, 3, h, w)` float RGB in [0, 1], any h, w. Outputs are RGB in the same range
    (not clamped: clamp/quantise at evaluation). Submodules: `backbone`, `head`.

    Sizes that are not a multiple of the backbone's window (the official order): the backbone
    pads the image; the discrete head's 3x3 conv runs on the padded features and its output is
    cropped to `(h*s, w*s)`, then the base (mean, or the bilinear upsampling of the UN-padded
    input) is added, so the last LR row/column equals the official models' output. The
    continuous head instead encodes the features cropped to `(h, w)`: its query coordinates
    are relative to the real image, and padded rows would shift them (and, with the feature
    conv and border-clamped neighbours, mix padding into the border samples).

    `scale_range`: `(min, max)` of the scales a continuous model was trained on, when known
    (recorded in model files by `c2disr.evaluate.save_model`); None otherwise.
    """

    scale_range: tuple[float, float] | None = None

    def __init__(self, *, backbone: nn.Module, head: nn.Module, spec: dict, backbone_config, head_config):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.spec = spec
        self.backbone_config = backbone_config
        self.head_config = head_config
        self.register_buffer(
            "rgb_mean", torch.tensor(DIV2K_RGB_MEAN).view(1, 3, 1, 1), persistent=False
        )

    @property
    def continuous(self) -> bool:
        return isinstance(self.head, ContinuousHead)

    @property
    def scale(self) -> int | None:
        """The integer scale of a discrete model; None for a continuous one."""
        return None if self.continuous else self.head.scale

    @staticmethod
    def _check_lr(lr: torch.Tensor) -> None:
        if lr.ndim != 4 or lr.shape[1] != 3 or not lr.is_floating_point():
            raise ValueError(
                f"expected lr of shape (B, 3, h, w) float RGB in [0, 1], got {tuple(lr.shape)} {lr.dtype}"
            )

    def features(self, lr: torch.Tensor, *, crop: bool = True) -> torch.Tensor:
        """`(B, 3, h, w)` [0, 1] -> backbone features `(B, C, h, w)`; `crop=False`: on the
        backbone's padded grid `(B, C, hp, wp)` (top-left `(h, w)` = the cropped features),
        what the discrete head runs on."""
        self._check_lr(lr)
        return self.backbone(lr - self.rgb_mean.to(lr.dtype), crop=crop)

    def head_term(self, lr: torch.Tensor) -> torch.Tensor:
        """Discrete models: the head's output `(B, 3, h*s, w*s)` before the base is added, as
        the official forward computes it: head on the padded features, cropped after."""
        h, w = lr.shape[-2:]
        s = self.head.scale
        return self.head(self.features(lr, crop=False))[..., : h * s, : w * s]

    def forward(self, lr: torch.Tensor, out_size: tuple[int, int] | None = None) -> torch.Tensor:
        """`lr (B, 3, h, w)` -> `(B, 3, H, W)`: discrete H = h*scale; continuous needs out_size."""
        h, w = lr.shape[-2:]
        if not self.continuous:
            s = self.head.scale
            if out_size is not None and tuple(out_size) != (h * s, w * s):
                raise ValueError(
                    f"a discrete x{s} model outputs {(h * s, w * s)} for input {(h, w)}, not "
                    f"{tuple(out_size)}; use a continuous head for other sizes"
                )
            return self.head_term(lr) + self.base(lr)
        if out_size is None:
            raise ValueError("a continuous model needs out_size=(H, W)")
        big_h, big_w = (int(v) for v in out_size)
        if big_h < 1 or big_w < 1:
            raise ValueError(f"out_size must be positive, got {out_size}")
        b = lr.shape[0]
        coords = make_coords(big_h, big_w, device=lr.device, dtype=lr.dtype)
        coords = coords.unsqueeze(0).expand(b, -1, -1)
        cells = torch.tensor([2.0 / big_h, 2.0 / big_w], device=lr.device, dtype=lr.dtype)
        cells = cells.expand_as(coords)
        fmap = self.head.encode(self.features(lr))
        rgb = self.head.query(fmap, coords, cells, chunk=self.head.cfg.chunk)  # (B, Q, 3)
        rgb = rgb.transpose(1, 2).reshape(b, 3, big_h, big_w)
        up = torch.nn.functional.interpolate(lr, size=(big_h, big_w), mode="bilinear", align_corners=False)
        return rgb + up

    def base(self, lr: torch.Tensor) -> torch.Tensor:
        """Discrete models: what the head's output is added to, `(B, 3, h*s, w*s)` or the
        broadcastable mean RGB `(1, 3, 1, 1)` (see `DiscreteHeadConfig.residual`)."""
        if self.continuous:
            raise ValueError("base() is for discrete models; a continuous one adds the bilinear "
                             "upsampling at its output size")
        if self.head.residual == "bilinear":
            return torch.nn.functional.interpolate(lr, scale_factor=self.head.scale, mode="bilinear",
                                                   align_corners=False)
        return self.rgb_mean.to(lr.dtype)

    def query(self, lr: torch.Tensor, coords: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        """Continuous heads only: RGB at `coords (B, Q, 2)` (pixel centres in [-1, 1], order
        (y, x)) for cells `(B, Q, 2)` = (2/H, 2/W) of each sample's target size -> `(B, Q, 3)`."""
        if not self.continuous:
            raise ValueError("query() needs a continuous head (build_model(..., head='continuous'))")
        if coords.ndim != 3 or coords.shape[-1] != 2 or cells.shape != coords.shape:
            raise ValueError(
                f"coords and cells must both be (B, Q, 2); got {tuple(coords.shape)} and {tuple(cells.shape)}"
            )
        fmap = self.head.encode(self.features(lr))
        return self.head.query(fmap, coords, cells) + sample_bilinear(lr, coords)


def _jsonable(value):
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def build_model(
    arch: str,
    *,
    variant: str = "plain",
    flavor: str = "light",
    head: str = "discrete",
    scale: int = 4,
    overrides: Mapping[str, Any] | None = None,
    head_overrides: Mapping[str, Any] | None = None,
) -> SRModel:
    """Build an SRModel (see the module docstring). `scale` is used by the discrete head."""
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    cfg = make_backbone_config(arch, variant=variant, flavor=flavor, overrides=overrides)
    head_cfg = make_head_config(head, flavor=flavor, overrides=head_overrides)
    backbone = backbone_module(arch).build_backbone(cfg)
    if head == "discrete":
        head_mod: nn.Module = PixelShuffleDirect(in_channels=backbone.out_channels, scale=scale,
                                                 residual=head_cfg.residual)
    else:
        head_mod = ContinuousHead(in_channels=backbone.out_channels, cfg=head_cfg)
    spec = {
        "arch": arch,
        "variant": variant,
        "flavor": flavor,
        "head": head,
        "scale": scale,
        "overrides": _jsonable(dict(overrides or {})),
        "head_overrides": _jsonable(dict(head_overrides or {})),
    }
    return SRModel(backbone=backbone, head=head_mod, spec=spec, backbone_config=cfg, head_config=head_cfg)


def build_from_spec(spec: Mapping[str, Any]) -> SRModel:
    """Rebuild the architecture described by `SRModel.spec` (weights are not part of a spec)."""
    unknown = set(spec) - set(SPEC_KEYS)
    missing = {"arch"} - set(spec)
    if unknown or missing:
        raise ValueError(
            f"model spec: unknown keys {sorted(unknown)}, missing {sorted(missing)}; "
            f"a spec has keys {SPEC_KEYS}"
        )
    return build_model(**dict(spec))


def to_discrete(model: SRModel, scale: int, *, residual: str | None = None) -> SRModel:
    """A discrete x`scale` model with `model`'s backbone tensors copied bit-exact and a fresh
    pixelshuffledirect head (the continuous -> discrete step of C2D-ISR).

    residual: the new head's base (`DiscreteHeadConfig.residual`); default "bilinear" from a
    continuous model (its backbone learned to predict detail over bilinear), else the source's."""
    if residual is None:
        residual = "bilinear" if model.continuous else model.head.residual
    spec = dict(model.spec, head="discrete", scale=scale,
                head_overrides={} if residual == "none" else {"residual": residual})
    out = build_from_spec(spec)
    ref = next(model.parameters(), None)
    if ref is not None:
        out = out.to(device=ref.device, dtype=ref.dtype)
    out.backbone.load_state_dict(model.backbone.state_dict(), strict=True)
    return out


# Parameter names (last component) that never get weight decay besides 0/1-d tensors.
# Position-bias tables are 2-d but are additive biases of the attention logits; decaying them
# pulls the learned relative-position prior towards zero (Swin / timm `no_weight_decay`).
NO_DECAY_NAMES = frozenset({
    "relative_position_bias_table",
    "absolute_pos_embed",
    "pos_embed",
    "logit_scale",
    "A_log",
    "A_logs",
    "D",
    "Ds",
})


def no_decay(name: str, param: torch.Tensor, extra: frozenset[str] | set[str] = frozenset()) -> bool:
    """True when parameter `name` must not be decayed: biases and norm scales (ndim <= 1),
    position-bias tables and state-space constants (by name), parameters flagged with
    `_no_weight_decay = True` (VMamba/MambaIR convention) and names a model lists in
    `no_weight_decay()` (timm convention, passed here as `extra`)."""
    last = name.rsplit(".", 1)[-1]
    return (
        param.ndim <= 1
        or last in NO_DECAY_NAMES
        or name in extra
        or last in extra
        or bool(getattr(param, "_no_weight_decay", False))
    )


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two explicit AdamW groups: `decay` (weight matrices and kernels) with `weight_decay`,
    `no_decay` (see `no_decay`) with 0. Frozen parameters are left out. Each group carries its
    parameter names under "names" (the optimizer ignores extra keys) so they can be checked."""
    hook = getattr(model, "no_weight_decay", None)
    extra = set(hook()) if callable(hook) else set()
    groups: dict[str, dict[str, Any]] = {
        "decay": {"params": [], "names": [], "weight_decay": float(weight_decay), "group": "decay"},
        "no_decay": {"params": [], "names": [], "weight_decay": 0.0, "group": "no_decay"},
    }
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        g = groups["no_decay" if no_decay(name, p, extra) else "decay"]
        g["params"].append(p)
        g["names"].append(name)
    return [g for g in groups.values() if g["params"]]


def count_params(model: nn.Module) -> int:
    """Number of parameters (see c2disr.complexity)."""
    from c2disr.complexity import count_params as _count

    return _count(model)


def count_macs(model: nn.Module, lr_hw: tuple[int, int], out_size=None) -> int:
    """MACs of one forward (see c2disr.complexity.count_macs)."""
    from c2disr.complexity import count_macs as _count

    return _count(model, lr_hw, out_size=out_size)


def load_published(model: SRModel, path, *, backbone_only: bool = False) -> SRModel:
    """Load an official checkpoint (see c2disr.models.checkpoints.load_published)."""
    from c2disr.models.checkpoints import load_published as _load

    return _load(model, path, backbone_only=backbone_only)


@torch.no_grad()
def head_fit_stats(model: SRModel, lr: torch.Tensor, hr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The normal-equation sums of the least-squares head fit on one batch (float64):
    `gram (D, D)` and `xty (D, 3*s*s)`, D = C*9 + 1. Sums over batches (and over ranks, by an
    all-reduce) add up to the fit on all of them; `solve_head` turns them into weights.
    `lr (B,3,h,w)`, `hr (B,3,h*s,w*s)`, float [0,1] RGB."""
    if model.continuous:
        raise ValueError("fitting a discrete head needs a discrete model (see to_discrete)")
    s = model.head.scale
    if hr.shape[-2:] != (lr.shape[-2] * s, lr.shape[-1] * s):
        raise ValueError(f"hr {tuple(hr.shape[-2:])} is not x{s} of lr {tuple(lr.shape[-2:])}")
    h, w = lr.shape[-2:]
    with torch.no_grad():
        # the head's conv runs on the padded grid and its output is cropped (SRModel.forward)
        feats = model.features(lr, crop=False).to(torch.float64)  # (B, C, hp, wp)
        cols = F.unfold(feats, kernel_size=3, padding=1)  # (B, C*9, hp*wp), channel-major like conv
        cols = cols.view(*cols.shape[:2], *feats.shape[-2:])[..., :h, :w].flatten(2)  # (B, C*9, h*w)
        x = cols.transpose(1, 2).reshape(-1, cols.shape[1])  # (N, C*9)
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        # The head predicts HR minus its base (mean RGB or the bilinear upsampling of lr).
        target = F.pixel_unshuffle(hr.to(torch.float64) - model.base(lr).to(torch.float64), s)
        y = target.flatten(2).transpose(1, 2).reshape(-1, target.shape[1])  # (N, 3*s*s)
        return x.T @ x, x.T @ y


def solve_head(model: SRModel, gram: torch.Tensor, xty: torch.Tensor, *, ridge: float = 1e-3) -> None:
    """Set the pixel-shuffle conv to the ridge solution of the summed normal equations;
    `ridge` is relative to the mean feature energy (the mean of gram's diagonal)."""
    conv = model.head.upsample[0]
    reg = ridge * gram.diagonal().mean()
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    sol = torch.linalg.solve(gram + reg * eye, xty)
    with torch.no_grad():
        conv.weight.copy_(sol[:-1].T.reshape(conv.weight.shape).to(conv.weight.dtype))
        conv.bias.copy_(sol[-1].to(conv.bias.dtype))


def fit_discrete_head(model: SRModel, lr: torch.Tensor, hr: torch.Tensor, *, ridge: float = 1e-3) -> float:
    """Set a discrete model's pixel-shuffle head to the ridge least-squares fit on `(lr, hr)`.

    The head is one 3x3 convolution followed by PixelShuffle, i.e. linear in the backbone
    features, so with the backbone fixed its best weights have a closed form. C2D-ISR's stage 2
    starts from a well-trained backbone and a fresh head: a random head first spends many steps
    undoing its own noise (and drags the backbone with it), while the fitted one starts close
    to the continuous model's quality when the head keeps the continuous head's bilinear base
    (`to_discrete`'s default). Fit on many patches: on one batch of four the fit overfits (its
    L1 on the next batch is ~1.5x). `lr (B,3,h,w)`, `hr (B,3,h*s,w*s)`, float [0,1] RGB.
    Returns the fit's L1 error on the batch."""
    gram, xty = head_fit_stats(model, lr, hr)
    solve_head(model, gram, xty, ridge=ridge)
    with torch.no_grad():
        return float((model(lr) - hr).abs().mean())
