"""Benchmark alexpipe-pca (CPU, and GPU where present) against a naive baseline, in one run.

Baseline: one process decodes each JPEG of the same shards with PIL and calls numpy.cov on
each batch of 256 images' pixels (then averages), the way such statistics are often
computed. Shards: the real ImageNet sample (or --src) prepared at 256 px, each image used
--repeat times. Prints images/s of each (alexpipe-pca's after its start-up - pipeline
build, decoder init, first batch - which is reported apart, as it does not grow with the
data), the ratios, the projected time for ImageNet's 1,281,167 train images (start-up +
images / rate), and how far GPU (nvJPEG) and CPU (libjpeg-turbo) results differ.

  python tools/bench_pca.py [--src DIR] [--repeat 20] [--baseline-images 1500]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from alexpipe.pca import PCAConfig, compute
from alexpipe.prepare import PrepareConfig, prepare
from bench_prepare import DEFAULT_SRC, IMAGENET_TRAIN, make_tree


def baseline(out: Path, limit: int) -> float:
    manifest = json.loads((out / "manifest.json").read_text())
    urls = [str(out / s["tar"]) for s in manifest["splits"]["train"]["shards"]]
    t0, batch, covs, n = time.perf_counter(), [], [], 0
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        batch.append(np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB")).reshape(-1, 3))
        n += 1
        if len(batch) == 256 or n == limit:
            covs.append(np.cov(np.concatenate(batch).T))
            batch = []
        if n == limit:
            break
    np.mean(covs, axis=0)
    return n / (time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", type=Path, default=DEFAULT_SRC)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--baseline-images", type=int, default=1500)
    p.add_argument("--repeats", type=int, default=2, help="timed passes per mode (the best is reported)")
    args = p.parse_args(argv)
    if not args.src.is_dir():
        sys.exit(f"bench_pca: {args.src}: not found (pass --src DIR of JPEGs)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = make_tree(args.src, tmp / "src", args.repeat)
        out = tmp / "out"
        prepare(PrepareConfig(src=tmp / "src", out=out, split="train", shard_size=2000))
        base = baseline(out, args.baseline_images)
        # on a GPU: one pipeline (as before) against the default (several decoding side by side)
        modes = ["cpu"] + (["cuda:1", "cuda"] if torch.cuda.is_available() else [])
        rates, results = {}, {}
        for mode in modes:
            best = None
            for _ in range(args.repeats):
                device, _, pipes = mode.partition(":")
                r = compute(PCAConfig(out=out, device=device, pipelines=int(pipes) if pipes else None))
                r["rate"] = r["steady_images_per_second"] or r["images_per_second"]  # None on tiny runs
                best = r if best is None or r["rate"] > best["rate"] else best
            rates[mode], results[mode] = best["rate"], best
        print(f"\nimages: {len(files)} 256-px q90 JPEGs ({args.repeat}x the {len(files) // args.repeat} of {args.src.name})")
        print(f"baseline (PIL decode + numpy.cov per 256 images, 1 process): {base:9.1f} images/s   1.00x")
        for mode, r in rates.items():
            whole, startup = results[mode]["images_per_second"], results[mode]["startup_seconds"]
            flags = f"--device {mode.split(':')[0]}" + (f" --pipelines {mode.split(':')[1]}" if ":" in mode else "")
            print(f"alexpipe-pca {flags:<28} (exact int64 sums, {results[mode]['decoder']}): "
                  f"{r:9.1f} images/s after {startup:.1f} s start-up ({whole:.0f} over this whole pass)  "
                  f"{r / base:6.2f}x   ImageNet train projected {startup + IMAGENET_TRAIN / r:7.1f} s")
        if "cuda" in results:
            g, c = results["cuda"], results["cpu"]
            for key in ("mean", "std", "eigval"):
                rel = np.max(np.abs(np.array(g[key]) - c[key]) / np.abs(c[key]))
                print(f"GPU vs CPU decoder, max relative difference of {key}: {rel:.2e}")
            cos = np.abs(np.sum(np.array(g["eigvec"]) * np.array(c["eigvec"]), axis=0))
            print(f"GPU vs CPU eigenvectors, |cos| per column: {np.round(cos, 6).tolist()}")
        print("eigval/255^2:", np.round(np.array(results[modes[-1]]["eigval"]) / 255 ** 2, 4).tolist())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
