"""Loading the published checkpoints (BasicSR layout: `{"params_ema" | "params": state_dict}`).

    model = build_model("swinir_l", variant="plain", scale=2)
    load_published(model, "002_lightweightSR_DIV2K_s64w8_SwinIR-S_x2.pth")

Supported: SwinIR-S (swinir_l plain), SRFormer-light (srformer_l plain), HiT-SIR / HiT-SRF
(swinir_l / srformer_l hit), MambaIRv2-light (mambairv2_l plain; its module owns the map).
A backbone module provides either `official_key_map(cfg)` (pure renames, see derive_key_map) or
`convert_official_state_dict(state)` (renames plus tensor reshapes, returning SRModel keys).
The mapping is explicit and strict: every official key must map to one of ours (or to a buffer
we derive, which is dropped), every one of our keys must be filled, shapes must agree; otherwise
a ValueError names the missing / unexpected / mismatched keys and the file.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

# official upsampler (pixelshuffledirect) keys -> ours
HEAD_KEYS = {"upsample.0.weight": "head.upsample.0.weight", "upsample.0.bias": "head.upsample.0.bias"}


def derive_key_map(
    build: Callable,
    cfg,
    renames: Iterable[tuple[str, str]],
    derived: Mapping[str, None] | None = None,
) -> dict[str, str | None]:
    """Official key -> our key for every tensor of `build(cfg)`'s state_dict, where the official
    name is ours with each `(pattern, replacement)` regex substitution applied in order, plus the
    official-only derived buffers in `derived` (mapped to None). The backbone is built on the meta
    device (no memory, no compute)."""
    with torch.device("meta"):
        ours = list(build(cfg).state_dict().keys())
    renames = list(renames)
    out: dict[str, str | None] = {}
    for key in ours:
        official = key
        for pattern, repl in renames:
            official = re.sub(pattern, repl, official)
        if official in out:
            raise RuntimeError(f"key map collision: {official!r} from {key!r} and {out[official]!r}")
        out[official] = key
    for key in derived or {}:
        out[key] = None
    return out


def load_weights_only(path: str | Path, map_location: str | torch.device = "cpu"):
    """`torch.load(path, weights_only=True)`: tensors and plain containers only.

    A file holding other pickled objects is refused with a ValueError that names the file and
    the first such object. torch's own message goes on to explain how to load the file anyway
    (`weights_only=False`, which runs whatever code the file carries); that advice is not passed
    on: a checkpoint this project reads never needs it.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f" ({found.group(1)})" if found else ""
        raise ValueError(
            f"{path}: refused: the file contains non-tensor objects{what}; only tensors and plain "
            "containers are loaded from checkpoints, because unpickling anything else can run "
            "code from the file"
        ) from None


def read_official_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict inside an official checkpoint (`params_ema` preferred, then `params`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; download the official .pth file first")
    obj = load_weights_only(path)
    if isinstance(obj, Mapping):
        for key in ("params_ema", "params"):
            if key in obj and isinstance(obj[key], Mapping):
                return dict(obj[key])
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)  # a bare state dict
    keys = list(obj.keys())[:10] if isinstance(obj, Mapping) else type(obj).__name__
    raise ValueError(
        f"{path}: not an official checkpoint: expected a dict with 'params_ema' or 'params' "
        f"(or a bare state dict), found {keys}"
    )


def _short(keys, limit=12) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def convert_official(model, state: Mapping[str, torch.Tensor], *, backbone_only: bool = False, source="checkpoint"):
    """Map an official state dict to `model`'s keys (strict; see the module docstring)."""
    from c2disr.models import backbone_module

    arch = model.spec["arch"]
    module = backbone_module(arch)
    if not hasattr(module, "official_key_map"):
        return _convert_with_module(model, module, state, backbone_only=backbone_only, source=source)
    key_map = dict(module.official_key_map(model.backbone_config))
    key_map = {k: (None if v is None else f"backbone.{v}") for k, v in key_map.items()}
    if model.continuous or backbone_only:
        if model.continuous and not backbone_only:
            raise ValueError(
                f"{source}: published checkpoints carry a pixelshuffledirect head; load them into a "
                f"discrete model, or pass backbone_only=True to load only the backbone"
            )
        key_map.update({k: None for k in HEAD_KEYS})
    else:
        key_map.update(HEAD_KEYS)
    unexpected = [k for k in state if k not in key_map]
    missing = [k for k, v in key_map.items() if v is not None and k not in state]
    if unexpected or missing:
        raise ValueError(
            f"{source} does not match {arch} variant {model.spec['variant']} "
            f"(flavor {model.spec['flavor']}, scale {model.spec['scale']}): "
            f"missing official keys [{_short(missing)}]; unexpected keys [{_short(unexpected)}]"
        )
    ours = model.state_dict()
    converted, mismatched = {}, []
    for off_key, our_key in key_map.items():
        if our_key is None or off_key not in state:
            continue
        tensor = state[off_key]
        if tuple(tensor.shape) != tuple(ours[our_key].shape):
            mismatched.append(f"{off_key} {tuple(tensor.shape)} vs {our_key} {tuple(ours[our_key].shape)}")
        converted[our_key] = tensor
    if mismatched:
        raise ValueError(f"{source}: shape mismatch (check scale / flavor / overrides): {'; '.join(mismatched[:8])}")
    return converted


def _convert_with_module(model, module, state, *, backbone_only, source):
    """Backbones whose official tensors need more than renaming (e.g. squeezed stacks) provide
    `convert_official_state_dict(state) -> {SRModel key: tensor}`; the strictness checks stay here."""
    if not hasattr(module, "convert_official_state_dict"):
        raise ValueError(f"{model.spec['arch']} has no published-checkpoint mapping")
    if model.spec["variant"] != "plain":
        raise ValueError(f"{source}: published checkpoints exist for the plain {model.spec['arch']} only")
    if model.continuous and not backbone_only:
        raise ValueError(
            f"{source}: published checkpoints carry a pixelshuffledirect head; load them into a "
            f"discrete model, or pass backbone_only=True to load only the backbone"
        )
    converted = dict(module.convert_official_state_dict(dict(state)))
    if backbone_only or model.continuous:
        converted = {k: v for k, v in converted.items() if not k.startswith("head.")}
        expected = {k for k in model.state_dict() if k.startswith("backbone.")}
    else:
        expected = set(model.state_dict())
    missing, unexpected = expected - set(converted), set(converted) - expected
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match {model.spec['arch']} (flavor {model.spec['flavor']}, scale "
            f"{model.spec['scale']}): our keys not filled [{_short(missing)}]; "
            f"converted keys we lack [{_short(unexpected)}]"
        )
    ours = model.state_dict()
    bad = [f"{k} {tuple(v.shape)} vs {tuple(ours[k].shape)}" for k, v in converted.items() if v.shape != ours[k].shape]
    if bad:
        raise ValueError(f"{source}: shape mismatch (check scale / flavor / overrides): {'; '.join(bad[:8])}")
    return converted


def load_published(model, path, *, backbone_only: bool = False):
    """Load an official checkpoint into `model` (an SRModel) in place and return it."""
    state = read_official_state_dict(path)
    converted = convert_official(model, state, backbone_only=backbone_only, source=str(path))
    if backbone_only or model.continuous:
        prefix = "backbone."
        model.backbone.load_state_dict({k[len(prefix):]: v for k, v in converted.items()}, strict=True)
    else:
        model.load_state_dict(converted, strict=True)
    return model
