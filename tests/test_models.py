"""Models: every registered arch x variant (tiny) runs on odd sizes, trains, round-trips; the light
sizes match the published parameter/MAC tables; attention fast path == explicit path; shifted
masks are right; published checkpoints map by their official key names."""

from __future__ import annotations

import math

import pytest
import torch

from c2disr.complexity import count_macs, count_params, lr_size_for_output
from c2disr.models import (
    ARCHS,
    VARIANTS,
    apply_overrides,
    build_from_spec,
    build_model,
    load_published,
    param_groups,
    to_discrete,
)
from c2disr.models.common import (
    MASK_VALUE,
    WindowAttention,
    relative_position_index,
    set_fused_attention,
    shifted_window_mask,
    window_partition,
)

ALL = [(a, v) for a in sorted(ARCHS) for v in VARIANTS]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _tiny(arch, variant, **kw):
    return build_model(arch, variant=variant, flavor="tiny", **kw)


# ----------------------------------------------------------------------------- every model


@pytest.mark.parametrize("arch,variant", ALL)
@pytest.mark.parametrize("scale", [2, 3, 4])
def test_discrete_any_size(arch, variant, scale):
    model = _tiny(arch, variant, scale=scale).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 17, 23))
    assert out.shape == (1, 3, 17 * scale, 23 * scale)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("arch,variant", ALL)
def test_every_parameter_gets_a_finite_gradient(arch, variant):
    model = _tiny(arch, variant, scale=2).train()
    out = model(torch.rand(2, 3, 19, 16))
    (out - torch.rand_like(out)).abs().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not missing, f"no gradient: {missing[:5]}"
    assert not bad, f"non-finite gradient: {bad[:5]}"
    # not merely finite: the bulk of the tensors actually receive signal
    nonzero = sum(bool(p.grad.abs().sum() > 0) for p in model.parameters())
    assert nonzero >= 0.9 * len(list(model.parameters()))


@pytest.mark.parametrize("arch,variant", ALL)
def test_state_dict_round_trip_and_no_size_tensors(arch, variant):
    model = _tiny(arch, variant, scale=2).eval()
    x = torch.rand(1, 3, 12, 20)
    with torch.no_grad():
        ref = model(x)
        model(torch.rand(1, 3, 9, 30))  # another size must not change the state_dict
    state = model.state_dict()
    assert not [k for k in state if "mask" in k or "position_index" in k or k.endswith("aligned_index")]
    torch.manual_seed(1)
    clone = build_from_spec(model.spec).eval()
    assert clone.state_dict().keys() == state.keys()
    clone.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert torch.equal(clone(x), ref)


@pytest.mark.parametrize("arch,variant", ALL)
def test_continuous_head_non_integer_scales(arch, variant):
    model = _tiny(arch, variant, head="continuous").eval()
    lr = torch.rand(2, 3, 13, 11)
    with torch.no_grad():
        for s in (1.7, 3.3):
            size = (round(13 * s), round(11 * s))
            out = model(lr, out_size=size)
            assert out.shape == (2, 3, *size) and torch.isfinite(out).all()


@pytest.mark.parametrize("arch,variant", ALL)
@pytest.mark.parametrize("head", ["discrete", "continuous"])
def test_bf16_autocast_forward_and_backward(arch, variant, head):
    """The training loop runs under bf16 autocast on CUDA; CPU autocast takes the same dtype
    paths through our code (masks and biases cast to the logits' dtype, the scan in float32,
    the implicit head), so every model must train under it and stay near its float32 output."""
    model = _tiny(arch, variant, head=head, scale=3).train()
    x = torch.rand(2, 3, 19, 23)
    size = (45, 51) if head == "continuous" else None
    with torch.no_grad():
        ref = model(x, size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, size)
    (out.float() - ref).abs().mean().backward()
    assert out.shape == ref.shape and torch.isfinite(out).all()
    mse = float(((out.detach().float().clamp(0, 1) - ref.clamp(0, 1)) ** 2).mean())
    assert 10 * math.log10(1 / max(mse, 1e-12)) > 40, mse  # bf16 keeps ~3 significant digits
    bad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not bad, bad[:5]


def test_continuous_query_matches_render_and_chunking_is_exact():
    model = _tiny("swinir_l", "plain", head="continuous").eval()
    lr = torch.rand(2, 3, 10, 12)
    size = (17, 21)
    with torch.no_grad():
        full = model(lr, out_size=size)
        model.head.cfg = type(model.head.cfg)(**{**vars(model.head.cfg), "chunk": 50})
        chunked = model(lr, out_size=size)
        from c2disr.models.heads import make_coords

        coords = make_coords(*size).expand(2, -1, -1)
        cells = torch.tensor([2 / size[0], 2 / size[1]]).expand_as(coords)
        q = model.query(lr, coords, cells).transpose(1, 2).reshape(2, 3, *size)
    assert torch.allclose(full, chunked, atol=1e-5)
    assert torch.allclose(full, q, atol=1e-5)


def test_continuous_query_per_sample_scales_and_errors():
    model = _tiny("srformer_l", "plain", head="continuous")
    lr = torch.rand(2, 3, 8, 8)
    coords = torch.rand(2, 30, 2) * 2 - 1
    cells = torch.tensor([[2 / 12, 2 / 12], [2 / 27, 2 / 27]])[:, None, :].expand(2, 30, 2)
    assert model.query(lr, coords, cells).shape == (2, 30, 3)
    with pytest.raises(ValueError, match="out_size"):
        model(lr)
    with pytest.raises(ValueError, match="query"):
        _tiny("srformer_l", "plain").query(lr, coords, cells)
    with pytest.raises(ValueError, match="expected lr"):
        model(torch.rand(2, 1, 8, 8), out_size=(16, 16))


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_to_discrete_keeps_backbone_bit_exact(arch):
    cont = _tiny(arch, "c2d", head="continuous")
    with torch.no_grad():
        for p in cont.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # differ from any fresh init
    disc = to_discrete(cont, 3)
    assert disc.spec["head"] == "discrete" and disc.scale == 3
    a, b = cont.backbone.state_dict(), disc.backbone.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert disc.head.upsample[0].weight.shape[0] == 3 * 9
    assert disc(torch.rand(1, 3, 9, 10)).shape == (1, 3, 27, 30)


def test_overrides_are_checked_by_name_and_type():
    with pytest.raises(TypeError, match="embed_dimm"):
        build_model("swinir_l", flavor="tiny", overrides={"embed_dimm": 8})
    with pytest.raises(ValueError, match="window"):
        build_model("swinir_l", flavor="tiny", overrides={"window": "big"})
    with pytest.raises(ValueError, match="depths"):
        build_model("swinir_l", variant="c2d", flavor="tiny", overrides={"depths": [2, 2]})
    with pytest.raises(TypeError, match="width"):
        build_model("swinir_l", flavor="tiny", head="discrete", head_overrides={"width": 8})
    with pytest.raises(ValueError, match="unknown arch"):
        build_model("edsr")
    m = build_model("swinir_l", flavor="tiny", overrides={"depths": [1, 1, 1], "num_heads": [2, 2, 2]})
    assert m.backbone_config.depths == (1, 1, 1) and len(m.backbone.groups) == 3
    assert build_from_spec(m.spec).backbone_config == m.backbone_config


def test_param_groups_exclude_norms_biases_tables():
    model = _tiny("swinir_l", "plain")
    decay, no_decay = param_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim > 1 for p in decay["params"])
    assert any(names[id(p)].endswith("relative_position_bias_table") for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


# ----------------------------------------------------------------------------- published sizes

# params (x2, x3, x4) and MACs in G (x2, x3, x4) of the published light models
PUBLISHED = {
    ("swinir_l", "plain"): ((910_000, 918_000, 930_000), (244.4, 110.8, 63.6)),
    ("srformer_l", "plain"): ((853_000, 861_000, 873_000), (236.2, 104.8, 62.8)),
    ("swinir_l", "hit"): ((772_000, 780_000, 792_000), (209.9, 94.2, 53.8)),
    ("srformer_l", "hit"): ((847_000, 855_000, 866_000), (226.5, 101.6, 58.0)),
}


@pytest.mark.parametrize("arch,variant", sorted(PUBLISHED))
def test_light_params_and_macs_match_published(arch, variant):
    params, macs = PUBLISHED[(arch, variant)]
    for i, scale in enumerate((2, 3, 4)):
        with torch.device("meta"):
            model = build_model(arch, variant=variant, scale=scale)
        n = count_params(model)
        assert abs(n - params[i]) / params[i] < 0.005, (scale, n)
        g = count_macs(model, lr_size_for_output(scale)) / 1e9
        assert abs(g - macs[i]) / macs[i] < 0.03, (scale, g)


def test_swinir_light_matches_official_code_exactly():
    # counts of the official SwinIR code (SwinIR-S x2: 910,152 params; 240.9 GMACs by FlopCounterMode)
    with torch.device("meta"):
        model = build_model("swinir_l", scale=2)
    assert count_params(model) == 910_152
    assert abs(count_macs(model, (360, 640)) / 1e9 - 240.9) < 0.05


# ----------------------------------------------------------------------------- attention


def _bruteforce_labels(h, w, window, shift):
    """Region labels the way the official Swin code builds them: three slices per axis."""
    labels = torch.zeros(h, w, dtype=torch.long)
    cnt = 0
    for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for ws in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            labels[hs, ws] = cnt
            cnt += 1
    return labels


@pytest.mark.parametrize("h,w,window", [(8, 8, 4), (16, 24, 8), (12, 8, 4)])
def test_shift_mask_matches_slice_construction(h, w, window):
    shift = window // 2
    lab = window_partition(_bruteforce_labels(h, w, window, shift)[None, :, :, None], window, window)[0, :, :, 0]
    expected = torch.where(lab[:, :, None] == lab[:, None, :], 0.0, MASK_VALUE)
    assert torch.equal(shifted_window_mask(h, w, window, shift), expected)


@pytest.mark.parametrize("arch", ["swinir_l", "srformer_l"])
def test_shifted_block_never_mixes_wrapped_regions(arch):
    """The shifted block's output at the bottom-right pixel must not depend on the top-left
    pixel (they share a window only because of the cyclic shift), but a pixel next to the
    top-left one, also wrapped into that window, must."""
    model = _tiny(arch, "plain")
    block = model.backbone.groups[0].body.blocks[1]
    assert block.shift > 0
    size = 2 * block.window
    x = torch.randn(1, size, size, block.norm1.normalized_shape[0])
    x2 = x.clone()
    x2[0, 0, 0] += 5.0 * torch.randn(x.shape[-1])  # a constant shift would vanish in LayerNorm
    with torch.no_grad():
        y, y2 = block(x), block(x2)
    assert torch.allclose(y[0, -1, -1], y2[0, -1, -1], atol=1e-6)
    assert not torch.allclose(y[0, 1, 1], y2[0, 1, 1], atol=1e-4)
    # without the mask the same perturbation leaks across the wrap-around
    block._mask = lambda *a: torch.zeros_like(block._mask_cache[1])
    with torch.no_grad():
        assert not torch.allclose(block(x)[0, -1, -1], block(x2)[0, -1, -1], atol=1e-6)


def test_window_attention_sdpa_matches_explicit():
    attn = WindowAttention(dim=24, num_heads=3, window=4)
    x = torch.randn(2, 4, 16, 24)
    mask = shifted_window_mask(8, 8, 4, 2)
    with torch.no_grad():
        fast = attn(x, mask)
        attn.fused = False
        slow = attn(x, mask)
    assert torch.allclose(fast, slow, atol=1e-5)


@pytest.mark.parametrize("arch,variant", [(a, v) for a in ("swinir_l", "srformer_l", "mambairv2_l") for v in ("plain", "c2d")])
def test_model_sdpa_matches_explicit(arch, variant):
    model = _tiny(arch, variant).eval()
    x = torch.rand(1, 3, 18, 21)
    with torch.no_grad():
        assert set_fused_attention(model, True) > 0
        fast = model(x)
        set_fused_attention(model, False)
        slow = model(x)
    assert torch.allclose(fast, slow, atol=1e-5)


# ----------------------------------------------------------------------------- published checkpoints
# Official key names and shapes, as the official SwinIR / SRFormer / HiT-SR code builds its light
# models (read from that code; written out here independently of our own module names).


def _official_light_state(kind: str, scale: int, c: int = 60, heads: int = 6, depth: int = 6, groups: int = 4):
    t = torch.randn
    sd = {
        "conv_first.weight": t(c, 3, 3, 3),
        "conv_first.bias": t(c),
        "patch_embed.norm.weight": t(c),
        "patch_embed.norm.bias": t(c),
        "norm.weight": t(c),
        "norm.bias": t(c),
        "conv_after_body.weight": t(c, c, 3, 3),
        "conv_after_body.bias": t(c),
        "upsample.0.weight": t(3 * scale * scale, c, 3, 3),
        "upsample.0.bias": t(3 * scale * scale),
    }
    hid = 2 * c
    hit_windows = (4, 8, 16, 32, 48, 64)
    for i in range(groups):
        sd[f"layers.{i}.conv.weight"] = t(c, c, 3, 3)
        sd[f"layers.{i}.conv.bias"] = t(c)
        for j in range(depth):
            p = f"layers.{i}.residual_group.blocks.{j}."
            for n in ("norm1", "norm2"):
                sd[p + n + ".weight"], sd[p + n + ".bias"] = t(c), t(c)
            sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"] = t(hid, c), t(hid)
            sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"] = t(c, hid), t(c)
            if kind in ("srformer", "hit_srf"):
                sd[p + "mlp.dwconv.depthwise_conv.0.weight"] = t(hid, 1, 5, 5)
                sd[p + "mlp.dwconv.depthwise_conv.0.bias"] = t(hid)
            if kind == "swinir":
                sd[p + "attn.relative_position_bias_table"] = t(15 * 15, heads)
                sd[p + "attn.relative_position_index"] = torch.zeros(64, 64, dtype=torch.long)
                sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"] = t(3 * c, c), t(3 * c)
                sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"] = t(c, c), t(c)
                if j % 2:
                    sd[p + "attn_mask"] = torch.zeros(64, 64, 64)
            elif kind == "srformer":
                sd[p + "attn.relative_position_bias_table"] = t(15 * 15, heads)
                sd[p + "attn.aligned_relative_position_index"] = torch.zeros(256, 64, dtype=torch.long)
                sd[p + "attn.kv.weight"], sd[p + "attn.kv.bias"] = t(c // 2, c), t(c // 2)
                sd[p + "attn.q.weight"], sd[p + "attn.q.bias"] = t(c, c), t(c)
                sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"] = t(c, c), t(c)
            else:  # HiT-SIR / HiT-SRF spatial-channel correlation
                q = p + "correlation."
                m = c // 5
                sd[q + "qv.conv.0.weight"], sd[q + "qv.conv.0.bias"] = t(m, c, 1, 1), t(m)
                sd[q + "qv.conv.2.weight"], sd[q + "qv.conv.2.bias"] = t(m, m, 3, 3), t(m)
                sd[q + "qv.conv.4.weight"], sd[q + "qv.conv.4.bias"] = t(c, m, 1, 1), t(c)
                sd[q + "qv.linear.weight"], sd[q + "qv.linear.bias"] = t(c, c, 1, 1), t(c)
                sd[q + "proj.weight"], sd[q + "proj.bias"] = t(c, c), t(c)
                r2 = max(hit_windows[j] // 8, 1) ** 2
                sd[q + "spatial_linear.weight"], sd[q + "spatial_linear.bias"] = t(1, r2), t(1)
                pd = c // 4 // 4
                sd[q + "pos.pos_proj.weight"], sd[q + "pos.pos_proj.bias"] = t(pd, 2), t(pd)
                for k, out in (("pos1", pd), ("pos2", pd), ("pos3", heads)):
                    sd[q + f"pos.{k}.0.weight"], sd[q + f"pos.{k}.0.bias"] = t(pd), t(pd)
                    sd[q + f"pos.{k}.2.weight"], sd[q + f"pos.{k}.2.bias"] = t(out, pd), t(out)
    return sd


@pytest.mark.parametrize(
    "arch,variant,kind",
    [("swinir_l", "plain", "swinir"), ("srformer_l", "plain", "srformer"),
     ("swinir_l", "hit", "hit_sir"), ("srformer_l", "hit", "hit_srf")],
)
def test_load_published_maps_official_names(tmp_path, arch, variant, kind):
    official = _official_light_state(kind, scale=3)
    path = tmp_path / "official.pth"
    torch.save({"params_ema": official, "params": {}}, path)
    model = build_model(arch, variant=variant, scale=3)
    load_published(model, path)
    ours = model.state_dict()
    used = [k for k, v in official.items() if v.is_floating_point() and v.ndim and "mask" not in k]
    assert len(used) == len(ours)  # every one of our tensors came from one official tensor
    ours_values = {(tuple(v.shape), float(v.flatten()[0]), float(v.sum())) for v in ours.values()}
    for k in used:
        v = official[k]
        assert (tuple(v.shape), float(v.flatten()[0]), float(v.sum())) in ours_values, k
    assert torch.equal(model.head.upsample[0].weight, official["upsample.0.weight"])
    assert torch.equal(model.backbone.embed_norm.weight, official["patch_embed.norm.weight"])


def test_load_published_is_strict(tmp_path):
    official = _official_light_state("swinir", scale=2)
    model = build_model("swinir_l", scale=2)
    bad = dict(official)
    del bad["layers.2.residual_group.blocks.3.attn.qkv.weight"]
    bad["layers.9.extra.weight"] = torch.zeros(1)
    torch.save({"params": bad}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"blocks\.3\.attn\.qkv\.weight.*layers\.9\.extra"):
        load_published(model, tmp_path / "bad.pth")
    torch.save({"params": official}, tmp_path / "x2.pth")
    with pytest.raises(ValueError, match="shape mismatch"):
        load_published(build_model("swinir_l", scale=4), tmp_path / "x2.pth")
    with pytest.raises(ValueError, match="backbone_only"):
        load_published(build_model("swinir_l", head="continuous"), tmp_path / "x2.pth")
    cont = load_published(build_model("swinir_l", head="continuous"), tmp_path / "x2.pth", backbone_only=True)
    assert torch.equal(cont.backbone.conv_first.weight, official["conv_first.weight"])
    with pytest.raises(ValueError, match="c2d"):
        load_published(build_model("swinir_l", variant="c2d", scale=2), tmp_path / "x2.pth")
    torch.save({"net": {}}, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match="params_ema"):
        load_published(model, tmp_path / "odd.pth")
    with pytest.raises(FileNotFoundError):
        load_published(model, tmp_path / "missing.pth")


def test_apply_overrides_coerces_yaml_values():
    from c2disr.models.swinir import make_config

    cfg = apply_overrides(make_config(flavor="tiny", variant="plain"), {"mlp_ratio": 3, "depths": [1, 2]})
    assert cfg.mlp_ratio == 3.0 and isinstance(cfg.mlp_ratio, float) and cfg.depths == (1, 2)


def _official_psa(attn, x):
    """The official SRFormer PSA forward on `(b_, n, c)` windows, written from its algorithm:
    K/V channels reshaped as (pw, 2, pw, 2, [k|v], c/4), 2x2 patches folded into channels;
    each query's bias row taken from an aligned index repeated over 2x2 query blocks."""
    import torch.nn.functional as F

    b_, n, c = x.shape
    pw, heads = attn.pw, attn.num_heads
    kv = F.linear(x, attn.kv.weight, attn.kv.bias).reshape(b_, pw, 2, pw, 2, 2, c // 4)
    kv = kv.permute(0, 1, 3, 5, 2, 4, 6).reshape(b_, n // 4, 2, heads, c // heads).permute(2, 0, 3, 1, 4)
    q = F.linear(x, attn.q.weight, attn.q.bias).reshape(b_, n, heads, c // heads).transpose(1, 2)
    small = relative_position_index(pw, pw)
    aligned = small.reshape(pw, pw, 1, 1, pw * pw).repeat(1, 1, 2, 2, 1).permute(0, 2, 1, 3, 4).reshape(n, n // 4)
    bias = attn.relative_position_bias_table[aligned.view(-1)].view(n, n // 4, heads).permute(2, 0, 1)
    a = ((q * attn.scale) @ kv[0].transpose(-2, -1) + bias).softmax(-1)
    return F.linear((a @ kv[1]).transpose(1, 2).reshape(b_, n, c), attn.proj.weight, attn.proj.bias)


def test_permuted_attention_matches_official_algorithm():
    from c2disr.models.srformer import PermutedAttention

    attn = PermutedAttention(dim=24, num_heads=3, window=8)
    x = torch.randn(5, 64, 24)
    with torch.no_grad():
        ours = attn(x[:, None])[:, 0]
        assert torch.allclose(ours, _official_psa(attn, x), atol=1e-5)


def test_psa_official_mask_matches_official_slices():
    from c2disr.models.srformer import psa_mask

    h, w, window = 16, 24, 8
    shift, pw = window // 2, window // 2
    # the official key-map slices (the third w slice pair is (-pw, -pw): empty, as in the original)
    lab = torch.zeros(h // 2, w // 2, dtype=torch.long)
    cnt = 0
    for hs in (slice(0, -pw), slice(-pw, -shift), slice(-shift, None)):
        for ws in (slice(0, -pw), slice(-pw, -pw), slice(-pw, None)):
            lab[hs, ws] = cnt
            cnt += 1
    q_lab = window_partition(_bruteforce_labels(h, w, window, shift)[None, :, :, None], window, window)[0, :, :, 0]
    k_lab = window_partition(lab[None, :, :, None], pw, pw)[0, :, :, 0]
    expected = torch.where(q_lab[:, :, None] == k_lab[:, None, :], 0.0, MASK_VALUE)
    official = psa_mask(h, w, window, shift, "official")
    exact = psa_mask(h, w, window, shift, "exact")
    assert torch.equal(official, expected)
    # the two agree away from the last window row/column, and differ inside it
    n_cols = w // window
    interior = [i for i in range(official.shape[0]) if i // n_cols < h // window - 1 and i % n_cols < n_cols - 1]
    assert torch.equal(official[interior], exact[interior]) and not torch.equal(official, exact)


@pytest.mark.parametrize("h,w,window", [(16, 24, 8), (32, 48, 16)])
def test_psa_exact_mask_matches_todays_official_slices(h, w, window):
    """Since SRFormer's commit bc85758 ("fix shift_size for the permuted_window_mask") the
    official key-map slices are (0, -pw), (-pw, -shift // 2), (-shift // 2, None) on both axes:
    that is `psa_mask="exact"`; "official" is the first commit's mask (test above)."""
    from c2disr.models.srformer import psa_mask

    shift, pw = window // 2, window // 2
    lab = torch.zeros(h // 2, w // 2, dtype=torch.long)
    cnt = 0
    for hs in (slice(0, -pw), slice(-pw, -shift // 2), slice(-shift // 2, None)):
        for ws in (slice(0, -pw), slice(-pw, -shift // 2), slice(-shift // 2, None)):
            lab[hs, ws] = cnt
            cnt += 1
    q_lab = window_partition(_bruteforce_labels(h, w, window, shift)[None, :, :, None], window, window)[0, :, :, 0]
    k_lab = window_partition(lab[None, :, :, None], pw, pw)[0, :, :, 0]
    expected = torch.where(q_lab[:, :, None] == k_lab[:, None, :], 0.0, MASK_VALUE)
    assert torch.equal(psa_mask(h, w, window, shift, "exact"), expected)


def test_cli_model_info_and_list(capsys):
    from srplatform.cli import main

    assert main(["model", "info", "--arch", "swinir_l", "--variant", "hit", "--scale", "2"]) == 0
    out = capsys.readouterr().out
    assert "772,064" in out and "206.4" in out and "640x360 -> 1280x720" in out
    assert main(["model", "info", "--arch", "swinir_l", "--flavor", "tiny", "--head", "continuous",
                 "--scale", "3.3", "--set", "head.width=16", "--json"]) == 0
    import json

    info = json.loads(capsys.readouterr().out)
    assert info["out_hw"] == [720, 1280] and info["lr_hw"] == [218, 388] and info["head_overrides"] == {"width": 16}
    assert main(["model", "info", "--arch", "swinir_l", "--set", "windw=8"]) == 2
    assert "windw" in capsys.readouterr().err
    assert main(["model", "list"]) == 0
    assert "mambairv2_l" in capsys.readouterr().out


def test_load_published_dispatches_to_mambairv2_checkpoint():
    import os
    from pathlib import Path

    shared = Path(os.environ.get("C2D_SHARED", Path(__file__).resolve().parents[2] / "shared"))
    path = shared / "weights" / "mambairv2_lightSR_x2.pth"
    if not path.is_file():
        pytest.skip(f"official MambaIRv2-light x2 checkpoint not found at {path}")
    model = build_model("mambairv2_l", scale=2)
    load_published(model, path)
    raw = torch.load(path, map_location="cpu", weights_only=True)["params"]
    assert torch.equal(model.backbone.conv_first.weight, raw["conv_first.weight"])
    assert torch.equal(model.head.upsample[0].weight, raw["upsample.0.weight"])
    with pytest.raises(ValueError):
        load_published(build_model("mambairv2_l", scale=4), path)  # x2 head into a x4 model
