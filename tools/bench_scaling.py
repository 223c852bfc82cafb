"""Multi-GPU scaling of AlexNet training: images/s on 1..N GPUs of one host, under torchrun.

    CUDA_DEVICE_MAX_CONNECTIONS=32 python tools/bench_scaling.py [--gpus 1,2,4,8] [--out OUT] ...

(torchrun passes the variable on to every rank; see README, Training.)

The driver (this script without torchrun's environment) prepares shards once (the real
sample, each image --repeat times, with pca.json), then for each N runs
`torchrun --standalone --nproc_per_node N tools/bench_scaling.py --worker ...` and prints,
per arch, global training images/s (a) with the alexpipe loader (each rank its own share
of the shards) and (b) on synthetic GPU-resident tensors, the scaling efficiency
imgs/s(N) / (N x imgs/s(1)), and the loader alone per GPU with N ranks against 1.

Weak scaling, as DDP training runs: a fixed per-rank batch (--batch-size), so the global
batch is N times it. Same model and step as bench_train.py (torch.compile, bf16 autocast,
channels_last, SGD), wrapped in DistributedDataParallel; --hook bf16 also times DDP's
bf16 gradient-compression hook on synthetic data (half the all-reduce bytes), for the
first arch.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from alexpipe.loader import LoaderOptions, train_loader
from alexpipe.runtime import Runtime, barrier, cleanup, gather_objects
from alexpipe.model import alexnet
from alexpipe.train import train_step
from bench_loader import endless
from bench_prepare import DEFAULT_SRC, sample_shards


def timed(step, batches, steps: int, warmup: int, per_rank: int) -> float:
    """Global images/s over `steps` steps on every rank (the slowest rank's time)."""
    for _ in range(warmup):
        step(*next(batches))
    torch.cuda.synchronize()
    barrier()
    t0 = time.perf_counter()
    for _ in range(steps):
        step(*next(batches))
    torch.cuda.synchronize()
    barrier()
    seconds = max(gather_objects(time.perf_counter() - t0))
    return steps * per_rank * int(os.environ.get("WORLD_SIZE", "1")) / seconds


def worker(args) -> None:
    d = Runtime.start("cuda", "bf16")
    b = args.batch_size
    loader = train_loader(args.out, LoaderOptions(batch_size=b, verify=False), runtime=d)
    stream = endless(loader)
    result = {"world": d.world, "gpu": torch.cuda.get_device_name(), "cores": len(os.sched_getaffinity(0))}
    # the loader alone, on every rank at once: images/s per GPU
    result["loader_per_gpu"] = timed(lambda x, y: None, stream, args.steps, 10, b) / d.world
    x = torch.randn(b, 3, 224, 224, device=d.device, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (b,), device=d.device)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    def step_fn(arch: str, hook: bool):
        torch.manual_seed(0)
        model = alexnet(arch).to(d.device, memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4, fused=True)
        ddp = model
        if d.world > 1:
            ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[d.local_rank])
            if hook:
                ddp.register_comm_hook(None, default_hooks.bf16_compress_hook)
        compiled = torch.compile(ddp)
        return lambda images, labels: train_step(compiled, images, labels, opt, 0.01, scaler, torch.bfloat16)

    for i, arch in enumerate(args.archs.split(",")):
        step = step_fn(arch, hook=False)
        result[arch] = {"synthetic": timed(step, itertools.repeat((x, y)), args.steps, 30, b),  # warmup compiles
                        "loader": timed(step, stream, args.steps, 10, b)}
        if args.hook == "bf16" and d.world > 1 and i == 0:  # the first arch only: each costs a compile
            step = step_fn(arch, hook=True)
            result[arch]["synthetic_bf16_hook"] = timed(step, itertools.repeat((x, y)), args.steps, 30, b)
    if d.main:
        Path(args.result).write_text(json.dumps(result))
    cleanup()


def driver(args) -> int:
    if not torch.cuda.is_available():
        sys.exit("bench_scaling: needs CUDA GPUs")
    gpus = [int(n) for n in args.gpus.split(",") if int(n) <= torch.cuda.device_count()]
    if not gpus:
        sys.exit(f"bench_scaling: --gpus {args.gpus}: none fits the {torch.cuda.device_count()} visible GPU(s)")
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or sample_shards(args.src, Path(tmp), args.repeat)
        results = {}
        for n in gpus:
            res = Path(tmp) / f"result{n}.json"
            cmd = ["torchrun", "--standalone", f"--nproc_per_node={n}", __file__, "--worker", "--out", str(out),
                   "--result", str(res), "--archs", args.archs, "--batch-size", str(args.batch_size),
                   "--steps", str(args.steps), "--hook", args.hook]
            print(f"\n$ {' '.join(cmd)}", flush=True)
            subprocess.run(cmd, check=True)
            results[n] = json.loads(res.read_text())
    one = results[gpus[0]]
    print(f"\n{one['gpu']} x {', '.join(map(str, gpus))}; per-rank batch {args.batch_size}, bf16, channels_last, "
          f"torch.compile, DDP; {args.steps} timed steps; efficiency = imgs/s(N) / (N/{gpus[0]} x imgs/s({gpus[0]}))")
    print(f"\n{'GPUs':>4} {'loader/GPU':>11} {'vs ' + str(gpus[0]):>5}", end="")
    archs = args.archs.split(",")
    for arch in archs:
        print(f" | {arch + ' (a) loader':>24} {'eff':>5} {'(b) synthetic':>14} {'eff':>5}", end="")
    print()
    for n, r in results.items():
        k = n / gpus[0]
        print(f"{n:4d} {r['loader_per_gpu']:11.0f} {r['loader_per_gpu'] / one['loader_per_gpu']:5.2f}", end="")
        for arch in archs:
            a, s = r[arch]["loader"], r[arch]["synthetic"]
            print(f" | {a:24.0f} {a / (k * one[arch]['loader']):5.2f} {s:14.0f} "
                  f"{s / (k * one[arch]['synthetic']):5.2f}", end="")
        print()
    for n, r in results.items():
        for arch in archs:
            if "synthetic_bf16_hook" in r[arch]:
                h = r[arch]["synthetic_bf16_hook"]
                print(f"{n} GPUs, {arch}: synthetic with DDP's bf16 gradient compression {h:.0f} images/s "
                      f"(efficiency {h / ((n / gpus[0]) * one[arch]['synthetic']):.2f}; without {r[arch]['synthetic']:.0f})")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", default="1,2,4,8", help="rank counts to run (those above the visible GPUs are skipped)")
    p.add_argument("--archs", default="torchvision,paper")
    p.add_argument("--batch-size", type=int, default=256, help="per rank")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--hook", default="bf16", choices=["none", "bf16"])
    p.add_argument("--out", type=Path, default=None, help="prepared shards with pca.json (default: build them)")
    p.add_argument("--src", type=Path, default=DEFAULT_SRC)
    p.add_argument("--repeat", type=int, default=60)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    return driver(args)


if __name__ == "__main__":
    raise SystemExit(main())
