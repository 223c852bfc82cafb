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
  yield       every thread waiting for the GPU (the loader's ~one event synchronize an image
              included) yields its core while it spins, rather than spinning (CUDA's choice with
              fewer contexts than cores)
  blocking    every such thread sleeps until the GPU wakes it
  thread      batches taken from the loader (DALI's run(), the cast, the labels) on a thread of
              their own, two ahead, so that the training thread only issues the model's work
              (the loader's handover, here around a loader without it)
  greenN      the model's step on a highest-priority stream of a CUDA green context of N SMs,
              so that the others are always free for the loader's small kernels

  CUDA_DEVICE_MAX_CONNECTIONS=32 python tools/bench_host.py --out OUT [--arch torchvision] [--decode]
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import os
import re
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from alexpipe.loader import PIPELINES_GPU, THREADS_GPU, LoaderOptions, handed_over, train_loader
from alexpipe.runtime import Runtime, priority_stream
from bench_loader import endless
from profile_model import training_step


PARTS = ("default", "pinned", "graphs", "priority", "yield", "blocking", "thread")


def threaded(batches, n: int):
    """The next `n` of `batches`, made on the loader's handover thread (loader.handed_over)."""
    items = ((batch, None) for batch in itertools.islice(batches, n))
    return (batch for batch, _ in handed_over(items, torch.device("cuda"), depth=2))


def driver(name: str, *args) -> None:
    """Call the CUDA driver's `name`; a failure raises with its error code."""
    if err := getattr(ctypes.CDLL("libcuda.so.1"), name)(*args):
        raise RuntimeError(f"{name} failed with CUDA driver error {err}")


def green_stream(device: torch.device, sms: int) -> torch.cuda.ExternalStream:
    """A new highest-priority CUDA stream whose kernels run on `sms` of the GPU's SMs only (a
    CUDA green context of them), so that the other SMs are always free for the loader's small
    kernels. The stream keeps its context alive; `.sms` says how many SMs it got."""
    torch.cuda.synchronize(device)  # the primary context exists and is current
    dev, n = ctypes.c_int(), ctypes.c_uint(1)
    desc, green, handle = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
    whole, part, rest = (ctypes.create_string_buffer(1024) for _ in range(3))  # CUdevResource, ~150 bytes
    driver("cuDeviceGet", ctypes.byref(dev), device.index or 0)
    driver("cuDeviceGetDevResource", dev, whole, 1)  # CU_DEV_RESOURCE_TYPE_SM
    driver("cuDevSmResourceSplitByCount", part, ctypes.byref(n), whole, rest, 0, sms)
    driver("cuDevResourceGenerateDesc", ctypes.byref(desc), part, 1)
    driver("cuGreenCtxCreate", ctypes.byref(green), desc, dev, 1)  # CU_GREEN_CTX_DEFAULT_STREAM
    priority = torch.cuda.Stream.priority_range()[1]
    driver("cuGreenCtxStreamCreate", ctypes.byref(handle), green, 1, ctypes.c_int(priority))  # non-blocking
    stream = torch.cuda.ExternalStream(handle.value, device=device)
    stream.green, stream.sms = green, int.from_bytes(part.raw[96:100], "little")  # CUdevResource.sm.smCount
    return stream


SYNC_MODES = {"auto": 0, "spin": 1, "yield": 2, "blocking": 4}  # the driver's CU_CTX_SCHED_* flags


def cuda_sync(mode: str) -> str:
    """Set how every host thread of this process waits for the GPU (an event's or a stream's
    synchronize) on the current device's context, the loader's threads included: "spin" (what
    CUDA's "auto" picks with fewer contexts than cores), "yield" the core while spinning, or
    "blocking" (sleep until woken). Returns the mode it replaced."""
    torch.cuda.synchronize()  # the context is made current on this thread
    flags = ctypes.c_uint()
    driver("cuCtxGetFlags", ctypes.byref(flags))
    driver("cuCtxSetFlags", ctypes.c_uint(flags.value & ~7 | SYNC_MODES[mode]))
    return {v: k for k, v in SYNC_MODES.items()}[flags.value & 7]


WARMUP = 10


def rate(step, batches, steps: int, warmup: int = WARMUP) -> float:
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
                   help="comma-separated; each case a '+'-joined set of " + ", ".join(PARTS))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_host: needs a CUDA GPU")
    b = args.batch_size
    pipes, threads = (int(v) for v in args.loader.split("x"))
    options = LoaderOptions(batch_size=b, verify=False, pipelines=pipes, threads=threads,
                            cache="off" if args.decode else "gpu", handover=False)  # the thread is a case
    loader = train_loader(args.out, options, runtime=Runtime.start("cuda", "bf16", distributed=False))
    if not args.decode:
        for _ in loader:  # epoch 1 fills the cache
            pass
    stream = endless(loader)
    cases = {case: set(case.split("+")) for case in args.cases.split(",")}
    if unknown := {p for p in set().union(*cases.values()) - set(PARTS) if not re.fullmatch(r"green\d+", p)}:
        sys.exit(f"bench_host: unknown case part(s) {', '.join(sorted(unknown))} in --cases")
    high = priority_stream(torch.device("cuda"))  # as alexpipe-train's Runtime.model_stream
    x = torch.randn(b, 3, 224, 224, device="cuda", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (b,), device="cuda")
    steps = {graphs: training_step(args.arch, mode="reduce-overhead" if graphs else "default")
             for graphs in sorted({False, any("graphs" in parts for parts in cases.values())})}
    ceilings = {g: statistics.median(rate(s, itertools.repeat((x, y)), args.steps, warmup=30) for _ in range(3))
                for g, s in steps.items()}
    greens = {p: green_stream(torch.device("cuda"), int(p[5:])) for p in sorted(set().union(*cases.values()))
              if p.startswith("green")}
    for p, g in greens.items():
        with torch.cuda.stream(g):
            c = rate(steps[False], itertools.repeat((x, y)), args.steps, warmup=30)
        print(f"{p}: a green context of {g.sms} SMs; the model alone there {c:.0f} images/s", flush=True)
    timings = {case: [] for case in cases}
    for _ in range(args.repeats):
        for case, parts in cases.items():
            pin("pinned" in parts)
            cuda_sync(next((m for m in ("yield", "blocking") if m in parts), "auto"))
            green = next((greens[p] for p in parts if p in greens), None)
            with torch.cuda.stream(green or (high if "priority" in parts else None)):
                src = threaded(stream, args.steps + WARMUP) if "thread" in parts else stream
                timings[case].append(rate(steps["graphs" in parts], src, args.steps))
    pin(False)
    cuda_sync("auto")
    what = "every image decoded" if args.decode else "every image cached"
    print(f"\n{torch.cuda.get_device_name()}, {os.cpu_count()} cores; {args.arch} AlexNet, batch {b}, loader "
          f"{pipes} x {threads} with {what}; median of {args.repeats} x {args.steps} steps")
    print("  ceiling (synthetic): " + ", ".join(f"{'CUDA graphs' if g else 'compiled'} {c:.0f}"
                                             for g, c in ceilings.items()) + " images/s")
    for case, t in timings.items():
        m = statistics.median(t)
        print(f"  {case:<16} {m:8.0f} images/s = {m / ceilings[False]:.2f} of the compiled ceiling "
              f"(timings in order {', '.join(f'{v:.0f}' for v in t)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
