"""Benchmark AlexNet training throughput: alexpipe loader vs synthetic data vs PyTorch loader.

For each arch (paper, torchvision), with the same compiled model, bf16 autocast,
channels_last, SGD, batch --batch-size, in one run:
  (a) the alexpipe DALI train loader end to end (read, decode, crop, flip, lighting), with
      each --pipelines count per GPU (default 1 and 2: before and after the second pipeline);
  (b) synthetic GPU-resident tensors: the model-bound ceiling;
  (c) webdataset + PIL + torchvision transforms in a DataLoader with all cores;
  (d) the alexpipe loader alone, batches taken with no model running: an upper bound on (a),
      so (d)/(b) says how much of the ceiling the decoder could feed at best.
Prints images/s, (a)/(b), (a)/(c), (d)/(b), and the projected time of 90 ImageNet epochs on 1 GPU
and on 8 from the last --pipelines count's (a) (a projection at 0.9 scaling efficiency,
not a measurement).

  CUDA_DEVICE_MAX_CONNECTIONS=32 python tools/bench_train.py [--out OUT_WITH_SHARDS_AND_PCA] [--steps 150]

(as alexpipe-train should be started; the header prints the value; with CUDA's default 8 the
paper arch's (a) was 13.8k instead of 16.7k images/s on an H100).
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from alexpipe.loader import train_loader
from alexpipe.model import alexnet
from alexpipe.train import train_step
from bench_loader import endless, stream_rate, torchvision_loader
from bench_prepare import DEFAULT_SRC, sample_shards

IMAGENET_TRAIN = 1_281_167


def rate(model, opt, batches, steps: int, warmup: int) -> float:
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    for _ in range(warmup):
        x, y = next(batches)
        train_step(model, x, y, opt, 0.01, scaler, torch.bfloat16)
    torch.cuda.synchronize()
    t0, n = time.perf_counter(), 0
    for _ in range(steps):
        x, y = next(batches)
        train_step(model, x, y, opt, 0.01, scaler, torch.bfloat16)
        n += len(y)
    torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def median_rate(model, opt, batches, steps: int, repeats: int) -> float:
    """The median of `repeats` timings (of the synthetic runs, which vary by < 1%)."""
    return statistics.median(rate(model, opt, batches, steps, warmup=10) for _ in range(repeats))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="prepared shards with pca.json (default: build them)")
    p.add_argument("--src", type=Path, default=DEFAULT_SRC)
    p.add_argument("--repeat", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--repeats", type=int, default=3, help="timings of (a) and (b), median reported")
    p.add_argument("--archs", default="torchvision,paper")
    p.add_argument("--pipelines", default="1,2", help="DALI pipelines per GPU for (a), each timed --repeats times")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_train: needs a CUDA GPU")
    cores = len(os.sched_getaffinity(0))
    dev = torch.device("cuda")
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or sample_shards(args.src, Path(tmp), args.repeat)
        b = args.batch_size
        print(f"\n{torch.cuda.get_device_name()}, {cores} CPU cores; batch {b}, bf16 autocast, channels_last, "
              f"torch.compile, SGD; median of {args.repeats} x {args.steps} timed steps; "
              f"CUDA_DEVICE_MAX_CONNECTIONS={os.environ.get('CUDA_DEVICE_MAX_CONNECTIONS', 'unset (8)')}")
        for arch in args.archs.split(","):
            torch.manual_seed(0)
            model = alexnet(arch).to(dev, memory_format=torch.channels_last)
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
            compiled = torch.compile(model)
            x = torch.randn(b, 3, 224, 224, device=dev, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
            y = torch.randint(0, 1000, (b,), device=dev)
            rate(compiled, opt, itertools.repeat((x, y)), 1, warmup=30)  # compiles
            synthetic = median_rate(compiled, opt, itertools.repeat((x, y)), args.steps, args.repeats)
            # one loader per count, timed in interleaved rounds, so drift over the run (single
            # loader-fed timings on an H100 varied by up to 30%) hits every count alike
            counts = [int(c) for c in args.pipelines.split(",")]
            streams = {c: endless(train_loader(out, b, device="gpu", dtype="bfloat16", verify=False, pipelines=c))
                       for c in counts}
            timings, alone = {c: [] for c in counts}, {c: [] for c in counts}
            for _ in range(args.repeats):
                for c, stream in streams.items():
                    timings[c].append(rate(compiled, opt, stream, args.steps, warmup=10))
                    alone[c].append(stream_rate(stream, args.steps, warmup=10))
            ours = {c: statistics.median(t) for c, t in timings.items()}
            del streams, stream

            def tv_batches():
                for images, labels in torchvision_loader(out, b, cores):
                    yield (images.to(dev, non_blocking=True).to(torch.bfloat16, memory_format=torch.channels_last),
                           labels.to(dev, non_blocking=True))
            tv = tv_batches()
            # untimed: the 2 x cores batches the workers have ready after their first round (with 4
            # untimed, 30 timed steps varied from 2.5k to 5.3k images/s on one H100 host)
            baseline = rate(compiled, opt, tv, max(40, args.steps // 2), warmup=2 * cores)
            tv.close()  # shuts its worker processes down before the next measurement
            print(f"\n{arch} AlexNet")
            for pipelines, a in ours.items():
                print(f"  (a) alexpipe loader, {pipelines} pipeline{'s' if pipelines > 1 else ' '}        {a:8.0f} images/s   "
                      f"(a)/(b) = {a / synthetic:.2f}   (a)/(c) = {a / baseline:.1f}   "
                      f"(timings {min(timings[pipelines]):.0f}-{max(timings[pipelines]):.0f})")
            print(f"  (b) synthetic GPU tensors (ceiling)    {synthetic:8.0f} images/s")
            print(f"  (c) webdataset+PIL+torchvision, {cores:2d} workers {baseline:7.0f} images/s")
            for c, t in alone.items():
                d = statistics.median(t)
                print(f"  (d) alexpipe loader alone, {c} pipeline{'s' if c > 1 else ' '}   {d:8.0f} images/s   "
                      f"(d)/(b) = {d / synthetic:.2f}   (timings {min(t):.0f}-{max(t):.0f})")
            h1 = 90 * IMAGENET_TRAIN / ours[counts[-1]] / 3600
            print(f"  projected 90 ImageNet epochs with {counts[-1]} pipelines: {h1:.2f} h on 1 GPU; "
                  f"{h1 / 8 / 0.9:.2f} h on 8 (projection, assuming 0.9 scaling efficiency)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
