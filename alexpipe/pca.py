"""alexpipe-pca: exact RGB statistics of a prepared split in one streaming pass.

AlexNet's colour augmentation adds eigvec @ (alpha * eigval) to every pixel, with the
eigen-decomposition of the 3x3 covariance of RGB values over the training set; the loader
also normalizes with the per-channel mean and std. Both come from here.

Exactness: each image's channel sums and sums of products are computed on the device
that decoded it (GPU with nvJPEG, or CPU) in integers (int32 products, int64 sums),
and accumulated in Python integers, so the totals are exact whatever the order, batch or
thread count; mean, covariance and eigenpairs are computed from them once, in float64.
Memory is one batch: 12 numbers per image leave the device. Pixels are on the 0..255
scale (written into the output as "scale").

Conventions: cov is the unbiased sample covariance (divide by n-1); std = sqrt(diag(cov));
eigval descending; eigvec columns are the eigenvectors, each with its largest-magnitude
component made positive. A jackknife over 16 interleaved groups of images gives standard
errors of mean, std and eigval, so a --fraction run says how far it can be trusted.
"""

from __future__ import annotations

import argparse
import collections
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .dataset import Prepared, check_shards, find_bad_sample, statistics
from .loader import PIPELINES_GPU
from .pipeline import READER, decoded_pipeline
from .runtime import Runtime
from .util import Bar, Help, UserError, config_dict, default_workers, print_config, run_main, write_json

GROUPS = 16  # jackknife groups: image ordinal mod 16
# fb.resnet.torch's widely used ImageNet values (pixels on 0..1), for comparison only.
FB_RESNET_EIGVAL = [0.2175, 0.0188, 0.0045]
FB_RESNET_EIGVEC = [[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]]


@dataclass
class PCAConfig:
    out: Path
    split: str = "train"
    device: str | None = None  # cuda | cpu; default: cuda if a GPU is visible
    workers: int = field(default_factory=default_workers)
    fraction: float = 1.0
    seed: int = 0
    batch_size: int | None = None  # default 256 on a GPU, 32 on the CPU (its float64 matmul pads every image)
    pipelines: int | None = None  # default 4 on a GPU (more decodes in flight), 1 on the CPU
    output: Path | None = None  # default OUT/pca.json


# A row of sufficient statistics: images, pixels, channel sums (3), sums of products
# rr rg rb gg gb bb (6). Rows are numpy object arrays of Python ints, so adding them is exact.
ROW = 11


def jackknife(groups: np.ndarray) -> dict:
    """Delete-one-group jackknife standard errors of mean, std and eigval."""
    total = groups.sum(0)
    used = [g for g in groups if g[1]]
    if len(used) < 2:
        return {}
    reps = [statistics(total - g) for g in used]
    k = len(used)
    out = {}
    for key in ("mean", "std", "eigval"):
        v = np.array([r[key] for r in reps])
        out[key] = np.sqrt((k - 1) / k * ((v - v.mean(0)) ** 2).sum(0)).tolist()
    return out


def choose_shards(shards: list[dict], fraction: float, seed: int) -> list[dict]:
    """A seeded random subset of whole shards. Prepared shards are a uniform shuffle of the
    split, so whole shards are a uniform random sample of images, and reading them stays
    sequential."""
    if fraction >= 1:
        return shards
    k = max(1, round(fraction * len(shards)))
    pick = sorted(np.random.default_rng(seed).permutation(len(shards))[:k])
    return [shards[i] for i in pick]


def sums_elementwise(images: torch.Tensor):
    """Per image of a (B, N, 3) uint8 batch of pixels: channel sums [r, g, b], squares
    [rr, gg, bb] and cross products [rg, gb, br], each (B, 3) int64: products of 0..255
    values exact in int32, summed in int64, in memory-bound elementwise passes."""
    x = images.reshape(images.shape[0], -1, 3).int()
    return (x.sum(1, dtype=torch.int64), (x * x).sum(1, dtype=torch.int64),
            (x * x.roll(-1, dims=2)).sum(1, dtype=torch.int64))


def sums_matmul(images: torch.Tensor):
    """The same sums as a batched float64 matmul, exact: every term and partial sum is an
    integer below 2^53 (a 256 x 2048 image sums to < 2^36)."""
    x = images.reshape(images.shape[0], -1, 3).double()
    ss = torch.bmm(x.transpose(1, 2), x)
    cross = torch.stack([ss[:, 0, 1], ss[:, 1, 2], ss[:, 2, 0]], 1)
    return x.sum(1).long(), torch.diagonal(ss, dim1=1, dim2=2).long(), cross.long()


def image_sums(images: torch.Tensor):
    """On CUDA the elementwise form, on the CPU the matmul form (each is the faster there:
    docs/benchmarks.md); tests/test_pca.py checks that both give the same integers."""
    return (sums_elementwise if images.is_cuda else sums_matmul)(images)


IN_FLIGHT = 4  # batches whose sums are still being computed on the GPU when the next is read


def decoded_batches(shards: list[dict], device: str, workers: int, batch_size: int, pipelines: int,
                    device_id: int = 0):
    """Every image of `shards` once, as (pixels (k, N, 3) uint8 zero-padded, shapes (k, 3))
    batches on the decoding device: `pipelines` DALI pipelines read disjoint ranges of the
    shards, taken in turn (more decodes in flight), workers // pipelines threads each."""
    total = sum(s["count"] for s in shards)
    pipes = [decoded_pipeline(shards, device, p, pipelines, batch_size=batch_size,
                              num_threads=max(1, workers // pipelines), device_id=device_id if device == "gpu" else None,
                              prefetch_queue_depth=2) for p in range(pipelines)]
    for pipe in pipes:
        pipe.build()
    held = pipes[0].reader_meta(READER)["epoch_size"]  # (epoch_size() counts the ranges' padding)
    if held != total:
        raise UserError(f"the shards hold {held} samples, the manifest says {total}")
    left = [total * (p + 1) // pipelines - total * p // pipelines for p in range(pipelines)]
    turn = 0
    while any(left):
        p = turn % pipelines
        turn += 1
        if not left[p]:
            continue
        try:
            images, shapes = pipes[p].run()
        except RuntimeError as e:
            raise UserError(find_bad_sample(shards) or f"decoding failed: {str(e).splitlines()[0]}") from None
        k = min(len(shapes), left[p])  # drop the range's padding
        left[p] -= k
        yield torch.from_dlpack(images.as_tensor())[:k], np.asarray(shapes.as_tensor())[:k].astype(np.int64)


def start_sums(x: torch.Tensor, shapes: np.ndarray, ordinal: int) -> tuple:
    """Launch a batch's sums; on CUDA they come back through pinned memory, with an event to
    wait on later (the batch's pixels are held until then, as DALI reuses its buffers)."""
    sums, event = torch.cat(image_sums(x), 1), None
    if sums.is_cuda:
        host = torch.empty(sums.shape, dtype=sums.dtype, pin_memory=True)
        host.copy_(sums, non_blocking=True)
        sums, event = host, torch.cuda.Event()
        event.record()
    return event, sums, x, shapes, ordinal


def add_sums(groups: np.ndarray, event, sums, _pixels, shapes: np.ndarray, start: int) -> None:
    """A batch's per-image sums into the jackknife groups (image ordinal mod GROUPS), exactly."""
    if event is not None:
        event.synchronize()
    s = sums.numpy()  # (k, 9): r g b, rr gg bb, rg gb br
    k = len(s)
    prods = s[:, 3:4], s[:, 6:7], s[:, 8:9], s[:, 4:5], s[:, 7:8], s[:, 5:6]  # rr rg rb gg gb bb
    rows = np.concatenate([np.ones((k, 1), np.int64), shapes[:, :1] * shapes[:, 1:2], s[:, :3], *prods], axis=1)
    batch = np.zeros((GROUPS, ROW), np.int64)  # within a batch int64 cannot overflow
    np.add.at(batch, (start + np.arange(k)) % GROUPS, rows)
    groups[...] += batch.astype(object)


def accumulate(shards: list[dict], device: str, workers: int, batch_size: int,
               in_flight: int = IN_FLIGHT, pipelines: int = 1, device_id: int = 0) -> tuple[np.ndarray, float]:
    """The streaming pass over every image of `shards`: one exact row of sums per jackknife
    group, as a (GROUPS, ROW) object array, and the time.perf_counter() at which the first
    batch arrived (the end of the start-up). The host waits for a batch's sums only
    `in_flight` batches later, so it never stalls the decoder."""
    groups = np.zeros((GROUPS, ROW), dtype=object)
    pending, ordinal, first = collections.deque(), 0, None
    with Bar(total=sum(s["count"] for s in shards), unit="img", desc="pca", smoothing=0.05) as bar:
        for x, shapes in decoded_batches(shards, device, workers, batch_size, pipelines, device_id):
            first = first or time.perf_counter()
            pending.append(start_sums(x, shapes, ordinal))
            if len(pending) > in_flight:
                add_sums(groups, *pending.popleft())
            ordinal += len(x)
            bar.update(len(x))
        while pending:
            add_sums(groups, *pending.popleft())
    return groups, first


def compute(cfg: PCAConfig) -> dict:
    data = Prepared.open(cfg.out, pca=False)
    if not 0 < cfg.fraction <= 1:
        raise UserError(f"--fraction must be in (0, 1], got {cfg.fraction}")
    rt = Runtime.start(cfg.device, distributed=False)
    device = "gpu" if rt.cuda else "cpu"
    shards = choose_shards(data.split(cfg.split), cfg.fraction, cfg.seed)
    check_shards(shards, verify=True, workers=cfg.workers, show=True)
    t0 = time.perf_counter()
    batch_size = cfg.batch_size or (256 if device == "gpu" else 32)
    pipelines = cfg.pipelines or (PIPELINES_GPU if device == "gpu" else 1)
    groups, first = accumulate(shards, device, cfg.workers, batch_size, pipelines=pipelines, device_id=rt.local_rank)
    end = time.perf_counter()
    seconds, startup = end - t0, first - t0
    total = groups.sum(0)
    result = {
        **statistics(total),
        "stderr": jackknife(groups),
        "scale": 255, "eigvec_layout": "columns", "std_ddof": 1,
        "sign_convention": "each eigenvector's largest-magnitude component is positive",
        "pixels": int(total[1]), "images": int(total[0]), "tile": data.tile(cfg.split), "split": cfg.split,
        "fraction": cfg.fraction,
        "shards": [Path(s["tar"]).name for s in shards],
        "decoder": "nvjpeg (DALI mixed)" if device == "gpu" else "libjpeg-turbo (DALI cpu)",
        "sums": {"pixels": str(total[1]), "s": [str(v) for v in total[2:5]],
                 "rr_rg_rb_gg_gb_bb": [str(v) for v in total[5:]]},
        "manifest_sha256": data.identity,
        "seconds": round(seconds, 2), "images_per_second": round(int(total[0]) / seconds, 1),
        # start-up (pipeline build, decoder init, first batch) apart: it does not grow with the data
        "startup_seconds": round(startup, 2),
        # None where fewer than two batches follow the first: too few to time
        "steady_images_per_second": round((int(total[0]) - batch_size) / (end - first), 1)
        if int(total[0]) > 2 * batch_size else None,
    }
    return result


def report(r: dict) -> str:
    """The numbers for people, with fb.resnet.torch's ImageNet values for comparison."""
    se = r["stderr"]
    fmt = lambda v: "[" + ", ".join(f"{x:8.4f}" for x in v) + "]"  # noqa: E731
    eig01 = [v / 255 ** 2 for v in r["eigval"]]
    what = f"JPEGs (tiles of {r['tile']})" if r.get("tile", 1) > 1 else "images"
    lines = [
        f"{r['images']} {what}, {r['pixels']} pixels ({r['split']}, fraction {r['fraction']}) with {r['decoder']} in "
        f"{r['seconds']:.1f} s: " + (f"{r['startup_seconds']:.1f} s start-up (pipelines, decoder, first batch), then "
                                     f"{r['steady_images_per_second']:.0f} images/s" if r["steady_images_per_second"]
                                     else f"{r['images_per_second']:.0f} images/s (too few batches to time apart)"),
        f"mean (0..255)   {fmt(r['mean'])}" + (f"  +- {fmt(se['mean'])}" if se else ""),
        f"std  (0..255)   {fmt(r['std'])}" + (f"  +- {fmt(se['std'])}" if se else ""),
        f"eigval (0..255) {fmt(r['eigval'])}" + (f"  +- {fmt(se['eigval'])}" if se else ""),
        f"eigval / 255^2  {fmt(eig01)}   fb.resnet.torch ImageNet (0..1): {fmt(FB_RESNET_EIGVAL)}",
        "eigvec (columns)                     fb.resnet.torch ImageNet:",
    ]
    for row, ref in zip(r["eigvec"], FB_RESNET_EIGVEC):
        lines.append(f"  {fmt(row)}          {fmt(ref)}")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alexpipe-pca", formatter_class=Help,
                                description="Exact per-channel mean/std and RGB covariance eigenpairs of a "
                                            "prepared split, for normalization and AlexNet's PCA lighting.")
    p.add_argument("out", type=Path, help="the directory alexpipe-prepare wrote")
    p.add_argument("--split", default="train", help="the split to measure")
    p.add_argument("--device", default=None, choices=["cuda", "cpu"],
                   help="decode with nvJPEG on the GPU, or on the CPU (default: cuda if a GPU is visible, else cpu)")
    p.add_argument("--workers", type=int, default=default_workers(), help="DALI threads in all (default: all cores, "
                   "here %(default)s)")
    p.add_argument("--fraction", type=float, default=1.0, help="use a seeded random subset of the shards")
    p.add_argument("--seed", type=int, default=0, help="which shards --fraction picks")
    p.add_argument("--batch-size", type=int, default=None, help="images per batch (default: 256 on GPU, 32 on CPU)")
    p.add_argument("--pipelines", type=int, default=None, help="DALI pipelines decoding side by side "
                   "(default: 4 on GPU, 1 on CPU)")
    p.add_argument("--output", type=Path, default=None, help="where to write the result (default: OUT/pca.json)")
    return p


def parse_args(argv) -> PCAConfig:
    p = parser()
    args = p.parse_args(argv)
    for name in ("workers", "batch_size", "pipelines"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    return PCAConfig(**vars(args))


def _main(argv) -> int:
    cfg = parse_args(argv)
    print_config("alexpipe-pca", cfg)
    result = compute(cfg)
    result["config"] = config_dict(cfg)
    output = cfg.output or cfg.out / "pca.json"
    write_json(output, result)
    print(report(result))
    print(f"wrote {output}")
    return 0


def main(argv=None) -> int:
    return run_main("alexpipe-pca", _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
