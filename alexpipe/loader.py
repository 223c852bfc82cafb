"""The PyTorch side of the loader: DALI graphs (pipeline.py) as iterables of torch batches,
usable from any training loop:

    from alexpipe import LoaderOptions, train_loader, eval_loader
    for images, labels in train_loader("OUT", LoaderOptions(batch_size=256)):   # one epoch per loop
        ...

On a GPU, start the process with CUDA_DEVICE_MAX_CONNECTIONS=32 in its environment (see
cuda_queues_note). Where the batches go (device, dtype, memory format, rank of how many) is a
runtime.Runtime; how they are made, a LoaderOptions.

Epochs are defined, not inferred. Rank r of W reads a range of N*(r+1)//W - N*r//W samples
(see Layout), split further among the rank's P pipelines; DALI pads every range to the
largest, and the iterator drops the padding. Train: every rank yields the same number of full
batches, P * min over all ranges of size // batch_size, so DDP never waits on a rank with one
batch more; the few samples left over (fewer than W*P*batch_size, different ones each epoch)
are not seen that epoch and no sample is seen twice. Eval: every sample exactly once, the
last batch partial, no padding counted.

State: `state_dict()` (epoch, batch within it, and DALI's own checkpoint of reader positions
and random generators) restores the exact sample order and augmentation, at an epoch boundary
or mid-epoch (with echo, between rounds of pipelines x echo batches).

alexpipe-preview (main below) draws a grid of augmented training crops and one ten-crop set.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import queue
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from nvidia.dali import types

from .dataset import Prepared, check_over_ranks
from .pipeline import eval_pipeline, train_pipeline
from .runtime import Runtime
from .util import Help, UserError, default_workers, run_main, save_png

# DALI has no bf16: fp16 out, cast on the device
DTYPES = {"bf16": (types.FLOAT16, torch.bfloat16), "fp16": (types.FLOAT16, torch.float16),
          "fp32": (types.FLOAT, torch.float32)}
PIPELINES_GPU, THREADS_GPU = 4, 4  # per rank on a GPU: more decodes in flight, fewer threads each
# tiles: one pipeline alone makes 50-75k images/s, and fewer decodes in flight slow the model less
PIPELINES_TILES_GPU = 1


def default_pipelines(cuda: bool, tile: int = 1) -> int:
    """Train pipelines per rank: on a GPU PIPELINES_GPU, or PIPELINES_TILES_GPU for a tiled
    split (docs/benchmarks.md, "0.2.6"); 1 on the CPU, where decoding is compute-bound."""
    if not cuda:
        return 1
    return PIPELINES_GPU if tile == 1 else PIPELINES_TILES_GPU


@dataclass(frozen=True, kw_only=True)
class LoaderOptions:
    """How a loader makes its batches. Evaluation uses batch_size, threads, prefetch, verify,
    sources, crop and mmap; training all of them."""
    batch_size: int = 256  # per rank
    threads: int | None = None  # DALI threads per pipeline; default: THREADS_GPU on a GPU, cores / pipelines on CPU
    prefetch: int = 2
    verify: bool = True  # sha256 of every shard first (else only their sizes)
    sources: bool = False  # batches are (images, labels, ["tar:offset:key.jpg", ...])
    pipelines: int | None = None  # per rank; default: default_pipelines (4 on a GPU, 1 for tiles or on the CPU)
    hw_decoder_load: float = 1.0  # share of each batch on the GPU's JPEG engines (no SMs; one decoder's pixels)
    seed: int = 0
    lighting: float = 0.1  # std of the PCA lighting alpha
    crop: int = 224
    initial_fill: int = 4096  # shuffle buffer
    echo: int = 1  # views of each decoded image per epoch (see DaliLoader)
    cache: str = "off"  # decoded images in GPU memory: off | gpu | auto (gpu if the rank's share fits)
    cache_gb: float | None = None  # default: the rank's share, or what is free less CACHE_RESERVE_GB
    fixed_share: bool = False  # each rank keeps one share of the samples (implied by a cache; see Layout)
    mmap: bool = True  # map the shards (their pages count in RSS) or read them (RSS stays flat; see read_shards)
    handover: bool | None = None  # batches made on a thread of their own (see handed_over); default: on a GPU

    def check(self) -> None:
        for name in ("batch_size", "prefetch", "echo", "initial_fill", "crop"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("threads", "pipelines"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.cache not in ("off", "gpu", "auto"):
            raise UserError(f"cache must be off, gpu or auto, got {self.cache!r}")

    def resolved(self, rt: Runtime, train: bool, tile: int = 1) -> LoaderOptions:
        """The defaults that depend on the device and the split's tile filled in; evaluation reads
        every sample once, in one pipeline, so the training-only options are reset for it."""
        pipelines = (self.pipelines or default_pipelines(rt.cuda, tile)) if train else 1
        threads = self.threads or (THREADS_GPU if rt.cuda else max(1, default_workers() // pipelines))
        if not train:
            return dataclasses.replace(self, pipelines=1, threads=threads, echo=1, cache="off", fixed_share=False,
                                       handover=False)
        # the handover measured to pay on a GPU, from a cache and while decoding (docs/benchmarks.md, 0.2.5)
        handover = rt.cuda if self.handover is None else self.handover
        return dataclasses.replace(self, pipelines=pipelines, threads=threads, handover=handover)


def parse_labels(padded: torch.Tensor, fields: int = 1) -> torch.Tensor:
    """(B, k) uint8 ASCII decimals, `fields` of them separated by spaces, zero-padded on the
    right -> (B,) int64 (fields 1) or (B, fields), on their device."""
    digits, field = padded >= 48, torch.cumsum(padded == 32, 1)  # which number each byte is in
    out = []
    for f in range(fields):
        mine = digits & (field == f)
        power = mine.sum(1, keepdim=True) - torch.cumsum(mine, 1)  # digits after this one in its number
        out.append(((padded.long() - 48) * mine * torch.pow(10, power.clamp(min=0))).sum(1))
    return out[0] if fields == 1 else torch.stack(out, 1)


CUDA_QUEUES = 32


def cuda_queues_note() -> str | None:
    """A note when this process runs with fewer than CUDA_QUEUES hardware work queues
    (CUDA_DEVICE_MAX_CONNECTIONS; CUDA's default is 8), else None. With 8, DALI's streams share
    queues with the model's and the decoder's small steps wait behind its kernels. The variable
    must be in the environment when the process starts (set from Python later, it changes
    nothing), so it is the launcher's to export, not this library's to set."""
    value = os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS")
    if value and value.isdigit() and int(value) >= CUDA_QUEUES:
        return None
    return (f"note: CUDA_DEVICE_MAX_CONNECTIONS={value or 'unset (8)'}; export CUDA_DEVICE_MAX_CONNECTIONS="
            f"{CUDA_QUEUES} before starting, so that the loader's CUDA streams overlap the model's")


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

    images: (B, 3, H, W) or, for ten-crop, (B, 10, 3, H, W), on the runtime's device, in its
    precision's dtype, channels_last memory if it says so; labels: (B,) int64.

    With P pipelines per rank (training) the P pipelines read P reader shards (see Layout)
    and batches come from them in turn: each has its own decoder, so P batches decode at once.

    With echo K > 1 (training) every pipeline run gives K views of each image (own crop, flip
    and lighting); the P pipelines' batches of one round are pooled, and each view's pool is
    shuffled and cut into P batches, so a batch never holds two views of one image and the K
    views of an image sit in K different batches of the round. Tiles of T images (prepare
    --tile) are read alike: T x K views a sample, each batch `batch_size` views, so a
    pipeline run makes T x K batches.

    With options.handover, DALI's run(), the labels and the cast happen on a thread of their
    own (handed_over), `prefetch` batches ahead, and state_dict() gives the state after the
    last batch handed out: the pipelines' checkpoints are taken as each run returns. An epoch
    left mid-way (the thread having run ahead) then goes on only in a new loader from that state.
    """

    def __init__(self, make_pipe, layout: Layout, options: LoaderOptions, rt: Runtime, *, train: bool,
                 state: dict | None = None, tile: int = 1):
        pipelines, b = len(layout.ids), options.batch_size
        self.options, self.batch_size, self.rank_size = options, b, sum(layout.mine)
        self.echo, self.tile, self.fixed_share = options.echo, tile, layout.fixed
        self.views = self.echo * tile  # views of each sample
        self.torch_dtype, self.channels_last, self.device = DTYPES[rt.precision][1], rt.channels_last, rt.device
        self.handover = bool(options.handover)
        # with handover: checkpoints per pipeline, the state handed out last, the epoch's handed_over
        self._checkpoints, self._handed, self._active = None, None, None
        # With pad_last_batch DALI pads every reader shard's range to the largest one, then to a
        # whole batch: that is the reader's epoch in every pipeline, and all of it must be consumed.
        self.reader_batches = math.ceil(layout.pad_to / b)
        # train: every pipeline of every rank gives the same number of full batches;
        # eval (one pipeline): every sample once, the last batch partial
        self.runs = pipelines * (layout.least // b) if train else math.ceil(self.rank_size / b)
        if not train and layout.total < layout.world:  # global numbers: every rank refuses alike
            raise UserError(f"{layout.total} samples are fewer than the {layout.world} ranks")
        if self.runs == 0:
            hint = " (lower the batch size or pass pipelines=1)" if pipelines > 1 else ""
            raise UserError(f"batch size {b} x {layout.world} rank(s) x {pipelines} pipeline(s) is more than "
                            f"the {layout.total} samples{hint}")
        self.length = self.runs * self.views
        self.epoch, self.batch = (state["epoch"], state["batch"]) if state else (0, 0)
        self._check_state(state, pipelines)
        self.pipes = [make_pipe(i, layout.num_shards, c)
                      for i, c in zip(layout.ids, state["dali"] if state else [None] * pipelines)]
        for pipe in self.pipes:
            pipe.build()

    def _check_state(self, state: dict | None, pipelines: int) -> None:
        if not state:
            return
        written = {"pipelines": len(state["dali"]), "echo": state.get("echo", 1),
                   "fixed_share": state.get("fixed_share", False)}  # (states of 0.1.0 had neither)
        for key, value in (("pipelines", pipelines), ("echo", self.echo), ("fixed_share", self.fixed_share)):
            if written[key] != value:
                what = " (a decoder cache implies a fixed share: the same --cache)" if key == "fixed_share" else ""
                raise UserError(f"the loader state was written with {key}={written[key]}, not {key}={value}{what}")

    def __len__(self) -> int:
        return self.length

    def state_dict(self) -> dict:
        state = self._handed or self._state()
        if self.views > 1 and state["batch"] % (len(self.pipes) * self.views):
            raise ValueError("with echo or tiles, the loader state is exact only between rounds of pipelines x "
                             "views batches")
        return state

    def _state(self) -> dict:
        dali = list(self._checkpoints) if self._checkpoints else [p.checkpoint() for p in self.pipes]
        return {"epoch": self.epoch, "batch": self.batch, "echo": self.echo, "fixed_share": self.fixed_share,
                "dali": dali}

    def _run(self, i: int):
        outs = self.pipes[i].run()
        if self._checkpoints:  # a handover thread runs ahead: keep the state that goes with this run
            # (one checkpoint a run, rather than every pipeline's with every batch)
            self._checkpoints[i] = self.pipes[i].checkpoint()
        return outs

    @staticmethod
    def _torch(tl, keep: int | None = None) -> torch.Tensor:
        """Zero-copy view of a dense DALI batch. DALI's dynamic executor (the default) keeps
        the buffer alive while torch holds it, and DLPack orders the consumer's CUDA stream
        after DALI's, as DALI's own PyTorch iterator relies on."""
        return torch.from_dlpack(tl.as_tensor())[:keep]

    @staticmethod
    def _strings(tl, keep: int | None = None) -> list[str]:
        return [bytes(np.asarray(tl[i])).decode() for i in range(len(tl))][:keep]

    def _images(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:  # DALI wrote HWC: a permuted view is NCHW in channels_last memory
            x = x.permute(0, 3, 1, 2) if x.dim() == 4 else x.permute(0, 1, 4, 2, 3)
        # handed over, a batch is torch's memory (DALI's own is released on the making thread's stream)
        return x if x.dtype == self.torch_dtype and not self.handover else x.to(self.torch_dtype, copy=True)

    def __iter__(self):
        if not self.handover:
            yield from self._epoch()
            return
        if self._active:  # an epoch left unfinished: its thread stops (having ended the epoch, or not)
            self._active.close()
        if self._handed and (self._handed["batch"], self.epoch) != (self.length, self._handed["epoch"] + 1):
            raise ValueError("this loader's epoch was left mid-way while its handover thread ran ahead: "
                             "continue from its state_dict() in a new loader")
        self._handed, self._checkpoints = None, [p.checkpoint() for p in self.pipes]
        self._active = batches = handed_over(self._epoch(states=True), self.device, depth=self.options.prefetch)
        try:
            for batch, state in batches:
                self._handed = state
                yield batch
            self._handed = None  # the epoch is over: the pipelines stand where the state says
        finally:
            batches.close()  # the thread has stopped before the checkpoints are let go
            if self._active is batches:  # (a later epoch may have started since)
                self._active, self._checkpoints = None, None

    def _epoch(self, states: bool = False):
        """One epoch's batches (with `states`, each with the loader's state after it)."""
        for batch in self._single() if self.views == 1 else self._echoed():
            yield (batch, self._state()) if states else batch
        for i in range(len(self.pipes)):  # the dropped remainder and the padding, to end each reader's epoch
            for _ in range(self.runs // len(self.pipes), self.reader_batches):
                self._run(i)
        self.epoch, self.batch = self.epoch + 1, 0

    def _single(self):
        for b in range(self.batch, self.length):
            outs = self._run(b % len(self.pipes))
            keep = min(self.batch_size, self.rank_size - b * self.batch_size)  # eval's last batch: no padding
            batch = (self._images(self._torch(outs[0], keep)), parse_labels(self._torch(outs[1], keep)))
            self.batch = b + 1
            yield (*batch, self._strings(outs[2], keep)) if self.options.sources else batch

    def _echoed(self):
        per_round, labels_at = len(self.pipes) * self.views, self.views
        for r in range(self.batch // per_round, self.length // per_round):
            outs = [self._run(i) for i in range(len(self.pipes))]
            labels = torch.cat([parse_labels(self._torch(o[labels_at]), self.tile) for o in outs])
            sources = [s for o in outs for s in self._strings(o[labels_at + 1])] if self.options.sources else None
            gen = torch.Generator(labels.device).manual_seed(hash((self.options.seed, self.epoch, r)) % 2**62)
            for k in range(self.views):
                views = torch.cat([self._torch(o[k]) for o in outs])
                of_view = labels if self.tile == 1 else labels[:, k // self.echo]  # view k is in square k // echo
                order = torch.randperm(len(labels), generator=gen, device=labels.device)
                for part in order.split(self.batch_size):
                    self.batch += 1
                    batch = (self._images(views[part]), of_view[part])
                    yield (*batch, [sources[i] for i in part.tolist()]) if self.options.sources else batch


_END = object()


def handed_over(items, device: torch.device, depth: int):
    """`items` ((batch, state) pairs) made on a thread of their own (`depth` queued, one more
    waiting to be, one being made), so that the training thread only issues the model's work:
    beside a decoder cache, DALI's run() and the batch's own kernels on the training thread cost
    ~5% of a torchvision AlexNet step, and while decoding more (docs/benchmarks.md, 0.2.4 and
    0.2.5). On a GPU the thread makes them on a CUDA stream of its own and each batch is handed
    over ordered before the consumer's current stream; an error there is raised here. Stopping
    early stops the thread."""
    q, stop = queue.Queue(depth), threading.Event()
    side = torch.cuda.Stream(device) if device.type == "cuda" else None

    def put(item) -> bool:
        while not stop.is_set():
            with contextlib.suppress(queue.Full):
                q.put(item, timeout=0.1)
                return True
        return False

    def work():
        try:
            # (torch.cuda.stream(None) would start CUDA on a machine with a GPU even for a CPU loader)
            with (torch.cuda.device(device) if side else contextlib.nullcontext(),
                  torch.cuda.stream(side) if side else contextlib.nullcontext()):
                for batch, state in items:
                    done = side.record_event() if side else None
                    if not put((batch, state, done)):
                        return
            put(_END)
        except BaseException as e:  # noqa: BLE001 - the consumer raises it
            put(e)

    thread = threading.Thread(target=work, name="alexpipe-handover", daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            batch, state, done = item
            if done is not None:
                here = torch.cuda.current_stream(device)
                here.wait_event(done)
                for t in batch:
                    if isinstance(t, torch.Tensor):
                        t.record_stream(here)  # the allocator keeps it until this stream is done with it
            yield batch, state
    finally:
        stop.set()
        while thread.is_alive():
            with contextlib.suppress(queue.Empty):
                q.get_nowait()
            thread.join(0.01)


CACHE_RESERVE_GB = 16.0  # GPU memory left to the model, DALI's buffers and the eval loader


def cache_gb_needed(shards: list[dict], rank: int, world: int) -> float:
    """GB of decoded uint8 pixels in rank's share (H*W*3 per image, from prepare's per-shard
    pixel counts; about 262 KB per image where the manifest has none)."""
    total = sum(3 * s.get("pixels", 256 * 341 * s["count"]) * (b - a) / s["count"]
                for s, a, b in share(shards, rank, world))
    return total * 1.01 / 1e9 + 0.05  # DALI stores images unpadded; a margin for rounding


def plan_cache(options: LoaderOptions, needed: float, rt: Runtime) -> tuple[float, str]:
    """(GB to cache, a line saying why) for cache auto | gpu | off on this rank's GPU."""
    if options.cache == "off":
        return 0.0, "decoder cache off"
    if not rt.cuda:
        if options.cache == "gpu":
            raise UserError("cache gpu needs a CUDA GPU (DALI's decoder cache is GPU memory); use cache auto or off")
        return 0.0, "decoder cache off (no GPU)"
    free = torch.cuda.mem_get_info()[0] / 1e9
    room = max(0.0, free - CACHE_RESERVE_GB)
    if options.cache == "auto" and needed > room:
        return 0.0, (f"decoder cache off: this rank's share needs {needed:.1f} GB, {free:.1f} GB of GPU memory "
                     f"is free ({CACHE_RESERVE_GB:g} GB kept for training); --cache gpu --cache-gb N caches part")
    size = min(needed, options.cache_gb if options.cache_gb is not None else room)
    if size <= 0:
        return 0.0, (f"decoder cache off: {free:.1f} GB of GPU memory is free and {CACHE_RESERVE_GB:g} GB is kept "
                     f"for training; --cache-gb N caches part anyway")
    part = "all" if size >= needed else f"{100 * size / needed:.0f}%"
    return size, (f"decoder cache: {size:.1f} GB of GPU memory for {part} of this rank's share ({needed:.1f} GB; "
                  f"{free:.1f} GB free); epoch 1 decodes and fills it, later epochs copy from it")


def open_split(data, rt: Runtime | None, options: LoaderOptions | None, split: str, train: bool):
    """The pieces both loaders start from: the dataset, runtime, options with their defaults,
    and the split's shards, checked (sizes, and sha256 with options.verify) over all ranks."""
    data = data if isinstance(data, Prepared) else Prepared.open(data)
    rt = rt or Runtime.start(distributed=False)
    options = options or LoaderOptions()
    options.check()
    options = options.resolved(rt, train, data.tile(split))
    shards = data.split(split)
    check_over_ranks(shards, verify=options.verify, workers=options.threads, rank=rt.rank, world=rt.world)
    return data, rt, options, shards


def train_loader(data, options: LoaderOptions | None = None, *, runtime: Runtime | None = None,
                 split: str = "train", state: dict | None = None, log=None) -> DaliLoader:
    """AlexNet's training stream of `data` (a Prepared, or OUT): random crop, flip, PCA
    lighting, normalization with its pca.json's mean and std. `runtime`: where batches go
    (default: this process's device, rank and world); `state`: a state_dict() to resume from;
    `log` (print, say) gets the line on the decoder cache."""
    data, rt, o, shards = open_split(data, runtime, options, split, train=True)
    cache_gb, note = plan_cache(o, cache_gb_needed(shards, rt.rank, rt.world), rt)
    if log and o.cache != "off":
        log(note)
    tmp = None
    if o.fixed_share or (o.cache != "off" and rt.cuda):  # by the setting, not the fit: a resume gets the same
        tmp = tempfile.TemporaryDirectory(prefix="alexpipe-share-")
        layout = fixed_layout(shards, rt.rank, rt.world, o.pipelines, Path(tmp.name))
    else:
        layout = moving_layout(shards, rt.rank, rt.world, o.pipelines)
    pca, tile = data.pca, data.tile(split)

    def make(shard_id, num_shards, checkpoint):
        return train_pipeline(layout.shards, "gpu" if rt.cuda else "cpu", shard_id, num_shards, pca["mean"],
                              pca["std"], pca["eigval"], pca["eigvec"], lighting=o.lighting, crop=o.crop,
                              dtype=DTYPES[rt.precision][0], layout="HWC" if rt.channels_last else "CHW",
                              initial_fill=o.initial_fill, shuffle_seed=o.seed, hw_decoder_load=o.hw_decoder_load,
                              cache_mb=math.ceil(cache_gb * 1e9 / 2**20), echo=o.echo, tile=tile,
                              with_sources=o.sources,
                              batch_size=o.batch_size, seed=o.seed * 100_003 + shard_id,
                              prefetch_queue_depth=o.prefetch, checkpoint=checkpoint, num_threads=o.threads,
                              device_id=rt.local_rank if rt.cuda else None, mmap=o.mmap)

    loader = DaliLoader(make, layout, o, rt, train=True, state=state, tile=tile)
    loader.share_dir, loader.cache_gb = tmp, cache_gb  # the cut index files live as long as the loader
    return loader


def eval_loader(data, options: LoaderOptions | None = None, *, runtime: Runtime | None = None, split: str = "val",
                ten_crop: bool = False, full_image: bool = False, normalize: dict | None = None) -> DaliLoader:
    """Center-crop (or the paper's ten-crop) stream of `data`; each rank yields its own samples
    once. `normalize` ({"mean", "std"} on 0..255) overrides pca.json's, for weights trained
    with other statistics (torchvision's)."""
    data, rt, o, shards = open_split(data, runtime, options, split, train=False)
    if data.tile(split) > 1:
        raise UserError(f"{data.out}: split {split!r} holds tiles of {data.tile(split)} images (alexpipe-prepare "
                        f"--tile), and evaluation reads single images: prepare that split without --tile")
    norm = normalize or data.pca

    def make(shard_id, num_shards, checkpoint):
        return eval_pipeline(shards, "gpu" if rt.cuda else "cpu", shard_id, num_shards, norm["mean"], norm["std"],
                             crop=o.crop, dtype=DTYPES[rt.precision][0], layout="HWC" if rt.channels_last else "CHW",
                             ten_crop=ten_crop, full_image=full_image, with_sources=o.sources, batch_size=o.batch_size,
                             prefetch_queue_depth=o.prefetch, checkpoint=checkpoint, num_threads=o.threads,
                             device_id=rt.local_rank if rt.cuda else None, mmap=o.mmap)

    return DaliLoader(make, moving_layout(shards, rt.rank, rt.world, 1), o, rt, train=False)


# ---------------------------------------------------------------------------- preview

def denormalize(x: torch.Tensor, pca: dict) -> np.ndarray:
    """(..., 3, H, W) normalized -> (..., H, W, 3) uint8 with the dataset mean, so the
    lighting shift stays visible."""
    x = x.float().cpu() * torch.tensor(pca["std"]).view(3, 1, 1) + torch.tensor(pca["mean"]).view(3, 1, 1)
    return x.clamp(0, 255).round().byte().movedim(-3, -1).numpy()


def preview(out: Path, png: Path, n: int, seed: int, device: str | None) -> None:
    from PIL import Image
    data = Prepared.open(out)
    rt = Runtime.start(device, "fp32", channels_last=False, distributed=False)
    images, _ = next(iter(train_loader(data, LoaderOptions(batch_size=n, seed=seed, pipelines=1), runtime=rt)))
    split, ten = "val" if "val" in data.manifest["splits"] else "train", []
    if data.tile(split) == 1:  # (a tiled train split alone: no ten crops to show)
        crops, _ = next(iter(eval_loader(data, LoaderOptions(batch_size=1), runtime=rt, split=split, ten_crop=True)))
        ten = list(denormalize(crops[0], data.pca))
    pictures = list(denormalize(images, data.pca)) + ten
    cols, size, gap = 8, pictures[0].shape[0], 4
    top = math.ceil(n / cols)
    grid = Image.new("RGB", (cols * (size + gap), (top + math.ceil(len(ten) / cols)) * (size + gap)), (255, 255, 255))
    for i, t in enumerate(pictures):
        row, col = (i // cols, i % cols) if i < n else (top + (i - n) // cols, (i - n) % cols)
        grid.paste(Image.fromarray(t), (col * (size + gap), row * (size + gap)))
    save_png(grid, png)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alexpipe-preview", formatter_class=Help,
                                description="Save what the network sees: a grid of augmented training crops (random "
                                            "crop, flip, PCA lighting), then one image's ten crops, de-normalized.")
    p.add_argument("out", type=Path, help="prepared directory with pca.json")
    p.add_argument("--png", type=Path, required=True, help="where to write the image (required)")
    p.add_argument("--n", type=int, default=16, help="training crops to show")
    p.add_argument("--seed", type=int, default=0, help="the crops drawn")
    p.add_argument("--device", default=None, choices=["cuda", "cpu"], help="(default: cuda if a GPU is visible, "
                   "else cpu)")
    return p


def _main(argv) -> int:
    args = parser().parse_args(argv)
    if args.n < 1:
        raise UserError(f"--n must be >= 1, got {args.n}")
    preview(args.out, args.png, args.n, args.seed, args.device)
    print(f"wrote {args.png}")
    return 0


def main(argv=None) -> int:
    return run_main("alexpipe-preview", _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
