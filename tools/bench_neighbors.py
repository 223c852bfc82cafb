"""Benchmark alexpipe-neighbors on the GPU: the feature pass and the exact search.

(1) alexpipe-neighbors on the benchmarks' shards (the real sample x --repeat, prepared),
train queries against the train pool, with a random-weight AlexNet (the cost does not depend
on the weights); (2) the search alone against a pool of ImageNet's size, 1,281,167 x 4096
float16 features (random, ReLU-like), for --queries queries. Prints images/s of the feature
pass, queries/s of the search, and the projected time for 50,000 val queries against
ImageNet's train set on one GPU.

  python tools/bench_neighbors.py --out OUT_WITH_PCA [--queries 2000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from alexpipe import neighbors
from alexpipe.model import alexnet

IMAGENET_TRAIN, IMAGENET_VAL = 1_281_167, 50_000


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="prepared shards with pca.json")
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--arch", default="torchvision")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_neighbors: needs a CUDA GPU")
    manifest = neighbors.Prepared.open(args.out).manifest
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "w.pth"
        torch.save(alexnet(args.arch, len(manifest["classes"])).state_dict(), weights)
        cfg = neighbors.NeighborsConfig(checkpoint=weights, out=args.out, query="train", pool="train",
                                        queries=args.queries, json=Path(tmp) / "n.json", png=Path(tmp) / "n.png")
        r = neighbors.find(cfg)
    pool = r["pool"]
    feature_rate = pool / r["feature_seconds"]
    print(f"\n{torch.cuda.get_device_name()}: {args.arch} FC7 features of {pool} images (center crop, bf16): "
          f"{r['feature_seconds']:.1f} s = {feature_rate:.0f} images/s (decoding included); search of "
          f"{args.queries} queries in {pool}: {r['search_seconds']:.2f} s", flush=True)
    g = torch.Generator("cuda").manual_seed(0)
    big = torch.relu(torch.randn(IMAGENET_TRAIN, 4096, device="cuda", generator=g, dtype=torch.float16))
    queries = torch.relu(torch.randn(args.queries, 4096, device="cuda", generator=g, dtype=torch.float16))
    keys = [f"{i:08d}" for i in range(IMAGENET_TRAIN)]
    stats = {}
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    neighbors.search(queries, big, keys, 6, cfg.chunk, stats)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    search_50k = seconds * IMAGENET_VAL / args.queries
    features_all = (IMAGENET_TRAIN + IMAGENET_VAL) / feature_rate
    print(f"search, {args.queries} queries x {IMAGENET_TRAIN} x 4096 float16 pool (10.5 GB): {seconds:.1f} s "
          f"({args.queries / seconds:.0f} queries/s; {stats.get('rescanned', 0)} rescanned); projected for "
          f"50,000 val queries against ImageNet train on one GPU: features {features_all / 60:.1f} min + search "
          f"{search_50k / 60:.1f} min = {(features_all + search_50k) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
