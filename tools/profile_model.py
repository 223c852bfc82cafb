"""Where an AlexNet training step spends its GPU time, and what the optimizer set-up costs.

For each arch: every layer timed alone, forward + backward, on inputs of its real shape
(batch --batch-size, bf16 autocast, channels_last; no input gradient for the first layer),
in eager mode and (LRN, pooling) compiled on its own, with its FLOPs and achieved TFLOP/s.
Then whole-model training steps on synthetic data (compiled): SGD foreach (torch's default)
and fused, each with cuDNN's heuristics and with cudnn.benchmark, and with --graphs fused +
CUDA graphs (torch.compile mode "reduce-overhead"). Needs a CUDA GPU; no DALI.

  python tools/profile_model.py [--archs paper,torchvision] [--batch-size 256]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from alexpipe.model import LRN, alexnet


def cuda_ms(fn, iters: int = 20, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def flops(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Forward + backward multiply-adds x 2 (backward ~ twice the forward) of convs and linears."""
    if isinstance(layer, nn.Conv2d):
        k = layer.kernel_size[0] * layer.kernel_size[1] * layer.in_channels // layer.groups
        return 3 * 2 * y.numel() * k
    if isinstance(layer, nn.Linear):
        return 3 * 2 * y.numel() * layer.in_features
    return 0.0


def layer_step(layer: nn.Module, x: torch.Tensor, first: bool = False):
    x = x.detach().requires_grad_(not first)  # the images need no gradient

    def step():
        with torch.autocast("cuda", torch.bfloat16):
            y = layer(x)
        y.backward(torch.ones_like(y))
    return step


def layer_table(arch: str, b: int) -> None:
    model = alexnet(arch).cuda().to(memory_format=torch.channels_last)
    layers = [(f"features.{i}", m) for i, m in enumerate(model.features)]
    layers += [("avgpool", model.avgpool), ("flatten", nn.Flatten())]
    layers += [(f"classifier.{i}", m) for i, m in enumerate(model.classifier)]
    x = torch.randn(b, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
    rows, total = [], [0.0, 0.0]
    for index, (name, layer) in enumerate(layers):
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
            y = layer(x)
        if isinstance(layer, (nn.ReLU, nn.Dropout)):
            layer = type(layer)()  # not in place: the timed input must stay as it is
        eager = cuda_ms(layer_step(layer, x, index == 0))
        # cuDNN and cuBLAS run the same kernels compiled or not: compile only what inductor writes
        fusible = isinstance(layer, (LRN, nn.MaxPool2d, nn.AdaptiveAvgPool2d))
        compiled = cuda_ms(layer_step(torch.compile(layer), x, index == 0)) if fusible else eager
        f = flops(layer, x, y)
        rows.append((name, layer.__class__.__name__, tuple(y.shape[1:]), f, eager, compiled))
        total[0], total[1] = total[0] + eager, total[1] + compiled
        x = y
    print(f"\n{arch} AlexNet, batch {b}, bf16 autocast, channels_last: each layer alone, forward + backward")
    print(f"{'layer':<44} {'output':>16} {'GFLOP':>7} {'eager ms':>9} {'compiled ms':>11} {'share':>6} {'TFLOP/s':>8}")
    for label, kind, shape, f, eager, compiled in rows:
        share = f"{100 * compiled / total[1]:5.1f}%"
        tf = f"{f / compiled / 1e9:8.1f}" if f else ""
        print(f"{label + ' ' + kind:<44} {str(shape):>16} {f / 1e9:7.1f} {eager:9.3f} {compiled:11.3f} {share:>6} {tf:>8}")
    print(f"{'sum of the layers':<44} {'':>16} {'':>7} {total[0]:9.3f} {total[1]:11.3f} -> "
          f"{b / total[1] * 1e3:.0f} images/s compiled layer by layer")


def training_step(arch: str, fused: bool = True, mode: str = "default"):
    """step(x, y): one compiled training step of `arch` (bf16 autocast, channels_last, SGD)."""
    torch.manual_seed(0)
    model = alexnet(arch).cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4, fused=fused)
    compiled = torch.compile(model, mode=mode)

    def step(x, y):
        if mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast("cuda", torch.bfloat16):
            loss = F.cross_entropy(compiled(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def step_rate(arch: str, b: int, fused: bool, mode: str = "default", benchmark: bool = False) -> float:
    torch.backends.cudnn.benchmark = benchmark
    step = training_step(arch, fused, mode)
    x = torch.randn(b, 3, 224, 224, device="cuda", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (b,), device="cuda")

    def timed(steps=100):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in itertools.repeat(None, steps):
            step(x, y)
        torch.cuda.synchronize()
        return steps * b / (time.perf_counter() - t0)
    for _ in range(30):
        step(x, y)
    return statistics.median(timed() for _ in range(3))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", default="paper,torchvision")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--no-layers", action="store_true", help="only the whole-model steps")
    p.add_argument("--graphs", action="store_true", help="also time CUDA graphs (a compile of its own)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("profile_model: needs a CUDA GPU")
    print(torch.cuda.get_device_name(), torch.__version__)
    archs = args.archs.split(",")
    if not args.no_layers:
        for arch in archs:
            layer_table(arch, args.batch_size)
    print(f"\nwhole training steps on synthetic data, compiled, batch {args.batch_size} (median of 3 x 100 steps):")
    for arch in archs:
        setups = [("SGD foreach", False, "default", False), ("SGD fused (alexpipe-train)", True, "default", False),
                  ("SGD fused, cudnn.benchmark", True, "default", True)]
        if args.graphs:
            setups.append(("SGD fused + CUDA graphs", True, "reduce-overhead", False))
        base = None
        for label, fused, mode, benchmark in setups:
            r = step_rate(arch, args.batch_size, fused, mode, benchmark)
            base = base or r
            print(f"  {arch:<12} {label:<40} {r:8.0f} images/s  {r / base:5.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
