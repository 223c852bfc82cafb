"""Benchmark alexpipe-prepare against a plain PIL loop on the same images, in one run.

Baseline: one process, for each image PIL full decode -> RGB -> antialiased bicubic resize
of the short side to 256 -> JPEG q90 (what a simple conversion script does). alexpipe-prepare
then runs on the same files (a train tree of symlinks, the sample repeated under distinct
names to ~--images-per-worker images per worker, so every run lasts several seconds) with
1, 2 and all workers; it also shuffles, writes shards, indexes and hashes them. Prints images/s, ratios, the projected time for ImageNet's 1,281,167 train
images, and the PSNR of draft-mode decoding against a full decode.

  python tools/bench_prepare.py [--src DIR] [--images-per-worker 600] [--workers 1,2,16]
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from alexpipe.prepare import PrepareConfig, load_resized, prepare
from alexpipe.util import default_workers

IMAGENET_TRAIN = 1_281_167
DEFAULT_SRC = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample"


def baseline(files: list[Path]) -> float:
    t0 = time.perf_counter()
    for f in files:
        with Image.open(f) as img:
            rgb = img.convert("RGB")
        s = 256 / min(rgb.size)
        small = rgb.resize((round(rgb.size[0] * s), round(rgb.size[1] * s)), Image.Resampling.BICUBIC)
        small.save(io.BytesIO(), "JPEG", quality=90)
    return len(files) / (time.perf_counter() - t0)


def psnr(a, b) -> float:
    return 10 * np.log10(255 ** 2 / ((np.asarray(a, float) - np.asarray(b, float)) ** 2).mean())


def draft_quality(files: list[Path]) -> str:
    """PSNR of draft-mode vs full decode (both resized), and of the q90 re-encode alone."""
    drafted, encoded, n = [], [], 0
    for f in files:
        with Image.open(f) as img:
            if img.format != "JPEG" or min(img.size) < 512:
                continue
        n += 1
        d, _ = load_resized(f, False, draft=True)
        full, _ = load_resized(f, False, draft=False)
        drafted.append(psnr(d, full))
        buf = io.BytesIO()
        full.save(buf, "JPEG", quality=90)
        encoded.append(psnr(Image.open(buf).convert("RGB"), full))
    if not n:
        return "draft mode: no source JPEG with short side >= 512"
    return (f"draft mode applies to {n} of {len(files)} sources (short side >= 512): PSNR vs full decode "
            f"mean {np.mean(drafted):.1f} dB, min {min(drafted):.1f} dB "
            f"(for scale: the q90 re-encode alone gives {np.mean(encoded):.1f} dB on the same images)")


def make_tree(src: Path, root: Path, repeat: int) -> list[Path]:
    files = sorted(p for p in src.iterdir() if p.suffix.lower() in (".jpeg", ".jpg"))
    out = []
    for r in range(repeat):
        for p in files:
            wnid = p.name.split("_")[0] if p.name.startswith("n") else "class0"
            d = root / "train" / wnid
            d.mkdir(parents=True, exist_ok=True)
            link = d / f"{p.stem}_r{r}{p.suffix}"
            os.symlink(p.resolve(), link)
            out.append(link)
    return out


def sample_shards(src: Path, root: Path, repeat: int, shard_size: int = 500, tile: int = 1) -> Path:
    """The benchmarks' data: make_tree(src, root/src, repeat) prepared into root/out (with
    `tile` > 1 as central squares in tiles of that many) with its pca.json (alexpipe-pca in
    its own process, so the caller holds no CUDA context or DALI memory from it)."""
    make_tree(src, root / "src", repeat)
    out = root / "out"
    prepare(PrepareConfig(src=root / "src", out=out, split="train", shard_size=max(1, shard_size // tile),
                          center_crop=tile > 1, tile=tile))
    subprocess.run([sys.executable, "-m", "alexpipe.pca", str(out)], check=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", type=Path, default=DEFAULT_SRC, help="a folder of JPEGs (default: the real sample)")
    p.add_argument("--images-per-worker", type=int, default=600,
                   help="each run gets about this many images per worker (whole copies of the sample)")
    p.add_argument("--workers", default=f"1,2,{default_workers()}")
    p.add_argument("--repeats", type=int, default=3, help="runs of each contender; the median is reported")
    args = p.parse_args(argv)
    if not args.src.is_dir():
        sys.exit(f"bench_prepare: {args.src}: not found (pass --src DIR of JPEGs)")
    workers = sorted({int(w) for w in args.workers.split(",")})
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        distinct = make_tree(args.src, tmp / "base", 1)
        for f in distinct:
            f.read_bytes()  # page cache warm for every contender
        base = statistics.median(baseline(distinct) for _ in range(args.repeats))
        trees = {}
        for w in workers:
            repeat = max(1, round(args.images_per_worker * w / len(distinct)))
            trees[w] = (tmp / f"src{w}", len(make_tree(args.src, tmp / f"src{w}", repeat)))
        rates = {w: [] for w in workers}
        for r in range(args.repeats):  # interleaved, so drift on a shared machine hits all alike
            for w in workers:
                src, n = trees[w]
                out = tmp / f"out{w}-{r}"
                t0 = time.perf_counter()
                prepare(PrepareConfig(src=src, out=out, split="train", workers=w, shard_size=max(250, n // (4 * w))))
                rates[w].append(n / (time.perf_counter() - t0))
                shutil.rmtree(out)
        rates = {w: statistics.median(v) for w, v in rates.items()}
        print(f"\nresults (median of {args.repeats} runs each); {len(distinct)} distinct images; "
              f"machine: {os.cpu_count()} cores visible, {default_workers()} usable")
        print(f"baseline, 1 process, PIL full decode + bicubic + q90: {base:8.1f} images/s   1.00x")
        for w, r in rates.items():
            print(f"alexpipe-prepare, {w:3d} workers, {trees[w][1]:6d} images (+shuffle, tar, index, sha256): "
                  f"{r:8.1f} images/s  {r / base:5.2f}x baseline   ImageNet train projected "
                  f"{IMAGENET_TRAIN / r / 60:6.1f} min")
        if 1 in rates and 2 in rates:
            print(f"scaling 1 -> 2 workers: {rates[2] / rates[1]:.2f}x")
        print(draft_quality(distinct))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
