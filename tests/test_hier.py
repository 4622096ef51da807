"""Hierarchical encoding: SCC matches the official HiT-SR formulation, the C2D encoder-decoder
wires its skips as specified, configs are validated, and c2d costs less than plain and HiT."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from c2disr.complexity import count_macs, lr_size_for_output
from c2disr.models import build_model
from c2disr.models.common import pad_to_multiple, relative_position_index, window_partition
from c2disr.models.hier import SCC, C2DBody, HierFields, SCCBlock, build_group_body, validate_hier


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _official_bias(scc: SCC) -> torch.Tensor:
    """HiT-SR's bias: per-(query, key) table lookup over the window, averaged over the keys each
    base-window token summarises (keys grouped in contiguous r x r blocks)."""
    w, m, r = scc.window, scc.base, scc.ratio
    offs = torch.arange(1 - w, w, dtype=torch.float32)
    grid = torch.stack(torch.meshgrid(offs, offs, indexing="ij")).flatten(1).t()
    table = scc.pos(grid)  # ((2w-1)^2, heads)
    full = table[relative_position_index(w, w).view(-1)].view(w * w, m, r, m, r, -1)
    return full.permute(0, 1, 3, 5, 2, 4).reshape(w * w, m * m, scc.num_heads, r * r).mean(-1).permute(2, 0, 1)


@pytest.mark.parametrize("window,base", [(16, 8), (8, 8), (4, 8), (24, 8), (12, 4)])
def test_scc_bias_matches_official_formulation(window, base):
    scc = SCC(dim=32, num_heads=2, window=window, base_window=base)
    with torch.no_grad():
        ours = scc.position_bias(torch.device("cpu"), torch.float32)
        ref = _official_bias(scc)
    assert ours.shape == ref.shape == (2, window * window, min(window, base) ** 2)
    assert torch.allclose(ours, ref, atol=1e-6)


def _reference_scc(scc: SCC, x: torch.Tensor) -> torch.Tensor:
    """SCC written out per window, following the official HiT-SR algorithm step by step."""
    b, h, w, c = x.shape
    win, m, r, heads, d = scc.window, scc.base, scc.ratio, scc.num_heads, scc.head_dim
    qv = scc.qv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    out = torch.zeros(b, h, w, c)
    bias = _official_bias(scc)
    for bi in range(b):
        for y0 in range(0, h, win):
            for x0 in range(0, w, win):
                tok = qv[bi, y0 : y0 + win, x0 : x0 + win].reshape(win * win, 2, heads, d)
                q, v = tok[:, 0].transpose(0, 1), tok[:, 1].transpose(0, 1)  # (heads, L, d)
                # each base token: Linear over the r x r block of value tokens it covers
                vg = v.view(heads, m, r, m, r, d).permute(0, 1, 3, 5, 2, 4).reshape(heads, m * m, d, r * r)
                vb = scc.spatial_linear(vg)[..., 0]
                sp = (q @ vb.transpose(1, 2) / d + bias) @ vb  # (heads, L, d)
                qc, vc = q.transpose(0, 1).reshape(-1, c // 2), v.transpose(0, 1).reshape(-1, c // 2)
                ch = ((qc.t() @ vc / (win * win)) @ vc.t()).t()  # (L, C/2)
                res = torch.cat([sp.transpose(0, 1).reshape(-1, c // 2), ch], dim=-1)
                out[bi, y0 : y0 + win, x0 : x0 + win] = scc.proj(res).view(win, win, c)
    return out


@pytest.mark.parametrize("window,base", [(8, 4), (4, 8)])
def test_scc_forward_matches_reference(window, base):
    scc = SCC(dim=16, num_heads=2, window=window, base_window=base)
    x = torch.randn(2, 2 * window, window, 16)
    with torch.no_grad():
        assert torch.allclose(scc(x), _reference_scc(scc, x), atol=1e-5)


def test_scc_block_any_size_and_gradients():
    blk = SCCBlock(dim=20, num_heads=2, window=16, base_window=8, mlp_ratio=2.0, ffn="convffn")
    for size in [(5, 3), (17, 23), (1, 40)]:
        x = torch.randn(1, *size, 20, requires_grad=True)
        y = blk(x)
        assert y.shape == x.shape
        y.sum().backward()
        assert torch.isfinite(x.grad).all()


def test_pad_to_multiple_mirrors_repeatedly():
    x = torch.arange(15.0).view(1, 1, 3, 5)
    y = pad_to_multiple(x, 16, 16)
    assert y.shape == (1, 1, 16, 16)
    assert torch.equal(y[..., :3, :5], x)
    assert torch.equal(y[0, 0, 3, :5], x[0, 0, 1])  # first reflected row mirrors row 1
    assert torch.equal(pad_to_multiple(torch.ones(1, 2, 1, 1), 4, 8), torch.ones(1, 2, 4, 8))


class _Probe(nn.Module):
    """A stand-in block that records the spatial size it saw and adds a constant."""

    def __init__(self, window):
        super().__init__()
        self.window, self.seen = window, None
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        self.seen = tuple(x.shape[1:3])
        return x + self.bias


@pytest.mark.parametrize("mode", ["constant", "resample"])
def test_c2d_body_wiring(mode):
    windows = [64, 32, 8, 32, 64]
    blocks = [_Probe(w) for w in windows]
    body = C2DBody(dim=6, windows=windows, blocks=blocks, mode=mode)
    assert body.skip_from == {3: 1, 4: 0}  # each decoder layer fuses the encoder layer with its window
    assert sorted(body.fuse.keys()) == ["3", "4"]
    assert body.fuse["3"].in_features == 12 and body.fuse["3"].out_features == 6
    x = torch.randn(2, 17, 23, 6)
    assert body(x).shape == x.shape
    seen = [b.seen for b in blocks]
    half = (9, 12) if mode == "resample" else (17, 23)
    assert seen == [(17, 23), (17, 23), half, (17, 23), (17, 23)]


def test_c2d_body_skip_matters():
    windows = [16, 8, 16]
    body = C2DBody(dim=4, windows=windows, blocks=[_Probe(w) for w in windows], mode="constant")
    x = torch.randn(1, 8, 8, 4)
    with torch.no_grad():
        nn.init.zeros_(body.fuse["2"].weight)
        nn.init.zeros_(body.fuse["2"].bias)
        body.fuse["2"].weight[:, 4:] = torch.eye(4)  # pass the skip (encoder output) only
        assert torch.allclose(body(x), x)


def test_build_group_body_uses_native_blocks_only_for_small_windows():
    calls = []

    def make_native(window, index):
        calls.append((window, index))
        return _Probe(window)

    cfg = HierFields(variant="c2d", c2d_schedule=(8.0, 4.0, 1.0, 4.0, 8.0))
    body = build_group_body(
        cfg, dim=12, depth=5, num_heads=2, native_window=8, make_native=make_native, mlp_ratio=2.0, ffn="mlp"
    )
    assert calls == [(8, 2)]
    kinds = [type(b).__name__ for b in body.blocks]
    assert kinds == ["SCCBlock", "SCCBlock", "_Probe", "SCCBlock", "SCCBlock"]
    assert [b.window for b in body.blocks] == [64, 32, 8, 32, 64]
    hit = build_group_body(
        HierFields(variant="hit"), dim=12, depth=6, num_heads=2, native_window=8,
        make_native=make_native, mlp_ratio=2.0, ffn="mlp",
    )
    assert [b.window for b in hit.blocks] == [4, 8, 16, 32, 48, 64]


def test_validate_hier_names_the_problem():
    with pytest.raises(ValueError, match="len\\(hit_ratios\\)"):
        validate_hier(HierFields(variant="hit"), depths=(5, 5), native_window=8)
    with pytest.raises(ValueError, match="len\\(c2d_schedule\\)"):
        validate_hier(HierFields(variant="c2d"), depths=(6,), native_window=8)
    with pytest.raises(ValueError, match="multiple of hier_base_window"):
        validate_hier(HierFields(variant="hit", hit_ratios=(1.5, 1.25)), depths=(2,), native_window=8)
    with pytest.raises(ValueError, match="c2d_mode"):
        validate_hier(HierFields(variant="c2d", c2d_mode="zoom"), depths=(5,), native_window=8)
    with pytest.raises(ValueError, match="variant"):
        validate_hier(HierFields(variant="hier"), depths=(5,), native_window=8)
    with pytest.raises(ValueError, match="depths"):
        build_model("swinir_l", variant="c2d", overrides={"c2d_schedule": [4, 1, 4]})
    m = build_model("swinir_l", variant="c2d", flavor="tiny", overrides={"c2d_schedule": [4, 1, 4, 1], "depths": [4, 4]})
    assert [b.window for b in m.backbone.groups[0].body.blocks] == [16, 4, 16, 4]


@pytest.mark.parametrize("arch", ["swinir_l", "srformer_l"])
@pytest.mark.parametrize("scale", [2, 4])
def test_c2d_costs_less_than_plain_and_hit(arch, scale):
    macs = {}
    for variant in ("plain", "hit", "c2d"):
        with torch.device("meta"):
            model = build_model(arch, variant=variant, scale=scale)
        macs[variant] = count_macs(model, lr_size_for_output(scale))
    assert macs["c2d"] < macs["hit"] < macs["plain"], macs


def test_c2d_resample_option_builds_and_is_cheaper():
    with torch.device("meta"):
        const = build_model("swinir_l", variant="c2d", scale=4)
        res = build_model("swinir_l", variant="c2d", scale=4, overrides={"c2d_mode": "resample"})
    assert const.backbone_config.c2d_mode == "constant"  # the documented default
    assert count_macs(res, (180, 320)) < 0.95 * count_macs(const, (180, 320))
    tiny = build_model("srformer_l", variant="c2d", flavor="tiny", overrides={"c2d_mode": "resample"})
    assert tiny(torch.rand(1, 3, 15, 9)).shape == (1, 3, 60, 36)


def test_window_partition_layout():
    x = torch.arange(2 * 4 * 6 * 1.0).view(2, 4, 6, 1)
    win = window_partition(x, 2, 3)
    assert win.shape == (2, 4, 6, 1)
    assert win[0, 1, :, 0].tolist() == [3, 4, 5, 9, 10, 11]  # second window: rows 0-1, cols 3-5
