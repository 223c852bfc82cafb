"""Tiles against the usual shards, beside the model: the sample prepared as alexpipe-prepare
does by default (short side 256) and with --center-crop --tile K for each K, every loader
(the default shape for its data, optionally also with --echo) alive at once and timed in
interleaved rounds: (a) training fed by it against (b) the model alone, and (d) the loader
alone. Medians of --repeats.

  CUDA_DEVICE_MAX_CONNECTIONS=32 python tools/bench_tiles.py [--tiles 4] [--echo 2] [--archs torchvision,paper]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from alexpipe.dataset import Prepared
from alexpipe.loader import THREADS_GPU, default_pipelines
from alexpipe.runtime import priority_stream
from bench_loader import endless, stream_rate
from bench_prepare import DEFAULT_SRC, sample_shards
from bench_train import loader, model_and_ceiling, rate


def loaders(outs: dict, b: int, echo: int) -> dict:
    """name -> endless batches: each prepared set's default loader (default_pipelines x
    THREADS_GPU at load 1.0), and with echo > 1 each again with echo."""
    streams = {}
    for name, out in outs.items():
        shape = (default_pipelines(True, Prepared.open(out).tile("train")), THREADS_GPU, 1.0)
        streams[name] = endless(loader(out, b, shape))
        if echo > 1:
            streams[f"{name}, echo {echo}"] = endless(loader(out, b, shape, echo=echo))
    return streams


def compare(outs: dict, arch: str, b: int, steps: int, repeats: int, echo: int, stream) -> None:
    torch._dynamo.reset()
    compiled, opt, ceiling = model_and_ceiling(arch, b, steps, 3, stream)
    print(f"\n{arch} AlexNet: (b) {ceiling:.0f} images/s", flush=True)
    streams = loaders(outs, b, echo)
    a, d = {n: [] for n in streams}, {n: [] for n in streams}
    for _ in range(repeats):
        for name, batches in streams.items():
            a[name].append(rate(compiled, opt, batches, steps, 10, stream))
            d[name].append(stream_rate(batches, steps, 10))
    base = statistics.median(a[next(iter(a))])
    for name in streams:
        am = statistics.median(a[name])
        print(f"  {name:<28} (a) {am:7.0f} = {am / ceiling:.2f} of (b), {am / base:.2f} x the usual shards' "
              f"(timings {min(a[name]):.0f}-{max(a[name]):.0f}); (d) {statistics.median(d[name]):7.0f}", flush=True)
    del streams, batches, compiled, opt
    gc.collect()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", type=Path, default=DEFAULT_SRC, help="a folder of JPEGs (default: the real sample)")
    p.add_argument("--repeat", type=int, default=60, help="use each source image this many times")
    p.add_argument("--tiles", default="4", help="comma-separated tile sizes to prepare besides the usual shards")
    p.add_argument("--echo", type=int, default=1, help="also time every loader with this echo")
    p.add_argument("--archs", default="torchvision,paper")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_tiles: needs a CUDA GPU")
    if not args.src.is_dir():
        sys.exit(f"bench_tiles: {args.src}: not found (pass --src DIR of JPEGs)")
    stream = priority_stream(torch.device("cuda"))  # as alexpipe-train's Runtime.model_stream
    with tempfile.TemporaryDirectory() as tmp:
        tiles = [int(k) for k in args.tiles.split(",")]
        outs = {"short side 256 (the default)": sample_shards(args.src, Path(tmp) / "t1", args.repeat)}
        for k in tiles:
            outs[f"tiles of {k}"] = sample_shards(args.src, Path(tmp) / f"t{k}", args.repeat, tile=k)  # as many images
        print(f"{torch.cuda.get_device_name()}; batch {args.batch_size}, default loaders, median of {args.repeats} x "
              f"{args.steps} timed steps, interleaved", flush=True)
        for arch in args.archs.split(","):
            compare(outs, arch, args.batch_size, args.steps, args.repeats, args.echo, stream)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
