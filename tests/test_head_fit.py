"""The closed-form start of stage 2: fitting the pixel-shuffle head on frozen features."""

from __future__ import annotations

import pytest
import torch

from c2disr.models import build_model, fit_discrete_head, to_discrete


@pytest.mark.parametrize("scale", [2, 3])
def test_fit_recovers_a_linear_head(scale):
    torch.manual_seed(0)
    teacher = build_model("swinir_l", variant="plain", flavor="tiny", head="discrete", scale=scale).eval()
    with torch.no_grad():
        for p in teacher.head.parameters():
            p.normal_(0, 0.05)
        lr = torch.rand(3, 3, 12, 13)
        hr = teacher(lr)  # exactly representable by the head on these features
    student = build_model("swinir_l", variant="plain", flavor="tiny", head="discrete", scale=scale).eval()
    student.backbone.load_state_dict(teacher.backbone.state_dict())
    with torch.no_grad():
        before = float((student(lr) - hr).abs().mean())
    err = fit_discrete_head(student, lr, hr, ridge=1e-9)
    assert err < 1e-4 < before
    torch.testing.assert_close(student.head.upsample[0].weight, teacher.head.upsample[0].weight,
                               atol=1e-3, rtol=0)


def test_fit_keeps_backbone_and_rejects_bad_input():
    torch.manual_seed(1)
    cont = build_model("swinir_l", variant="c2d", flavor="tiny", head="continuous").eval()
    disc = to_discrete(cont, 2).eval()
    before = {k: v.clone() for k, v in disc.backbone.state_dict().items()}
    lr = torch.rand(2, 3, 16, 16)
    fit_discrete_head(disc, lr, torch.rand(2, 3, 32, 32))
    for k, v in disc.backbone.state_dict().items():
        assert torch.equal(v, before[k]), f"backbone tensor {k} changed"
    with pytest.raises(ValueError, match="is not x2"):
        fit_discrete_head(disc, lr, torch.rand(2, 3, 30, 32))
    with pytest.raises(ValueError, match="needs a discrete model"):
        fit_discrete_head(cont, lr, torch.rand(2, 3, 32, 32))


def test_bilinear_base_of_the_discrete_head():
    """From a continuous model `to_discrete` keeps the continuous head's base: with a zero head
    the discrete model outputs the bilinear upsampling of its input; the model file keeps it;
    `residual="none"` is the published form (mean colour only)."""
    import torch.nn.functional as F

    torch.manual_seed(2)
    cont = build_model("swinir_l", variant="c2d", flavor="tiny", head="continuous").eval()
    disc = to_discrete(cont, 3).eval()
    assert disc.head.residual == "bilinear" and disc.spec["head_overrides"] == {"residual": "bilinear"}
    with torch.no_grad():
        disc.head.upsample[0].weight.zero_()
        disc.head.upsample[0].bias.zero_()
        lr = torch.rand(1, 3, 10, 7)
        want = F.interpolate(lr, scale_factor=3, mode="bilinear", align_corners=False)
        torch.testing.assert_close(disc(lr), want)
        # the continuous model renders the same base at the same size with its zero-start head
        torch.testing.assert_close(cont(lr, out_size=(30, 21)), want, atol=1e-6, rtol=0)
    assert to_discrete(disc, 2).head.residual == "bilinear"  # a discrete source keeps its base
    plain = to_discrete(cont, 2, residual="none")
    assert plain.head.residual == "none" and plain.spec["head_overrides"] == {}
    with pytest.raises(ValueError, match="residual must be one of"):
        to_discrete(cont, 2, residual="bicubic")


def test_bilinear_base_survives_the_model_file(tmp_path):
    from c2disr.evaluate import load_model, save_model

    torch.manual_seed(3)
    disc = to_discrete(build_model("srformer_l", variant="plain", flavor="tiny", head="continuous"), 2).eval()
    back = load_model(save_model(tmp_path / "m.pt", disc)).eval()
    assert back.head.residual == "bilinear"
    lr = torch.rand(1, 3, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(back(lr), disc(lr))


def test_head_fit_stats_add_up_over_batches():
    """Normal equations summed over two batches give the fit on both at once (what the
    training loop all-reduces over workers)."""
    from c2disr.models import head_fit_stats, solve_head

    torch.manual_seed(4)
    disc = to_discrete(build_model("swinir_l", variant="c2d", flavor="tiny", head="continuous"), 2).eval()
    lr, hr = torch.rand(4, 3, 12, 12), torch.rand(4, 3, 24, 24)
    g1, x1 = head_fit_stats(disc, lr[:2], hr[:2])
    g2, x2 = head_fit_stats(disc, lr[2:], hr[2:])
    solve_head(disc, g1 + g2, x1 + x2)
    split = disc.head.upsample[0].weight.detach().clone()
    fit_discrete_head(disc, lr, hr)
    torch.testing.assert_close(disc.head.upsample[0].weight, split, atol=1e-6, rtol=0)
