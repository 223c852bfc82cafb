"""Benchmark AlexNet training throughput: the alexpipe loader against the model alone.

For each arch (paper, torchvision), with the same compiled model, bf16 autocast,
channels_last, fused SGD, batch --batch-size, in one run:
  (a) training fed by the alexpipe train loader (read, decode, crop, flip, lighting), for
      each --loaders setting (pipelines x threads @ hw_decoder_load), and with --echo K
      (each decoded image used K times) for the first setting;
  (b) training on synthetic GPU-resident tensors: the model-bound ceiling;
  (c) with --baseline: webdataset + PIL + torchvision transforms in a DataLoader, all cores;
  (d) each loader alone, no model running: an upper bound on (a).
Batches are handed over from the loader's own thread, as by default on a GPU; --no-handover
also times (a) with them made on the training thread (LoaderOptions.handover=False). (a) and
(d) are timed in interleaved rounds (drift hits every setting alike), medians of --repeats.
With --cache, whole epochs: without a cache, and with DALI's GPU decoder cache holding all or
half of the set (epoch 1 fills it; epochs 2-3 read it), and all of it once more without the
handover. The model runs on a highest-priority CUDA stream, as in alexpipe-train
(Runtime.model_stream); --default-stream also times (a) and the epochs without and with the
whole cache on torch's default stream (as alexpipe-train before 0.2.3). Prints images/s, ratios to (b), and the projected hours of 90
ImageNet epochs on one GPU.

  CUDA_DEVICE_MAX_CONNECTIONS=32 python tools/bench_train.py [--out OUT] [--cache] [--echo 2] [--no-handover]
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from alexpipe.dataset import Prepared
from alexpipe.loader import (PIPELINES_GPU, PIPELINES_TILES_GPU, THREADS_GPU, LoaderOptions, cache_gb_needed,
                             default_pipelines, train_loader)
from alexpipe.model import alexnet
from alexpipe.runtime import Runtime, priority_stream
from alexpipe.train import train_step
from bench_loader import endless, stream_rate, torchvision_loader
from bench_prepare import DEFAULT_SRC, sample_shards

IMAGENET_TRAIN = 1_281_167


def rate(model, opt, batches, steps: int, warmup: int, stream=None) -> float:
    """Images/s of `steps` steps after `warmup` untimed ones, run (and the batches taken) on `stream`."""
    with torch.cuda.stream(stream):
        timed(model, opt, itertools.islice(batches, warmup))
        return timed(model, opt, itertools.islice(batches, steps))


def epoch_rate(model, opt, loader, stream=None) -> float:
    """Images/s of one whole epoch, the reader's end-of-epoch drain included."""
    with torch.cuda.stream(stream):
        return timed(model, opt, loader)


def timed(model, opt, batches) -> float:
    """Images/s of a training step on each of `batches`, from a synchronized start (what other
    streams queued, the model and its inputs, comes first) to a synchronized end."""
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    torch.cuda.synchronize()
    t0, n = time.perf_counter(), 0
    for x, y in batches:
        torch.compiler.cudagraph_mark_step_begin()  # (a model compiled with CUDA graphs: a new step; else a no-op)
        train_step(model, x, y, opt, 0.01, scaler, torch.bfloat16)
        n += len(y)
    torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def parse_setting(text: str) -> tuple[int, int, float]:
    """'4x4@1.0' -> (pipelines, threads, hw_decoder_load)."""
    shape, _, load = text.partition("@")
    pipes, threads = shape.split("x")
    return int(pipes), int(threads), float(load or 1.0)


def loader(out, b, setting, **kw):
    pipes, threads, load = setting
    options = LoaderOptions(batch_size=b, verify=False, pipelines=pipes, threads=threads, hw_decoder_load=load, **kw)
    return train_loader(out, options, runtime=Runtime.start("cuda", "bf16", distributed=False))


def model_and_ceiling(arch, b, steps, repeats, stream, mode="default"):
    """The compiled model (torch.compile `mode`; reduce-overhead: CUDA graphs, captured here on
    synthetic data, before any loader's threads run), its optimizer and (b)."""
    torch.manual_seed(0)
    model = alexnet(arch).cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4, fused=True)
    compiled = torch.compile(model, mode=mode)
    x = torch.randn(b, 3, 224, 224, device="cuda", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (b,), device="cuda")
    rate(compiled, opt, itertools.repeat((x, y)), 1, warmup=30, stream=stream)  # compiles
    ceiling = statistics.median(rate(compiled, opt, itertools.repeat((x, y)), steps, 10, stream)
                                for _ in range(repeats))
    return compiled, opt, ceiling


def fed_rates(compiled, opt, out, b, settings, echo, steps, repeats, stream, default_stream, no_handover=False):
    """(a) and (d) per setting (and echo, with no_handover the first setting's batches made on the
    training thread, and with default_stream the model on torch's default stream), in
    interleaved rounds; medians and ranges."""
    runs = {f"{p}x{t}@{h}": (s, 1, None) for s in settings for p, t, h in [s]}
    first = next(iter(runs))
    if echo > 1:
        runs[f"{first} echo {echo}"] = (settings[0], echo, None)
    for k in sorted({1, echo}) if no_handover else []:
        runs[f"{first}{f' echo {k}' if k > 1 else ''} no handover"] = (settings[0], k, False)
    streams = {name: endless(loader(out, b, s, echo=k, handover=h)) for name, (s, k, h) in runs.items()}
    cuda = {name: stream for name in runs}
    if default_stream:  # the first setting's loader again, the model on the default stream; (d) is the same
        name = f"{first} default stream"
        streams[name], cuda[name] = streams[first], torch.cuda.default_stream()
    a, d = {n: [] for n in streams}, {n: [] for n in streams}
    for _ in range(repeats):
        for name, batches in streams.items():
            a[name].append(rate(compiled, opt, batches, steps, warmup=10, stream=cuda[name]))
            d[name].append(stream_rate(batches, steps, 10) if name in runs else float("nan"))  # nan: (d) above
    del streams, batches
    gc.collect()
    return a, d


def cache_epochs(compiled, opt, out, b, setting, ceiling, stream, default_stream):
    """Epoch rates without a cache, with all of the set cached and with half of it (and with
    default_stream, without and with all of it, the model on torch's default stream)."""
    need = cache_gb_needed(Prepared.open(out).split("train"), 0, 1)
    rows = {}
    cases = [("no cache", "off", None, stream, None), ("cache, all", "gpu", None, stream, None),
             ("all, no handover", "gpu", None, stream, False), ("cache, half", "gpu", need / 2, stream, None)]
    if default_stream:
        cases[1:1] = [(f"{name}, default stream", cache, None, torch.cuda.default_stream(), None)
                      for name, cache in (("no cache", "off"), ("all", "gpu"))]
    for name, cache, gb, cuda_stream, handover in cases:
        free0 = torch.cuda.mem_get_info()[0]
        data = loader(out, b, setting, cache=cache, cache_gb=gb, fixed_share=True, handover=handover)
        rows[name] = [epoch_rate(compiled, opt, data, cuda_stream) for _ in range(3)]
        used = (free0 - torch.cuda.mem_get_info()[0]) / 1e9
        print(f"  {name:<16} epoch 1 {rows[name][0]:7.0f}, epochs 2-3 {rows[name][1]:7.0f} {rows[name][2]:7.0f} "
              f"images/s = {rows[name][1] / ceiling:.2f} {rows[name][2] / ceiling:.2f} of (b); cache "
              f"{data.cache_gb:.1f} GB (set needs {need:.1f}); GPU memory taken while loaded {used:.1f} GB", flush=True)
        del data
        gc.collect()
    fill = rows["cache, all"][0] / rows["no cache"][0]
    later = statistics.mean(rows["cache, all"][1:])
    hours = (IMAGENET_TRAIN / rows["cache, all"][0] + 89 * IMAGENET_TRAIN / later) / 3600
    print(f"  epoch 1 with the cache filling: {fill:.2f} of epoch 1 without; 90 ImageNet epochs at these rates "
          f"(all cached): {hours:.2f} h on one GPU", flush=True)
    if default_stream:
        print(f"  the model on the default stream: epoch 1 with the cache filling "
              f"{rows['all, default stream'][0] / rows['no cache, default stream'][0]:.2f} of epoch 1 without",
              flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="prepared shards with pca.json (default: build them)")
    p.add_argument("--src", type=Path, default=DEFAULT_SRC)
    p.add_argument("--tile", type=int, default=1, help="built shards: central squares in tiles of this many "
                   "(alexpipe-prepare --center-crop --tile)")
    p.add_argument("--repeat", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--repeats", type=int, default=3, help="timings of (a), (b), (d), median reported")
    p.add_argument("--archs", default="torchvision,paper")
    p.add_argument("--loaders", default=None, help="loader settings for (a)/(d): pipelines x threads @ "
                   "hw_decoder_load, the first the one --echo takes (default: the package's for the data, "
                   f"then 2x8@0.65; for tiles, {PIPELINES_TILES_GPU}x{THREADS_GPU}@1.0 then "
                   f"{PIPELINES_GPU}x{THREADS_GPU}@1.0)")
    p.add_argument("--echo", type=int, default=1, help="also time (a) with this echo, first loader setting")
    p.add_argument("--baseline", action="store_true", help="also time (c)")
    p.add_argument("--cache", action="store_true", help="also time whole epochs with the decoder cache")
    p.add_argument("--cache-only", action="store_true", help="only (b) and the whole epochs of --cache")
    p.add_argument("--default-stream", action="store_true",
                   help="also time (a) and the epochs with the model on torch's default CUDA stream")
    p.add_argument("--no-handover", action="store_true",
                   help="also time (a), first setting (and --echo), with batches made on the training thread")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_train: needs a CUDA GPU")
    cores = len(os.sched_getaffinity(0))
    stream = priority_stream(torch.device("cuda"))  # as alexpipe-train's Runtime.model_stream
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or sample_shards(args.src, Path(tmp), args.repeat, tile=args.tile)
        b = args.batch_size
        data = Prepared.open(out)
        n, tile = data.count("train"), data.tile("train")
        args.loaders = args.loaders or default_loaders(tile)
        settings = [parse_setting(s) for s in args.loaders.split(",")]
        print(f"\n{torch.cuda.get_device_name()}, {cores} CPU cores; {n} samples"
              f"{f' (tiles of {tile})' if tile > 1 else ''}, batch {b}, bf16 autocast, "
              f"channels_last, torch.compile, fused SGD, a highest-priority stream; median of {args.repeats} x "
              f"{args.steps} timed steps; "
              f"CUDA_DEVICE_MAX_CONNECTIONS={os.environ.get('CUDA_DEVICE_MAX_CONNECTIONS', 'unset (8)')}", flush=True)
        for arch in args.archs.split(","):
            compiled, opt, ceiling = model_and_ceiling(arch, b, args.steps, args.repeats, stream)
            print(f"\n{arch} AlexNet\n  (b) synthetic GPU tensors (ceiling)  {ceiling:8.0f} images/s", flush=True)
            if not args.cache_only:
                fed(compiled, opt, out, settings, ceiling, args, cores, stream)
            if args.cache or args.cache_only:
                cache_epochs(compiled, opt, out, b, settings[0], ceiling, stream, args.default_stream)
            del compiled, opt
            gc.collect()
    return 0


def default_loaders(tile: int) -> str:
    """The package's default loader for data of this tile first, then the one to compare it with."""
    other = f"{PIPELINES_GPU}x{THREADS_GPU}@1.0" if tile > 1 else "2x8@0.65"
    return f"{default_pipelines(True, tile)}x{THREADS_GPU}@1.0,{other}"


def fed(compiled, opt, out, settings, ceiling, args, cores, stream) -> None:
    """(a), (d) and with --baseline (c), printed."""
    b = args.batch_size
    a, d = fed_rates(compiled, opt, out, b, settings, args.echo, args.steps, args.repeats, stream,
                     args.default_stream, args.no_handover)
    for name in a:
        am, dm = statistics.median(a[name]), statistics.median(d[name])
        alone = "" if dm != dm else f";  (d) alone {dm:8.0f} = {dm / ceiling:.2f} of (b)"  # nan: the same loader
        print(f"  (a) loader {name:<24} {am:8.0f} images/s = {am / ceiling:.2f} of (b) "
              f"(timings {min(a[name]):.0f}-{max(a[name]):.0f}){alone}", flush=True)
    first = statistics.median(a[next(iter(a))])
    print(f"  projected 90 ImageNet epochs, {args.loaders.split(',')[0]}, no cache: "
          f"{90 * IMAGENET_TRAIN / first / 3600:.2f} h on one GPU", flush=True)
    if args.baseline:
        tv = (
            (x.cuda(non_blocking=True).to(torch.bfloat16, memory_format=torch.channels_last), y.cuda())
            for x, y in torchvision_loader(out, b, cores))
        base = rate(compiled, opt, tv, max(40, args.steps // 2), warmup=2 * cores, stream=stream)
        tv.close()  # shuts its worker processes down before the next measurement
        print(f"  (c) webdataset+PIL+torchvision, {cores} workers {base:7.0f} images/s; (a)/(c) = "
              f"{first / base:.1f}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
