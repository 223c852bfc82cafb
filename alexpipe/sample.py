"""alexpipe-sample: write a small ImageNet-layout tree of synthetic images.

It exists so that the README's end-to-end command runs on a fresh machine with no
download, and so that tests have a dataset a network can learn in CI time: each class is
one shape in one hue (a red disk, a green square, ...) on a noisy background, at a
random size and place, in images of varied size and aspect ratio. The tree carries the
odd files real ImageNet has (a grayscale JPEG, a CMYK JPEG, a PNG and a palette GIF
named .JPEG) and the broken ones a prepare tool must survive (a truncated JPEG, an
empty file, a README), so the demo exercises those paths too.

Layout written (as ILSVRC-2012 with Kaggle's label file):
  DIR/train/<wnid>/<wnid>_<n>.JPEG
  DIR/val/ILSVRC2012_val_<8 digits>.JPEG   (flat)
  DIR/LOC_val_solution.csv
With --names shape the folders are named by shape (disk_020, ...) and val is in class
folders, so the labels are 0..classes-1: a 4-way head learns in a minute on a CPU, where
a 1000-way head with 4 classes present takes far longer to leave its uniform start.
"""

from __future__ import annotations

import argparse
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .util import Bar, Help, UserError, imagenet_classes, print_config, run_main

# (class index in ILSVRC-2012, shape, hue in degrees): distinct in shape and colour.
CLASS_DESIGNS = [
    (1, "disk", 20),       # goldfish: orange disk
    (340, "square", 120),  # zebra: green square
    (417, "triangle", 230),  # balloon: blue triangle
    (963, "ring", 300),    # pizza: magenta ring
    (530, "cross", 55),    # digital clock: yellow cross
    (980, "bar", 180),     # volcano: cyan bar
]


@dataclass
class SampleConfig:
    dir: Path
    classes: int = 4
    train_per_class: int = 40
    val_per_class: int = 10
    seed: int = 0
    names: str = "wnid"  # wnid: ImageNet layout, flat val + LOC_val_solution.csv; shape: class folders by shape


def hsv_to_rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    rgb = Image.new("HSV", (1, 1), (int(h / 360 * 255) % 256, int(s * 255), int(v * 255))).convert("RGB")
    return rgb.getpixel((0, 0))


def draw_image(rng: np.random.Generator, shape: str, hue: float) -> Image.Image:
    """One RGB image: noisy two-colour background gradient plus the class's shape."""
    short = int(rng.integers(140, 560))
    aspect = float(rng.uniform(0.6, 1.8))
    w, h = (int(short * aspect), short) if aspect >= 1 else (short, int(short / aspect))
    bg1 = np.array(hsv_to_rgb(rng.uniform(0, 360), rng.uniform(0, 0.3), rng.uniform(0.3, 0.9)))
    bg2 = np.array(hsv_to_rgb(rng.uniform(0, 360), rng.uniform(0, 0.3), rng.uniform(0.3, 0.9)))
    t = np.linspace(0, 1, w)[None, :, None]
    pixels = bg1 * (1 - t) + bg2 * t + rng.normal(0, 12, (h, w, 3))
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    color = hsv_to_rgb(hue + rng.uniform(-12, 12), rng.uniform(0.7, 1.0), rng.uniform(0.7, 1.0))
    r = rng.uniform(0.25, 0.4) * min(w, h)
    cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "disk":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
    elif shape == "ring":
        draw.ellipse(box, outline=color, width=max(3, int(r / 3)))
    elif shape == "cross":
        draw.rectangle((cx - r, cy - r / 4, cx + r, cy + r / 4), fill=color)
        draw.rectangle((cx - r / 4, cy - r, cx + r / 4, cy + r), fill=color)
    else:  # bar
        draw.rectangle((cx - r, cy - r / 5, cx + r, cy + r / 5), fill=color)
    return img


def encode(img: Image.Image, kind: str) -> bytes:
    """Encode as the odd file `kind`; everything is named .JPEG whatever its format."""
    buf = io.BytesIO()
    if kind == "gray":
        img.convert("L").save(buf, "JPEG", quality=92)
    elif kind == "cmyk":
        img.convert("CMYK").save(buf, "JPEG", quality=92)
    elif kind == "png":  # RGBA PNG with a transparent border
        rgba = img.convert("RGBA")
        alpha = Image.new("L", img.size, 0)
        ImageDraw.Draw(alpha).rectangle((8, 8, img.size[0] - 9, img.size[1] - 9), fill=255)
        rgba.putalpha(alpha)
        rgba.save(buf, "PNG")
    elif kind == "gif":
        img.convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(buf, "GIF")
    else:
        img.save(buf, "JPEG", quality=92)
    return buf.getvalue()


def make_sample(cfg: SampleConfig) -> dict:
    """Write the tree; return counts. Deterministic in cfg.seed."""
    if not 1 <= cfg.classes <= len(CLASS_DESIGNS):
        raise UserError(f"--classes must be between 1 and {len(CLASS_DESIGNS)}")
    if cfg.train_per_class < 6 or cfg.val_per_class < 1:
        raise UserError("--train-per-class must be >= 6 (room for the odd files) and --val-per-class >= 1")
    root = Path(cfg.dir)
    if root.exists() and any(root.iterdir()):
        raise UserError(f"{root}: exists and is not empty")
    if cfg.names not in ("wnid", "shape"):
        raise UserError("--names must be wnid or shape")
    wnids = {i: w for i, w, _ in imagenet_classes()}
    if cfg.names == "shape":  # folder names that are not wnids: labels are sorted folder order
        wnids = {index: f"{shape}_{hue:03d}" for index, shape, hue in CLASS_DESIGNS}
    rng = np.random.default_rng(cfg.seed)
    odd = {1: "gray", 2: "cmyk", 3: "png", 4: "gif"}  # per class, image n -> kind
    counts = {"train": 0, "val": 0, "broken": 0}
    bar = Bar(total=cfg.classes * (cfg.train_per_class + cfg.val_per_class), unit="img", desc="sample")
    for index, shape, hue in CLASS_DESIGNS[: cfg.classes]:
        folder = root / "train" / wnids[index]
        folder.mkdir(parents=True)
        for n in range(cfg.train_per_class):
            data = encode(draw_image(rng, shape, hue), odd.get(n, "jpeg"))
            (folder / f"{wnids[index]}_{n}.JPEG").write_bytes(data)
            counts["train"] += 1
            bar.update()
    # What a prepare tool must survive: ignored (not images) and rejected (broken) files.
    first = root / "train" / wnids[CLASS_DESIGNS[0][0]]
    good = (first / f"{first.name}_0.JPEG").read_bytes()
    (first / f"{first.name}_truncated.JPEG").write_bytes(good[: len(good) // 3])
    (first / f"{first.name}_empty.JPEG").write_bytes(b"")
    (first / "README.txt").write_text("not an image\n")
    counts["broken"] = 2
    (root / "val").mkdir()
    lines = ["ImageId,PredictionString"]
    order = [d for d in CLASS_DESIGNS[: cfg.classes] for _ in range(cfg.val_per_class)]
    for k in rng.permutation(len(order)):
        index, shape, hue = order[k]
        counts["val"] += 1
        name = f"ILSVRC2012_val_{counts['val']:08d}"
        folder = root / "val" / (wnids[index] if cfg.names == "shape" else "")
        folder.mkdir(exist_ok=True)
        (folder / f"{name}.JPEG").write_bytes(encode(draw_image(rng, shape, hue), "jpeg"))
        bar.update()
        lines.append(f"{name},{wnids[index]} 0 0 10 10")
    bar.close()
    if cfg.names == "wnid":
        (root / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")
    return counts


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alexpipe-sample", description=__doc__.split("\n\n")[0], formatter_class=Help)
    p.add_argument("dir", type=Path, help="where to write the tree (must not exist or be empty)")
    p.add_argument("--classes", type=int, default=SampleConfig.classes, help=f"classes, 1..{len(CLASS_DESIGNS)}")
    p.add_argument("--train-per-class", type=int, default=SampleConfig.train_per_class, help="train images per class")
    p.add_argument("--val-per-class", type=int, default=SampleConfig.val_per_class, help="val images per class")
    p.add_argument("--seed", type=int, default=SampleConfig.seed, help="the images drawn")
    p.add_argument("--names", default="wnid", choices=["wnid", "shape"],
                   help="wnid: ImageNet wnid folders, flat val with LOC_val_solution.csv (standard labels); "
                        "shape: folders named by shape, val in class folders (labels 0..classes-1)")
    return p


def parse_args(argv) -> SampleConfig:
    return SampleConfig(**vars(parser().parse_args(argv)))


def _main(argv) -> int:
    cfg = parse_args(argv)
    print_config("alexpipe-sample", cfg)
    counts = make_sample(cfg)
    print(f"wrote {cfg.dir}: {counts['train']} train images in {cfg.classes} classes "
          f"(+{counts['broken']} broken files and a README.txt), {counts['val']} val images "
          + ("with LOC_val_solution.csv" if cfg.names == "wnid" else "in class folders"))
    return 0


def main(argv=None) -> int:
    return run_main("alexpipe-sample", _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
