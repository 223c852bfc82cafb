"""What DALI's GPU decode paths do on the GPU, image by image: one pipeline (reader, decoder,
crop-flip-normalize to 224) per decoder output, its images/s alone, then the GPU work of 10
batches by name (count a batch x mean time), from a torch.profiler trace.

  python tools/bench_decode.py --out OUT [--threads 4]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from nvidia.dali import fn, pipeline_def, types

from alexpipe.dataset import Prepared
from alexpipe.pipeline import read_shards
from profile_train import gpu_activity, loader_work, traced

# name: (output_type, hw_decoder_load, decode only a random window)
PATHS = {"RGB": (types.RGB, 1.0, False), "any data": (types.ANY_DATA, 1.0, False),
         "YCbCr": (types.YCbCr, 1.0, False), "BGR": (types.BGR, 1.0, False),
         "RGB, load 0.0": (types.RGB, 0.0, False), "RGB, random window": (types.RGB, 1.0, True)}


@pipeline_def(device_id=0, prefetch_queue_depth=2)
def decode_pipeline(shards, output_type, load, window):
    jpegs = read_shards(shards, ["jpg"], 0, 1, random_shuffle=True, initial_fill=1024)
    if window:
        images = fn.resize(fn.decoders.image_random_crop(jpegs, device="mixed", output_type=output_type,
                                                         hw_decoder_load=load), size=(224, 224))
    else:
        images = fn.decoders.image(jpegs, device="mixed", output_type=output_type, hw_decoder_load=load)
    return fn.crop_mirror_normalize(images, crop=(224, 224), dtype=types.FLOAT16, output_layout="HWC")


def gpu_work(pipe, runs: int) -> str:
    """The GPU work of `runs` batches by name, per batch, from a trace."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        traced(pipe.run, runs, path)
        return loader_work(gpu_activity(json.loads(path.read_text())["traceEvents"]), runs, None, top=5)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="prepared shards (alexpipe-prepare OUT)")
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--batches", type=int, default=20, help="timed batches per path")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_decode: needs a CUDA GPU")
    shards, b = Prepared.open(args.out).split("train"), args.batch_size
    print(f"{torch.cuda.get_device_name()}; one pipeline, {args.threads} threads, batch {b}", flush=True)
    for name, (output_type, load, window) in PATHS.items():
        try:  # a path this DALI or GPU lacks is reported, and the others still run
            print(f"  {name:<20} {timed(shards, output_type, load, window, b, args)}", flush=True)
        except Exception as e:
            print(f"  {name:<20} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
    return 0


def timed(shards, output_type, load, window, b, args) -> str:
    pipe = decode_pipeline(shards, output_type, load, window, batch_size=b, num_threads=args.threads)
    pipe.build()
    for _ in range(10):
        pipe.run()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.batches):
        pipe.run()
    torch.cuda.synchronize()
    rate = args.batches * b / (time.perf_counter() - t0)
    return f"{rate:7.0f} images/s; a batch's GPU work: {gpu_work(pipe, 10)}"


if __name__ == "__main__":
    raise SystemExit(main())
