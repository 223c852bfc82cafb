"""The paper's LRN on the GPU: torch's pooling formula (alexpipe 0.2.0), the band-matrix GEMM
(0.2.1) and the fused Triton kernels (alexpipe.model's CUDA path now).

Each compiled, forward + backward, bf16 in and out (as under autocast), channels_last, at
the paper model's two LRN shapes (batch --batch-size); their largest deviation from float64
on the CPU; then the whole paper model's training step on synthetic data (its ceiling, (b) in
bench_train) with each; ratios against the pooling formula. Needs a CUDA GPU; no DALI.

  python tools/bench_lrn.py [--batch-size 256]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from unittest import mock

import torch
from torch import nn

from alexpipe import model as alexmodel
from profile_model import cuda_ms, step_rate


def pooling_lrn(x, size=5, alpha=1e-4, beta=0.75, k=2.0, groups=1):
    """alexpipe's LRN before: torch's local_response_norm per group, in float32."""
    n, c, h, w = x.shape
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    y = nn.functional.local_response_norm(wide.reshape(n * groups, c // groups, h, w), size, alpha * size, beta, k)
    return y.reshape(n, c, h, w).to(x.dtype)


def layer_ms(fn, shape, groups: int) -> float:
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16).mul_(40)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    compiled = torch.compile(lambda t: fn(t, groups=groups))

    def step():
        compiled(x).backward(torch.ones_like(x))
    return statistics.median(cuda_ms(step) for _ in range(3))


def deviation(fn, groups: int) -> float:
    x = torch.randn(8, 96, 27, 27, dtype=torch.float64) * 40
    want = alexmodel.local_response_norm(x, groups=groups)  # float64: either formula is exact there
    got = torch.compile(lambda t: fn(t, groups=groups))(x.float().cuda().contiguous(memory_format=torch.channels_last))
    return float(((got.double().cpu() - want).abs() / want.abs().clamp_min(1e-3)).max())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=256)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_lrn: needs a CUDA GPU")
    b = args.batch_size
    ways = {"pooling": pooling_lrn, "GEMM": alexmodel.lrn_gemm, "fused": alexmodel.local_response_norm}
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; LRN forward + backward, compiled, bf16, "
          f"channels_last, batch {b}")
    for groups in (1, 2):
        for shape in ((b, 96, 55, 55), (b, 256, 27, 27)):
            ms = {name: layer_ms(fn, shape, groups) for name, fn in ways.items()}
            print(f"  groups {groups} {str(shape[1:]):<16} " + "   ".join(
                f"{name} {t:6.3f} ms ({ms['pooling'] / t:4.2f}x)" for name, t in ms.items()))
        print(f"  groups {groups} largest relative deviation from float64: " + ", ".join(
            f"{name} {deviation(fn, groups):.1e}" for name, fn in ways.items()))
    rates = {name: step_rate_with(fn, b) for name, fn in ways.items()}
    print("paper AlexNet training step on synthetic data (fused SGD, compiled): " + ", ".join(
        f"{name} LRN {r:.0f} images/s ({r / rates['pooling']:.2f}x)" for name, r in rates.items()))
    return 0


def step_rate_with(fn, b: int) -> float:
    with mock.patch.object(alexmodel, "local_response_norm", fn):
        return step_rate("paper", b, True)


if __name__ == "__main__":
    raise SystemExit(main())
