"""Loader knobs beside the model: each variant a train loader of its own (4 pipelines x 4
threads unless it says otherwise), all alive at once, timed in interleaved rounds:
(a) training fed by it, (d) it alone, and the process's busy CPU cores during (a) (CPU time
over wall time), against the default in the same run. Medians of --repeats; (b) the ceiling
(median of 3).

  CUDA_DEVICE_MAX_CONNECTIONS=32 python tools/bench_knobs.py --out OUT [--variants "default,echo 2"] [--modes reduce-overhead,default]
"""

from __future__ import annotations

import argparse
import functools
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from nvidia.dali import fn, types

import alexpipe.loader
import alexpipe.pipeline
from alexpipe.runtime import priority_stream
from bench_loader import endless, stream_rate
from bench_prepare import DEFAULT_SRC, sample_shards
from bench_train import loader, model_and_ceiling, rate

# name: (LoaderOptions fields, with "load" the hw_decoder_load, "shape" (pipelines, threads) and
# "decoder" more arguments of the GPU decoder;
# DALI Pipeline arguments;
# Python's GIL switch interval while training)
VARIANTS = {
    "default": ({}, {}, None),
    "no mmap": ({"mmap": False}, {}, None),
    "old executor": ({}, {"exec_dynamic": False}, None),  # for timing only: its buffers may be reused under torch
    "prefetch 4": ({"prefetch": 4}, {}, None),
    "switch 0.2ms": ({}, {}, 2e-4),
    "affinity": ({}, {"set_affinity": True}, None),
    "echo 2": ({"echo": 2}, {}, None),
    "echo 2 no mmap": ({"echo": 2, "mmap": False}, {}, None),
    "echo 4": ({"echo": 4}, {}, None),
    "echo 2 prefetch 4": ({"echo": 2, "prefetch": 4}, {}, None),
    "echo 2 3x4": ({"echo": 2, "shape": (3, 4)}, {}, None),
    "echo 2 2x8": ({"echo": 2, "shape": (2, 8)}, {}, None),
    "hw 0.9": ({"load": 0.9}, {}, None),
    "hw 0.75": ({"load": 0.75}, {}, None),
    "hw 0.5": ({"load": 0.5}, {}, None),
    "echo 2 hw 0.75": ({"echo": 2, "load": 0.75}, {}, None),
    "6x3": ({"shape": (6, 3)}, {}, None),
    "6x2": ({"shape": (6, 2)}, {}, None),
    "3x4": ({"shape": (3, 4)}, {}, None),
    "2x8": ({"shape": (2, 8)}, {}, None),
    # the hardware decoder's buffers sized up front for 256 images of up to 512 x 512 (DALI's default: 1 x 1)
    "prealloc": ({"decoder": {"preallocate_width_hint": 512, "preallocate_height_hint": 512}}, {}, None),
}


def variant(name: str) -> tuple:
    """VARIANTS[name], or a loader shape "PxT", optionally after "echo K " (e.g. "echo 2 2x4")."""
    if name in VARIANTS:
        return VARIANTS[name]
    words = name.split()
    fields = {"echo": int(words[1])} if len(words) == 3 and words[0] == "echo" else {}
    pipes, _, threads = words[-1].partition("x")
    if len(words) != (3 if fields else 1) or not (pipes.isdigit() and threads.isdigit()):
        raise KeyError(name)
    return {**fields, "shape": (int(pipes), int(threads))}, {}, None


def variant_loader(out, b, fields: dict, pipeline_args: dict):
    """An endless stream of the variant's batches, its pipelines built (the DALI arguments
    reach them through the loader's pipeline and decode functions, swapped while it builds)."""
    fields, original, decode = dict(fields), alexpipe.loader.train_pipeline, alexpipe.pipeline.decode
    alexpipe.loader.train_pipeline = functools.partial(original, **pipeline_args)
    alexpipe.pipeline.decode = decoder_with(fields.pop("decoder", {}))
    try:
        stream = endless(loader(out, b, (*fields.pop("shape", (4, 4)), fields.pop("load", 1.0)), **fields))
        next(stream)
    finally:
        alexpipe.loader.train_pipeline, alexpipe.pipeline.decode = original, decode
    return stream


def decoder_with(extra: dict):
    """alexpipe.pipeline.decode with more arguments for the GPU decoder (none: itself)."""
    decode = alexpipe.pipeline.decode
    if not extra:
        return decode

    def decode_more(jpegs, device, hw_decoder_load=1.0, cache_mb=0):
        if device != "gpu" or cache_mb:
            return decode(jpegs, device, hw_decoder_load, cache_mb)
        return fn.decoders.image(jpegs, device="mixed", output_type=types.RGB, hw_decoder_load=hw_decoder_load, **extra)
    return decode_more


def timed_with(switch, fn):
    """fn() under a GIL switch interval (None: as it is); returns (result, busy cores)."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(switch or old)
    try:
        c0, t0 = time.process_time(), time.perf_counter()
        result = fn()
        return result, (time.process_time() - c0) / (time.perf_counter() - t0)
    finally:
        sys.setswitchinterval(old)


def knobs(out, arch, names, b, steps, repeats, stream, mode) -> None:
    torch._dynamo.reset()
    compiled, opt, ceiling = model_and_ceiling(arch, b, steps, 3, stream, mode)
    print(f"\n{arch} AlexNet, compiled with mode {mode}: (b) {ceiling:.0f} images/s", flush=True)
    streams = {name: variant_loader(out, b, *variant(name)[:2]) for name in names}
    a, d, busy = ({n: [] for n in names} for _ in range(3))
    for _ in range(repeats):
        for name, batches in streams.items():
            r, cores = timed_with(variant(name)[2], lambda: rate(compiled, opt, batches, steps, 10, stream))
            a[name].append(r)
            busy[name].append(cores)
            d[name].append(stream_rate(batches, steps, 10))
    for name in names:
        am = statistics.median(a[name])
        print(f"  {name:<16} (a) {am:7.0f} = {am / ceiling:.2f} of (b) (timings "
              f"{', '.join(f'{v:.0f}' for v in a[name])}); (d) {statistics.median(d[name]):7.0f}; "
              f"cores busy during (a) {statistics.median(busy[name]):.1f}", flush=True)
    del streams, batches, compiled, opt
    gc.collect()


def known(name: str) -> bool:
    try:
        return bool(variant(name))
    except KeyError:
        return False


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="prepared shards with pca.json (default: build them)")
    p.add_argument("--src", type=Path, default=DEFAULT_SRC)
    p.add_argument("--repeat", type=int, default=60)
    p.add_argument("--tile", type=int, default=1, help="built shards: central squares in tiles of this many")
    p.add_argument("--archs", default="torchvision,paper")
    p.add_argument("--variants", default="default,no mmap,old executor,prefetch 4,switch 0.2ms,affinity,echo 2",
                   help="comma-separated, of: " + ", ".join(VARIANTS) + '; or any "PxT" or "echo K PxT"')
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--modes", default="default", help="torch.compile modes, each timed against every variant (with "
                   "reduce-overhead, a CUDA graph; put it first: a capture beside a live loader's threads fails)")
    args = p.parse_args(argv)
    names = args.variants.split(",")
    if unknown := [n for n in names if not known(n)]:
        sys.exit(f"bench_knobs: unknown variant(s) {', '.join(unknown)}")
    if not torch.cuda.is_available():
        sys.exit("bench_knobs: needs a CUDA GPU")
    stream = priority_stream(torch.device("cuda"))  # as alexpipe-train's Runtime.model_stream
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or sample_shards(args.src, Path(tmp), args.repeat, tile=args.tile)
        print(f"{torch.cuda.get_device_name()}; batch {args.batch_size}, median of {args.repeats} x {args.steps} "
              f"timed steps, interleaved", flush=True)
        for arch in args.archs.split(","):
            for mode in args.modes.split(","):
                knobs(out, arch, names, args.batch_size, args.steps, args.repeats, stream, mode)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
