"""The paper model's LRN on the GPU: torch's pooling formula (alexpipe 0.2.0), the band-matrix
GEMM (0.2.1, model.lrn_gemm) and the fused Triton kernels (model.local_response_norm on CUDA
now, alexpipe._kernels).

Each compiled, forward + backward, bf16 in and out (as under autocast), channels_last, at the
paper model's two LRN shapes (batch --batch-size), with its largest deviation from float64 on
the CPU; then the whole paper model's training step on synthetic data (its ceiling, (b) in
bench_train) with each. Ratios against the pooling formula (docs/benchmarks.md also gives
them against the GEMM). Needs a CUDA GPU; no DALI.

  python tools/bench_kernels.py [--batch-size 256]
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
    """alexpipe's LRN in 0.2.0: torch's local_response_norm per group, in float32."""
    n, c, h, w = x.shape
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    y = nn.functional.local_response_norm(wide.reshape(n * groups, c // groups, h, w), size, alpha * size, beta, k)
    return y.reshape(n, c, h, w).to(x.dtype)


LRNS = {"pooling": pooling_lrn, "GEMM": alexmodel.lrn_gemm, "fused": alexmodel.local_response_norm}


def layer_ms(fn, shape) -> float:
    torch._dynamo.reset()  # each its own compile: the lambdas share one code object and its recompile limit
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16).mul_(40)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    compiled = torch.compile(fn)
    g = torch.ones_like(compiled(x))

    def step():
        compiled(x).backward(g)
    return statistics.median(cuda_ms(step) for _ in range(3))


def deviation(fn, groups: int) -> float:
    torch._dynamo.reset()
    x = torch.randn(8, 96, 27, 27, dtype=torch.float64) * 40
    want = alexmodel.lrn_gemm(x, groups=groups)  # float64: exact
    got = torch.compile(lambda t: fn(t, groups=groups))(x.float().cuda().contiguous(memory_format=torch.channels_last))
    return float(((got.double().cpu() - want).abs() / want.abs().clamp_min(1e-3)).max())


def row(label: str, times: dict) -> str:
    first = next(iter(times.values()))
    return f"  {label:<28} " + "   ".join(f"{name} {t:6.3f} ms ({first / t:4.2f}x)" for name, t in times.items())


def step_with(lrn: str, b: int) -> float:
    with mock.patch.object(alexmodel, "local_response_norm", LRNS[lrn]):
        return step_rate("paper", b, True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=256)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_kernels: needs a CUDA GPU")
    b = args.batch_size
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; forward + backward, compiled, bf16, "
          f"channels_last, batch {b}")
    for groups in (1, 2):
        for shape in ((b, 96, 55, 55), (b, 256, 27, 27)):
            print(row(f"LRN groups {groups} {shape[1:]}", {
                name: layer_ms(lambda t, fn=fn: fn(t, groups=groups), shape) for name, fn in LRNS.items()}))
        print(f"  LRN groups {groups} largest relative deviation from float64: " + ", ".join(
            f"{name} {deviation(fn, groups):.1e}" for name, fn in LRNS.items()))
    rates = {lrn: step_with(lrn, b) for lrn in LRNS}
    print("paper AlexNet training step on synthetic data (fused SGD, compiled): " + ", ".join(
        f"{lrn} LRN {r:.0f} images/s ({r / rates['pooling']:.2f}x)" for lrn, r in rates.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
