"""alexpipe-neighbors: the paper's Figure 4, right half - the training images nearest to test
images in the last hidden layer.

    alexpipe-neighbors CHECKPOINT OUT [--query val] [--pool train] [--k 6] [--queries 8]
    torchrun --nproc_per_node 8 -m alexpipe.neighbors CHECKPOINT OUT --queries 0

Features: FC7 after its ReLU (4096 values) of each image's center 224 crop, the model in
eval mode. Search: exact k nearest neighbours by Euclidean distance over the whole pool,
ties broken by sample key. The pool's features are kept as float16 on a GPU (ImageNet's
1.28M x 4096 are 10.5 GB; float32 on the CPU) and scanned in chunks: a float32 matmul
(TF32 on a GPU: exact products of float16 values) keeps each query's k + MARGIN best
candidates, which are then measured exactly (float64 differences) and sorted. A query is
certified when its k-th exact distance is below what any excluded sample could reach
given the matmul's rounding bound; the rare query that is not is scanned again in float64.
Each rank searches its share of the pool; rank 0 merges.

Output: a JSON list of queries {"key", "label", "neighbors": [{"key", "label", "distance"}]},
a PNG like the paper's (each row a query, then its neighbours, class names below, those of
the query's class framed in green), and a line with how often the nearest neighbour (other
than the query itself) shares the query's label.
"""

from __future__ import annotations

import argparse
import io
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .dataset import Prepared
from .eval import anchor, class_name
from .loader import LoaderOptions, eval_loader, range_sizes
from .model import load_for_eval
from .runtime import Runtime, cleanup, gather_objects
from .util import Bar, Help, UserError, run_main, save_png, write_json

MARGIN = 16  # candidates kept beyond k, so that the certificate rarely fails


@dataclass
class NeighborsConfig:
    checkpoint: Path
    out: Path
    query: str = "val"
    pool: str = "train"
    k: int = 6
    queries: int = 8  # chosen by seed; 0 = every sample of the query split
    seed: int = 0
    device: str | None = None  # cuda | cpu; default: cuda if a GPU is visible
    batch_size: int = 256
    chunk: int = 65536  # pool samples per matmul
    json: Path | None = None
    png: Path | None = None


def stored_keys(shards: list[dict]) -> list[str]:
    """Sample keys in stored order (the order eval loaders yield), from the index files."""
    return [line.split()[3].split(".")[0] for s in shards for line in Path(s["idx"]).read_text().splitlines()[1:]]


def fc7(model, images: torch.Tensor) -> torch.Tensor:
    """The last hidden layer: FC7 after its ReLU (the classifier up to, not including, FC8)."""
    x = torch.flatten(model.avgpool(model.features(images)), 1)
    return model.classifier[:-1](x)


def features(model, normalize: dict, data: Prepared, split: str, rt: Runtime, batch_size: int):
    """(features (n, 4096), labels (n,)) of this rank's range of `split`, in stored order;
    float16 on a GPU (ImageNet's 1.28M fit in 10.5 GB), float32 on the CPU."""
    loader = eval_loader(data, LoaderOptions(batch_size=batch_size), runtime=rt, split=split, normalize=normalize)
    feats, labels = [], []
    model.eval()
    with torch.no_grad(), torch.autocast(rt.device.type, rt.amp_dtype or torch.float32, enabled=rt.cuda):
        for images, y in Bar(loader, desc=f"features {split}", unit="batch", disable=not rt.main):
            feats.append(fc7(model, images).to(torch.float16 if rt.cuda else torch.float32))
            labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def rounding_bound(q_norm: torch.Tensor, p_max: float, dim: int) -> torch.Tensor:
    """Largest error of |q|^2 + |p|^2 - 2 q.p computed in float32 over `dim` products
    (gamma_n (|q| + |p|)^2, with the products themselves rounded too)."""
    gamma = 2 * (dim + 2) * 2.0 ** -24
    return gamma * (q_norm + p_max) ** 2


def exact_d2(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Squared distances (float64) between each query (Q, D) and its candidates (Q, C, D)."""
    return ((q.double()[:, None] - p.double()) ** 2).sum(-1)


def search(queries: torch.Tensor, pool: torch.Tensor, keys: list[str], k: int, chunk: int,
           stats: dict | None = None, block: int = 4096) -> tuple:
    """Exact k nearest pool rows of each query: (squared distances (Q, k) float64, pool
    indices (Q, k)), sorted by (distance, key). See the module docstring for the method;
    `stats` counts the queries scanned again ("rescanned"). Queries go `block` at a time."""
    rank_of = torch.as_tensor(np.argsort(np.argsort(np.array(keys))), device=pool.device)  # key order
    p_max = max((float(pool[s:s + chunk].float().norm(dim=1).max()) for s in range(0, len(pool), chunk)), default=0.0)
    found = [nearest(queries[b:b + block], pool, rank_of, k, chunk, p_max, stats)
             for b in range(0, len(queries), block)]
    return torch.cat([d for d, _ in found]), torch.cat([i for _, i in found])


def candidates(q32: torch.Tensor, pool: torch.Tensor, keep: int, chunk: int):
    """Each query's `keep` smallest squared distances as a float32 matmul computes them, and
    their pool rows, over the pool in chunks (a running top-keep)."""
    qn = (q32 ** 2).sum(1)
    best_d = torch.empty(len(q32), 0, device=pool.device)
    best_i = torch.empty(len(q32), 0, dtype=torch.long, device=pool.device)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # TF32 on a GPU: float16 inputs multiply exactly
    try:
        for start in range(0, len(pool), chunk):
            rows = pool[start:start + chunk].float()
            d = torch.cat([best_d, qn[:, None] + (rows ** 2).sum(1)[None] - 2 * q32 @ rows.T], 1)
            i = torch.cat([best_i, torch.arange(start, start + len(rows), device=pool.device).expand(len(d), -1)], 1)
            best_d, pos = d.topk(min(keep, d.shape[1]), dim=1, largest=False)
            best_i = i.gather(1, pos)
    finally:
        torch.set_float32_matmul_precision(precision)
    return best_d, best_i, qn


def nearest(queries, pool, rank_of, k: int, chunk: int, p_max: float, stats) -> tuple:
    """search() for one block of queries: candidates, exact distances, the certificate."""
    keep = min(len(pool), k + MARGIN)
    best_d, best_i, qn = candidates(queries.float(), pool, keep, chunk)
    out_d, out_i = [], []
    for b in range(0, len(queries), 256):  # float64 candidates: 256 x 22 x 4096 x 8 bytes at a time
        cand = best_i[b:b + 256]
        d2, cand = sort_by_distance_then_key(exact_d2(queries[b:b + 256], pool[cand]), cand, rank_of)
        if keep < len(pool):  # certificate: no excluded sample can be nearer than the k-th
            floor = best_d[b:b + 256, -1].double() - rounding_bound(qn[b:b + 256].double().sqrt(), p_max, pool.shape[1])
            for j in torch.nonzero(floor <= d2[:, k - 1]).flatten().tolist():
                d2[j], cand[j] = full_scan(queries[b + j], pool, rank_of, keep, chunk)
                if stats is not None:
                    stats["rescanned"] = stats.get("rescanned", 0) + 1
        out_d.append(d2[:, :k])
        out_i.append(cand[:, :k])
    return torch.cat(out_d), torch.cat(out_i)


def sort_by_distance_then_key(d2: torch.Tensor, idx: torch.Tensor, rank_of: torch.Tensor):
    order = torch.argsort(rank_of[idx], dim=1, stable=True)  # key order first, then a stable sort by distance
    d2, idx = d2.gather(1, order), idx.gather(1, order)
    order = torch.argsort(d2, dim=1, stable=True)
    return d2.gather(1, order), idx.gather(1, order)


def full_scan(q: torch.Tensor, pool: torch.Tensor, rank_of: torch.Tensor, keep: int, chunk: int):
    """One query against every pool row in float64: its `keep` best, by (distance, key)."""
    step = min(chunk, 8192)  # float64 rows: 256 MB a step
    d2 = torch.cat([exact_d2(q[None], pool[s:s + step][None])[0] for s in range(0, len(pool), step)])
    idx = torch.arange(len(pool), device=pool.device)[None]
    d2, idx = sort_by_distance_then_key(d2[None], idx, rank_of)
    return d2[0, :keep], idx[0, :keep]


def share_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rank's range of a split in stored order, as the eval loader reads it."""
    sizes = range_sizes(n, world)
    return sum(sizes[:rank]), sum(sizes[:rank + 1])


def chosen(n: int, queries: int, seed: int) -> list[int]:
    """Positions of the query samples in the query split's stored order."""
    if queries == 0 or queries >= n:
        return list(range(n))
    return sorted(np.random.default_rng(seed).permutation(n)[:queries].tolist())


def gather_queries(cfg: NeighborsConfig, rt: Runtime, q: torch.Tensor, q_labels: torch.Tensor, n: int):
    """The chosen queries' features and labels from every rank's range of the query split, on
    every rank; and their positions in the split's stored order."""
    lo, hi = share_range(n, rt.rank, rt.world)
    mine = [p for p in chosen(n, cfg.queries, cfg.seed) if lo <= p < hi]
    rows = torch.as_tensor([p - lo for p in mine], dtype=torch.long, device=q.device)
    parts = gather_objects((q[rows].cpu(), q_labels[rows].cpu(), mine))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]).tolist(), [p for x in parts for p in x[2]]


def merged(found: list, k: int) -> list:
    """Rank 0's view: every rank's best k of each query, merged by (distance, key)."""
    return [sorted((c for rank_found in found for c in rank_found[i]), key=lambda c: (c[0], c[1]))[:k]
            for i in range(len(found[0]))]


def find(cfg: NeighborsConfig) -> dict:
    """Every rank: its share of the pool's features and its best k per query; rank 0 merges.
    Returns {"queries": [...]} on rank 0 (None elsewhere) and the timings."""
    rt = Runtime.start(cfg.device)
    model, info = load_for_eval(cfg.checkpoint)
    data = Prepared.open(cfg.out)
    if info["num_classes"] != len(data.classes):
        raise UserError(f"{cfg.checkpoint}: a model of {info['num_classes']} classes, but {cfg.out} has "
                        f"{len(data.classes)}")
    pool_keys, query_keys = stored_keys(data.split(cfg.pool)), stored_keys(data.split(cfg.query))
    if cfg.k > len(pool_keys):
        raise UserError(f"--k {cfg.k} is more than the {len(pool_keys)} samples of split {cfg.pool!r}")
    model = model.to(rt.device, memory_format=rt.memory_format)
    t0 = time.perf_counter()
    pool, pool_labels = features(model, info["normalize"], data, cfg.pool, rt, cfg.batch_size)
    q, q_labels = (pool, pool_labels) if cfg.query == cfg.pool else features(model, info["normalize"], data,
                                                                             cfg.query, rt, cfg.batch_size)
    queries, labels, positions = gather_queries(cfg, rt, q, q_labels, len(query_keys))
    if rt.cuda:
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    lo, _ = share_range(len(pool_keys), rt.rank, rt.world)
    d2, idx = search(queries.to(pool.device), pool, pool_keys[lo:lo + len(pool)], cfg.k, cfg.chunk)
    d2, idx, pool_labels = d2.cpu(), idx.cpu(), pool_labels.cpu()  # one copy each, not one sync an element
    found = [[(float(d2[i, j]), pool_keys[lo + int(idx[i, j])], int(pool_labels[int(idx[i, j])]))
              for j in range(d2.shape[1])] for i in range(len(queries))]
    t2, found = time.perf_counter(), gather_objects(found)
    if not rt.main:
        return {"queries": None}
    out = [{"key": query_keys[pos], "label": label,
            "neighbors": [{"key": key, "label": lab, "distance": float(np.sqrt(d))} for d, key, lab in best]}
           for pos, label, best in zip(positions, labels, merged(found, cfg.k))]
    return {"queries": out, "info": info, "data": data, "feature_seconds": t1 - t0, "search_seconds": t2 - t1,
            "pool": len(pool_keys), "ranks": rt.world}


def agreement(queries: list[dict], same_split: bool) -> tuple[int, int]:
    """(queries whose nearest neighbour other than themselves shares their label, queries)."""
    hits = 0
    for q in queries:
        other = next((n for n in q["neighbors"] if not same_split or n["key"] != q["key"]), None)
        hits += other is not None and other["label"] == q["label"]
    return hits, len(queries)


def read_images(data: Prepared, split: str, keys: set[str]) -> dict[tuple[str, str], np.ndarray]:
    """The stored images of `keys` by (split, key), center-cropped to 224 (what the features saw)."""
    found = {}
    for s in data.split(split):
        with open(s["tar"], "rb") as f:
            for line in Path(s["idx"]).read_text().splitlines()[1:]:
                fields = line.split()
                key = fields[3].split(".")[0]
                if key not in keys:
                    continue
                j = fields.index("jpg")
                f.seek(int(fields[j + 1]))
                img = np.asarray(Image.open(io.BytesIO(f.read(int(fields[j + 2])))).convert("RGB"))
                h, w = img.shape[:2]
                y, x = anchor(0.5, h - 224), anchor(0.5, w - 224)
                found[split, key] = img[y:y + 224, x:x + 224]
    return found


def figure(queries: list[dict], cfg: NeighborsConfig, data: Prepared, classes, rows: int = 8):
    """The paper's Figure 4, right: a query, then its neighbours; same-class ones framed green."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shown = queries[:rows]
    images = read_images(data, cfg.query, {q["key"] for q in shown})
    images.update(read_images(data, cfg.pool, {n["key"] for q in shown for n in q["neighbors"]}))
    cols = 1 + cfg.k
    fig, axes = plt.subplots(len(shown), cols, figsize=(1.6 * cols, 1.8 * len(shown)), squeeze=False)
    for r, q in enumerate(shown):
        tiles = [((cfg.query, q["key"]), q["label"], "tab:blue", "query")]
        tiles += [((cfg.pool, n["key"]), n["label"], "tab:green" if n["label"] == q["label"] else None,
                   f"d {n['distance']:.3g}") for n in q["neighbors"]]
        for c, (where, label, frame, note) in enumerate(tiles):
            ax = axes[r, c]
            ax.imshow(images[where])
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(frame is not None)
                spine.set_color(frame or "white")
                spine.set_linewidth(3)
            ax.set_title(f"{class_name(classes, label)[:16]}\n{note}", fontsize=7)
    fig.tight_layout()
    return fig


def parser() -> argparse.ArgumentParser:
    d = NeighborsConfig
    p = argparse.ArgumentParser(prog="alexpipe-neighbors", formatter_class=Help,
                                description="The paper's Figure 4 (right): for query images, the pool images "
                                            "nearest in the last hidden layer (FC7 after ReLU, center crop); exact, "
                                            "on one GPU, several (torchrun) or the CPU.")
    p.add_argument("checkpoint", type=Path, help="alexpipe-train checkpoint or torchvision AlexNet state_dict")
    p.add_argument("out", type=Path, help="prepared directory")
    p.add_argument("--query", default=d.query, help="split the query images come from")
    p.add_argument("--pool", default=d.pool, help="split searched for neighbours")
    p.add_argument("--k", type=int, default=d.k, help="neighbours per query")
    p.add_argument("--queries", type=int, default=d.queries, help="query images, chosen by --seed; 0 = all")
    p.add_argument("--seed", type=int, default=d.seed, help="which queries --queries picks")
    p.add_argument("--device", default=None, choices=["cuda", "cpu"], help="(default: cuda if a GPU is visible, "
                   "else cpu)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per forward pass")
    p.add_argument("--chunk", type=int, default=d.chunk, help="pool samples per distance matmul")
    p.add_argument("--json", type=Path, default=None, help="the neighbours as JSON (default: "
                   "neighbors-<query>-in-<pool>-<dataset id>.json beside the checkpoint)")
    p.add_argument("--png", type=Path, default=None, help="the figure (default: the same name as the JSON, .png)")
    return p


def parse_args(argv) -> NeighborsConfig:
    args = parser().parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    for name in ("k", "batch_size", "chunk"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.queries < 0:
        raise UserError(f"--queries must be >= 0, got {args.queries}")
    return NeighborsConfig(**vars(args))


def _main(argv) -> int:
    cfg = parse_args(argv)
    try:
        r = find(cfg)
        if r["queries"] is not None:
            queries = r["queries"]
            name = f"neighbors-{cfg.query}-in-{cfg.pool}-{r['data'].identity[:8]}"  # other shards: other files
            json_path = cfg.json or cfg.checkpoint.parent / f"{name}.json"
            png_path = cfg.png or json_path.with_suffix(".png")
            write_json(json_path, queries)
            fig = figure(queries, cfg, r["data"], r["info"]["classes"])
            save_png(fig, png_path)
            hits, n = agreement(queries, cfg.query == cfg.pool)
            print(f"{n} {cfg.query} queries against {r['pool']} {cfg.pool} samples, k={cfg.k}, {r['ranks']} rank(s): "
                  f"features {r['feature_seconds']:.1f} s, search {r['search_seconds']:.1f} s; the nearest "
                  f"neighbour (other than the query itself) shares the query's label for {hits} of {n}")
            print(f"wrote {json_path} and {png_path}")
    finally:
        cleanup()
    return 0


def main(argv=None) -> int:
    return run_main("alexpipe-neighbors", _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
