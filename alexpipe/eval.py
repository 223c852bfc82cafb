"""Evaluation: center-crop and the paper's ten-crop protocol, exact on 1..N ranks.

Ten-crop (Krizhevsky et al. 2012, sec. 4): the four corner and the center 224 patches of
the central 256x256 square, and their mirror images; the network's softmax is averaged
over the ten (probabilities, not logits), then top-1 and top-5 error. --full-image takes
the corners of the whole short-side-256 image instead of the central square.

    alexpipe-eval CHECKPOINT OUT [--crops center|ten|both] [--full-image] [--json FILE]
    torchrun --nproc_per_node 8 -m alexpipe.eval CHECKPOINT OUT
    alexpipe-predict CHECKPOINT IMAGE...

Also draws filters.png (conv1's kernels, the paper's Figure 3) and
predictions-<split>-<dataset id>.png (val images with their top-5 classes, the paper's Figure 4,
left).

Top-k rule, stated because ties happen with low-precision logits: a sample is correct at k
when fewer than k classes have a probability strictly greater than the true class's
(ties count in the model's favour; NaN outputs count as wrong). Every rank evaluates its own samples once; counts are
summed over ranks, so the total equals the split's size in the manifest.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .dataset import Prepared, iter_samples
from .loader import LoaderOptions, eval_loader
from .model import load_for_eval
from .runtime import Runtime, all_reduce_sum, barrier, cleanup
from .pipeline import TEN_CROPS
from .prepare import load_resized
from .util import Bar, Help, UserError, config_dict, run_main, save_png, write_json


def crop_probabilities(model, images: torch.Tensor) -> torch.Tensor:
    """Softmax per sample; for (B, 10, 3, H, W) ten-crop input, averaged over the crops."""
    if images.dim() == 5:
        b, c = images.shape[:2]
        logits = model(images.flatten(0, 1))
        return logits.float().softmax(-1).view(b, c, -1).mean(1)
    return model(images).float().softmax(-1)


def topk_correct(probs: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """(B,) bool: fewer than k classes score strictly above the true class (a NaN score
    counts as above, and a NaN true score is wrong, so a diverged model scores 0)."""
    p_true = probs.gather(1, labels[:, None])
    above = (probs > p_true) | probs.isnan()
    return (above.sum(1) < k) & ~p_true.squeeze(1).isnan()


def evaluate(model, loader, amp_dtype: torch.dtype | None, num_classes: int, show: str | None = None) -> dict:
    """Loss (NLL of the averaged softmax), top-1/top-5 error and per-class top-1 accuracy
    over every sample of every rank's loader, summed over ranks; a progress bar named `show`."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    count = torch.zeros(num_classes, dtype=torch.float64, device=device)
    hits1, hits5 = torch.zeros_like(count), torch.zeros_like(count)
    nll = torch.zeros(1, dtype=torch.float64, device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        for images, labels in Bar(loader, desc=show, unit="batch", disable=show is None, leave=False):
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            probs = crop_probabilities(model, images)
            p_true = probs.gather(1, labels[:, None]).squeeze(1)
            nll -= torch.log(p_true.double().clamp_min(1e-30)).sum()
            count += torch.bincount(labels, minlength=num_classes)
            hits1 += torch.bincount(labels, weights=topk_correct(probs, labels, 1).double(), minlength=num_classes)
            hits5 += torch.bincount(labels, weights=topk_correct(probs, labels, 5).double(), minlength=num_classes)
    totals = all_reduce_sum(torch.cat([count, hits1, hits5, nll])).cpu()
    model.train(was_training)
    count, hits1, hits5, nll = totals[:num_classes], totals[num_classes:2 * num_classes], \
        totals[2 * num_classes:3 * num_classes], float(totals[-1])
    n = int(count.sum())
    per_class = {int(c): float(hits1[c] / count[c]) for c in torch.nonzero(count).flatten()}
    return {"count": n, "loss": nll / max(n, 1), "top1_err": 1 - float(hits1.sum()) / max(n, 1),
            "top5_err": 1 - float(hits5.sum()) / max(n, 1), "per_class_top1": per_class}


# ---------------------------------------------------------------------------- CLI

@dataclass
class EvalConfig:
    checkpoint: Path
    out: Path
    split: str = "val"
    crops: str = "both"  # center | ten | both
    full_image: bool = False
    device: str | None = None  # cuda | cpu; default: cuda if a GPU is visible
    batch_size: int = 128
    precision: str | None = None  # default: bf16 on cuda, fp32 on cpu
    workers: int | None = None
    json: Path | None = None
    figures: Path | None = None  # default: the checkpoint's folder


def anchor(pos: float, free: int) -> int:
    """Where DALI places a crop at relative position pos: round half up of pos * free."""
    return int(np.floor(pos * free + 0.5))


def ten_crops(img: np.ndarray, crop: int = 224, square: int | None = 256) -> np.ndarray:
    """(10, crop, crop, 3) views of an HxWx3 image, as the ten-crop pipeline cuts them
    (TEN_CROPS order), for images that do not come from shards (alexpipe-predict)."""
    if square:
        h, w = img.shape[:2]
        y, x = anchor(0.5, h - square), anchor(0.5, w - square)
        img = img[y:y + square, x:x + square]
    h, w = img.shape[:2]
    views = []
    for px, py, mirror in TEN_CROPS:
        y, x = anchor(py, h - crop), anchor(px, w - crop)
        v = img[y:y + crop, x:x + crop]
        views.append(v[:, ::-1] if mirror else v)
    return np.stack(views)


def filters_image(model, scale: int = 4, gap: int = 2) -> Image.Image:
    """The first layer's kernels as a grid (the paper's Figure 3): each kernel min-max
    scaled to 0..255 on its own, enlarged `scale` times, 8 to a row for 64, 12 for 96."""
    w = model.features[0].weight.detach().float().cpu()
    n, size = w.shape[0], w.shape[-1] * scale
    cols = 12 if n % 12 == 0 else 8
    rows = (n + cols - 1) // cols
    grid = Image.new("RGB", (cols * (size + gap) + gap, rows * (size + gap) + gap), (255, 255, 255))
    for i, k in enumerate(w):
        k = (k - k.min()) / (k.max() - k.min() + 1e-12) * 255
        tile = Image.fromarray(k.permute(1, 2, 0).round().byte().numpy()).resize((size, size), Image.Resampling.NEAREST)
        grid.paste(tile, (gap + (i % cols) * (size + gap), gap + (i // cols) * (size + gap)))
    return grid


def predict_images(model, images: list[np.ndarray], normalize: dict, device, amp_dtype, k: int = 5):
    """Ten-crop softmax for decoded short-side-256 images; returns (probs (N, C), topk indices)."""
    mean = torch.tensor(normalize["mean"]).view(3, 1, 1)
    std = torch.tensor(normalize["std"]).view(3, 1, 1)
    batch = torch.stack([(torch.from_numpy(ten_crops(img).copy()).permute(0, 3, 1, 2).float() - mean) / std
                         for img in images]).to(device)
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        probs = crop_probabilities(model, batch)
    return probs.cpu(), probs.topk(min(k, probs.shape[1]), dim=1).indices.cpu()


def class_name(classes, index: int) -> str:
    if classes and index < len(classes):
        return str(classes[index][2]).split(",")[0]
    return f"class {index}"


def predictions_image(model, info: dict, data: Prepared, split: str, device, amp_dtype, n: int = 8):
    """A grid of n val images with their top-5 classes by name and probability, the true
    class in green (the paper's Figure 4, left)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    samples = [s for _, s in zip(range(n), (s for shard in data.split(split) for s in iter_samples(shard)))]
    images = [np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB")) for s in samples]
    probs, top = predict_images(model, images, info["normalize"], device, amp_dtype)
    fig, axes = plt.subplots(2, len(images), figsize=(2.2 * len(images), 4.6),
                             gridspec_kw={"height_ratios": [1.2, 1]}, squeeze=False)
    for j, (img, s) in enumerate(zip(images, samples)):
        label = int(s["cls"])
        axes[0, j].imshow(ten_crops(img)[4])
        axes[0, j].set_title(class_name(info["classes"], label), fontsize=8)
        axes[0, j].axis("off")
        names = [class_name(info["classes"], int(c))[:18] for c in top[j]]
        values = [float(probs[j, c]) for c in top[j]]
        colors = ["tab:green" if int(c) == label else "tab:gray" for c in top[j]]
        axes[1, j].barh(range(len(names))[::-1], values, color=colors)
        axes[1, j].set_yticks(range(len(names))[::-1], names, fontsize=7)
        axes[1, j].set_xlim(0, 1)
        axes[1, j].tick_params(axis="x", labelsize=6)
    fig.tight_layout()
    return fig


def run_eval(cfg: EvalConfig) -> dict:
    rt = Runtime.start(cfg.device, cfg.precision)
    model, info = load_for_eval(cfg.checkpoint)
    data = Prepared.open(cfg.out)
    if info["num_classes"] != len(data.classes):
        raise UserError(f"{cfg.checkpoint}: a model of {info['num_classes']} classes, but {cfg.out} has "
                        f"{len(data.classes)}")
    expected = data.count(cfg.split)
    model = model.to(rt.device, memory_format=rt.memory_format)
    results = {}
    for i, mode in enumerate(["center", "ten"] if cfg.crops == "both" else [cfg.crops]):
        options = LoaderOptions(batch_size=cfg.batch_size // (10 if mode == "ten" else 1) or 1, threads=cfg.workers,
                                verify=i == 0)  # the shards' sha256 once
        loader = eval_loader(data, options, runtime=rt, split=cfg.split, ten_crop=mode == "ten",
                             full_image=cfg.full_image, normalize=info["normalize"])
        barrier()
        t0 = time.perf_counter()
        r = evaluate(model, loader, rt.amp_dtype, info["num_classes"], f"{mode} crop" if rt.main else None)
        if rt.cuda:
            torch.cuda.synchronize()
        r["seconds"] = time.perf_counter() - t0
        r["images_per_s"] = r["count"] / r["seconds"]
        if r["count"] != expected:
            raise UserError(f"counted {r['count']} {cfg.split} images, the manifest says {expected}")
        results[mode] = r
    return {"model": model, "info": info, "results": results, "rank": rt.rank, "world": rt.world, "data": data,
            "runtime": rt}


def summary(cfg: EvalConfig, r: dict) -> str:
    info = r["info"]
    lines = [f"{cfg.checkpoint} ({info['arch']}" + (f", epoch {info['epoch']}" if info.get("epoch") else "") +
             f") on {cfg.out} {cfg.split}, {r['world']} rank(s), {r['runtime'].device.type}"]
    for mode, v in r["results"].items():
        what = "ten-crop (" + ("whole image" if cfg.full_image else "central 256 square") + ")" \
            if mode == "ten" else "center crop"
        lines.append(f"  {what:<32} {v['count']} images  top-1 err {100 * v['top1_err']:6.2f}%  "
                     f"top-5 err {100 * v['top5_err']:6.2f}%  {v['seconds']:.1f} s  {v['images_per_s']:.0f} img/s")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alexpipe-eval", formatter_class=Help,
                                description="Center-crop and the paper's ten-crop evaluation of an AlexNet "
                                            "(alexpipe-train checkpoint or torchvision state_dict) on prepared "
                                            "shards; run under torchrun for several GPUs.")
    p.add_argument("checkpoint", type=Path, help="alexpipe-train checkpoint or torchvision AlexNet state_dict")
    p.add_argument("out", type=Path, help="prepared directory (shards, manifest.json, pca.json)")
    p.add_argument("--split", default="val", help="the split to evaluate")
    p.add_argument("--crops", default="both", choices=["center", "ten", "both"], help="center crop, the paper's ten "
                   "crops, or both")
    p.add_argument("--full-image", action=argparse.BooleanOptionalAction, default=False,
                   help="ten-crop corners of the whole short-side-256 image, not of its central 256x256 square")
    p.add_argument("--device", default=None, choices=["cuda", "cpu"], help="(default: cuda if a GPU is visible, "
                   "else cpu)")
    p.add_argument("--batch-size", type=int, default=EvalConfig.batch_size, help="crops per forward pass per rank")
    p.add_argument("--precision", default=None, choices=["bf16", "fp16", "fp32"],
                   help="autocast dtype (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--workers", type=int, default=None, help="DALI threads per rank (default: 4 on a GPU, "
                   "the cores on CPU)")
    p.add_argument("--json", type=Path, default=None, help="write the numbers and per-class accuracy here "
                   "(default: not written)")
    p.add_argument("--figures", type=Path, default=None, help="where to write filters.png and "
                   "predictions-<split>-<dataset id>.png (default: the checkpoint's folder)")
    return p


def parse_args(argv) -> EvalConfig:
    p = parser()
    args = p.parse_args(argv)
    if args.batch_size < 1 or (args.workers is not None and args.workers < 1):
        raise UserError("--batch-size and --workers must be >= 1")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.precision is None:
        args.precision = "bf16" if args.device == "cuda" else "fp32"
    return EvalConfig(**vars(args))


def write_outputs(cfg: EvalConfig, r: dict) -> None:
    """filters.png (the checkpoint's alone: the same for any shards), predictions of these
    shards under a name of their own, and with --json the numbers."""
    info, model, data = r["info"], r["model"], r["data"]
    figures = cfg.figures or cfg.checkpoint.parent
    figures.mkdir(parents=True, exist_ok=True)
    save_png(filters_image(model), figures / "filters.png")
    fig = predictions_image(model, info, data, cfg.split, r["runtime"].device, r["runtime"].amp_dtype)
    predictions = figures / f"predictions-{cfg.split}-{data.identity[:8]}.png"
    save_png(fig, predictions, dpi=110)
    print(f"wrote {figures / 'filters.png'} and {predictions}")
    if cfg.json:
        classes = info["classes"]
        out = {"checkpoint": str(cfg.checkpoint), "out": str(cfg.out), "split": cfg.split, "arch": info["arch"],
               "ranks": r["world"], "device": r["runtime"].device.type, "full_image": cfg.full_image,
               "config": config_dict(cfg),
               "results": {}}
        for mode, v in r["results"].items():
            out["results"][mode] = {k: v[k] for k in ("count", "top1_err", "top5_err", "loss", "seconds",
                                                      "images_per_s")}
            out["results"][mode]["per_class_top1"] = {
                (classes[c][1] if classes else str(c)): acc for c, acc in v["per_class_top1"].items()}
        write_json(cfg.json, out)
        print(f"wrote {cfg.json}")


def _main(argv) -> int:
    cfg = parse_args(argv)
    try:
        r = run_eval(cfg)
        if r["rank"] == 0:
            print(summary(cfg, r))
            write_outputs(cfg, r)
    finally:
        cleanup()
    return 0


def main(argv=None) -> int:
    return run_main("alexpipe-eval", _main, argv)


# ---------------------------------------------------------------------------- predict

def predict_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alexpipe-predict", formatter_class=Help,
                                description="Top-5 classes of image files, with the ten-crop preprocessing of "
                                            "alexpipe-eval. An unreadable file is reported and skipped (exit 1).")
    p.add_argument("checkpoint", type=Path, help="alexpipe-train checkpoint or torchvision AlexNet state_dict")
    p.add_argument("images", type=Path, nargs="+", help="image files (any format PIL reads)")
    p.add_argument("--device", default=None, choices=["cuda", "cpu"], help="(default: cuda if a GPU is visible, "
                   "else cpu)")
    p.add_argument("--top", type=int, default=5, help="classes to show per image")
    return p


def predict(argv) -> int:
    """Every readable image's top classes; the others named on stderr, exit 1 at the end."""
    args = predict_parser().parse_args(argv)
    d = Runtime.start(args.device, "fp32", distributed=False)
    model, info = load_for_eval(args.checkpoint)
    model = model.to(d.device)
    failed = 0
    for path in args.images:
        try:
            img, _ = load_resized(path, center_crop=False)
        except FileNotFoundError:
            print(f"alexpipe-predict: {path}: not found", file=sys.stderr)
            failed += 1
            continue
        except Exception as e:  # noqa: BLE001 - whatever PIL says about it
            print(f"alexpipe-predict: {path}: not a readable image ({type(e).__name__}: {e})", file=sys.stderr)
            failed += 1
            continue
        probs, top = predict_images(model, [np.asarray(img)], info["normalize"], d.device, None, args.top)
        print(path)
        for c in top[0]:
            print(f"  {float(probs[0, c]):6.3f}  {class_name(info['classes'], int(c))}")
    if failed:
        print(f"alexpipe-predict: {failed} of {len(args.images)} files could not be read", file=sys.stderr)
    return 1 if failed else 0


def predict_main(argv=None) -> int:
    return run_main("alexpipe-predict", predict, argv)


if __name__ == "__main__":
    raise SystemExit(main())
