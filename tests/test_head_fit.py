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
