"""Selective scan: the chunked pure-PyTorch operator against a position-by-position reference
(float64, forward and gradients), its numerics on long / strongly decaying sequences, its cost
in Python steps, its FLOP formula, argument checks, and (GPU only) mamba-ssm's CUDA kernel."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from c2disr.models import scan
from c2disr.models.scan import scan_macs, selective_scan, selective_scan_reference


def _inputs(b, d, n, length, *, groups=None, dtype=torch.float64, seed=0, a_scale=3.0, device="cpu"):
    """Random scan inputs in mamba-ssm's layout; A < 0 as in Mamba (A = -exp(A_log))."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).to(device)

    bc_shape = (b, n, length) if groups is None else (b, groups, n, length)
    A = -(torch.rand(d, n, generator=g, dtype=dtype) * a_scale + 0.05).to(device)
    return {"u": r(b, d, length), "delta": r(b, d, length), "A": A, "B": r(*bc_shape), "C": r(*bc_shape),
            "D": r(d), "delta_bias": r(d)}


def _run(fn, t, *, with_d=True, with_bias=True, softplus=True, **kw):
    return fn(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"] if with_d else None,
              delta_bias=t["delta_bias"] if with_bias else None, delta_softplus=softplus, **kw)


@pytest.mark.parametrize(
    "length,chunk,groups",
    [
        (1, 4, None),  # a single position
        (37, 64, None),  # shorter than a chunk: one walk
        (64, 8, None),  # exact multiple, two levels
        (301, 4, None),  # ragged tail, four levels of recursion
        (200, 7, 2),  # grouped B/C (channels split in 2 blocks)
        (150, 16, 6),  # one group per channel
    ],
)
def test_chunked_matches_sequential_reference_forward_and_gradients(length, chunk, groups):
    t = _inputs(2, 6, 4, length, groups=groups)
    leaves = {k: v.clone().requires_grad_() for k, v in t.items()}
    y = _run(selective_scan, leaves, chunk=chunk, backend="chunked")
    ref_leaves = {k: v.clone().requires_grad_() for k, v in t.items()}
    ref = _run(selective_scan_reference, ref_leaves)
    assert y.dtype == torch.float64 and y.shape == ref.shape == (2, 6, length)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    gy = torch.randn_like(ref)
    names = list(t)
    grads = torch.autograd.grad(y, [leaves[k] for k in names], gy)
    ref_grads = torch.autograd.grad(ref, [ref_leaves[k] for k in names], gy)
    for name, got, want in zip(names, grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize(
    "with_d,with_bias,softplus", [(False, False, False), (True, False, True), (False, True, False)]
)
def test_optional_arguments_match_reference(with_d, with_bias, softplus):
    t = _inputs(1, 4, 3, 90, seed=3)
    if not softplus:  # raw steps must be >= 0 for a decaying recurrence
        t["delta"] = t["delta"].abs()
        t["delta_bias"] = t["delta_bias"].abs()
    leaves = {k: v.clone().requires_grad_() for k, v in t.items()}
    kw = dict(with_d=with_d, with_bias=with_bias, softplus=softplus)
    y = _run(selective_scan, leaves, chunk=8, **kw)
    ref = _run(selective_scan_reference, t, **kw)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    y.sum().backward()
    assert (leaves["D"].grad is not None) == with_d
    assert (leaves["delta_bias"].grad is not None) == with_bias


def test_gradcheck_small():
    t = {k: v.requires_grad_() for k, v in _inputs(1, 2, 2, 11, seed=5).items()}
    assert torch.autograd.gradcheck(
        lambda u, delta, A, B, C, D, bias: selective_scan(u, delta, A, B, C, D, delta_bias=bias,
                                                          delta_softplus=True, chunk=3),
        tuple(t.values()),
    )


def test_long_strongly_decaying_sequence_is_stable_in_float32():
    """Long sequences with steps that decay by up to e^-200 per position (where a
    cumsum(exp(-logdecay)) closed form would overflow) and near-1 decays (long memory)."""
    length = 3000
    t = _inputs(1, 4, 4, length, seed=7, a_scale=1.0)
    t["A"] = torch.tensor([[-1e-3, -0.5, -5.0, -200.0]] * 4, dtype=torch.float64)
    t["delta"] = t["delta"] * 3  # softplus(.) spans ~0 .. 10
    ref = _run(selective_scan_reference, t)
    t32 = {k: v.float() for k, v in t.items()}
    y = _run(selective_scan, t32, chunk=64)
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    err = (y.double() - ref).abs().max() / ref.abs().max()
    assert err < 1e-5, err


def test_result_does_not_depend_on_chunk_length():
    t = {k: v.float() for k, v in _inputs(2, 8, 4, 1000, seed=11).items()}
    ys = [_run(selective_scan, t, chunk=c) for c in (2, 5, 64, 4096)]
    for y in ys[1:]:
        torch.testing.assert_close(y, ys[0], rtol=1e-4, atol=1e-5)


def test_python_steps_grow_like_chunk_log_length_not_length(monkeypatch):
    """The chunked scan must not be a Python loop over positions: count the steps its walks take."""
    steps = []
    real_walk, real_end = scan._walk, scan._walk_end

    def walk(a, b, init=None):
        steps.append(b.shape[1])
        return real_walk(a, b, init)

    def walk_end(a, b):
        steps.append(b.shape[1])
        return real_end(a, b)

    monkeypatch.setattr(scan, "_walk", walk)
    monkeypatch.setattr(scan, "_walk_end", walk_end)
    t = {k: v.float() for k, v in _inputs(1, 2, 2, 65536, seed=2).items()}
    with torch.no_grad():
        y = _run(selective_scan, t, chunk=64)
    assert torch.isfinite(y).all()
    # 65536 = 1024 chunks of 64 -> 16 chunks of 64 -> one walk of 16: 2*64 + 2*64 + 16 steps
    assert sum(steps) == 272, steps


def test_flop_counter_sees_the_scan_with_its_formula():
    """FlopCounterMode counts the operator as 9 MACs per (batch, channel, state, position) plus
    the D skip (the mamba-ssm / VMamba convention), on the meta device as on CPU."""
    for device, with_d in (("meta", True), ("cpu", False)):
        t = {k: v.float().to(device) for k, v in _inputs(2, 6, 4, 50).items()}
        with FlopCounterMode(display=False) as counter:
            y = _run(selective_scan, t, with_d=with_d)
        assert y.shape == (2, 6, 50) and y.device.type == device
        assert counter.get_total_flops() == 2 * scan_macs(2, 6, 4, 50, with_d=with_d)
    assert scan_macs(1, 48, 8, 100) == 9 * 48 * 8 * 100 + 48 * 100


def test_auto_backend_on_cpu_is_the_chunked_path_and_cuda_backend_needs_cuda():
    t = {k: v.float() for k, v in _inputs(1, 4, 2, 40).items()}
    torch.testing.assert_close(_run(selective_scan, t), _run(selective_scan, t, backend="chunked"), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="backend='cuda'"):
        _run(selective_scan, t, backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        _run(selective_scan, t, backend="triton")


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda t: t.update(delta=t["delta"][..., :-1]), "u and delta"),
        (lambda t: t.update(A=t["A"][:-1]), "A must be"),
        (lambda t: t.update(B=t["B"][..., :-1]), "B must be"),
        (lambda t: t.update(C=t["C"].unsqueeze(1).expand(-1, 4, -1, -1)), "C has 4 groups"),
        (lambda t: t.update(D=t["D"][:-1]), "D must be"),
        (lambda t: t.update(A=t["A"].to(torch.complex128)), "complex"),
    ],
)
def test_bad_arguments_are_named(change, match):
    t = _inputs(1, 6, 2, 10)
    change(t)
    with pytest.raises(ValueError, match=match):
        _run(selective_scan, t)


def test_float32_and_half_inputs_compute_in_float32():
    t = {k: v.float() for k, v in _inputs(1, 4, 2, 30).items()}
    y32 = _run(selective_scan, t)
    y16 = _run(selective_scan, {k: v.to(torch.bfloat16) for k, v in t.items()})
    assert y32.dtype == torch.float32 and y16.dtype == torch.float32


@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("mamba_ssm") is None,
    reason="needs a CUDA device and mamba-ssm (pip install 'c2disr[gpu]')",
)
def test_cuda_kernel_agrees_with_chunked_path():
    t = {k: v.float().cuda() for k, v in _inputs(2, 48, 8, 4096, seed=13).items()}
    leaves = {k: v.clone().requires_grad_() for k, v in t.items()}
    ref_leaves = {k: v.clone().requires_grad_() for k, v in t.items()}
    y = _run(selective_scan, leaves, backend="cuda")
    ref = _run(selective_scan, ref_leaves, backend="chunked")
    torch.testing.assert_close(y, ref, rtol=1e-3, atol=1e-3)
    gy = torch.randn_like(ref)
    for name, got, want in zip(t, torch.autograd.grad(y, list(leaves.values()), gy),
                               torch.autograd.grad(ref, list(ref_leaves.values()), gy)):
        scale = want.abs().max().clamp_min(1e-6)
        assert ((got - want).abs().max() / scale) < 1e-2, name
