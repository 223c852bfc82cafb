"""Where and how a process runs, resolved once at its entry point: device, rank and world,
precision; and the collectives every stage uses. Launch several processes with torchrun (one
per GPU, or CPU processes with gloo); a plain `python -m alexpipe.train` is a world of one.
Multi-node works through torchrun's own rendezvous (--nnodes, --rdzv-endpoint).

Vocabulary: a device is "cuda" or "cpu" (None: cuda if a GPU is visible); a precision is
"bf16", "fp16" or "fp32" (None: bf16 on cuda, fp32 on cpu).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .util import UserError

DEVICES, PRECISIONS = ("cuda", "cpu"), ("bf16", "fp16", "fp32")
AMP = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: str
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    channels_last: bool = True

    @classmethod
    def start(cls, device: str | None = None, precision: str | None = None, *, channels_last: bool | None = None,
              distributed: bool = True) -> Runtime:
        """Resolve the words, and with `distributed` join torchrun's process group (NCCL for
        cuda, gloo for cpu) when its environment says there are several ranks. A process group
        that already exists (a user's own DDP script) decides rank and world either way."""
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device not in DEVICES:
            raise UserError(f"device must be cuda or cpu, got {device!r}")
        precision = precision or ("bf16" if device == "cuda" else "fp32")
        if precision not in PRECISIONS:
            raise UserError(f"precision must be bf16, fp16 or fp32, got {precision!r}")
        if device == "cuda" and not torch.cuda.is_available():
            raise UserError("device cuda: no CUDA GPU is visible (use --device cpu)")
        rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1),
                                                                      ("LOCAL_RANK", 0)))
        if dist.is_initialized():
            rank, world = dist.get_rank(), dist.get_world_size()
        if device == "cuda":
            if local >= torch.cuda.device_count():
                raise UserError(f"local rank {local} but only {torch.cuda.device_count()} GPU(s) visible "
                                f"(--nproc_per_node is more than the GPUs)")
            torch.cuda.set_device(local)
        dev = torch.device("cuda", local) if device == "cuda" else torch.device("cpu")
        if distributed and world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device == "cuda" else "gloo", device_id=dev if device == "cuda" else None)
        elif not dist.is_initialized() and not distributed:
            rank, world = 0, 1
        cl = (device == "cuda") if channels_last is None else channels_last
        return cls(dev, precision, rank, world, local, cl)

    def as_rank(self, rank: int, world: int) -> Runtime:
        """The same device and precision as rank `rank` of `world` (loaders for one rank, in tests)."""
        return Runtime(self.device, self.precision, rank, world, self.local_rank, self.channels_last)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """The autocast dtype; None runs in float32."""
        return AMP[self.precision]

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    @contextlib.contextmanager
    def model_stream(self):
        """Run the block's CUDA work on a new highest-priority stream (yielded; on the CPU None,
        and nothing changes): the GPU then runs the model's kernels before the loader's wherever
        both are ready. The block starts after what was queued on the current stream and what
        follows it waits for the block; inside, using a DALI batch waits for DALI's stream
        through DLPack (docs/benchmarks.md, 0.2.3)."""
        if not self.cuda:
            yield None
            return
        before, stream = torch.cuda.current_stream(self.device), priority_stream(self.device)
        stream.wait_stream(before)
        try:
            with torch.cuda.stream(stream):
                yield stream
        finally:
            before.wait_stream(stream)


def priority_stream(device: torch.device) -> torch.cuda.Stream:
    """A new CUDA stream of the highest priority on `device`."""
    return torch.cuda.Stream(device, priority=torch.cuda.Stream.priority_range()[1])  # lower: sooner


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place (gloo reduces CPU tensors, NCCL device tensors)."""
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Rank 0's `obj` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
