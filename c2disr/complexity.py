"""Parameter and MAC counts at the papers' convention.

MACs are `torch.utils.flop_counter.FlopCounterMode` total FLOPs / 2 of one forward on the meta
device (no memory, no compute), batch 1, with the LR size whose output is 1280x720
(640x360 at x2, 427x240 at x3, 320x180 at x4). The counter sees matrix products and convolutions
(including SDPA); element-wise ops, norms and softmax are not counted, as in the published tables.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

OUTPUT_HW = (720, 1280)  # H, W of the papers' 1280x720 output


def count_params(model: nn.Module) -> int:
    """Total number of parameters (buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


def lr_size_for_output(scale: float, out_hw: tuple[int, int] = OUTPUT_HW) -> tuple[int, int]:
    """LR (h, w) whose x`scale` output is `out_hw`, rounded: 720x1280 -> x3 (240, 427)."""
    return (round(out_hw[0] / scale), round(out_hw[1] / scale))


def _meta_copy(model: nn.Module) -> nn.Module:
    spec = getattr(model, "spec", None)
    if isinstance(spec, dict):
        from c2disr.models import build_from_spec

        spec = dict(spec)
        if spec.get("head") == "continuous":
            # count one pass over all queries, not the chunked multi-pass rendering
            spec["head_overrides"] = dict(spec.get("head_overrides") or {}, chunk=2**62)
        with torch.device("meta"):
            return build_from_spec(spec)
    return copy.deepcopy(model).to("meta")


def count_macs(model: nn.Module, lr_hw: tuple[int, int], *, out_size: tuple[int, int] | None = None) -> int:
    """MACs of one forward of `model` on a `(1, 3, *lr_hw)` input (see the module docstring).

    An SRModel is rebuilt from its spec on the meta device; another module is deep-copied there.
    Continuous models need `out_size=(H, W)`.
    """
    meta = _meta_copy(model).eval()
    x = torch.empty(1, 3, int(lr_hw[0]), int(lr_hw[1]), device="meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        if out_size is not None:
            meta(x, out_size=tuple(out_size))
        else:
            meta(x)
    return counter.get_total_flops() // 2
