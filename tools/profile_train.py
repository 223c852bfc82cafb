"""What the loader and the model wait for when they share one GPU: a torch.profiler trace
of (1) the model alone on synthetic data, (2) the loader alone, (3) training fed by the
loader, each over --steps steps, summarised from the trace's kernels by CUDA stream (the
model's stream against every other, i.e. DALI's) and from the host side:

  model kernels ms/step   GPU time of the model's kernels per step (slower beside the
                          loader = the two compete for SMs or memory)
  loader kernels ms/step  GPU time of the loader's kernels (nvJPEG's CUDA parts, copies,
                          crop/normalize); the hardware JPEG engines run outside the SMs
  model stream idle       the share of the wall time with no model kernel running
  overlap                 the share of the model's kernel time with a loader kernel running
  host in run()           the share of the wall time the training thread spent in DALI's
                          Pipeline.run(), waiting for the next batch (the loader's handover,
                          its default beside a cache, is off here: the profiler records only
                          the thread that starts it)
  idle: host late         of the model stream's idle time, the part before a kernel whose
                          launch call had not yet returned (the host issues too slowly), and
                          the part before kernels already launched (waiting on the GPU: for a
                          batch from DALI's stream, or for SMs)
  loader's GPU work       its costliest kernels and copies by name: how many a step, their
                          mean time and ms a step (per-image steps show as ~batch-size a step;
                          beside the model each waits for SMs, so its mean grows)
  CUDA calls              the costliest CUDA runtime/driver calls per step, the model's
                          threads' (those running aten ops: the training thread and autograd's
                          backward thread) apart from all others' (DALI's): launches that take
                          longer beside the loader, or synchronizing calls in DALI's threads

  CUDA_DEVICE_MAX_CONNECTIONS=32 python tools/profile_train.py --out OUT [--arch torchvision] [--cache]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from alexpipe.loader import PIPELINES_GPU, THREADS_GPU, LoaderOptions, train_loader
from alexpipe.runtime import Runtime, priority_stream
from alexpipe.model import alexnet
from alexpipe.train import train_step
from bench_loader import endless


def union(intervals) -> float:
    total, end = 0.0, -1.0
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def overlap(xs, ys) -> float:
    """Length of the intersection of two unions of intervals."""
    return union(xs) + union(ys) - union(xs + ys)


def gpu_activity(events) -> list[dict]:
    """A trace's kernels, copies and memsets (each with its stream, start and duration)."""
    return [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]


def summarize(trace: Path, label: str, steps: int, model_stream: int | None) -> None:
    events = json.loads(trace.read_text())["traceEvents"]
    kernels = gpu_activity(events)
    if not kernels:
        print(f"{label}: no GPU activity recorded")
        return
    t0 = min(e["ts"] for e in kernels)
    wall = max(e["ts"] + e["dur"] for e in kernels) - t0
    mine = [(e["ts"], e["ts"] + e["dur"]) for e in kernels if e["args"].get("stream") == model_stream]
    other = [(e["ts"], e["ts"] + e["dur"]) for e in kernels if e["args"].get("stream") != model_stream]
    runs = [e["dur"] for e in events if e.get("name") == "loader.run" and e.get("ph") == "X"]
    print(f"{label:<28} wall {wall / 1e3:8.1f} ms ({steps} steps)  model kernels {union(mine) / 1e3 / steps:6.2f} "
          f"ms/step  loader kernels {union(other) / 1e3 / steps:6.2f} ms/step  model stream idle "
          f"{1 - union(mine) / wall:5.1%}  overlap {overlap(mine, other) / max(union(mine), 1):5.1%}  host in run() "
          f"{sum(runs) / wall:5.1%}  ({len(other)} loader kernels/copies, {len(mine)} model)", flush=True)
    late, waiting = idle_causes(events, model_stream)
    print(f"    model stream idle: host late {late / 1e3 / steps:.2f} ms/step, launched but waiting "
          f"{waiting / 1e3 / steps:.2f} ms/step", flush=True)
    print("    loader's GPU work a step: " + loader_work(kernels, steps, model_stream), flush=True)
    print("    CUDA calls ms/step: " + api_calls(events, steps), flush=True)


def short_name(name: str) -> str:
    """A kernel's name without 'void ', namespaces' templates or arguments: 'nvjpeg::rgba2rgb';
    a copy's whole name ('Memcpy HtoD (Pinned -> Device)')."""
    if name.startswith("Memcpy"):
        return name
    name = name.removeprefix("void ")
    return name[:min((i for i in (name.find("<"), name.find("(")) if i > 0), default=len(name))].strip()


def loader_work(kernels, steps: int, model_stream, top: int = 4) -> str:
    """The loader's (every stream but the model's; with None, every stream's) costliest kernels
    and copies, as 'name count x mean us = ms' per step."""
    total = {}
    for e in kernels:
        if e["args"].get("stream") != model_stream:
            name = short_name(e["name"])
            n, t = total.get(name, (0, 0.0))
            total[name] = (n + 1, t + e["dur"])
    best = sorted(total.items(), key=lambda kv: -kv[1][1])[:top]
    return ", ".join(f"{name} {n / steps:.0f}x {t / n:.1f} us = {t / 1e3 / steps:.2f} ms" for name, (n, t) in best)


def idle_causes(events, model_stream) -> tuple[float, float]:
    """The model stream's gaps (us) split at the end of the next kernel's launch call: before it
    the host was late, after it the launched kernel waited on the GPU."""
    launches = {e["args"]["correlation"]: e["ts"] + e["dur"] for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    mine = sorted((e for e in gpu_activity(events) if e["args"].get("stream") == model_stream), key=lambda e: e["ts"])
    late = waiting = 0.0
    for a, b in zip(mine, mine[1:]):
        end, gap = a["ts"] + a["dur"], b["ts"] - a["ts"] - a["dur"]
        if gap > 0:
            host = min(gap, max(0.0, launches.get(b["args"].get("correlation"), end) - end))
            late, waiting = late + host, waiting + gap - host
    return late, waiting


def api_calls(events, steps: int, top: int = 6) -> str:
    """The costliest CUDA runtime/driver calls, as 'name count x ms' per step, by thread kind."""
    calls = [e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver") and "dur" in e]
    model = {e["tid"] for e in events if e.get("cat") == "cpu_op"}  # the training and backward threads
    parts = []
    for label, keep in (("model's threads", lambda e: e["tid"] in model),
                        ("DALI's threads", lambda e: e["tid"] not in model)):
        total = {}
        for e in filter(keep, calls):
            n, t = total.get(e["name"], (0, 0.0))
            total[e["name"]] = (n + 1, t + e["dur"])
        best = sorted(total.items(), key=lambda kv: -kv[1][1])[:top]
        parts.append(f"{label}: " + ", ".join(f"{name} {n / steps:.0f}x {t / 1e3 / steps:.2f}"
                                              for name, (n, t) in best))
    return "; ".join(parts)


def traced(fn, steps: int, path: Path) -> None:
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    prof.export_chrome_trace(str(path))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="prepared shards with pca.json")
    p.add_argument("--arch", default="torchvision")
    p.add_argument("--loader", default=f"{PIPELINES_GPU}x{THREADS_GPU}@1.0", help="pipelines x threads @ hw load")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--save", type=Path, default=None, help="keep the gzipped traces in this folder")
    p.add_argument("--cache", action="store_true", help="every image in the decoder cache first (no decoding)")
    p.add_argument("--default-stream", action="store_true",
                   help="the model on torch's default stream (alexpipe-train before 0.2.3), not a highest-priority one")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("profile_train: needs a CUDA GPU")
    shape, _, load = args.loader.partition("@")
    pipes, threads = (int(v) for v in shape.split("x"))
    b = args.batch_size
    torch.manual_seed(0)
    rt = Runtime.start("cuda", "bf16", distributed=False)
    if not args.default_stream:  # as alexpipe-train: the model's work on a highest-priority stream
        torch.cuda.set_stream(priority_stream(rt.device))
    model = alexnet(args.arch).cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4, fused=True)
    compiled = torch.compile(model)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    x = torch.randn(b, 3, 224, 224, device="cuda", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (b,), device="cuda")
    options = LoaderOptions(batch_size=b, verify=False, pipelines=pipes, threads=threads,
                            hw_decoder_load=float(load or 1.0), cache="gpu" if args.cache else "off",
                            handover=False)
    loader = train_loader(args.out, options, runtime=rt)
    if args.cache:
        for _ in loader:  # epoch 1 fills the cache
            pass
    for pipe in loader.pipes:  # mark the host's waits for DALI in the trace
        pipe.run = marked(pipe.run)
    stream = endless(loader)
    for _ in range(30):
        train_step(compiled, *next(stream), opt, 0.01, scaler, torch.bfloat16)
    print(f"{torch.cuda.get_device_name()}, {len(os.sched_getaffinity(0))} cores; {args.arch} AlexNet, batch {b}, "
          f"loader {args.loader}{', every image cached' if args.cache else ''}, model on "
          f"{'the default' if args.default_stream else 'a highest-priority'} "
          f"stream; CUDA_DEVICE_MAX_CONNECTIONS="
          f"{os.environ.get('CUDA_DEVICE_MAX_CONNECTIONS', 'unset (8)')}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        cases = {"model alone (synthetic)": lambda: train_step(compiled, x, y, opt, 0.01, scaler, torch.bfloat16),
                 "loader alone": lambda: next(stream),
                 "model fed by the loader": lambda: train_step(compiled, *next(stream), opt, 0.01, scaler,
                                                               torch.bfloat16)}
        model_stream = None
        for i, (label, fn) in enumerate(cases.items()):
            path = Path(tmp) / f"trace{i}.json"
            traced(fn, args.steps, path)
            model_stream = model_stream or busiest_stream(path)  # from the model-alone trace
            summarize(path, label, args.steps, model_stream)
            if args.save:
                args.save.mkdir(parents=True, exist_ok=True)
                with open(path, "rb") as f, gzip.open(args.save / f"{path.stem}.json.gz", "wb") as g:
                    shutil.copyfileobj(f, g)
    return 0


def marked(run):
    def wrapped():
        with record_function("loader.run"):
            return run()
    return wrapped


def busiest_stream(trace: Path) -> int | None:
    """The stream with the most kernels (in the model-alone trace: the model's)."""
    counts = {}
    for e in json.loads(trace.read_text())["traceEvents"]:
        if e.get("cat") == "kernel":
            counts[e["args"].get("stream")] = counts.get(e["args"].get("stream"), 0) + 1
    return max(counts, key=counts.get) if counts else None


if __name__ == "__main__":
    raise SystemExit(main())
