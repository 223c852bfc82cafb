"""alexpipe-train: AlexNet on prepared shards with the paper's recipe, on one GPU or many.

    alexpipe-train OUT [--arch paper|torchvision] [--epochs 90] [--batch-size 128] [--lr 0.01] ...
    torchrun --nproc_per_node 8 -m alexpipe.train OUT ...          # DDP, one process per GPU

The recipe (Krizhevsky et al. 2012, sec. 5): SGD with momentum 0.9 and weight decay 5e-4
on every weight, batch 128, lr 0.01 divided by 10 when the validation error stops
improving (the paper did so three times in ~90 epochs); `--schedule step` divides every
30 epochs instead. The lr is scaled linearly with the global batch B, for any B (0.01 *
B / 128: 0.0025 at batch 32); above 128 it warms up linearly from 0.01 over 5 epochs
(Goyal et al. 2017); --warmup-epochs sets the length (from 0 when the batch is <= 128).
channels_last memory (--no-channels-last); on CUDA also bf16 autocast, torch.compile and fused
SGD. Data: the DALI train loader
(random crop, flip, PCA lighting from OUT/pca.json) and the center-crop val loader.

Output (rank 0): a progress bar per epoch, a one-line summary per epoch, RUN/config.json,
RUN/metrics.jsonl, RUN/curves.png and RUN/checkpoint.pt (atomic, every epoch: model,
optimizer, schedule, scaler, loader states and RNG states of every rank, config, and the
dataset's identity). --resume continues exactly where the checkpoint left off.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .dataset import Prepared, train_tile
from .eval import evaluate
from .loader import DaliLoader, LoaderOptions, cuda_queues_note, default_pipelines, eval_loader, train_loader
from .model import ARCHS, Checkpoint, alexnet
from .runtime import Runtime, broadcast_object, cleanup, gather_objects
from .util import (Bar, DiskFull, Help, UserError, atomic_write_bytes, config_dict, print_config, save_png,
                   run_main, write_json)

BASE_BATCH = 128


@dataclass
class TrainConfig:
    out: Path
    arch: str = "paper"
    groups: int = 1
    epochs: int = 90
    batch_size: int = BASE_BATCH  # global, over all ranks
    lr: float = 0.01  # for a batch of 128; scaled linearly with the global batch
    momentum: float = 0.9
    weight_decay: float = 5e-4
    dropout: float = 0.5
    schedule: str = "plateau"
    step_epochs: int = 30
    patience: int = 5  # plateau: epochs without a 0.1-point val top-1 improvement before lr /= 10
    warmup_epochs: float | None = None  # default: 5 if the lr is scaled up, else 0
    lighting: float = 0.1
    device: str | None = None  # cuda | cpu; default: cuda if a GPU is visible
    precision: str | None = None  # bf16 | fp16 | fp32; default: bf16 on cuda, fp32 on cpu
    channels_last: bool = True
    compile: bool = True
    seed: int = 0
    workers: int | None = None  # DALI threads per pipeline
    pipelines: int | None = None  # DALI train pipelines per rank; default: 4 on cuda, 1 for tiles or on cpu
    cache: str = "auto"  # decoded images in GPU memory: auto (if the rank's share fits) | gpu | off
    cache_gb: float | None = None
    echo: int = 1  # views of each decoded image per epoch; 1 is the paper's recipe
    mmap: bool = True  # the loaders map the shards (their pages count in RSS) rather than read them
    run_dir: Path | None = None  # default OUT/runs/<arch>
    resume: Path | None = None
    deterministic: bool = False
    log_every: int = 50


@dataclass
class Schedule:
    """The learning rate as a function of (epoch, step): a linear warmup from warmup_from
    to peak_lr, then step or plateau decay. Plain state, saved in checkpoints."""
    warmup_from: float
    peak_lr: float
    kind: str
    steps_per_epoch: int
    warmup_steps: int = 0
    step_epochs: int = 30
    patience: int = 5
    drops: int = 0
    best: float = math.inf
    bad_epochs: int = 0

    def lr(self, epoch: int, step: int) -> float:
        g = epoch * self.steps_per_epoch + step
        if g < self.warmup_steps:
            return self.warmup_from + (self.peak_lr - self.warmup_from) * (g + 1) / self.warmup_steps
        drops = epoch // self.step_epochs if self.kind == "step" else self.drops
        return self.peak_lr * 0.1 ** drops

    def end_epoch(self, val_top1_err: float) -> bool:
        """Plateau bookkeeping after an epoch; True if the lr was just divided by 10."""
        if self.kind != "plateau":
            return False
        if val_top1_err < self.best - 1e-3:
            self.best, self.bad_epochs = val_top1_err, 0
            return False
        self.bad_epochs += 1
        if self.bad_epochs > self.patience:
            self.drops, self.bad_epochs = self.drops + 1, 0
            return True
        return False


class Diverged(UserError):
    pass


def train_step(model, images, labels, optimizer, lr: float, scaler, amp_dtype) -> torch.Tensor:
    """One SGD step; returns the (detached, on-device) loss. No host sync."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    with torch.autocast(images.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        loss = F.cross_entropy(model(images), labels)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


def train_epoch(model, loader, optimizer, schedule: Schedule, scaler, amp_dtype, epoch: int, log_every: int,
                show: bool) -> dict:
    """One epoch; returns mean train loss, images/s and the last lr. The host syncs every
    `log_every` steps only, to check the losses (naming the first non-finite one) and
    update the progress bar."""
    model.train()
    losses, window, n_images = [], [], 0
    bar = Bar(total=len(loader), desc=f"epoch {epoch + 1}", unit="step", disable=not show, leave=False)
    t0 = time.perf_counter()
    lr = schedule.lr(epoch, 0)

    def check(first_step: int):
        values = torch.stack(window).float().cpu()
        bad = torch.nonzero(~torch.isfinite(values)).flatten()
        # every rank stops together (at the first bad step of any rank), so none waits in an all-reduce
        firsts = [b for b in gather_objects(int(bad[0]) if len(bad) else None) if b is not None]
        if firsts:
            step = first_step + min(firsts) + 1
            raise Diverged(f"loss is not finite at epoch {epoch + 1}, step {step} (lr {lr:.3g}); "
                           f"the last checkpoint is from before this epoch")
        losses.extend(values.tolist())
        window.clear()

    step = 0
    for step, (images, labels) in enumerate(loader):
        lr = schedule.lr(epoch, step)
        window.append(train_step(model, images, labels, optimizer, lr, scaler, amp_dtype))
        n_images += len(labels)
        if len(window) == log_every:
            check(step + 1 - log_every)
            rate = n_images / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{np.mean(losses[-log_every:]):.3f}", lr=f"{lr:.3g}", img_s=f"{rate:.0f}")
            bar.update(log_every)
    if window:
        check(step + 1 - len(window))
        bar.update(len(window))
    bar.close()
    seconds = time.perf_counter() - t0
    totals = gather_objects((float(np.sum(losses)), len(losses), n_images))  # over all ranks
    return {"train_loss": sum(t[0] for t in totals) / sum(t[1] for t in totals),
            "images_per_s": sum(t[2] for t in totals) / seconds, "lr": lr, "epoch_seconds": seconds}


def seed_everything(seed: int, deterministic: bool) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)


def rng_state() -> dict:
    """Every generator a training step may draw from, in types torch.load(weights_only=True) accepts."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "python": random.getstate()}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])
    name, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(s["python"])


def plot_curves(metrics: list[dict], path: Path) -> None:
    """curves.png: train/val loss and val top-1/top-5 error per epoch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ep = [m["epoch"] for m in metrics]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ep, [m["train_loss"] for m in metrics], "o-", label="train")
    a.plot(ep, [m["val_loss"] for m in metrics], "o-", label="val")
    a.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    b.plot(ep, [100 * m["val_top1_err"] for m in metrics], "o-", label="top-1")
    b.plot(ep, [100 * m["val_top5_err"] for m in metrics], "o-", label="top-5")
    b.set(xlabel="epoch", ylabel="val error (%)", title="validation error (center crop)")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    save_png(fig, path)


@dataclass
class Run:
    """What a run carries from epoch to epoch."""
    model: torch.nn.Module  # the weights (saved, evaluated)
    step_model: torch.nn.Module  # what trains: the model, in DDP and compiled where asked
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    train_data: DaliLoader
    val_data: DaliLoader
    schedule: Schedule
    metrics: list[dict]
    start: int  # the first epoch to run


def check_config(cfg: TrainConfig) -> None:
    """Before any process group: every rank refuses the same config alike."""
    if cfg.arch not in ARCHS:
        raise UserError(f"--arch must be one of {', '.join(ARCHS)}")
    if cfg.schedule not in ("plateau", "step"):
        raise UserError("--schedule must be plateau or step")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.batch_size % world:
        raise UserError(f"--batch-size {cfg.batch_size} does not divide over {world} ranks")


def resolved(cfg: TrainConfig, rt: Runtime, data: Prepared) -> TrainConfig:
    """The defaults that depend on the device and the train split filled in (config.json and
    checkpoints record them)."""
    return dataclasses.replace(cfg, device=rt.device.type, precision=rt.precision,
                               pipelines=cfg.pipelines or default_pipelines(rt.cuda, data.tile("train")))


def resume_from(cfg: TrainConfig, rt: Runtime, data: Prepared) -> Checkpoint | None:
    """The --resume checkpoint, refused unless it fits this run: arch, ranks, loader layout,
    and the very shards and pca.json it was trained on."""
    if cfg.resume is None:
        return None
    ckpt = Checkpoint.load(cfg.resume)
    if None in (ckpt.loader, ckpt.rng, ckpt.optimizer, ckpt.schedule, ckpt.scaler):
        raise UserError(f"{cfg.resume}: a checkpoint without training state (loader, optimizer, schedule): "
                        f"it can be evaluated, not resumed")
    ckpt.check(cfg.resume, arch=cfg.arch, groups=cfg.groups, world=rt.world, pipelines=cfg.pipelines, echo=cfg.echo,
               manifest_sha256=data.identity, pca_sha256=data.pca_sha256)
    return ckpt


def run_dir_for(cfg: TrainConfig) -> Path:
    """Where this run writes; an existing checkpoint there is only continued, never replaced."""
    run_dir = cfg.run_dir or (Path(cfg.resume).parent if cfg.resume else cfg.out / "runs" / cfg.arch)
    ckpt = run_dir / "checkpoint.pt"
    # rank 0's filesystem decides for all ranks, so none goes on alone into a collective
    if broadcast_object(ckpt.exists() and not (cfg.resume and ckpt.resolve() == Path(cfg.resume).resolve())):
        raise UserError(f"{ckpt} exists: pass --resume {ckpt} or another --run-dir")
    return run_dir


def make_schedule(cfg: TrainConfig, steps_per_epoch: int) -> Schedule:
    scale = cfg.batch_size / BASE_BATCH
    warmup = cfg.warmup_epochs if cfg.warmup_epochs is not None else (5 if scale > 1 else 0)
    # Goyal et al.: from the unscaled lr up to the scaled one; an asked-for warmup at batch <= 128 starts at 0
    return Schedule(warmup_from=cfg.lr if scale > 1 else 0.0, peak_lr=cfg.lr * scale, kind=cfg.schedule,
                    steps_per_epoch=steps_per_epoch, warmup_steps=round(warmup * steps_per_epoch),
                    step_epochs=cfg.step_epochs, patience=cfg.patience)


def build(cfg: TrainConfig, rt: Runtime, data: Prepared, ckpt: Checkpoint | None) -> Run:
    """Model, optimizer, loaders and schedule, from scratch or from the checkpoint."""
    model = alexnet(cfg.arch, len(data.classes), cfg.groups, cfg.dropout).to(rt.device, memory_format=rt.memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                fused=rt.cuda)  # one kernel for the whole step on CUDA
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.precision == "fp16")
    options = LoaderOptions(batch_size=cfg.batch_size // rt.world, threads=cfg.workers, pipelines=cfg.pipelines,
                            seed=cfg.seed, lighting=cfg.lighting, echo=cfg.echo,
                            cache=cfg.cache, cache_gb=cfg.cache_gb, mmap=cfg.mmap)
    train_data = train_loader(data, options, runtime=rt, state=ckpt.loader[rt.rank] if ckpt else None,
                              log=print if rt.main else None)
    val_data = eval_loader(data, options, runtime=rt)
    schedule, metrics, start = make_schedule(cfg, len(train_data)), [], 0
    if ckpt:
        model.load_state_dict(ckpt.model)
        optimizer.load_state_dict(ckpt.optimizer)
        for group in optimizer.param_groups:  # hyperparameters are this run's, the buffers the checkpoint's
            group.update(momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=rt.cuda)
        scaler.load_state_dict(ckpt.scaler)
        progress = {k: ckpt.schedule[k] for k in ("drops", "best", "bad_epochs")}  # lr settings: this run's
        schedule = dataclasses.replace(schedule, **progress)
        set_rng_state(ckpt.rng[rt.rank])
        metrics, start = ckpt.metrics, ckpt.epoch
    step_model = model
    if rt.world > 1:
        step_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rt.local_rank] if rt.cuda else None)
    if cfg.compile and rt.cuda:
        step_model = torch.compile(step_model)
    return Run(model, step_model, optimizer, scaler, train_data, val_data, schedule, metrics, start)


def announce(cfg: TrainConfig, rt: Runtime, data: Prepared, run: Run, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "config.json", config_dict(cfg))
    if data.pca.get("split") != "train" or data.pca.get("fraction", 1) < 1:
        print(f"note: {cfg.out / 'pca.json'} was computed on split {data.pca.get('split')!r}, "
              f"fraction {data.pca.get('fraction')}", flush=True)
    print(f"{cfg.arch} AlexNet, {sum(p.numel() for p in run.model.parameters()):,} parameters, "
          f"{len(data.classes)} classes; {rt.world} rank(s) x {cfg.batch_size // rt.world} = batch {cfg.batch_size}, "
          f"peak lr {run.schedule.peak_lr:g}, {len(run.train_data)} steps/epoch; run dir {run_dir}", flush=True)


def run_epoch(cfg: TrainConfig, rt: Runtime, run: Run, data: Prepared, epoch: int) -> dict:
    """Train one epoch, evaluate (the uncompiled model: no recompiles), step the plateau
    schedule; returns the epoch's row of metrics."""
    m = train_epoch(run.step_model, run.train_data, run.optimizer, run.schedule, run.scaler, rt.amp_dtype, epoch,
                    cfg.log_every, rt.main)
    v = evaluate(run.model, run.val_data, rt.amp_dtype, len(data.classes), "val" if rt.main else None)
    dropped = run.schedule.end_epoch(v["top1_err"])
    if rt.main:
        print(f"epoch {epoch + 1:3d}/{cfg.epochs}  loss {m['train_loss']:.4f}  val loss {v['loss']:.4f}  "
              f"top-1 err {100 * v['top1_err']:5.2f}%  top-5 err {100 * v['top5_err']:5.2f}%  "
              f"({v['count']} val)  lr {m['lr']:.3g}  {m['images_per_s']:.0f} img/s  "
              f"{m['epoch_seconds']:.0f} s" + ("  -> lr / 10" if dropped else ""), flush=True)
    return {"epoch": epoch + 1, **m, "val_loss": v["loss"], "val_top1_err": v["top1_err"],
            "val_top5_err": v["top5_err"], "val_count": v["count"], "lr_dropped": dropped}


def checkpoint(cfg: TrainConfig, rt: Runtime, data: Prepared, run: Run) -> Checkpoint:
    """The checkpoint after the last epoch of run.metrics, with every rank's loader and RNG
    state (gathered: a collective, so every rank calls it)."""
    loaders, rngs = gather_objects(run.train_data.state_dict()), gather_objects(rng_state())
    return Checkpoint(arch=cfg.arch, groups=cfg.groups, num_classes=len(data.classes), classes=data.classes,
                      normalize={"mean": data.pca["mean"], "std": data.pca["std"]}, epoch=run.metrics[-1]["epoch"],
                      model=run.model.state_dict(), world=rt.world, pipelines=cfg.pipelines, echo=cfg.echo,
                      optimizer=run.optimizer.state_dict(), scaler=run.scaler.state_dict(),
                      schedule=dataclasses.asdict(run.schedule), metrics=run.metrics, config=config_dict(cfg),
                      manifest_sha256=data.identity, pca_sha256=data.pca_sha256, loader=loaders, rng=rngs)


def save_epoch(run_dir: Path, ckpt: Checkpoint, metrics: list[dict]) -> None:
    """The checkpoint, then metrics.jsonl and curves.png (so a resume never repeats or loses a
    row); a full disk is a line that says which checkpoint is intact."""
    path = run_dir / "checkpoint.pt"
    try:
        ckpt.save(path)
        atomic_write_bytes(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in metrics).encode())
        plot_curves(metrics, run_dir / "curves.png")
    except DiskFull as e:
        saved = ckpt.epoch - (e.path == path)
        intact = (f"{path} holds epoch {saved}, intact: free space and add --resume {path}" if saved
                  else "no checkpoint was written yet")
        raise UserError(f"{run_dir}: disk full (no space left on device) while writing {e.path.name}; {intact}") \
            from None


def on_main(rt: Runtime, write) -> None:
    """Run `write` (the run's files) on rank 0; whatever stops it there stops every rank with its
    line, so none is left waiting in a collective."""
    problem = None
    if rt.main:
        try:
            write()
        except UserError as e:
            problem = str(e)
        except OSError as e:
            problem = f"{e.filename or 'the run dir'}: cannot write ({e.strerror or e})"
    if problem := broadcast_object(problem):
        raise UserError(problem)


def train(cfg: TrainConfig) -> list[dict]:
    """The whole run; returns the per-epoch metrics (on every rank)."""
    check_config(cfg)
    rt = Runtime.start(cfg.device, cfg.precision, channels_last=cfg.channels_last)
    with rt.model_stream():  # the whole run on one stream, the GPU's first in line
        data = Prepared.open(cfg.out)  # a missing or stale pca.json is refused before anything else
        cfg = resolved(cfg, rt, data)
        seed_everything(cfg.seed + rt.rank, cfg.deterministic)
        ckpt = resume_from(cfg, rt, data)
        run_dir = run_dir_for(cfg)
        run = build(cfg, rt, data, ckpt)
        on_main(rt, lambda: announce(cfg, rt, data, run, run_dir))
        for epoch in range(run.start, cfg.epochs):
            run.metrics.append(run_epoch(cfg, rt, run, data, epoch))
            ckpt = checkpoint(cfg, rt, data, run)
            on_main(rt, lambda: save_epoch(run_dir, ckpt, run.metrics))
        return run.metrics


def parser() -> argparse.ArgumentParser:
    d = TrainConfig
    p = argparse.ArgumentParser(prog="alexpipe-train", formatter_class=Help,
                                description="Train AlexNet on alexpipe shards with the paper's recipe "
                                            "(run under torchrun for several GPUs).")
    p.add_argument("out", type=Path, help="prepared directory (shards, manifest.json, pca.json)")
    p.add_argument("--arch", default=d.arch, choices=ARCHS, help="paper: the 2012 net with LRN; torchvision: "
                   "torchvision's AlexNet")
    p.add_argument("--groups", type=int, default=d.groups, choices=[1, 2],
                   help="paper arch: 2 = the two-GPU connectivity")
    p.add_argument("--epochs", type=int, default=d.epochs, help="epochs to train (the paper: ~90)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch over all ranks")
    p.add_argument("--lr", type=float, default=d.lr, help="lr for a batch of 128, scaled linearly with the batch")
    p.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="on every weight")
    p.add_argument("--dropout", type=float, default=d.dropout, help="before FC6 and FC7")
    p.add_argument("--schedule", default=d.schedule, choices=["plateau", "step"],
                   help="plateau: lr/10 when val top-1 stops improving (the paper); step: lr/10 every --step-epochs")
    p.add_argument("--step-epochs", type=int, default=d.step_epochs, help="step schedule: epochs between lr drops")
    p.add_argument("--patience", type=int, default=d.patience, help="plateau: epochs without improvement")
    p.add_argument("--warmup-epochs", type=float, default=None, help="linear lr warmup (default: 5 if the batch is "
                   "> 128, else 0)")
    p.add_argument("--lighting", type=float, default=d.lighting, help="std of the PCA lighting alpha")
    p.add_argument("--device", default=None, choices=["cuda", "cpu"], help="where to train (default: cuda if a GPU "
                   "is visible, else cpu)")
    p.add_argument("--precision", default=None, choices=["bf16", "fp16", "fp32"],
                   help="autocast dtype (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=d.channels_last,
                   help="NHWC memory for the images and the model")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=d.compile,
                   help="torch.compile the model (cuda only)")
    p.add_argument("--seed", type=int, default=d.seed, help="init, loader order and augmentation")
    p.add_argument("--workers", type=int, default=None, help="DALI threads per pipeline (default: 4 on a GPU, "
                   "the cores / --pipelines on CPU)")
    p.add_argument("--pipelines", type=int, default=None, help="DALI train pipelines per rank, decoding batches "
                   "side by side; --resume needs the number the checkpoint was written with (default: 4 on cuda, "
                   "1 for tiles (alexpipe-prepare --tile) or on cpu)")
    p.add_argument("--cache", default=d.cache, choices=["auto", "gpu", "off"],
                   help="keep decoded images in GPU memory after epoch 1 (DALI's decoder cache; each rank then keeps "
                        "one fixed share of the samples): auto = if the rank's share fits, gpu = as much as fits or "
                        "--cache-gb")
    p.add_argument("--cache-gb", type=float, default=None, help="GPU memory for the cache per rank (default: the "
                   "rank's share, or what is free less 16 GB)")
    p.add_argument("--echo", type=int, default=d.echo, help="views (crop, flip, lighting) of each decoded image per "
                   "epoch, in different batches (data echoing; 1 = the paper)")
    p.add_argument("--mmap", action=argparse.BooleanOptionalAction, default=d.mmap, help="map the shards into "
                   "memory (the pages read count in the resident set, up to a rank's share of the shards; the kernel "
                   "can drop them) or read them (--no-mmap: the resident set stays flat)")
    p.add_argument("--run-dir", type=Path, default=None, help="where the checkpoint and logs go (default: "
                   "OUT/runs/<arch>, or the --resume checkpoint's folder)")
    p.add_argument("--resume", type=Path, default=None, help="checkpoint.pt to continue from (default: a new run)")
    p.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=d.deterministic,
                   help="torch deterministic algorithms (for exact resume tests)")
    p.add_argument("--log-every", type=int, default=d.log_every, help="steps between host syncs / bar updates")
    return p


def parse_args(argv) -> TrainConfig:
    p = parser()
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size", "step_epochs", "log_every", "workers", "pipelines", "echo"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.cache_gb is not None and args.cache_gb <= 0:
        raise UserError(f"--cache-gb must be > 0, got {args.cache_gb}")
    if args.lr <= 0 or args.patience < 0:
        raise UserError("--lr must be > 0 and --patience >= 0")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.precision is None:
        args.precision = "bf16" if args.device == "cuda" else "fp32"
    if args.pipelines is None:  # saved in checkpoints: a resume must read the same reader shards
        args.pipelines = default_pipelines(args.device == "cuda", train_tile(args.out))
    return TrainConfig(**vars(args))


def _main(argv) -> int:
    cfg = parse_args(argv)
    if int(os.environ.get("RANK", "0")) == 0:
        print_config("alexpipe-train", cfg)
        if cfg.device == "cuda" and (note := cuda_queues_note()):
            print(note, flush=True)
    try:
        train(cfg)
    finally:
        cleanup()
    return 0


def main(argv=None) -> int:
    return run_main("alexpipe-train", _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
