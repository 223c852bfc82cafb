"""The paper model's LRN on the GPU as two Triton kernels, one pass forward and one backward,
as torch custom ops that torch.compile calls as they are.

The model's LRNs see channels_last maps, where each pixel's C channels lie side by side, so
element e of the flat tensor is channel e % C and its window neighbours are e - 2 .. e + 2:
one load each, all but the first from cache. With S_i = k + alpha * sum_{m in window(i)} x_m^2:
forward reads x once and writes y_i = x_i S_i^-beta and, in float32, q_i = S_i^(-beta-1), which
the backward keeps; backward reads x, dy and q once and writes
  dx_i = dy_i q_i S_i - 2 alpha beta x_i sum_{j: i in window(j)} dy_j x_j q_j,
with S_i summed again from the x it loads anyway: no powers and no neighbours' windows there,
which made the backward bound by arithmetic when it recomputed them (docs/benchmarks.md).
Sums and powers in float32. alexpipe.model uses this where x is on a CUDA device and Triton
imports; elsewhere the GEMM formula (model.lrn_gemm), which this is tested against.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

WARPS = 2
BLOCK = 256  # elements a program


@triton.jit
def _group_bounds(e, C: tl.constexpr, GROUP: tl.constexpr):
    """The offsets dlo <= 0 < dhi from element e that stay in its channel's group."""
    c = e % C
    start = (c // GROUP) * GROUP
    return start - c, start + GROUP - c


@triton.jit
def _scale(x_ptr, e, ok, dlo, dhi, alpha, k, LO: tl.constexpr, HI: tl.constexpr):
    """S = k + alpha * the sum of x^2 over element e's window (offsets LO..HI, within the group);
    each load's mask depends on its offset alone, so the backward's loads of the same offsets
    are shared with these."""
    s = tl.zeros(e.shape, tl.float32)
    for d in tl.static_range(LO, HI + 1):
        v = tl.load(x_ptr + e + d, mask=ok & (d >= dlo) & (d < dhi), other=0.0).to(tl.float32)
        s += v * v
    return k + alpha * s


@triton.jit
def _forward(x_ptr, y_ptr, q_ptr, n, alpha, beta, k, C: tl.constexpr, GROUP: tl.constexpr, LO: tl.constexpr,
             HI: tl.constexpr, BLOCK: tl.constexpr):
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = e < n
    dlo, dhi = _group_bounds(e, C, GROUP)
    x = tl.load(x_ptr + e, mask=ok, other=0.0).to(tl.float32)
    log_s = tl.log2(_scale(x_ptr, e, ok, dlo, dhi, alpha, k, LO, HI))
    tl.store(y_ptr + e, (x * tl.exp2(-beta * log_s)).to(y_ptr.dtype.element_ty), mask=ok)
    tl.store(q_ptr + e, tl.exp2((-beta - 1.0) * log_s), mask=ok)


@triton.jit
def _backward(x_ptr, q_ptr, dy_ptr, dx_ptr, n, alpha, beta, k, C: tl.constexpr, GROUP: tl.constexpr,
              LO: tl.constexpr, HI: tl.constexpr, BLOCK: tl.constexpr):
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = e < n
    dlo, dhi = _group_bounds(e, C, GROUP)
    x = tl.load(x_ptr + e, mask=ok, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + e, mask=ok, other=0.0).to(tl.float32)
    q = tl.load(q_ptr + e, mask=ok, other=0.0)
    s = _scale(x_ptr, e, ok, dlo, dhi, alpha, k, LO, HI)
    through = tl.zeros(e.shape, tl.float32)  # over the outputs j whose window holds this input
    for d in tl.static_range(-HI, -LO + 1):  # j = i + d, in i's group
        okj = ok & (d >= dlo) & (d < dhi)
        xj = tl.load(x_ptr + e + d, mask=okj, other=0.0).to(tl.float32)
        dyj = tl.load(dy_ptr + e + d, mask=okj, other=0.0).to(tl.float32)
        through += dyj * xj * tl.load(q_ptr + e + d, mask=okj, other=0.0)
    dx = dy * q * s - 2.0 * alpha * beta * x * through
    tl.store(dx_ptr + e, dx.to(dx_ptr.dtype.element_ty), mask=ok)


def _launch(kernel, tensors, size: int, alpha: float, beta: float, k: float, groups: int) -> None:
    n, c = tensors[0].numel(), tensors[0].shape[1]
    if n >= 2**31 or c % groups:
        raise ValueError(f"alexpipe::lrn takes under 2**31 elements and channels in equal groups, not {n} and "
                         f"{c} in {groups}")
    if n:
        kernel[(triton.cdiv(n, BLOCK),)](*tensors, n, alpha, beta, k, C=c, GROUP=c // groups, LO=-(size // 2),
                                         HI=(size - 1) // 2, BLOCK=BLOCK, num_warps=WARPS)


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def _like(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return torch.empty_like(x, dtype=dtype, memory_format=torch.channels_last)  # the fake ops' strides too


@torch.library.custom_op("alexpipe::lrn_forward", mutates_args=())
def lrn_forward(x: torch.Tensor, size: int, alpha: float, beta: float, k: float,
                groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, q): the LRN of a 4-D tensor (fewer than 2**31 elements) and the float32 S^(-beta-1)
    its backward needs, both in channels_last memory."""
    x = _channels_last(x)
    y, q = _like(x), _like(x, torch.float32)
    _launch(_forward, (x, y, q), size, alpha, beta, k, groups)
    return y, q


@torch.library.custom_op("alexpipe::lrn_backward", mutates_args=())
def lrn_backward(x: torch.Tensor, q: torch.Tensor, dy: torch.Tensor, size: int, alpha: float, beta: float,
                 k: float, groups: int) -> torch.Tensor:
    x, q, dy = _channels_last(x), _channels_last(q), _channels_last(dy)  # as the kernel indexes them
    dx = _like(x)
    _launch(_backward, (x, q, dy, dx), size, alpha, beta, k, groups)
    return dx


def lrn(x: torch.Tensor, size: int, alpha: float, beta: float, k: float, groups: int) -> torch.Tensor:
    """The LRN of a 4-D tensor, returned in channels_last memory. First derivatives only:
    lrn_backward has no gradient of its own."""
    return lrn_forward(x, size, alpha, beta, k, groups)[0]


@lrn_forward.register_fake
def _(x, size, alpha, beta, k, groups):
    return _like(x), _like(x, torch.float32)


@lrn_backward.register_fake
def _(x, q, dy, size, alpha, beta, k, groups):
    return _like(x)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # q's gradient stays None, not a tensor of zeros every step
    ctx.args = inputs[1:]


def _backward_op(ctx, dy, _dq):
    x, q = ctx.saved_tensors
    return (lrn_backward(x, q, dy, *ctx.args),) + (None,) * 5


lrn_forward.register_autograd(_backward_op, setup_context=_setup)
