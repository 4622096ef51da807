"""Selective scan: the input-dependent linear recurrence at the heart of Mamba (S6).

For every batch element, channel ``d`` and state index ``n``::

    dt_t      = softplus(delta_t + delta_bias)        (or delta_t + delta_bias)
    h_t[d, n] = exp(dt_t[d] * A[d, n]) * h_{t-1}[d, n] + dt_t[d] * B_t[g(d), n] * u_t[d]
    y_t[d]    = sum_n C_t[g(d), n] * h_t[d, n] + D[d] * u_t[d]

with ``h_{-1} = 0`` and ``g(d)`` the group of channel ``d`` (channels split into consecutive
blocks, one per group of B/C). This is the semantics and argument order of
``mamba_ssm.ops.selective_scan_interface.selective_scan_fn``, restricted to real ``A`` and without
the ``z`` gate, which MambaIRv2 does not use.

Three implementations agree (``tests/test_scan.py``):

- ``"chunked"``: pure PyTorch, any device, differentiable. The recurrence ``h_t = a_t h_{t-1} + b_t``
  is solved by cutting the sequence into chunks of ``chunk`` positions, walking the positions of
  a chunk for *all chunks at once*, getting the state that enters each chunk from the same
  recurrence one level up (over the chunk summaries, recursively), and finishing every position
  in closed form with ``exp(log-decay since the chunk start) * entering state``. Python steps grow
  like ``chunk * log_chunk(L)``, not ``L``, and every exponential has a non-positive argument
  (``A < 0``, ``dt >= 0``), so nothing overflows as a ``cumsum(exp(-logdecay))`` form would on
  long sequences. It is an operator of its own (``torch.ops.c2disr.selective_scan``, so the FLOP
  counter sees it whole, see below) with an analytic backward (a reverse scan of the same kind;
  states are recomputed rather than stored, as mamba-ssm's kernel does).
- ``"cuda"``: mamba-ssm's fused kernel, chosen by ``"auto"`` for CUDA tensors when ``mamba_ssm``
  is importable.
- ``"reference"``: a plain Python loop over every position, for tests.

FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` sees the custom op as one operation and
counts ``scan_macs`` for it: 9 MACs per (batch, channel, state, position) plus one per
(batch, channel, position) for the ``D`` skip. This is the convention of mamba-ssm (issue #110)
and of VMamba's counter, which the MambaIR papers' MAC tables follow; it is a convention for the
discretisation, input, state update and read-out, not a count of this implementation's kernels.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

__all__ = ["selective_scan", "selective_scan_reference", "cuda_kernel_available", "scan_macs", "BACKENDS"]

BACKENDS = ("auto", "chunked", "cuda", "reference")


@functools.cache
def _mamba_kernel():
    """mamba-ssm's ``selective_scan_fn`` or None. Imported lazily: mamba-ssm pulls in triton and
    CUDA extensions, which a CPU machine neither has nor needs."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # ImportError, or a broken CUDA extension build: fall back to pure PyTorch
        return None
    return selective_scan_fn


def cuda_kernel_available() -> bool:
    """True when mamba-ssm's CUDA selective-scan kernel can be used on this machine."""
    return torch.cuda.is_available() and _mamba_kernel() is not None


def scan_macs(batch: int, channels: int, d_state: int, length: int, *, with_d: bool = True) -> int:
    """Conventional MACs of one selective scan: 9 * B*D*N*L (+ B*D*L for the D skip)."""
    return 9 * batch * channels * d_state * length + (batch * channels * length if with_d else 0)


# ----------------------------------------------------------------------------------------------
# argument checks


def _check(u, delta, A, B, C, D, delta_bias) -> None:
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"selective_scan: u and delta must both be (batch, channels, length); "
                         f"got u {tuple(u.shape)}, delta {tuple(delta.shape)}")
    bsz, dim, length = u.shape
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"selective_scan: A must be (channels={dim}, d_state); got {tuple(A.shape)}")
    if A.is_complex():
        raise ValueError("selective_scan: complex A is not supported (MambaIRv2 uses real A)")
    d_state = A.shape[1]
    groups = []
    for name, t in (("B", B), ("C", C)):
        if t.dim() == 3:
            t = t.unsqueeze(1)
        if t.dim() != 4 or t.shape[0] != bsz or t.shape[2] != d_state or t.shape[3] != length:
            raise ValueError(f"selective_scan: {name} must be (batch={bsz}, [groups,] d_state={d_state}, "
                             f"length={length}); got {tuple(t.shape)}")
        if dim % t.shape[1]:
            raise ValueError(f"selective_scan: {name} has {t.shape[1]} groups, which does not divide "
                             f"{dim} channels")
        groups.append(t.shape[1])
    if groups[0] != groups[1]:
        raise ValueError(f"selective_scan: B and C must have the same number of groups; "
                         f"got {tuple(B.shape)} and {tuple(C.shape)}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and tuple(t.shape) != (dim,):
            raise ValueError(f"selective_scan: {name} must be (channels={dim},); got {tuple(t.shape)}")


def _compute_dtype(u: torch.Tensor) -> torch.dtype:
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _step(delta, delta_bias, softplus):
    """(step dt, pre-activation z) from the raw delta, (b, d, l)."""
    z = delta if delta_bias is None else delta + delta_bias[:, None]
    return (F.softplus(z) if softplus else z), z


# ----------------------------------------------------------------------------------------------
# the reference loop


def selective_scan_reference(u, delta, A, B, C, D=None, *, delta_bias=None, delta_softplus=False):
    """The recurrence written one position at a time: slow, obviously right; the ground truth the
    fast paths are tested against. Same arguments and result as ``selective_scan``."""
    _check(u, delta, A, B, C, D, delta_bias)
    dtype = _compute_dtype(u)
    u, delta, A = u.to(dtype), delta.to(dtype), A.to(dtype)
    dt, _ = _step(delta, None if delta_bias is None else delta_bias.to(dtype), delta_softplus)
    per_group = u.shape[1] // (B.shape[1] if B.dim() == 4 else 1)
    B = (B if B.dim() == 4 else B.unsqueeze(1)).to(dtype).repeat_interleave(per_group, dim=1)  # (b, d, n, l)
    C = (C if C.dim() == 4 else C.unsqueeze(1)).to(dtype).repeat_interleave(per_group, dim=1)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])  # (b, d, n)
    ys = []
    for t in range(u.shape[-1]):
        h = torch.exp(dt[:, :, t, None] * A) * h + (dt[:, :, t] * u[:, :, t])[..., None] * B[:, :, :, t]
        ys.append((h * C[:, :, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    return y if D is None else y + D.to(dtype)[:, None] * u


# ----------------------------------------------------------------------------------------------
# the chunked scan (layout inside: length-major (L, b, d, n), so each step touches contiguous runs)


def _walk(a: torch.Tensor, b: torch.Tensor, init: torch.Tensor | None = None) -> torch.Tensor:
    """h_t = a_t * h_{t-1} + b_t along dim 1 of (K, T, ...) tensors, for all K at once, from
    h_{-1} = init (K, ...) or zero. Returns all states (K, T, ...)."""
    out = torch.empty_like(b)
    if init is None:
        out[:, 0] = b[:, 0]
    else:
        torch.addcmul(b[:, 0], a[:, 0], init, out=out[:, 0])
    for t in range(1, b.shape[1]):
        torch.addcmul(b[:, t], a[:, t], out[:, t - 1], out=out[:, t])
    return out


def _walk_end(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Final state of ``_walk(a, b)`` only, (K, ...), without storing the others."""
    h = b[:, 0]
    for t in range(1, b.shape[1]):
        h = torch.addcmul(b[:, t], a[:, t], h)
    return h


def _linear_recurrence(a: torch.Tensor, b: torch.Tensor, chunk: int) -> torch.Tensor:
    """All states of h_t = a_t * h_{t-1} + b_t along dim 0 from h_{-1} = 0.

    a, b: (L, ...) with a in [0, 1] (decays). Pass 1 gets each chunk's end state from zero; the
    states entering the chunks come from the same recurrence over (product of the chunk's
    decays, chunk end state), solved recursively; pass 2 walks every chunk from its entering
    state. Only products of numbers in [0, 1] occur, so nothing can overflow.
    """
    length = b.shape[0]
    if length <= chunk:
        return _walk(a[None], b[None])[0]
    n_chunks = -(-length // chunk)
    pad = n_chunks * chunk - length
    if pad:  # decay 1 and input 0 at the tail: padding never feeds back into real positions
        a = torch.cat([a, a.new_ones((pad, *a.shape[1:]))])
        b = torch.cat([b, b.new_zeros((pad, *b.shape[1:]))])
    a = a.view(n_chunks, chunk, *a.shape[1:])  # (K, T, ...)
    b = b.view(n_chunks, chunk, *b.shape[1:])
    ends = _linear_recurrence(a.prod(dim=1), _walk_end(a, b), chunk)  # (K, ...) true end states
    entering = torch.cat([torch.zeros_like(ends[:1]), ends[:-1]])
    return _walk(a, b, entering).flatten(0, 1)[:length]


def _discretize(u, dt, A, B):
    """Decays a = exp(dt A) and inputs dt u B, both contiguous (L, b, d, n); u, dt (b, d, L),
    B (b, g, n, L). (Permuted inputs would make every later step stride through memory.)"""
    bsz, dim, length = u.shape
    groups, d_state = B.shape[1], B.shape[2]
    dt_l = dt.permute(2, 0, 1).contiguous()  # (L, b, d)
    a = torch.exp(dt_l.unsqueeze(-1) * A)  # in (0, 1] since A < 0 and dt >= 0
    du = (dt_l * u.permute(2, 0, 1)).view(length, bsz, groups, dim // groups, 1)
    inp = du * B.permute(3, 0, 1, 2).contiguous().unsqueeze(3)  # (L, b, g, d/g, n)
    return a, inp.view(length, bsz, dim, d_state)


def _readout(h, C):
    """y[b, d, l] = sum_n C[b, g(d), n, l] h[l, b, d, n], as one batched matmul."""
    length, bsz, dim, d_state = h.shape
    groups = C.shape[1]
    c_l = C.permute(3, 0, 1, 2).contiguous().unsqueeze(-1)  # (L, b, g, n, 1)
    y = torch.matmul(h.view(length, bsz, groups, dim // groups, d_state), c_l)
    return y.view(length, bsz, dim).permute(1, 2, 0)


def _scan_impl(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
               D: torch.Tensor | None, delta_bias: torch.Tensor | None, delta_softplus: bool,
               chunk: int) -> torch.Tensor:
    """Chunked scan on prepared inputs: one floating dtype, B and C as (b, g, n, l)."""
    dt, _ = _step(delta, delta_bias, delta_softplus)
    y = _readout(_linear_recurrence(*_discretize(u, dt, A, B), chunk), C)
    return y.contiguous() if D is None else torch.addcmul(y, D[:, None], u)


# The chunked scan is one operator, torch.ops.c2disr.selective_scan, so FlopCounterMode can see it
# (and count it with the formula below) instead of its elementwise internals. Registered with the
# low-level Library API: torch.library.custom_op would wrap the kernel in a dynamo guard whose
# first call imports torch._dynamo (seconds per process). Autograd is the Function below.
_LIB = torch.library.Library("c2disr", "FRAGMENT")
_LIB.define("selective_scan(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, "
            "Tensor? delta_bias, bool delta_softplus, int chunk) -> Tensor")
_LIB.impl("selective_scan", _scan_impl, "CompositeExplicitAutograd")
_LIB.impl("selective_scan", lambda u, *args: torch.empty_like(u), "Meta")


@register_flop_formula(torch.ops.c2disr.selective_scan)
def _scan_flops(u_shape, delta_shape, A_shape, B_shape, C_shape, D_shape, *args, out_shape=None, **kwargs) -> int:
    bsz, dim, length = u_shape
    return 2 * scan_macs(bsz, dim, A_shape[1], length, with_d=D_shape is not None)


class _ChunkedScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, delta_bias, delta_softplus, chunk):
        ctx.save_for_backward(u, delta, A, B, C, D, delta_bias)
        ctx.delta_softplus, ctx.chunk = delta_softplus, chunk
        return torch.ops.c2disr.selective_scan(u, delta, A, B, C, D, delta_bias, delta_softplus, chunk)

    @staticmethod
    def backward(ctx, gy):
        return _scan_backward(ctx, gy)


def _scan_backward(ctx, gy):
    """Adjoint of the recurrence, g_t = a_{t+1} g_{t+1} + C_t gy_t (a reverse scan of the same
    kind), then the chain rule through the inputs dt u B, the log-decays dt A and the read-out.
    States are recomputed instead of stored (as mamba-ssm's kernel does)."""
    u, delta, A, B, C, D, delta_bias = ctx.saved_tensors
    bsz, dim, length = u.shape
    groups, d_state = B.shape[1], B.shape[2]
    per = dim // groups
    gy = gy.contiguous()
    dt, z = _step(delta, delta_bias, ctx.delta_softplus)
    a, inp = _discretize(u, dt, A, B)
    h = _linear_recurrence(a, inp, ctx.chunk)  # (l, b, d, n)
    del inp
    gy_l = gy.permute(2, 0, 1).reshape(length, bsz, groups, per, 1)
    B_l = B.permute(3, 0, 1, 2).unsqueeze(3)  # (l, b, g, 1, n)
    C_l = C.permute(3, 0, 1, 2).unsqueeze(3)
    src = (gy_l * C_l).view(length, bsz, dim, d_state)
    a_next = torch.cat([a[1:], torch.ones_like(a[:1])])  # decay applied when leaving position t
    gh = _linear_recurrence(a_next.flip(0), src.flip(0), ctx.chunk).flip(0)  # dLoss/dh_t
    del src, a_next
    gC = (gy_l * h.view(length, bsz, groups, per, d_state)).sum(3).permute(1, 2, 3, 0)  # (b, g, n, l)
    h_prev = torch.cat([torch.zeros_like(h[:1]), h[:-1]])
    del h
    g_log_a = gh * a * h_prev  # dLoss/d(dt A), (l, b, d, n)
    del h_prev, a
    gh5 = gh.view(length, bsz, groups, per, d_state)
    gh_b = (gh5 * B_l).sum(-1).view(length, bsz, dim).permute(1, 2, 0)  # sum_n dLoss/dinp * B, (b, d, l)
    du_l = (dt * u).permute(2, 0, 1).reshape(length, bsz, groups, per, 1)
    gB = (gh5 * du_l).sum(3).permute(1, 2, 3, 0)
    gA = (g_log_a * dt.permute(2, 0, 1).unsqueeze(-1)).sum((0, 1))
    g_dt = u * gh_b + (g_log_a * A).sum(-1).permute(1, 2, 0)
    gu = dt * gh_b
    gD = None
    if D is not None:
        gu = torch.addcmul(gu, gy, D[:, None])
        gD = (gy * u).sum((0, 2))
    g_z = g_dt * torch.sigmoid(z) if ctx.delta_softplus else g_dt
    g_bias = None if delta_bias is None else g_z.sum((0, 2))
    return gu, g_z, gA, gB.contiguous(), gC.contiguous(), gD, g_bias, None, None


# ----------------------------------------------------------------------------------------------
# entry point


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                   C: torch.Tensor, D: torch.Tensor | None = None, *,
                   delta_bias: torch.Tensor | None = None, delta_softplus: bool = False,
                   chunk: int = 64, backend: str = "auto") -> torch.Tensor:
    """Run the selective scan (see the module docstring for the recurrence).

    Args:
        u: (batch, channels, L) input sequence.
        delta: (batch, channels, L) raw step sizes (before ``delta_bias`` / softplus).
        A: (channels, d_state) real diagonal state matrix, negative for a stable recurrence
            (the chunked path relies on ``dt * A <= 0`` to keep every exponent non-positive).
        B, C: (batch, d_state, L) or (batch, groups, d_state, L); channels are split into
            ``groups`` consecutive blocks sharing B and C.
        D: optional (channels,) skip weight.
        delta_bias: optional (channels,) added to ``delta`` before the softplus.
        delta_softplus: apply softplus to the step size.
        chunk: chunk length of the pure-PyTorch path (speed only; results do not depend on it).
        backend: "auto" (mamba-ssm's kernel for CUDA tensors when installed, else "chunked"),
            "chunked", "cuda" or "reference".

    Returns:
        (batch, channels, L): float32, or float64 when ``u`` is float64 (which "auto" leaves to
        the chunked path: the CUDA kernel has no float64).
    """
    if backend not in BACKENDS:
        raise ValueError(f"selective_scan: backend must be one of {BACKENDS}; got {backend!r}")
    if chunk < 2:
        raise ValueError(f"selective_scan: chunk must be >= 2; got {chunk}")
    _check(u, delta, A, B, C, D, delta_bias)
    if backend == "cuda" or (backend == "auto" and u.is_cuda and u.dtype != torch.float64
                             and _mamba_kernel() is not None):
        kernel = _mamba_kernel()
        if kernel is None or not u.is_cuda:
            raise RuntimeError("selective_scan: backend='cuda' needs CUDA tensors and mamba-ssm "
                               "(pip install 'c2disr[gpu]'); use backend='chunked' otherwise")
        # Everything in float32, as the official MambaIRv2 calls it and as the chunked path
        # computes: the kernel wants u, delta, B, C of one dtype and A, D, delta_bias in float32,
        # which bf16 autocast would otherwise break (projections in bf16, A from exp in float32).
        def f32(t):
            return None if t is None else t.float().contiguous()

        return kernel(f32(u), f32(delta), f32(A), f32(B), f32(C), f32(D), z=None,
                      delta_bias=f32(delta_bias), delta_softplus=delta_softplus, return_last_state=False)
    if backend == "reference":
        return selective_scan_reference(u, delta, A, B, C, D, delta_bias=delta_bias,
                                        delta_softplus=delta_softplus)
    dtype = _compute_dtype(u)

    def cast(t):
        return None if t is None else t.to(dtype)

    B = B if B.dim() == 4 else B.unsqueeze(1)
    C = C if C.dim() == 4 else C.unsqueeze(1)
    return _ChunkedScan.apply(cast(u), cast(delta), cast(A), cast(B), cast(C), cast(D), cast(delta_bias),
                              bool(delta_softplus), int(chunk))
