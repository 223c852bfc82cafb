"""The paper model's LRN on the GPU as two Triton kernels, one pass forward and one backward,
as torch custom ops that torch.compile calls as they are.

The model's LRNs see channels_last maps, where each pixel's C channels lie side by side, so
element e of the flat tensor is channel e % C and its window neighbours are e - 2 .. e + 2:
one load each, all but the first from cache. Forward reads x once and writes y; backward
reads x and dy once and writes dx, recomputing the window sums instead of keeping them.
Sums and powers in float32. alexpipe.model uses this where x is on a CUDA device and Triton
imports; elsewhere the GEMM formula (model.lrn_gemm), which this is tested against.

Backward, with S_j = k + alpha * sum_{m in window(j)} x_m^2 and y_j = x_j S_j^-beta:
  dx_i = dy_i S_i^-beta - 2 alpha beta x_i sum_{j: i in window(j)} dy_j x_j S_j^(-beta-1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

WARPS = 2
BLOCK = 256  # elements a program: the fastest of 64-2048 x 2-16 warps on an H200, both directions


@triton.jit
def _group_bounds(e, C: tl.constexpr, GROUP: tl.constexpr):
    """The offsets dlo <= 0 < dhi from element e that stay in its channel's group."""
    c = e % C
    start = (c // GROUP) * GROUP
    return start - c, start + GROUP - c


@triton.jit
def _window_sum(x_ptr, e, ok, dlo, dhi, AT: tl.constexpr, LO: tl.constexpr, HI: tl.constexpr):
    """sum of x^2 over the window of the channel AT away from element e (offsets AT+LO..AT+HI,
    within the group); loads depend on the offset alone, so the compiler shares them between windows."""
    s = tl.zeros(e.shape, tl.float32)
    for d in tl.static_range(AT + LO, AT + HI + 1):
        v = tl.load(x_ptr + e + d, mask=ok & (d >= dlo) & (d < dhi), other=0.0).to(tl.float32)
        s += v * v
    return s


@triton.jit
def _forward(x_ptr, y_ptr, n, alpha, beta, k, C: tl.constexpr, GROUP: tl.constexpr, LO: tl.constexpr,
             HI: tl.constexpr, BLOCK: tl.constexpr):
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = e < n
    dlo, dhi = _group_bounds(e, C, GROUP)
    x = tl.load(x_ptr + e, mask=ok, other=0.0).to(tl.float32)
    scale = k + alpha * _window_sum(x_ptr, e, ok, dlo, dhi, 0, LO, HI)
    y = x * tl.exp2(-beta * tl.log2(scale))
    tl.store(y_ptr + e, y.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _backward(x_ptr, dy_ptr, dx_ptr, n, alpha, beta, k, C: tl.constexpr, GROUP: tl.constexpr,
              LO: tl.constexpr, HI: tl.constexpr, BLOCK: tl.constexpr):
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = e < n
    dlo, dhi = _group_bounds(e, C, GROUP)
    x = tl.load(x_ptr + e, mask=ok, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + e, mask=ok, other=0.0).to(tl.float32)
    through = tl.zeros(e.shape, tl.float32)  # sum over the outputs j whose window holds this input
    own = tl.zeros(e.shape, tl.float32)  # S_i^-beta, set at d = 0
    for d in tl.static_range(-HI, -LO + 1):  # j = i + d, in i's group (so is its window)
        okj = ok & (d >= dlo) & (d < dhi)
        log_s = tl.log2(k + alpha * _window_sum(x_ptr, e, ok, dlo, dhi, d, LO, HI))
        xj = tl.load(x_ptr + e + d, mask=okj, other=0.0).to(tl.float32)
        dyj = tl.load(dy_ptr + e + d, mask=okj, other=0.0).to(tl.float32)
        through += dyj * xj * tl.exp2((-beta - 1.0) * log_s)
        if d == 0:
            own = tl.exp2(-beta * log_s)
    dx = dy * own - 2.0 * alpha * beta * x * through
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


def _like(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.channels_last)  # the same strides as the fake ops'


@torch.library.custom_op("alexpipe::lrn", mutates_args=())
def lrn(x: torch.Tensor, size: int, alpha: float, beta: float, k: float, groups: int) -> torch.Tensor:
    """The LRN of a 4-D tensor (fewer than 2**31 elements), returned in channels_last memory.
    First derivatives only: lrn_backward has no gradient of its own."""
    x = _channels_last(x)
    y = _like(x)
    _launch(_forward, (x, y), size, alpha, beta, k, groups)
    return y


@torch.library.custom_op("alexpipe::lrn_backward", mutates_args=())
def lrn_backward(x: torch.Tensor, dy: torch.Tensor, size: int, alpha: float, beta: float, k: float,
                 groups: int) -> torch.Tensor:
    x, dy = _channels_last(x), _channels_last(dy)
    dx = _like(x)
    _launch(_backward, (x, dy, dx), size, alpha, beta, k, groups)
    return dx


@lrn.register_fake
def _(x, size, alpha, beta, k, groups):
    return _like(x)


@lrn_backward.register_fake
def _(x, dy, size, alpha, beta, k, groups):
    return _like(x)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.args = inputs[1:]


def _backward_op(ctx, dy):
    (x,) = ctx.saved_tensors
    return (lrn_backward(x, dy, *ctx.args),) + (None,) * 5


lrn.register_autograd(_backward_op, setup_context=_setup)

