"""An ImageNet-sized rehearsal: every stage at ImageNet's scale on tiny images.

Builds a tree of ImageNet's shape - 1,000 class folders named by the real wnids, 1,281,167
train files (732 to 1,300 a class) and 50,000 flat val files with a LOC_val_solution.csv -
of tiny JPEGs (32 to 64 px, so the tree takes ~2 GB), then runs and times, each stage in a
process of its own (peak memory: the largest resident set of the stage's processes):

  prepare        alexpipe-prepare, default shard size (257 train shards, 10 val), straight
  prepare-kill   the same into a second OUT, killed (SIGKILL, workers too) at about half
  prepare-resume the same command again; its shards must equal the straight run's, byte for byte
  verify         alexpipe-prepare --verify
  pca            alexpipe-pca --fraction (a seeded part of the shards, for time)
  eval loader    all val samples through the eval loader as 8 ranks, one after another:
                 every sample exactly once
  train loader   one epoch of the train loader as 8 ranks x 2 pipelines: equal batch counts,
                 no sample twice, fewer than one global batch a rank left out
                 (both loaders twice: with the shards mapped, the default, whose pages count
                 in the resident set while any reader lives; and read, mmap=False)

and prints a table: stage, files, wall time, files/s, peak memory. --fraction scales the
tree for a quick pass (0.01: 12,812 train files). Runs on the CPU.

  python tools/rehearsal.py WORK [--fraction 1.0] [--pca-fraction 0.05]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import signal
import subprocess
import sys
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

IMAGENET_TRAIN, IMAGENET_VAL = 1_281_167, 50_000
TOOLS = Path(__file__).resolve().parent


def class_sizes(n: int, classes: int, rng) -> list[int]:
    """Per-class counts summing to n, uneven like ImageNet's (1,300 for most, fewer for some)."""
    top = min(1300, -(-n // classes) + 1)
    sizes = np.full(classes, top)
    low = max(1, round(top * 732 / 1300))
    while sizes.sum() > n:  # take one from random classes still above the floor
        pick = rng.integers(classes, size=int(min(sizes.sum() - n, classes)))
        for c in pick:
            if sizes.sum() > n and sizes[c] > low:
                sizes[c] -= 1
    return sizes.tolist()


def tiny_jpegs(rng, count: int = 512) -> list[bytes]:
    """A pool of small JPEGs, 32-64 px a side, a colour gradient and noise each."""
    pool = []
    for _ in range(count):
        w, h = rng.integers(32, 65, size=2)
        base = rng.integers(0, 256, size=3)
        x = np.clip(base + rng.normal(0, 25, (h, w, 3)) + np.linspace(0, 60, w)[None, :, None], 0, 255)
        buf = io.BytesIO()
        Image.fromarray(x.astype(np.uint8)).save(buf, "JPEG", quality=85)
        pool.append(buf.getvalue())
    return pool


def make_tree(root: Path, fraction: float, seed: int = 0) -> tuple[int, int]:
    from alexpipe.util import Bar, imagenet_classes
    rng = np.random.default_rng(seed)
    wnids = [w for _, w, _ in imagenet_classes()]
    pool = tiny_jpegs(rng)
    n_train, n_val = round(IMAGENET_TRAIN * fraction), round(IMAGENET_VAL * fraction)
    sizes = class_sizes(n_train, len(wnids), rng)
    with Bar(total=n_train + n_val, unit="file", desc="tree") as bar:
        for wnid, size in zip(wnids, sizes):
            folder = root / "train" / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(size):
                (folder / f"{wnid}_{i}.JPEG").write_bytes(pool[(zlib.crc32(wnid.encode()) + i) % len(pool)])
            bar.update(size)
        (root / "val").mkdir(exist_ok=True)
        rows = ["ImageId,PredictionString"]
        for k in range(n_val):
            name, wnid = f"ILSVRC2012_val_{k + 1:08d}", wnids[k % len(wnids)]
            (root / "val" / f"{name}.JPEG").write_bytes(pool[k % len(pool)])
            rows.append(f"{name},{wnid} 1 1 10 10")
            bar.update()
    (root / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    return n_train, n_val


def run_stage(cmd: list[str], kill_when=None) -> tuple[float, float, int]:
    """(seconds, peak GB, return code) of `cmd` in a process group of its own; the peak is the
    largest resident set among the stage's processes (ru_maxrss of the children, read by a
    wrapper process that runs nothing else). kill_when(): SIGKILL the whole group when true."""
    wrapper = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
               "print('PEAK_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", wrapper, *cmd], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    while kill_when is not None and proc.poll() is None:
        if kill_when():
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.5)
    out, _ = proc.communicate()
    peak = next((int(line.split()[1]) for line in out.splitlines() if line.startswith("PEAK_KB")), 0)
    print(out.replace("PEAK_KB", "peak KB"), end="", flush=True)
    return time.perf_counter() - t0, peak / 2**20, proc.returncode


def loader_check(out: Path, mmap: bool, world: int = 8, pipelines: int = 2, batch: int = 256) -> str:
    """The loaders at this scale, rank by rank in this process, on the CPU (see the docstring)."""
    from alexpipe.dataset import Prepared
    from alexpipe.loader import LoaderOptions, eval_loader, train_loader
    from alexpipe.runtime import Runtime
    data, rt = Prepared.open(out), Runtime.start("cpu", distributed=False)
    n_train, n_val = data.count("train"), data.count("val")
    val = Counter()
    for r in range(world):
        loader = eval_loader(data, LoaderOptions(batch_size=batch, verify=False, sources=True, mmap=mmap),
                             runtime=rt.as_rank(r, world))
        for _, _, sources in loader:
            val.update(sources)
    assert sum(val.values()) == n_val and set(val.values()) == {1}, "eval: a sample missing or twice"
    seen, lengths = Counter(), set()
    for r in range(world):
        options = LoaderOptions(batch_size=batch, pipelines=pipelines, verify=False, sources=True, mmap=mmap)
        loader = train_loader(data, options, runtime=rt.as_rank(r, world))
        lengths.add(len(loader))
        for _, labels, sources in loader:
            assert len(labels) == batch
            seen.update(sources)
    left = n_train - sum(seen.values())
    assert len(lengths) == 1 and set(seen.values()) == {1}, "train: uneven batch counts or a sample twice"
    assert 0 <= left < world * batch * pipelines and left / world < batch * world, "train: too many left out"
    return (f"eval: {n_val} of {n_val} once over {world} ranks; train: {lengths.pop()} batches on each of {world} "
            f"ranks x {pipelines} pipelines, {sum(seen.values())} samples once, {left} left out "
            f"({left / world:.0f} a rank; one global batch is {batch * world})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("work", type=Path,
                   help="a folder with room: ~5 GB of tree on disk and two prepared OUTs (~24 GB each)")
    p.add_argument("--fraction", type=float, default=1.0, help="of ImageNet's file counts")
    p.add_argument("--pca-fraction", type=float, default=0.05, help="of the train shards alexpipe-pca reads")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--loader-check", type=Path, default=None, help=argparse.SUPPRESS)  # the loader stage's process
    p.add_argument("--no-mmap", action="store_true", help=argparse.SUPPRESS)  # with --loader-check
    args = p.parse_args(argv)
    if args.loader_check:
        print(loader_check(args.loader_check, mmap=not args.no_mmap), flush=True)
        return 0
    work, rows = args.work, []
    work.mkdir(parents=True, exist_ok=True)
    tree, out_a, out_b = work / "tree", work / "out_straight", work / "out_killed"
    t0 = time.perf_counter()
    if not (tree / "LOC_val_solution.csv").exists():
        n_train, n_val = make_tree(tree, args.fraction)
    else:
        n_train, n_val = round(IMAGENET_TRAIN * args.fraction), round(IMAGENET_VAL * args.fraction)
    rows.append(("make the tree", n_train + n_val, time.perf_counter() - t0, resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss / 2**20))
    cli = [sys.executable, "-m"]
    prep = [*cli, "alexpipe.prepare", str(tree)]
    workers = ["--workers", str(args.workers)]
    seconds, peak, rc = run_stage([*prep, str(out_a), *workers])
    assert rc == 0, "prepare failed"
    rows.append(("prepare", n_train + n_val, seconds, peak))
    shards = len(json.loads((out_a / "manifest.json").read_text())["splits"]["train"]["shards"])
    parts = out_b / "train" / ".parts"
    seconds, peak, rc = run_stage([*prep, str(out_b), *workers],
                                  kill_when=lambda: parts.is_dir() and len(list(parts.iterdir())) >= shards // 2)
    rows.append((f"prepare, killed at {len(list(parts.iterdir()))} of {shards} shards", None, seconds, peak))
    seconds, peak, rc = run_stage([*prep, str(out_b), *workers])
    assert rc == 0, "resumed prepare failed"
    rows.append(("prepare, resumed", None, seconds, peak))
    same = all(json.loads((out / "manifest.json").read_text())["splits"] == json.loads(
        (out_a / "manifest.json").read_text())["splits"] for out in (out_b,))
    seconds, peak, rc = run_stage([*cli, "alexpipe.prepare", "--verify", str(out_a), *workers])
    rows.append(("prepare --verify", n_train + n_val, seconds, peak))
    assert rc == 0, "verify failed"
    seconds, peak, rc = run_stage([*cli, "alexpipe.pca", str(out_a), "--device", "cpu", "--fraction",
                                   str(args.pca_fraction)])
    assert rc == 0, "pca failed"
    pca_images = json.loads((out_a / "pca.json").read_text())["images"]
    rows.append((f"pca --fraction {args.pca_fraction}", pca_images, seconds, peak))
    for flag, how in (([], "shards mapped"), (["--no-mmap"], "shards read")):
        seconds, peak, rc = run_stage([sys.executable, str(TOOLS / "rehearsal.py"), str(work), "--loader-check",
                                       str(out_a), *flag])
        assert rc == 0, "loader check failed"
        rows.append((f"loaders: val x 8 ranks, train x 8 x 2 pipelines, {how}", n_train + n_val, seconds, peak))
    print(f"\n{n_train} train + {n_val} val files ({args.fraction} of ImageNet's), {args.workers} workers, "
          f"{os.cpu_count()} cores; resumed shards byte-identical to the straight run's: {'yes' if same else 'NO'}")
    print(f"{'stage':<58} {'files':>10} {'wall':>9} {'files/s':>8} {'peak memory':>12}")
    for stage, files, seconds, peak in rows:
        rate = f"{files / seconds:8.0f}" if files else f"{'':>8}"
        print(f"{stage:<58} {files or '':>10} {seconds / 60:7.1f} m {rate} {peak:9.2f} GB")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
