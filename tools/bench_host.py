"""Is the training thread's host time what keeps the model from its ceiling beside the loader?

docs/benchmarks.md's profile found the model's stream idle two thirds of the time beside the
loader while its kernels ran as fast as alone: the host issues them too slowly. This times,
in interleaved rounds, the model fed by the loader with every image already in the decoder
cache (so no JPEG is decoded; with --decode, no cache: every image decoded) in several ways
(--cases, each a '+'-joined set of these), against its synthetic-data ceiling:
  default     torch.compile on torch's default stream (alexpipe-train before 0.2.3)
  pinned      the training thread alone on core 0, every other thread of the process (DALI's)
              on the other cores
  graphs      torch.compile(mode="reduce-overhead"): one CUDA graph replay a step
  priority    the model's step (and the batch's cast) on a highest-priority CUDA stream, so
              that the GPU runs its kernels before the loader's where both wait (alexpipe-train)

  CUDA_DEVICE_MAX_CONNECTIONS=32 python tools/bench_host.py --out OUT [--arch torchvision] [--decode]
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from alexpipe.loader import PIPELINES_GPU, THREADS_GPU, LoaderOptions, train_loader
from alexpipe.runtime import Runtime, priority_stream
from bench_loader import endless
from profile_model import training_step


def rate(step, batches, steps: int, warmup: int = 10) -> float:
    torch.cuda.synchronize()  # what other streams queued (the model, its inputs) comes first
    for _ in range(warmup):
        step(*next(batches))
    torch.cuda.synchronize()
    t0, n = time.perf_counter(), 0
    for _ in range(steps):
        x, y = next(batches)
        step(x, y)
        n += len(y)
    torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def pin(on: bool) -> None:
    """The calling thread alone on core 0 and every other thread of the process elsewhere, or
    every thread back on all cores."""
    cores = sorted(os.sched_getaffinity(0) | set(range(os.cpu_count() or 1)))
    me = threading.get_native_id()
    for tid in map(int, os.listdir("/proc/self/task")):
        try:
            os.sched_setaffinity(tid, ({cores[0]} if tid == me else set(cores[1:])) if on else set(cores))
        except OSError:
            pass  # a thread that ended meanwhile


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="prepared shards with pca.json (fits the cache)")
    p.add_argument("--arch", default="torchvision")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--decode", action="store_true", help="no decoder cache: every batch decoded")
    p.add_argument("--loader", default=f"{PIPELINES_GPU}x{THREADS_GPU}", help="pipelines x threads per pipeline")
    p.add_argument("--cases", default="default,pinned,graphs,pinned+graphs,priority,graphs+priority",
                   help="comma-separated; each case a '+'-joined set of default, pinned, graphs, priority")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_host: needs a CUDA GPU")
    b = args.batch_size
    pipes, threads = (int(v) for v in args.loader.split("x"))
    options = LoaderOptions(batch_size=b, verify=False, pipelines=pipes, threads=threads,
                            cache="off" if args.decode else "gpu")
    loader = train_loader(args.out, options, runtime=Runtime.start("cuda", "bf16", distributed=False))
    if not args.decode:
        for _ in loader:  # epoch 1 fills the cache
            pass
    stream = endless(loader)
    cases = {case: set(case.split("+")) for case in args.cases.split(",")}
    if unknown := set().union(*cases.values()) - {"default", "pinned", "graphs", "priority"}:
        sys.exit(f"bench_host: unknown case part(s) {', '.join(sorted(unknown))} in --cases")
    high = priority_stream(torch.device("cuda"))  # as alexpipe-train's Runtime.model_stream
    x = torch.randn(b, 3, 224, 224, device="cuda", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (b,), device="cuda")
    steps = {graphs: training_step(args.arch, mode="reduce-overhead" if graphs else "default")
             for graphs in sorted({False, any("graphs" in parts for parts in cases.values())})}
    ceilings = {g: statistics.median(rate(s, itertools.repeat((x, y)), args.steps, warmup=30) for _ in range(3))
                for g, s in steps.items()}
    timings = {case: [] for case in cases}
    for _ in range(args.repeats):
        for case, parts in cases.items():
            pin("pinned" in parts)
            with torch.cuda.stream(high if "priority" in parts else None):
                timings[case].append(rate(steps["graphs" in parts], stream, args.steps))
    pin(False)
    what = "every image decoded" if args.decode else "every image cached"
    print(f"\n{torch.cuda.get_device_name()}, {os.cpu_count()} cores; {args.arch} AlexNet, batch {b}, loader "
          f"{pipes} x {threads} with {what}; median of {args.repeats} x {args.steps} steps")
    print("  ceiling (synthetic): " + ", ".join(f"{'CUDA graphs' if g else 'compiled'} {c:.0f}"
                                             for g, c in ceilings.items()) + " images/s")
    for case, t in timings.items():
        m = statistics.median(t)
        print(f"  {case:<16} {m:8.0f} images/s = {m / ceilings[False]:.2f} of the compiled ceiling "
              f"(timings {min(t):.0f}-{max(t):.0f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
