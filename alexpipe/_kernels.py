"""The paper model's LRN and overlapping max-pooling on the GPU, each as two Triton kernels
(one pass forward, one backward), as torch custom ops that torch.compile calls as they are.

LRN.

The model's LRNs see channels_last maps, where each pixel's C channels lie side by side, so
element e of the flat tensor is channel e % C and its window neighbours are e - 2 .. e + 2:
one load each, all but the first from cache. Forward reads x once and writes y; backward
reads x and dy once and writes dx, recomputing the window sums instead of keeping them.
Sums and powers in float32. alexpipe.model uses this where x is on a CUDA device and Triton
imports; elsewhere the GEMM formula (model.lrn_gemm), which this is tested against.

Backward, with S_j = k + alpha * sum_{m in window(j)} x_m^2 and y_j = x_j S_j^-beta:
  dx_i = dy_i S_i^-beta - 2 alpha beta x_i sum_{j: i in window(j)} dy_j x_j S_j^(-beta-1).

Max-pooling (kernel K, stride S, no padding; channels_last). Forward keeps each output's
argmax as an int8 offset in its window (the first maximum, NaN winning, as torch); backward
gathers, for each input, the gradients of the outputs whose argmax it is: no atomics, and
exactly torch's result up to the order of adding the (at most ceil(K/S)^2) gradients.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

WARPS = 2
BLOCK = 256  # elements a program: the fastest of 64-2048 x 1-16 warps on an H200, both directions


@triton.jit
def _group_bounds(e, C: tl.constexpr, GROUP: tl.constexpr):
    """(element index, the offsets dlo <= 0 < dhi that stay in its channel's group)."""
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


def _launch(kernel, tensors, size: int, alpha: float, beta: float, k: float, groups: int, block: int = BLOCK,
            warps: int = WARPS):
    n, c = tensors[0].numel(), tensors[0].shape[1]
    if n == 0:
        return None
    return kernel[(triton.cdiv(n, block),)](*tensors, n, alpha, beta, k, C=c, GROUP=c // groups, LO=-(size // 2),
                                            HI=(size - 1) // 2, BLOCK=block, num_warps=warps)


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


@torch.library.custom_op("alexpipe::lrn", mutates_args=())
def lrn(x: torch.Tensor, size: int, alpha: float, beta: float, k: float, groups: int) -> torch.Tensor:
    """The LRN of a 4-D tensor (fewer than 2**31 elements), returned in channels_last memory."""
    x = _channels_last(x)
    y = torch.empty_like(x)
    _launch(_forward, (x, y), size, alpha, beta, k, groups)
    return y


@torch.library.custom_op("alexpipe::lrn_backward", mutates_args=())
def lrn_backward(x: torch.Tensor, dy: torch.Tensor, size: int, alpha: float, beta: float, k: float,
                 groups: int) -> torch.Tensor:
    x, dy = _channels_last(x), _channels_last(dy)
    dx = torch.empty_like(x)
    _launch(_backward, (x, dy, dx), size, alpha, beta, k, groups)
    return dx


@lrn.register_fake
def _(x, size, alpha, beta, k, groups):
    return torch.empty_like(x, memory_format=torch.channels_last)


@lrn_backward.register_fake
def _(x, dy, size, alpha, beta, k, groups):
    return torch.empty_like(x, memory_format=torch.channels_last)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.args = inputs[1:]


def _backward_op(ctx, dy):
    (x,) = ctx.saved_tensors
    return (lrn_backward(x, dy, *ctx.args),) + (None,) * 5


lrn.register_autograd(_backward_op, setup_context=_setup)


@triton.jit
def _pool_forward(x_ptr, y_ptr, arg_ptr, n, H, W, HO, WO, C: tl.constexpr, K: tl.constexpr, S: tl.constexpr,
                  BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = o < n
    c, t = o % C, o // C
    wo, t = t % WO, t // WO
    ho, b = t % HO, t // HO
    corner = ((b * H + ho * S) * W + wo * S) * C + c
    best = tl.full(o.shape, float("-inf"), tl.float32)
    arg = tl.zeros(o.shape, tl.int32)
    for kh in tl.static_range(K):
        for kw in tl.static_range(K):
            v = tl.load(x_ptr + corner + (kh * W + kw) * C, mask=ok, other=float("-inf")).to(tl.float32)
            take = (v > best) | (v != v)
            best = tl.where(take, v, best)
            arg = tl.where(take, kh * K + kw, arg)
    tl.store(y_ptr + o, best.to(y_ptr.dtype.element_ty), mask=ok)
    tl.store(arg_ptr + o, arg.to(tl.int8), mask=ok)


@triton.jit
def _pool_backward(dy_ptr, arg_ptr, dx_ptr, n, H, W, HO, WO, C: tl.constexpr, K: tl.constexpr, S: tl.constexpr,
                   BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    c, t = i % C, i // C
    w, t = t % W, t // W
    h, b = t % H, t // H
    acc = tl.zeros(i.shape, tl.float32)
    for dh in tl.static_range((K + S - 1) // S):  # the outputs whose window holds (h, w)
        for dw in tl.static_range((K + S - 1) // S):
            ho, wo = h // S - dh, w // S - dw
            inside = ok & (ho >= 0) & (ho < HO) & (wo >= 0) & (wo < WO) & (h - ho * S < K) & (w - wo * S < K)
            o = ((b * HO + ho) * WO + wo) * C + c
            arg = tl.load(arg_ptr + o, mask=inside, other=-1).to(tl.int32)
            g = tl.load(dy_ptr + o, mask=inside & (arg == (h - ho * S) * K + (w - wo * S)), other=0.0)
            acc += g.to(tl.float32)
    tl.store(dx_ptr + i, acc.to(dx_ptr.dtype.element_ty), mask=ok)


def _pooled(shape, k: int, s: int) -> tuple:
    return (shape[0], shape[1], (shape[2] - k) // s + 1, (shape[3] - k) // s + 1)


def _pool_launch(kernel, tensors, big, small, k: int, s: int) -> None:
    n = big.numel() if kernel is _pool_backward else small.numel()
    if n == 0:
        return
    kernel[(triton.cdiv(n, BLOCK),)](*tensors, n, big.shape[2], big.shape[3], small.shape[2], small.shape[3],
                                     C=big.shape[1], K=k, S=s, BLOCK=BLOCK, num_warps=WARPS)


@torch.library.custom_op("alexpipe::max_pool", mutates_args=())
def max_pool(x: torch.Tensor, k: int, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(max_pool2d(x, k, s), each output's argmax in its window as int8), channels_last."""
    x = _channels_last(x)
    y = x.new_empty(_pooled(x.shape, k, s)).contiguous(memory_format=torch.channels_last)
    arg = torch.empty_like(y, dtype=torch.int8)
    _pool_launch(_pool_forward, (x, y, arg), x, y, k, s)
    return y, arg


@torch.library.custom_op("alexpipe::max_pool_backward", mutates_args=())
def max_pool_backward(dy: torch.Tensor, arg: torch.Tensor, h: int, w: int, k: int, s: int) -> torch.Tensor:
    dy = _channels_last(dy)
    dx = dy.new_empty((dy.shape[0], dy.shape[1], h, w)).contiguous(memory_format=torch.channels_last)
    _pool_launch(_pool_backward, (dy, arg, dx), dx, dy, k, s)
    return dx


@max_pool.register_fake
def _(x, k, s):
    y = x.new_empty(_pooled(x.shape, k, s)).contiguous(memory_format=torch.channels_last)
    return y, torch.empty_like(y, dtype=torch.int8)


@max_pool_backward.register_fake
def _(dy, arg, h, w, k, s):
    return dy.new_empty((dy.shape[0], dy.shape[1], h, w)).contiguous(memory_format=torch.channels_last)


def _pool_setup(ctx, inputs, output):
    x, ctx.k, ctx.s = inputs
    ctx.hw = x.shape[2:]
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1])


def _pool_backward_op(ctx, dy, _):
    (arg,) = ctx.saved_tensors
    return max_pool_backward(dy, arg, ctx.hw[0], ctx.hw[1], ctx.k, ctx.s), None, None


max_pool.register_autograd(_pool_backward_op, setup_context=_pool_setup)
