"""Local response normalization (Krizhevsky et al. 2012, sec. 3.3), two ways with one result:

    b_i = a_i / (k + alpha * sum_{j in W(i)} a_j^2)^beta,   W(i) = the `size` maps centred on i,
                                                            clipped at the ends of i's group

- `lrn_reference`: torch ops (torch's local_response_norm per channel group), on any device
  and in float64 for the tests; what the CPU runs.
- `lrn_cuda`: two Triton kernels, one pass forward and one backward over channels_last
  memory (where a window is 5 neighbouring values of one pixel's row), registered as the
  custom op alexpipe::lrn so torch.compile treats it as one opaque kernel. The backward uses
  dx_i = g_i d_i^-beta - 2 alpha beta x_i sum_{j: i in W(j)} g_j x_j d_j^(-beta-1),
  d = k + alpha * window sum. Sums in float32 whatever the input dtype.

`local_response_norm` picks the kernels for CUDA tensors (when Triton is there) and the
reference otherwise. The kernels also run on the CPU under Triton's interpreter
(TRITON_INTERPRET=1), which is how CI tests them against the reference.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch builds come without Triton
    triton = None


def lrn_reference(x: torch.Tensor, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 2.0,
                  groups: int = 1) -> torch.Tensor:
    """torch's local_response_norm (which divides alpha by size) per channel group, computed in
    at least float32 (bf16 squares lose the sum)."""
    n, c, h, w = x.shape
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    y = torch.nn.functional.local_response_norm(wide.reshape(n * groups, c // groups, h, w), size, alpha * size,
                                                beta, k)
    return y.reshape(n, c, h, w).to(x.dtype)


if triton is not None:
    @triton.jit
    def _window_sum(X, rows, j, group, valid, C, PER, SIZE: tl.constexpr, BLOCK_P: tl.constexpr,
                    BLOCK_C: tl.constexpr):
        """sum of x^2 over the window of channel j (in j's group), for each row."""
        s = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
        for q in tl.static_range(SIZE):
            m = j + (q - SIZE // 2)
            ok = valid & (m >= 0) & (m < C) & (m // PER == group)
            v = tl.load(X + rows * C + m, mask=ok, other=0.0).to(tl.float32)
            s += v * v
        return s

    @triton.jit
    def _lrn_forward(X, Y, P, C, PER, alpha, beta, k, SIZE: tl.constexpr, BLOCK_P: tl.constexpr,
                     BLOCK_C: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)[:, None]
        cols = tl.arange(0, BLOCK_C)[None, :]
        inside = (rows < P) & (cols < C)
        group = cols // PER
        d = k + alpha * _window_sum(X, rows, cols, group, inside, C, PER, SIZE, BLOCK_P, BLOCK_C)
        x = tl.load(X + rows * C + cols, mask=inside, other=0.0).to(tl.float32)
        y = x * tl.exp2(-beta * tl.log2(d))
        tl.store(Y + rows * C + cols, y.to(Y.dtype.element_ty), mask=inside)

    @triton.jit
    def _lrn_backward(X, G, DX, P, C, PER, alpha, beta, k, SIZE: tl.constexpr, BLOCK_P: tl.constexpr,
                      BLOCK_C: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)[:, None]
        cols = tl.arange(0, BLOCK_C)[None, :]
        inside = (rows < P) & (cols < C)
        group = cols // PER
        acc = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
        for o in tl.static_range(SIZE):  # every j whose window holds i: j - i in [-(SIZE-1)//2, SIZE//2]
            j = cols + (o - (SIZE - 1) // 2)
            ok = inside & (j >= 0) & (j < C) & (j // PER == group)
            dj = k + alpha * _window_sum(X, rows, j, group, ok, C, PER, SIZE, BLOCK_P, BLOCK_C)
            gj = tl.load(G + rows * C + j, mask=ok, other=0.0).to(tl.float32)
            xj = tl.load(X + rows * C + j, mask=ok, other=0.0).to(tl.float32)
            acc += gj * xj * tl.exp2((-beta - 1.0) * tl.log2(dj))
        d = k + alpha * _window_sum(X, rows, cols, group, inside, C, PER, SIZE, BLOCK_P, BLOCK_C)
        x = tl.load(X + rows * C + cols, mask=inside, other=0.0).to(tl.float32)
        g = tl.load(G + rows * C + cols, mask=inside, other=0.0).to(tl.float32)
        dx = g * tl.exp2(-beta * tl.log2(d)) - 2.0 * alpha * beta * x * acc
        tl.store(DX + rows * C + cols, dx.to(DX.dtype.element_ty), mask=inside)


def _launch(kernel, tensors, x: torch.Tensor, size: int, alpha: float, beta: float, k: float, groups: int):
    n, c, h, w = x.shape
    rows = n * h * w
    block_c = triton.next_power_of_2(c)
    block_p = max(1, 4096 // block_c)  # ~4k values a program
    kernel[(triton.cdiv(rows, block_p),)](*tensors, rows, c, c // groups, alpha, beta, k, SIZE=size,
                                          BLOCK_P=block_p, BLOCK_C=block_c)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) as channels_last memory: a (N*H*W, C) row-major matrix underneath."""
    return t.contiguous(memory_format=torch.channels_last)


@torch.library.custom_op("alexpipe::lrn", mutates_args=())
def lrn_cuda(x: torch.Tensor, size: int, alpha: float, beta: float, k: float, groups: int) -> torch.Tensor:
    x = _rows(x)
    y = torch.empty_like(x)
    _launch(_lrn_forward, (x, y), x, size, alpha, beta, k, groups)
    return y


@lrn_cuda.register_fake
def _(x, size, alpha, beta, k, groups):
    return torch.empty_like(x, memory_format=torch.channels_last)


@torch.library.custom_op("alexpipe::lrn_backward", mutates_args=())
def lrn_cuda_backward(x: torch.Tensor, g: torch.Tensor, size: int, alpha: float, beta: float, k: float,
                      groups: int) -> torch.Tensor:
    x, g = _rows(x), _rows(g)
    dx = torch.empty_like(x)
    _launch(_lrn_backward, (x, g, dx), x, size, alpha, beta, k, groups)
    return dx


@lrn_cuda_backward.register_fake
def _(x, g, size, alpha, beta, k, groups):
    return torch.empty_like(x, memory_format=torch.channels_last)


def _setup(ctx, inputs, output):
    x, size, alpha, beta, k, groups = inputs
    ctx.save_for_backward(x)
    ctx.params = (size, alpha, beta, k, groups)


def _backward(ctx, g):
    x, = ctx.saved_tensors
    return lrn_cuda_backward(x, g, *ctx.params), None, None, None, None, None


lrn_cuda.register_autograd(_backward, setup_context=_setup)


def use_kernels(x: torch.Tensor) -> bool:
    return triton is not None and x.is_cuda


def local_response_norm(x: torch.Tensor, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 2.0,
                        groups: int = 1) -> torch.Tensor:
    """The paper's LRN (see the module docstring): the Triton kernels on CUDA, else the reference."""
    if use_kernels(x):
        return lrn_cuda(x, size, alpha, beta, k, groups)
    return lrn_reference(x, size, alpha, beta, k, groups)
