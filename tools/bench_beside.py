"""What the decoder and the model do to each other on one GPU.

Parts (--parts, comma-separated), each timed in interleaved rounds, medians:
  loads    the default loader's rate (d) alone and beside GPU work of one kind at a time, run
           as CUDA graphs (no host work) on a highest-priority stream while another thread
           drains the loader: compute-bound bf16 matmuls, HBM-bound 1 GB copies, 1-us kernels;
           and torchvision's training step on synthetic data; with each load's own rate
           beside the loader against alone
  kernels  graphs of one kernel length each (adds of 4 KB to 268 MB) beside the loader: the
           time each kernel gains
  batch    each net at batch 256 / 512 (and torchvision's at 1024): (b) alone, the model on
           synthetic data beside the drained loader, (a) fed by it, (d)
  graphs   torchvision's step compiled, and as one CUDA graph a step (reduce-overhead): the
           same three figures
  clocks   the SM clock, power, share of time a kernel runs and clock-event reasons (nvidia-smi
           every 100 ms) while each net (--archs) trains alone, the loader runs alone, fed, and fed with echo 2
  cpu      that graph beside the GPU loader, a CPU-decoding loader (libjpeg-turbo on
           --cpu-threads cores, batches copied to the GPU; no per-image GPU work), and both:
           do the two decoders add up beside a busy model? (not in the default --parts)

  CUDA_DEVICE_MAX_CONNECTIONS=32 python tools/bench_beside.py --out OUT [--parts loads,kernels,batch,graphs,clocks]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from alexpipe.loader import LoaderOptions, train_loader
from alexpipe.runtime import Runtime, priority_stream
from bench_host import rate as fed  # images/s of step on the loader's batches, after a warm-up
from bench_loader import endless, stream_rate
from bench_prepare import DEFAULT_SRC, sample_shards
from bench_train import loader
from profile_model import training_step

ROUNDS = 3


def graph(fn, n: int) -> torch.cuda.CUDAGraph:
    """fn() n times as one CUDA graph (captured before any loader runs: DALI's threads would
    break a capture)."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n):
            fn()
    torch.cuda.synchronize()
    return g


def run_for(work, seconds: float = 1.5) -> float:
    """Units/s of work() (it returns how many it queued) for `seconds`, two calls in flight."""
    torch.cuda.synchronize()
    t0, n, prev = time.perf_counter(), 0, None
    while time.perf_counter() - t0 < seconds:
        n += work()
        done = torch.cuda.Event()
        done.record()
        if prev is not None:
            prev.synchronize()  # lets the draining thread run
        prev = done
    torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def beside(work, *streams) -> tuple[float, float]:
    """(work's rate, the loaders' images/s together) while a thread drains each of `streams`."""
    stop, counts = threading.Event(), [0] * len(streams)

    def drain(i, batches):
        while not stop.is_set():
            counts[i] += len(next(batches)[0])
    threads = [threading.Thread(target=drain, args=(i, s), daemon=True) for i, s in enumerate(streams)]
    for thread in threads:
        thread.start()
    time.sleep(0.3)
    c0, t0 = sum(counts), time.perf_counter()
    r = run_for(work)
    d = (sum(counts) - c0) / (time.perf_counter() - t0)
    stop.set()
    for thread in threads:
        thread.join()
    return r, d


def synthetic(step, b: int):
    """work() for run_for: one step on a synthetic batch of b."""
    x = torch.randn(b, 3, 224, 224, device="cuda", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (b,), device="cuda")
    return lambda: (step(x, y), b)[1]


def med(values) -> str:
    return f"{statistics.median(values):7.0f}"


def loads_part(out, b: int) -> None:
    a, c = (torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    src, dst = (torch.empty(512 << 20, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    tiny = torch.zeros(1024, device="cuda")
    loads = {"compute (bf16 matmul 4096^3) x40": graph(lambda: torch.mm(a, a, out=c), 40),
             "HBM (1 GB copy) x12": graph(lambda: dst.copy_(src), 12),
             "1-us kernels x2000": graph(lambda: tiny.add_(1.0), 2000)}
    works = {name: (lambda g=g: (g.replay(), 1)[1]) for name, g in loads.items()}
    works["torchvision's training step, synthetic"] = synthetic(training_step("torchvision"), b)
    run_for(works["torchvision's training step, synthetic"], 0.5)  # compiles, so that its timing alone is not
    batches = endless(loader(out, b, (4, 4, 1.0)))
    alone = {name: run_for(work) for name, work in works.items()}
    d, r, dd = [], {n: [] for n in works}, {n: [] for n in works}
    for _ in range(ROUNDS):
        d.append(stream_rate(batches, 60, 8))
        for name, work in works.items():
            rate, loader_rate = beside(work, batches)
            r[name].append(rate / alone[name])
            dd[name].append(loader_rate)
    print(f"\nloads: the default loader alone (d) {med(d)} images/s; beside", flush=True)
    for name in works:
        print(f"  {name:<40} (d) {med(dd[name])}; the load at {statistics.median(r[name]):.2f} of its rate alone",
              flush=True)


def kernels_part(out, b: int) -> None:
    sizes = ((1024, 2000), (1 << 20, 1000), (4 << 20, 400), (16 << 20, 150), (64 << 20, 40))
    graphs = []
    for n_el, count in sizes:
        t = torch.zeros(n_el, device="cuda")
        graphs.append((n_el, count, t, graph(lambda t=t: t.add_(1.0), count)))
    batches = endless(loader(out, b, (4, 4, 1.0)))
    print(f"\nkernels: the loader alone {stream_rate(batches, 60, 8):.0f} images/s; kernels of one length beside it",
          flush=True)
    for n_el, count, _, g in graphs:
        work = lambda g=g, count=count: (g.replay(), count)[1]
        alone = run_for(work)
        rates, ds = zip(*(beside(work, batches) for _ in range(ROUNDS)))
        us, us_beside = 1e6 / alone, 1e6 / statistics.median(rates)
        print(f"  add_ on {n_el * 4 / 1e6:8.3f} MB: {us:7.2f} us a kernel alone, {us_beside:7.2f} beside "
              f"(+{us_beside - us:.2f} us, {us / us_beside:.2f} of its rate); (d) {med(ds)}", flush=True)


def model_figures(name: str, step, out, b: int) -> None:
    gc.collect()  # no earlier loader's threads run while a CUDA graph is captured
    work = synthetic(step, b)
    run_for(work, 0.5)  # compiles
    batches = endless(loader(out, b, (4, 4, 1.0)))
    alone, model, d_beside, a, d = ([] for _ in range(5))
    for _ in range(ROUNDS):
        alone.append(run_for(work))
        m, dd = beside(work, batches)
        model.append(m)
        d_beside.append(dd)
        a.append(fed(step, batches, max(40, 150 * 256 // b)))
        d.append(stream_rate(batches, max(30, 60 * 256 // b), 4))
    b_ = statistics.median(alone)
    print(f"  {name:<28} (b) {b_:7.0f}; on synthetic data beside the loader {med(model)} = "
          f"{statistics.median(model) / b_:.2f} (the loader then {med(d_beside)}); (a) {med(a)} = "
          f"{statistics.median(a) / b_:.2f} ({', '.join(f'{v:.0f}' for v in a)}); (d) {med(d)}", flush=True)
    del batches
    gc.collect()


SMI = "clocks.sm,power.draw,utilization.gpu,clocks_event_reasons.active"


def sampled(fn) -> tuple[float, str]:
    """(fn(), what nvidia-smi saw meanwhile: median SM clock, power, GPU busy, the clock-event reasons)."""
    smi = subprocess.Popen(["nvidia-smi", f"--query-gpu={SMI}", "--format=csv,noheader,nounits", "-lms", "100"],
                           stdout=subprocess.PIPE, text=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(smi.stdout), daemon=True)
    reader.start()
    time.sleep(0.5)
    try:
        result = fn()
    finally:
        smi.terminate()
        reader.join()
    rows = [line.strip().split(", ") for line in lines[5:]]  # (the first half second: before fn)
    mhz, watts, busy = (statistics.median(float(r[i]) for r in rows) for i in range(3))
    reasons = ",".join(sorted({r[3] for r in rows}))
    return result, f"SM {mhz:.0f} MHz, {watts:.0f} W, a kernel running {busy:.0f}% of the time, reasons {reasons}"


def clocks_part(out, b: int, archs: list[str]) -> None:
    print("\nclocks: nvidia-smi every 100 ms (reasons: nvidia-smi's clocks_event_reasons bits, 0x0 none)", flush=True)
    for arch in archs:
        torch._dynamo.reset()
        gc.collect()
        step = training_step(arch)
        work = synthetic(step, b)
        run_for(work, 0.5)  # compiles
        batches = endless(loader(out, b, (4, 4, 1.0)))
        echoed = endless(loader(out, b, (4, 4, 1.0), echo=2))
        for name, fn in (("the model alone", lambda: run_for(work, 3.0)),
                         ("the loader alone", lambda: stream_rate(batches, 400, 10)),
                         ("fed", lambda: fed(step, batches, 500)),
                         ("fed, echo 2", lambda: fed(step, echoed, 600))):
            images, seen = sampled(fn)
            print(f"  {arch:<12} {name:<17} {images:7.0f} images/s; {seen}", flush=True)


def cpu_part(out, b: int, threads: int) -> None:
    gc.collect()
    torch._dynamo.reset()
    work = synthetic(training_step("torchvision", mode="reduce-overhead"), b)
    run_for(work, 0.5)  # compiles and captures before any loader runs
    gpu = endless(loader(out, b, (4, 4, 1.0)))
    cpu = endless(train_loader(out, LoaderOptions(batch_size=b, verify=False, threads=threads),
                               runtime=Runtime.start("cpu", "bf16", distributed=False)))
    # on the GPU in the step's layout first, as training on them would need (and no new capture)
    cpu = ((x.cuda().contiguous(memory_format=torch.channels_last), y.cuda()) for x, y in cpu)
    alone = run_for(work)
    print(f"\ncpu: torchvision's step as one CUDA graph, (b) {alone:.0f}; the CPU loader ({threads} threads) alone "
          f"{stream_rate(cpu, 10, 2):.0f} images/s", flush=True)
    for name, streams in (("the GPU loader", [gpu]), ("the CPU loader", [cpu]), ("both", [gpu, cpu])):
        rates, ds = zip(*(beside(work, *streams) for _ in range(ROUNDS)))
        print(f"  beside {name:<16} the step {med(rates)} = {statistics.median(rates) / alone:.2f}; "
              f"the loaders {med(ds)} images/s together", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="prepared shards with pca.json (default: build them)")
    p.add_argument("--src", type=Path, default=DEFAULT_SRC)
    p.add_argument("--repeat", type=int, default=60)
    p.add_argument("--parts", default="loads,kernels,batch,graphs,clocks")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--archs", default="torchvision,paper", help="the clocks part's nets")
    p.add_argument("--cpu-threads", type=int, default=12, help="the cpu part's CPU-decoding loader")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_beside: needs a CUDA GPU")
    parts = args.parts.split(",")
    with tempfile.TemporaryDirectory() as tmp, torch.cuda.stream(priority_stream(torch.device("cuda"))):
        out = args.out or sample_shards(args.src, Path(tmp), args.repeat)
        print(f"{torch.cuda.get_device_name()}; batch {args.batch_size}; medians of {ROUNDS} rounds", flush=True)
        if "loads" in parts:
            loads_part(out, args.batch_size)
        if "kernels" in parts:
            kernels_part(out, args.batch_size)
        gc.collect()
        if "graphs" in parts:
            print("\ngraphs: torchvision's step", flush=True)
            for mode in ("reduce-overhead", "default"):
                torch._dynamo.reset()
                model_figures(f"compiled, mode {mode}", training_step("torchvision", mode=mode), out, args.batch_size)
        if "clocks" in parts:
            clocks_part(out, args.batch_size, args.archs.split(","))
        if "cpu" in parts:
            cpu_part(out, args.batch_size, args.cpu_threads)
        if "batch" in parts:
            print("\nbatch:", flush=True)
            for arch, b in (("torchvision", 256), ("torchvision", 512), ("torchvision", 1024), ("paper", 256),
                            ("paper", 512)):
                torch._dynamo.reset()  # each batch size compiled afresh, never dynamic
                model_figures(f"{arch} batch {b}", training_step(arch), out, b)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
