"""Benchmark ten-crop evaluation: alexpipe (DALI ten-crop graph on the GPU) against a plain
PyTorch pipeline (webdataset + PIL + torchvision CenterCrop(256) + TenCrop(224) in a
DataLoader with all cores), same model (torchvision AlexNet, bf16, channels_last), same
val shards, in one run. Prints images/s, the ratio, and both top-1 errors (they agree up
to the two pipelines' 1-pixel center conventions).

  python tools/bench_eval.py [--repeat 10]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from alexpipe.eval import crop_probabilities, evaluate
from alexpipe.dataset import Prepared
from alexpipe.loader import LoaderOptions, eval_loader
from alexpipe.model import alexnet
from alexpipe.runtime import Runtime
from bench_prepare import DEFAULT_SRC, sample_shards


def baseline(out: Path, model, batch: int, workers: int, pca: dict) -> tuple[float, float]:
    import webdataset as wds
    from torchvision import transforms as T
    urls = [s["tar"] for s in Prepared.open(out, pca=False).split("train")]
    norm = T.Normalize([m / 255 for m in pca["mean"]], [s / 255 for s in pca["std"]])
    tf = T.Compose([T.CenterCrop(256), T.TenCrop(224),
                    T.Lambda(lambda crops: torch.stack([norm(T.functional.to_tensor(c)) for c in crops]))])
    ds = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=wds.split_by_worker,
                        empty_check=False).decode("pil").to_tuple("jpg", "cls").map_tuple(tf, int)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers, pin_memory=True)
    correct = n = 0
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for images, labels in loader:
            images = images.cuda(non_blocking=True).to(torch.bfloat16)
            b = len(labels)
            probs = crop_probabilities(model, images.flatten(0, 1).contiguous(memory_format=torch.channels_last)
                                       .view(b, 10, 3, 224, 224))
            correct += int((probs.argmax(1).cpu() == labels).sum())
            n += b
    torch.cuda.synchronize()
    return n / (time.perf_counter() - t0), 1 - correct / n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", type=Path, default=DEFAULT_SRC)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64, help="images (x10 crops) per batch")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_eval: needs a CUDA GPU")
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        out = sample_shards(args.src, Path(tmp), args.repeat, shard_size=250)
        data = Prepared.open(out)
        pca = data.pca
        torch.manual_seed(0)
        model = alexnet("torchvision").cuda().to(memory_format=torch.channels_last).eval()
        n = data.count("train")
        loader = eval_loader(data, LoaderOptions(batch_size=args.batch_size), split="train", ten_crop=True,
                             runtime=Runtime.start("cuda", "bf16", distributed=False))
        evaluate(model, loader, torch.bfloat16, 1000)  # warm up (cuDNN plans, decoder)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        r = evaluate(model, loader, torch.bfloat16, 1000)
        torch.cuda.synchronize()
        ours = r["count"] / (time.perf_counter() - t0)
        base, base_err = baseline(out, model, args.batch_size, cores, pca)
        print(f"\n{torch.cuda.get_device_name()}, {cores} CPU cores; {n} images x 10 crops; "
              f"torchvision AlexNet (untrained weights), bf16, channels_last")
        print(f"alexpipe ten-crop eval (DALI graph + model):        {ours:8.0f} images/s  top-1 err {r['top1_err']:.4f}")
        print(f"PIL + torchvision TenCrop DataLoader, {cores:2d} workers: {base:8.0f} images/s  top-1 err {base_err:.4f}")
        print(f"ratio: {ours / base:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
