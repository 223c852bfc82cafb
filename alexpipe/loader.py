"""The PyTorch side of the loader: DALI graphs (pipeline.py) as iterables of torch batches,
usable from any training loop:

    from alexpipe.loader import train_loader, eval_loader
    for images, labels in train_loader("OUT", batch_size=256):   # one epoch per loop
        ...

On a GPU, start the process with CUDA_DEVICE_MAX_CONNECTIONS=32 in its environment (see
cuda_queues_note).

Epochs are defined, not inferred. Rank r of W reads a range of N*(r+1)//W - N*r//W samples
of the split (for training, of its per-epoch reshuffled order, split further among the rank's
P pipelines; DALI pads every range to the largest, and the iterator drops the padding).
Train: every rank yields the same number of full batches, P * min over all W*P ranges of
size // batch_size, so DDP never waits on a rank with one batch more; the few samples left
over (fewer than W*P*batch_size, different ones each epoch) are not seen that epoch and no
sample is seen twice. Eval: every sample exactly once, the last batch partial, no padding
counted.

State: `state_dict()` (epoch, batch within it, and DALI's own checkpoint of reader
positions and random generators) restores the exact sample order and augmentation, at an
epoch boundary or mid-epoch.

alexpipe-preview (main below) draws a grid of augmented training crops and one ten-crop set.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from nvidia.dali import types

from .pca import check_sums
from .pipeline import eval_pipeline, train_pipeline
from .util import (Help, UserError, check_shards, load_manifest, manifest_sha256, read_json, run_main,
                   split_shards)

DTYPES = {"float16": (types.FLOAT16, torch.float16), "bfloat16": (types.FLOAT16, torch.bfloat16),
          "float32": (types.FLOAT, torch.float32)}  # DALI has no bf16: fp16 out, cast on the device


def load_pca(out: Path) -> dict:
    """OUT/pca.json, refused if it was computed for other shards than OUT's manifest or its
    numbers do not follow from its own sums."""
    path = Path(out) / "pca.json"
    if not path.exists():
        raise UserError(f"{path}: not found (run alexpipe-pca {out})")
    pca = read_json(path, "pca.json")
    if pca.get("manifest_sha256") != manifest_sha256(out):
        raise UserError(f"{path}: computed for other shards than {Path(out) / 'manifest.json'} (rerun alexpipe-pca)")
    check_sums(pca, path)
    return pca


def resolve_device(device: str) -> str:
    if device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if device in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise UserError("device gpu: no CUDA GPU is visible (use --device cpu)")
        return "gpu"
    if device != "cpu":
        raise UserError(f"device must be gpu, cpu or auto, got {device!r}")
    return "cpu"


def rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def parse_labels(padded: torch.Tensor) -> torch.Tensor:
    """(B, k) uint8 ASCII decimals, zero-padded on the right -> (B,) int64, on their device."""
    digits = padded >= 48
    n = digits.sum(1, keepdim=True)
    power = (n - 1 - torch.arange(padded.shape[1], device=padded.device)).clamp(min=0)
    return ((padded.long() - 48) * digits * torch.pow(10, power)).sum(1)


CUDA_QUEUES = 32


def cuda_queues_note() -> str | None:
    """A note when this process runs with fewer than CUDA_QUEUES hardware work queues
    (CUDA_DEVICE_MAX_CONNECTIONS, CUDA's default 8), else None.

    With 8, DALI's streams share queues with the model's and nvJPEG's many small per-image
    steps (bitstream copies, 3-5 us kernels) wait behind the model's kernels: paper AlexNet
    fed by the loader on an H100 ran at 12.7-14.1k images/s with 8 (four processes) and
    16.4-18.0k with 32 (three; bench_train 13.8k vs 16.7k), the model alone at 20.1k either
    way; torchvision's AlexNet showed no difference beyond its run-to-run noise (13.6-19.0k
    either way). The variable must be in the environment when the process starts: set from
    Python after start-up it changed nothing (measured), so it is the launcher's to export,
    not this library's to set."""
    value = os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS")
    if value and value.isdigit() and int(value) >= CUDA_QUEUES:
        return None
    return (f"note: CUDA_DEVICE_MAX_CONNECTIONS={value or 'unset (8)'}; export CUDA_DEVICE_MAX_CONNECTIONS="
            f"{CUDA_QUEUES} before starting for the loader to overlap the model (paper AlexNet on an H100: "
            f"13.8k -> 16.7k images/s)")


PIPELINES_GPU, THREADS_GPU = 4, 4  # per rank on a GPU: more decodes in flight, fewer threads each


def default_pipelines(device: str) -> int:
    """Train pipelines per rank: PIPELINES_GPU on a GPU (see DaliLoader), 1 on the CPU, where
    decoding is compute-bound and a second pipeline would only split the same cores."""
    return PIPELINES_GPU if device == "gpu" else 1


def range_sizes(n: int, world: int) -> list[int]:
    """Samples per rank, as DALI's readers split a dataset: rank r gets [n*r//W, n*(r+1)//W)."""
    return [n * (r + 1) // world - n * r // world for r in range(world)]


@dataclass(frozen=True)
class Layout:
    """Which reader shards a rank's pipelines read, and how big every range is.

    moving (the default): W*P reader shards over the whole split; DALI moves every reader to
    the next shard each epoch. fixed: rank r keeps samples [N*r//W, N*(r+1)//W) for the whole
    run (index files cut to that share) split among its P pipelines, as a per-GPU decoder
    cache needs; the order of its tar shards is still reshuffled every epoch."""
    fixed: bool
    shards: list[dict]  # what this rank's readers open
    ids: list[int]  # reader shard id of each pipeline
    num_shards: int
    mine: list[int]  # samples of each of this rank's pipelines
    pad_to: int  # DALI pads every range of this rank's readers to this many samples
    least: int  # the smallest range of any pipeline of any rank
    world: int
    total: int  # samples in the split


def moving_layout(shards: list[dict], rank: int, world: int, pipelines: int) -> Layout:
    n = sum(s["count"] for s in shards)
    sizes = range_sizes(n, world * pipelines)
    ids = list(range(rank * pipelines, (rank + 1) * pipelines))
    return Layout(False, shards, ids, world * pipelines, [sizes[i] for i in ids], max(sizes), min(sizes), world, n)


def share(shards: list[dict], rank: int, world: int) -> list[tuple[dict, int, int]]:
    """Rank r's fixed share, samples [N*r//W, N*(r+1)//W) of the stored order, as
    (shard, first, end) sample ranges within each shard it touches."""
    n = sum(s["count"] for s in shards)
    lo, hi, start, parts = n * rank // world, n * (rank + 1) // world, 0, []
    for s in shards:
        a, b = max(lo, start), min(hi, start + s["count"])
        if a < b:
            parts.append((s, a - start, b - start))
        start += s["count"]
    return parts


def fixed_layout(shards: list[dict], rank: int, world: int, pipelines: int, tmp: Path) -> Layout:
    """The rank's share as shards; those it takes only part of get index files, written under
    `tmp`, that list only its samples."""
    mine = []
    for s, a, b in share(shards, rank, world):
        if b - a < s["count"]:
            lines = Path(s["idx"]).read_text().splitlines()[1 + a:1 + b]
            idx = tmp / f"{Path(s['idx']).stem}.rank{rank}.idx"
            idx.write_text(f"v1.2 {len(lines)}\n" + "".join(line + "\n" for line in lines))
            s = {**s, "idx": str(idx), "count": b - a}
        mine.append(s)
    n = sum(s["count"] for s in shards)
    sizes = range_sizes(sum(s["count"] for s in mine), pipelines)
    least = min(min(range_sizes(k, pipelines)) for k in range_sizes(n, world))
    return Layout(True, mine, list(range(pipelines)), pipelines, sizes, max(sizes), least, world, n)


class DaliLoader:
    """Iterate DALI pipelines as (images, labels) torch batches, one epoch per iteration.

    images: (B, 3, H, W) or, for ten-crop, (B, 10, 3, H, W), on the pipelines' device, in
    `dtype`, channels_last memory if asked; labels: (B,) int64.

    With `pipelines` P > 1 (training only) the rank's P pipelines read P reader shards (see
    Layout) and batches come from them in turn: each has its own decoder, so P batches decode
    at once and the decoder's per-image steps, which wait behind the model's kernels, overlap.

    With `echo` K > 1 (training only) every pipeline run gives K views of each image (own
    crop, flip and lighting); the P pipelines' batches of one round are pooled, and each
    view's pool is shuffled and cut into P batches, so a batch never holds two views of one
    image and the K views of an image sit in K different batches of the round.
    """

    def __init__(self, make_pipe, layout: Layout, batch_size: int, drop_last: bool, torch_dtype,
                 channels_last: bool, state: dict | None = None, echo: int = 1, seed: int = 0,
                 sources: bool = False):
        pipelines = len(layout.ids)
        if pipelines > 1 and not drop_last:
            raise ValueError("several pipelines per rank need drop_last (every batch full)")
        self.batch_size, self.rank_size, self.echo, self.seed = batch_size, sum(layout.mine), echo, seed
        self.sources = sources  # the pipelines' last output: each sample's "tar:offset:key.jpg"
        # With pad_last_batch DALI pads every reader shard's range to the largest one, then to a
        # whole batch: that is the reader's epoch in every pipeline, and all of it must be consumed.
        self.reader_batches = math.ceil(layout.pad_to / batch_size)
        # train (drop_last): every pipeline of every rank gives the same number of full batches;
        # eval (one pipeline): every sample once, the last batch partial
        self.runs = (pipelines * (layout.least // batch_size) if drop_last
                     else math.ceil(self.rank_size / batch_size))
        if self.runs == 0:
            hint = " (lower the batch size or pass pipelines=1)" if pipelines > 1 else ""
            raise UserError(f"batch size {batch_size} x {layout.world} rank(s) x {pipelines} pipeline(s) is more than "
                            f"the {layout.total} samples{hint}")
        self.length = self.runs * echo
        self.torch_dtype, self.channels_last = torch_dtype, channels_last
        self.epoch, self.batch = (state["epoch"], state["batch"]) if state else (0, 0)
        checkpoints = state["dali"] if state else [None] * pipelines
        if len(checkpoints) != pipelines:
            raise UserError(f"the loader state was written with pipelines={len(checkpoints)}, not pipelines={pipelines}")
        for key, value in (("echo", echo), ("fixed_share", layout.fixed)):
            if state and state[key] != value:
                raise UserError(f"the loader state was written with {key}={state[key]}, not {key}={value}")
        self.fixed_share = layout.fixed
        self.pipes = [make_pipe(i, layout.num_shards, c) for i, c in zip(layout.ids, checkpoints)]
        for pipe in self.pipes:
            pipe.build()

    def __len__(self) -> int:
        return self.length

    def state_dict(self) -> dict:
        if self.echo > 1 and self.batch % (len(self.pipes) * self.echo):
            raise ValueError("with echo, the loader state is exact only between rounds of pipelines x echo batches")
        return {"epoch": self.epoch, "batch": self.batch, "echo": self.echo, "fixed_share": self.fixed_share,
                "dali": [p.checkpoint() for p in self.pipes]}

    def _torch(self, tl, keep: int | None = None) -> torch.Tensor:
        """Zero-copy view of a dense DALI batch. DALI's dynamic executor (the default) keeps
        the buffer alive while torch holds it, and DLPack orders the consumer's CUDA stream
        after DALI's, as DALI's own PyTorch iterator relies on."""
        return torch.from_dlpack(tl.as_tensor())[:keep]

    def _images(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:  # DALI wrote HWC: a permuted view is NCHW in channels_last memory
            x = x.permute(0, 3, 1, 2) if x.dim() == 4 else x.permute(0, 1, 4, 2, 3)
        return x if x.dtype == self.torch_dtype else x.to(self.torch_dtype)

    def __iter__(self):
        yield from (self._single() if self.echo == 1 else self._echoed())
        for pipe in self.pipes:  # the dropped remainder and the padding, to end each reader's epoch
            for _ in range(self.runs // len(self.pipes), self.reader_batches):
                pipe.run()
        self.epoch, self.batch = self.epoch + 1, 0

    @staticmethod
    def _strings(tl, keep: int | None = None) -> list[str]:
        return [bytes(np.asarray(tl[i])).decode() for i in range(len(tl))][:keep]

    def _single(self):
        for b in range(self.batch, self.length):
            outs = self.pipes[b % len(self.pipes)].run()
            keep = min(self.batch_size, self.rank_size - b * self.batch_size)  # eval's last batch: no padding
            batch = (self._images(self._torch(outs[0], keep)), parse_labels(self._torch(outs[1], keep)))
            self.batch = b + 1
            yield (*batch, self._strings(outs[2], keep)) if self.sources else batch

    def _echoed(self):
        per_round, labels_at = len(self.pipes) * self.echo, self.echo
        for r in range(self.batch // per_round, self.length // per_round):
            outs = [pipe.run() for pipe in self.pipes]
            labels = torch.cat([parse_labels(self._torch(o[labels_at])) for o in outs])
            sources = [s for o in outs for s in self._strings(o[labels_at + 1])] if self.sources else None
            gen = torch.Generator(labels.device).manual_seed(hash((self.seed, self.epoch, r)) % 2**62)
            for k in range(self.echo):
                views = torch.cat([self._torch(o[k]) for o in outs])
                order = torch.randperm(len(labels), generator=gen, device=labels.device)
                for part in order.split(self.batch_size):
                    self.batch += 1
                    batch = (self._images(views[part]), labels[part])
                    yield (*batch, [sources[i] for i in part.tolist()]) if self.sources else batch


def _common(out, split, device, rank, world_size, dtype, num_threads, verify, pipelines=1):
    out = Path(out)
    manifest = load_manifest(out)
    pca = load_pca(out)
    shards = split_shards(manifest, out, split)
    if not shards:
        raise UserError(f"{out}: split {split!r} has no samples")
    device = resolve_device(device)
    rank, world = rank_and_world(rank, world_size)
    if dtype not in DTYPES:
        raise UserError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if pipelines < 1:
        raise UserError(f"pipelines must be >= 1, got {pipelines}")
    # per pipeline: THREADS_GPU on a GPU; on the CPU the cores, shared among the pipelines
    threads = num_threads or (THREADS_GPU if device == "gpu" else max(1, len(os.sched_getaffinity(0)) // pipelines))
    # each rank checks its share (present, right size, and with verify its sha256); under
    # torch.distributed every rank raises if any found a problem, so none is left waiting
    problem = None
    try:
        check_shards(shards[rank::world], hash_them=verify, workers=threads, show=rank == 0)
    except UserError as e:
        problem = str(e)
    if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        found = [None] * world
        torch.distributed.all_gather_object(found, problem)
        problem = next((p for p in found if p), None)
    if problem:
        raise UserError(problem)
    kw = dict(num_threads=threads, device_id=torch.cuda.current_device() if device == "gpu" else None)
    return out, pca, shards, device, rank, world, kw


CACHE_RESERVE_GB = 16.0  # GPU memory left to the model, DALI's buffers and the eval loader


def cache_gb_needed(shards: list[dict], rank: int, world: int) -> float:
    """GB of decoded uint8 pixels in rank's share (H*W*3 per image, from prepare's per-shard
    pixel counts; about 262 KB per image where the manifest has none)."""
    total = sum(3 * s.get("pixels", 256 * 341 * s["count"]) * (b - a) / s["count"] for s, a, b in share(shards, rank, world))
    return total * 1.01 / 1e9 + 0.05  # DALI stores images unpadded; a margin for rounding


def plan_cache(cache: str, cache_gb: float | None, needed: float, device: str) -> tuple[float, str]:
    """(GB to cache, a line saying why) for cache auto | gpu | off on this rank's GPU."""
    if cache == "off":
        return 0.0, "decoder cache off"
    if device != "gpu":
        if cache == "gpu":
            raise UserError("cache gpu needs a CUDA GPU (DALI's decoder cache is GPU memory)")
        return 0.0, "decoder cache off (no GPU)"
    free = torch.cuda.mem_get_info()[0] / 1e9
    room = max(0.0, free - CACHE_RESERVE_GB)
    if cache == "auto" and needed > room:
        return 0.0, (f"decoder cache off: this rank's share needs {needed:.1f} GB, {free:.1f} GB of GPU memory "
                     f"is free ({CACHE_RESERVE_GB:g} GB kept for training); --cache gpu --cache-gb N caches part")
    size = min(needed, cache_gb if cache_gb is not None else room)
    part = "all" if size >= needed else f"{100 * size / needed:.0f}%"
    return size, (f"decoder cache: {size:.1f} GB of GPU memory for {part} of this rank's share ({needed:.1f} GB; "
                  f"{free:.1f} GB free); epoch 1 decodes and fills it, later epochs copy from it")


def train_loader(out, batch_size: int = 256, *, split: str = "train", device: str = "auto", rank: int | None = None,
                 world_size: int | None = None, seed: int = 0, dtype: str = "float16", channels_last: bool = True,
                 lighting: float = 0.1, crop: int = 224, num_threads: int | None = None, initial_fill: int = 4096,
                 prefetch: int = 2, hw_decoder_load: float = 1.0, pipelines: int | None = None,
                 cache: str = "off", cache_gb: float | None = None, fixed_share: bool = False, echo: int = 1,
                 verify: bool = True, state: dict | None = None, log=None, sources: bool = False) -> DaliLoader:
    """AlexNet's training stream: random crop, flip, PCA lighting (alpha ~ N(0, lighting)),
    normalization with OUT/pca.json's mean and std; `pipelines` DALI pipelines per rank
    (see DaliLoader; default: default_pipelines), each with `num_threads` threads.

    cache: "gpu" keeps decoded images in GPU memory (at most `cache_gb`, default: the rank's
    share or what is free), "auto" does so only if the whole share fits, "off" never; any
    cache implies `fixed_share` (see Layout). echo K: K views of every decoded image per epoch
    (see DaliLoader). `log` (print, say) gets the line on the cache decision. With `sources`,
    batches are (images, labels, sources): each sample's "tar:offset:key.jpg"."""
    device = resolve_device(device)
    pipelines = pipelines if pipelines is not None else default_pipelines(device)
    if echo < 1:
        raise UserError(f"echo must be >= 1, got {echo}")
    if cache not in ("off", "gpu", "auto"):
        raise UserError(f"cache must be off, gpu or auto, got {cache!r}")
    out, pca, shards, device, rank, world, kw = _common(out, split, device, rank, world_size, dtype,
                                                        num_threads, verify, pipelines)
    cache_gb_used, note = plan_cache(cache, cache_gb, cache_gb_needed(shards, rank, world), device)
    if log and cache != "off":
        log(note)
    tmp = None
    if fixed_share or (cache != "off" and device == "gpu"):  # by the setting, not the fit: resume sees the same
        tmp = tempfile.TemporaryDirectory(prefix="alexpipe-share-")
        layout = fixed_layout(shards, rank, world, pipelines, Path(tmp.name))
    else:
        layout = moving_layout(shards, rank, world, pipelines)

    def make(shard_id, num_shards, checkpoint):
        return train_pipeline(layout.shards, device, shard_id, num_shards, pca["mean"], pca["std"], pca["eigval"],
                              pca["eigvec"], lighting=lighting, crop=crop, dtype=DTYPES[dtype][0],
                              layout="HWC" if channels_last else "CHW", initial_fill=initial_fill,
                              shuffle_seed=seed, hw_decoder_load=hw_decoder_load, cache_mb=math.ceil(cache_gb_used * 1e9 / 2**20),
                              echo=echo, with_sources=sources, batch_size=batch_size, seed=seed * 100_003 + shard_id,
                              prefetch_queue_depth=prefetch, checkpoint=checkpoint, **kw)

    loader = DaliLoader(make, layout, batch_size, True, DTYPES[dtype][1], channels_last, state, echo, seed, sources)
    loader.share_dir, loader.cache_gb = tmp, cache_gb_used  # the cut index files live as long as the loader
    return loader


def eval_loader(out, batch_size: int = 256, *, split: str = "val", ten_crop: bool = False, full_image: bool = False,
                device: str = "auto", rank: int | None = None, world_size: int | None = None, dtype: str = "float16",
                channels_last: bool = True, crop: int = 224, num_threads: int | None = None, prefetch: int = 2,
                verify: bool = True, normalize: dict | None = None, sources: bool = False) -> DaliLoader:
    """Center-crop (or ten-crop) evaluation stream; each rank yields its own samples once.
    `normalize` ({"mean", "std"} on 0..255) overrides pca.json's, for weights trained with
    other statistics (torchvision's); `sources` as in train_loader."""
    out, pca, shards, device, rank, world, kw = _common(out, split, device, rank, world_size, dtype,
                                                        num_threads, verify)
    norm = normalize or pca

    def make(shard_id, num_shards, checkpoint):
        return eval_pipeline(shards, device, shard_id, num_shards, norm["mean"], norm["std"], crop=crop,
                             dtype=DTYPES[dtype][0], layout="HWC" if channels_last else "CHW", ten_crop=ten_crop,
                             full_image=full_image, with_sources=sources, batch_size=batch_size,
                             prefetch_queue_depth=prefetch, checkpoint=checkpoint, **kw)

    layout = moving_layout(shards, rank, world, 1)
    return DaliLoader(make, layout, batch_size, False, DTYPES[dtype][1], channels_last, sources=sources)


# ---------------------------------------------------------------------------- preview

def denormalize(x: torch.Tensor, pca: dict) -> np.ndarray:
    """(..., 3, H, W) normalized -> (..., H, W, 3) uint8 with the dataset mean, so the
    lighting shift stays visible."""
    x = x.float().cpu() * torch.tensor(pca["std"]).view(3, 1, 1) + torch.tensor(pca["mean"]).view(3, 1, 1)
    return x.clamp(0, 255).round().byte().movedim(-3, -1).numpy()


def preview(out: Path, png: Path, n: int, seed: int, device: str) -> None:
    from PIL import Image
    pca = load_pca(out)
    train = train_loader(out, batch_size=n, device=device, seed=seed, dtype="float32", channels_last=False,
                         pipelines=1)  # one batch is all it shows
    images, _ = next(iter(train))
    split = "val" if "val" in load_manifest(out)["splits"] else "train"
    ten = eval_loader(out, batch_size=1, split=split, ten_crop=True, device=device, dtype="float32",
                      channels_last=False)
    crops, _ = next(iter(ten))
    tiles = list(denormalize(images, pca)) + list(denormalize(crops[0], pca))
    cols, size, gap = 8, tiles[0].shape[0], 4
    rows = math.ceil(n / cols) + math.ceil(10 / cols)
    grid = Image.new("RGB", (cols * (size + gap), rows * (size + gap)), (255, 255, 255))
    for i, t in enumerate(tiles[:n]):
        grid.paste(Image.fromarray(t), ((i % cols) * (size + gap), (i // cols) * (size + gap)))
    top = math.ceil(n / cols)
    for i, t in enumerate(tiles[n:]):
        grid.paste(Image.fromarray(t), ((i % cols) * (size + gap), (top + i // cols) * (size + gap)))
    grid.save(png)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alexpipe-preview", formatter_class=Help,
                                description="Save what the network sees: a grid of augmented training crops (random "
                                            "crop, flip, PCA lighting), then one image's ten crops, de-normalized.")
    p.add_argument("out", type=Path, help="prepared directory with pca.json")
    p.add_argument("--png", type=Path, required=True, help="where to write the image (required)")
    p.add_argument("--n", type=int, default=16, help="training crops to show")
    p.add_argument("--seed", type=int, default=0, help="the crops drawn")
    p.add_argument("--device", default="auto", choices=["auto", "gpu", "cpu"], help="auto: gpu if one is visible")
    return p


def _main(argv) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.n < 1:
        raise UserError(f"--n must be >= 1, got {args.n}")
    preview(args.out, args.png, args.n, args.seed, args.device)
    print(f"wrote {args.png}")
    return 0


def main(argv=None) -> int:
    return run_main("alexpipe-preview", _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
