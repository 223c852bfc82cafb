"""alexpipe-prepare: an ImageNet tree to shuffled, 256-px WebDataset shards.

Why offline: decoding a full-size ImageNet JPEG (avg ~400x350, up to several thousand
pixels a side) and resizing it costs far more than the training step needs; doing it once
leaves the GPU loader a ~30 KB 256-px JPEG per sample.

Each image is decoded by content (PIL sniffs the format, so a PNG named .JPEG works),
converted to RGB (grayscale replicated, CMYK through PIL's conversion, transparency
composited on white), resized so its short side is 256 with PIL's antialiased bicubic
filter (aspect kept, small images upscaled), or resized then center-cropped to 256x256
with --center-crop, and re-encoded as JPEG. EXIF orientation is not applied, as in
torchvision's ImageFolder that published ImageNet results were produced with. Large JPEGs
are decoded with PIL's draft mode (DCT-domain 1/2, 1/4, 1/8 scaling, never below the
target size) - tools/bench_prepare.py measures its speed and its PSNR against a full decode.

Output, per split: OUT/<split>/<split>-NNNNNN.tar (+ .idx in DALI's wds2idx format), each
sample <key>.jpg, <key>.cls (ASCII label), <key>.json (source, wnid, original size), where
<key> is the sample's 8-digit position in the split's seeded shuffle. Then
OUT/<split>/rejected.tsv and, last, OUT/manifest.json.

Tiles (--tile K, with --center-crop): each train sample is K consecutive images of the
shuffle, their 256x256 squares stacked top to bottom in one JPEG, its .cls the K labels
separated by spaces and its .json {"tile": [K records]}. The GPU decoder's per-JPEG work
(a copy, a colour conversion kernel and a synchronization per JPEG, whatever its size)
is then paid once per K images; the loader takes one view inside each square. A tile
short of readable images (rejects, or the split's last tile) repeats its own images,
marked "repeat" in its .json.

Resumable: a shard is written to a temporary and renamed when complete, then its record
(count, sha256, rejects) is written to OUT/<split>/.parts/; a rerun skips shards that have
a record from the same job and redoes the rest, so the result is byte-identical to an
uninterrupted run.
"""

from __future__ import annotations

import argparse
import collections
import csv
import hashlib
import io
import json
import sys
import tarfile
import time
from dataclasses import dataclass, field
from functools import partial
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import __version__
from .dataset import MANIFEST, MANIFEST_FORMAT, read_manifest
from .util import (Bar, DiskFull, Help, UserError, atomic_file, atomic_write_bytes, config_dict, default_workers,
                   imagenet_classes, print_config, run_main, sha256_file, write_json)

SHORT_SIDE = 256
IMAGE_EXTS = {".jpeg", ".jpg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}
RESAMPLE = "bicubic"  # antialiased (support scales with the ratio), PIL's filter, computed by torch (see resize)


@dataclass
class PrepareConfig:
    src: Path
    out: Path
    split: str = "both"
    workers: int = field(default_factory=default_workers)
    shard_size: int = 5000  # ~150 MB shards of ~30 KB JPEGs; ImageNet's train set in 257
    seed: int = 0
    quality: int = 90
    center_crop: bool = False
    tile: int = 1  # train images per JPEG (needs center_crop); val is never tiled
    strict: bool = False
    val_labels: Path | None = None


@dataclass(frozen=True)
class Item:
    path: str  # relative to SRC
    label: int
    wnid: str


# ---------------------------------------------------------------------------- scanning

def list_images(folder: Path) -> list[Path]:
    """Image files by extension (case-insensitive); hidden files and others are ignored."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTS)


def class_folders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def label_space(folders: list[str]) -> tuple[list[tuple[int, str, str]], str]:
    """Standard ILSVRC-2012 indices if every folder is one of its wnids (so a subset of
    classes keeps the standard labels), else sorted folder order."""
    standard = imagenet_classes()
    wnids = {w for _, w, _ in standard}
    if folders and all(f in wnids for f in folders):
        return standard, "imagenet"
    return [(i, f, f) for i, f in enumerate(folders)], "folders"


def scan_class_folders(src: Path, split_dir: Path, by_wnid: dict[str, int]) -> list[Item]:
    items = []
    for wnid in class_folders(split_dir):
        if wnid not in by_wnid:
            raise UserError(f"{split_dir / wnid}: class folder not among the classes of the train split")
        items += [Item(str(p.relative_to(src)), by_wnid[wnid], wnid) for p in list_images(split_dir / wnid)]
    return items


def find_val_labels(src: Path, given: Path | None) -> tuple[str, Path]:
    """Locate the flat val split's label file: Kaggle's LOC_val_solution.csv or the
    devkit's ILSVRC2012_validation_ground_truth.txt (with meta.mat beside it)."""
    if given is not None:
        if not given.is_file():
            raise UserError(f"{given}: --val-labels file not found")
        if given.name.endswith(".csv"):
            return "kaggle", given
        if given.name.endswith(".txt"):
            return "devkit", given
        raise UserError(f"{given}: unknown label file format (expected LOC_val_solution.csv "
                        f"or ILSVRC2012_validation_ground_truth.txt)")
    for d in (src, src / "val", src.parent):
        if (d / "LOC_val_solution.csv").is_file():
            return "kaggle", d / "LOC_val_solution.csv"
    for d in (src, src / "ILSVRC2012_devkit_t12" / "data", src / "val"):
        if (d / "ILSVRC2012_validation_ground_truth.txt").is_file():
            return "devkit", d / "ILSVRC2012_validation_ground_truth.txt"
    raise UserError(f"{src / 'val'}: flat val folder but no label file found (looked for "
                    f"LOC_val_solution.csv and ILSVRC2012_devkit_t12/data/"
                    f"ILSVRC2012_validation_ground_truth.txt; pass --val-labels)")


def read_val_labels(kind: str, path: Path) -> dict[str, str]:
    """Image stem -> wnid."""
    if kind == "kaggle":
        try:
            with open(path, newline="") as f:
                rows = list(csv.reader(f))
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise UserError(f"{path}: unreadable label file ({e})") from None
        if not rows or rows[0][:2] != ["ImageId", "PredictionString"]:
            raise UserError(f"{path}: unknown label file format (expected header ImageId,PredictionString)")
        try:
            return {r[0]: r[1].split()[0] for r in rows[1:] if r}
        except IndexError:
            raise UserError(f"{path}: unknown label file format (a row without a wnid)") from None
    meta = path.parent / "meta.mat"
    if not meta.is_file():
        raise UserError(f"{meta}: not found (the devkit's ground truth needs meta.mat beside it)")
    from scipy.io import loadmat  # only the devkit layout needs scipy
    try:
        synsets = loadmat(str(meta), squeeze_me=True)["synsets"]
        id_to_wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
        ids = [int(line) for line in path.read_text().split()]
    except Exception as e:  # noqa: BLE001 - scipy's MatReadError and friends: the file is not what we need
        raise UserError(f"{path}: unknown label file format ({type(e).__name__}: {e})") from None
    try:
        return {f"ILSVRC2012_val_{i + 1:08d}": id_to_wnid[x] for i, x in enumerate(ids)}
    except KeyError as e:
        raise UserError(f"{path}: ILSVRC2012_ID {e} not in {meta}") from None


def scan(cfg: PrepareConfig) -> tuple[dict[str, list[Item]], list, str, str | None]:
    """Find the splits' images and labels. Returns (items per split, class list,
    labelling, val label source)."""
    src = cfg.src
    if not src.is_dir():
        raise UserError(f"{src}: source directory not found")
    splits = ["train", "val"] if cfg.split == "both" else [cfg.split]
    for s in splits:
        if not (src / s).is_dir():
            raise UserError(f"{src / s}: not found (expected SRC/train/<class>/*.JPEG and SRC/val/; "
                            f"use --split to prepare one split)")
    train_dir, val_dir = src / "train", src / "val"
    val_folders = class_folders(val_dir) if val_dir.is_dir() else []
    folders = class_folders(train_dir) if train_dir.is_dir() else val_folders
    if train_dir.is_dir() and not folders:
        raise UserError(f"{train_dir}: no class folders")
    classes, labelling = label_space(folders) if folders else (imagenet_classes(), "imagenet")
    by_wnid = {w: i for i, w, _ in classes}
    items, val_source = {}, None
    if "train" in splits:
        items["train"] = scan_class_folders(src, train_dir, by_wnid)
    if "val" in splits:
        if val_folders:
            items["val"] = scan_class_folders(src, val_dir, by_wnid)
            val_source = "class folders"
        else:
            if labelling != "imagenet":
                raise UserError(f"{val_dir}: a flat val folder needs ImageNet wnid class folders in train")
            kind, path = find_val_labels(src, cfg.val_labels)
            print(f"val labels: {kind}: {path}")
            val_source = f"{kind}: {path.name}"  # no directory: the manifest's identity must not depend on it
            stem_to_wnid = read_val_labels(kind, path)
            files = list_images(val_dir)
            missing = [f for f in files if f.stem not in stem_to_wnid]
            if missing:
                raise UserError(f"{missing[0]}: no label in {path} ({len(missing)} val images unlabelled)")
            unknown = sorted({stem_to_wnid[f.stem] for f in files} - set(by_wnid))
            if unknown:
                raise UserError(f"{path}: wnid {unknown[0]} is not an ILSVRC-2012 class")
            items["val"] = [Item(str(f.relative_to(src)), by_wnid[stem_to_wnid[f.stem]], stem_to_wnid[f.stem])
                            for f in files]
    for s, its in items.items():
        if not its:
            raise UserError(f"{src / s}: no image files found")
    return items, classes, labelling, val_source


def shuffled(items: list[Item], seed: int) -> list[Item]:
    """Sorted by path, then a seeded permutation: the same tree and seed give the same order."""
    items = sorted(items, key=lambda it: it.path)
    return [items[i] for i in np.random.default_rng(seed).permutation(len(items))]


# ---------------------------------------------------------------------------- one image

def target_geometry(size: tuple[int, int], center_crop: bool):
    """(resized size, crop box): the short side scaled to 256, and with center_crop the
    box of the resized image that is its central 256x256 square (else None)."""
    w, h = size
    scale = SHORT_SIDE / min(w, h)
    tw, th = max(1, round(w * scale)), max(1, round(h * scale))
    if not center_crop:
        return (tw, th), None
    left, top = (tw - SHORT_SIDE) // 2, (th - SHORT_SIDE) // 2
    return (tw, th), (left, top, left + SHORT_SIDE, top + SHORT_SIDE)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to RGB; transparent pixels are composited on white rather than left at
    whatever colour they happen to store."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def resize(rgb: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Antialiased bicubic resize with torch's uint8 kernel on an HWC (channels_last) view:
    PIL's filter (within 2 of 255 levels), at a quarter of PIL's time, which was half of a
    worker's (docs/benchmarks.md)."""
    x = torch.from_numpy(np.array(rgb)).permute(2, 0, 1)[None]
    y = torch.nn.functional.interpolate(x, size=(size[1], size[0]), mode=RESAMPLE, antialias=True)
    return Image.fromarray(y[0].permute(1, 2, 0).numpy())


def load_resized(path, center_crop: bool, draft: bool = True) -> tuple[Image.Image, dict]:
    """Decode by content, convert to RGB, resize (and crop). Returns the image and what
    the sample's .json records about the source."""
    with Image.open(path) as img:
        info = {"size": list(img.size), "format": img.format, "mode": img.mode}
        size, box = target_geometry(img.size, center_crop)
        if draft and img.format == "JPEG":
            img.draft("RGB", size)  # the decoder scales by 1/2..1/8 while staying >= size
        out = resize(to_rgb(img), size)
        return (out.crop(box) if box else out), info


def tar_members(key: str, files: dict[str, bytes]) -> tuple[bytes, list[str]]:
    """One sample's files as tar bytes (USTAR headers from tarfile, data padded to 512)
    and their DALI index entries 'ext offset size name' with offsets from the sample's
    start. Built in the workers, so that the single writing process only concatenates
    (tarfile's writer there capped the scaling over workers)."""
    chunks, entries, pos = [], [], 0
    for ext in sorted(files):
        data = files[ext]
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o444, "", ""
        header = info.tobuf(tarfile.USTAR_FORMAT)
        pad = -len(data) % tarfile.BLOCKSIZE
        chunks += [header, data, tarfile.NUL * pad]
        entries.append([ext, pos + len(header), len(data), info.name])
        pos += len(header) + len(data) + pad
    return b"".join(chunks), entries


def read_one(src: Path, center_crop: bool, item: Item):
    """(image, its .json record) or (None, why it is not a readable image). Any exception
    while reading is the file's fault."""
    try:
        img, info = load_resized(src / item.path, center_crop)
    except Exception as e:  # noqa: BLE001 - unreadable, truncated, empty, not an image...
        return None, " ".join(f"{type(e).__name__}: {e}".split())
    return img, {"src": item.path, "wnid": item.wnid, "label": item.label, **info}


def jpeg_bytes(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def convert_one(src: Path, center_crop: bool, quality: int, task: tuple[int, Item]):
    """Worker: one source file to its sample's tar bytes, index entries, stored pixel count
    (H*W: what a decoded-image cache needs) and rejects ([] or [(path, reason)]); member
    None if the file is not a readable image."""
    index, item = task
    img, meta = read_one(src, center_crop, item)
    if img is None:
        return None, None, 0, [(item.path, meta)]
    member, entries = tar_members(f"{index:08d}", {"jpg": jpeg_bytes(img, quality), "cls": str(item.label).encode(),
                                                   "json": json.dumps(meta, sort_keys=True).encode()})
    return member, entries, img.size[0] * img.size[1], []


def convert_tile(src: Path, quality: int, tile: int, task: tuple[int, tuple[Item, ...]]):
    """Worker: up to `tile` items to one tile sample (their 256x256 squares top to bottom),
    as convert_one; a tile short of readable images repeats its own (marked "repeat"), one
    with none is no sample."""
    index, items = task
    read = [(item, *read_one(src, True, item)) for item in items]
    good = [(img, meta) for _, img, meta in read if img is not None]
    rejects = [(item.path, why) for item, img, why in read if img is None]
    if not good:
        return None, None, 0, rejects
    slots = [good[i] if i < len(good) else (good[i % len(good)][0], {**good[i % len(good)][1], "repeat": True})
             for i in range(tile)]
    stacked = Image.new("RGB", (SHORT_SIDE, SHORT_SIDE * tile))
    for k, (img, _) in enumerate(slots):
        stacked.paste(img, (0, SHORT_SIDE * k))
    labels = " ".join(str(meta["label"]) for _, meta in slots)
    member, entries = tar_members(f"{index:08d}", {
        "jpg": jpeg_bytes(stacked, quality), "cls": labels.encode(),
        "json": json.dumps({"tile": [meta for _, meta in slots]}, sort_keys=True).encode()})
    return member, entries, stacked.size[0] * stacked.size[1], rejects


def _init_worker():
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled once, in the parent
    torch.set_num_threads(1)  # one process per core already; torch's own threads would oversubscribe


# ---------------------------------------------------------------------------- shards

def index_text(tar_path: Path) -> tuple[str, int]:
    """DALI's index (the format of its wds2idx tool): 'v1.2 N', then per sample its
    components as 'ext data_offset size name'. Built by reading the tar's headers back, so
    it describes the bytes on disk. Returns the text and the sample count."""
    samples = collections.OrderedDict()
    with tarfile.open(tar_path) as tar:
        for m in tar:
            if m.isfile():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, []).append(f"{ext} {m.offset_data} {m.size} {m.name}")
    text = f"v1.2 {len(samples)}\n" + "".join(" ".join(c) + "\n" for c in samples.values())
    return text, len(samples)


def write_shard(tar_path: Path, results) -> dict:
    """Stream one shard's samples into a temporary tar (hashing as it goes), fsync, rename,
    then write its index (util.atomic_file: a full disk leaves no part of it behind). Returns
    the shard's record (without the job id). The bytes equal what tarfile.TarFile would write
    for the same members."""
    rejected, lines, pos, pixels = [], [], 0, 0
    sha = hashlib.sha256()
    with atomic_file(tar_path) as f:
        def put(data: bytes):
            f.write(data)
            sha.update(data)
        for member, entries, n_pixels, rejects in results:
            rejected += [list(r) for r in rejects]
            if member is None:
                continue
            put(member)
            pixels += n_pixels
            lines.append(" ".join(f"{ext} {pos + off} {size} {name}" for ext, off, size, name in entries))
            pos += len(member)
        end = tarfile.NUL * (2 * tarfile.BLOCKSIZE)  # end-of-archive, padded to a whole record
        put(end + tarfile.NUL * (-(pos + len(end)) % tarfile.RECORDSIZE))
    atomic_write_bytes(tar_path.with_suffix(".idx"), f"v1.2 {len(lines)}\n{''.join(x + chr(10) for x in lines)}"
                       .encode())
    return {"count": len(lines), "bytes": tar_path.stat().st_size, "sha256": sha.hexdigest(),
            "pixels": pixels, "rejected": rejected}


def split_tile(cfg: PrepareConfig, split: str) -> int:
    return cfg.tile if split == "train" else 1


def job_id(cfg: PrepareConfig, split: str, items: list[Item]) -> str:
    """Fingerprint of everything that determines a split's bytes; a shard record from
    another job (other files, seed, quality...) is never reused."""
    h, tile = hashlib.sha256(), split_tile(cfg, split)
    h.update(json.dumps([SHORT_SIDE, cfg.seed, cfg.quality, cfg.center_crop, cfg.shard_size,
                         RESAMPLE, Image.__version__, torch.__version__, __version__, split]
                        + ([tile] if tile > 1 else [])).encode())  # (untiled jobs keep 0.2.5's ids)
    for it in items:  # size and mtime too: an edited source file makes a new job
        st = (cfg.src / it.path).stat()
        h.update(f"{it.path}\t{it.label}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def finished_shards(cfg: PrepareConfig, split: str, job: str, n_shards: int) -> dict[int, dict]:
    """The records of this split's shards that a run of the same job completed; a record of
    another job is refused, so no shard of other files or settings is ever reused."""
    out, records = cfg.out / split, {}
    for k in range(n_shards):
        name = f"{split}-{k:06d}"
        rec_path = out / ".parts" / f"{name}.json"
        rec = json.loads(rec_path.read_text()) if rec_path.exists() else None
        if rec is not None and rec.get("job") != job:
            raise UserError(f"{out}: written by another run (other source files or settings); "
                            f"use a new OUT or delete {out}")
        if rec is not None and (out / f"{name}.tar").exists() and (out / f"{name}.idx").exists():
            records[k] = rec
    return records


def write_shards(cfg: PrepareConfig, split: str, items: list, todo: list[int], pool, bar, job: str):
    """Convert and write the shards `todo` of `items` (Items, or tuples of them: tiles),
    yielding (k, record) as each is complete. The next shard's images are queued while one
    is written, so workers never idle at a shard boundary; at most two shards' results are
    in memory."""
    tile = split_tile(cfg, split)
    convert = partial(convert_tile, cfg.src, cfg.quality, tile) if tile > 1 else partial(convert_one, cfg.src,
                                                                                 cfg.center_crop, cfg.quality)
    pending = collections.deque()

    def counted(results):
        for r in results:
            bar.update()
            yield r

    for k in todo + [None]:
        if k is not None:
            shard_items = items[k * cfg.shard_size:(k + 1) * cfg.shard_size]
            tasks = enumerate(shard_items, start=k * cfg.shard_size)  # sample key = position in the split
            pending.append((k, pool.imap(convert, tasks, chunksize=16)))
        while pending and (len(pending) == 2 or k is None):
            k_done, results = pending.popleft()
            name = f"{split}-{k_done:06d}"
            rec = write_shard(cfg.out / split / f"{name}.tar", counted(results))
            if cfg.strict and rec["rejected"]:
                path, why = rec["rejected"][0]
                raise UserError(f"{cfg.src / path}: {why} (--strict)")
            write_json(cfg.out / split / ".parts" / f"{name}.json", {**rec, "job": job})
            yield k_done, rec


def prepare_split(cfg: PrepareConfig, split: str, items: list[Item], pool) -> dict:
    """Write (or complete) one split's shards; return its manifest entry."""
    out = cfg.out / split
    (out / ".parts").mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.tmp"):
        stale.unlink()  # a temporary left by a killed run
    job, tile = job_id(cfg, split, items), split_tile(cfg, split)
    units = items if tile == 1 else [tuple(items[i:i + tile]) for i in range(0, len(items), tile)]
    n_shards = (len(units) + cfg.shard_size - 1) // cfg.shard_size
    records = finished_shards(cfg, split, job, n_shards)
    if records:
        print(f"{split}: {len(records)} of {n_shards} shards already complete, resuming", flush=True)
    done = sum(min(cfg.shard_size, len(units) - k * cfg.shard_size) for k in records)
    todo = [k for k in range(n_shards) if k not in records]
    with Bar(total=len(units), initial=done, unit="img" if tile == 1 else "tile", desc=split, smoothing=0.05) as bar:
        records.update(write_shards(cfg, split, units, todo, pool, bar, job))
    shards = [records[k] for k in range(n_shards)]
    rejected = [r for s in shards for r in s["rejected"]]
    atomic_write_bytes(out / "rejected.tsv",
                       ("path\treason\n" + "".join(f"{p}\t{why}\n" for p, why in rejected)).encode())
    return {
        "count": sum(s["count"] for s in shards),
        "tile": tile,
        "images": len(items) - len(rejected),
        "source_files": len(items),
        "rejected": len(rejected),
        "shards": [{"tar": f"{split}/{split}-{k:06d}.tar", "idx": f"{split}/{split}-{k:06d}.idx",
                    "count": s["count"], "bytes": s["bytes"], "sha256": s["sha256"], "pixels": s["pixels"]}
                   for k, s in enumerate(shards)],
    }


def earlier_manifest(cfg: PrepareConfig, settings: dict, classes: list) -> dict | None:
    """OUT's manifest from an earlier run, if any: splits are added to it one at a time, and
    one written with other settings or classes is refused."""
    path = cfg.out / MANIFEST
    try:
        cfg.out.mkdir(parents=True, exist_ok=True)
        probe = cfg.out / ".alexpipe-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{cfg.out}: not writable ({e.strerror})") from None
    old = read_manifest(cfg.out) if path.exists() else None
    as_json = json.loads(json.dumps(classes))  # tuples read back as lists
    if old is not None and (old.get("settings") != settings or old.get("classes") != as_json):
        what = "settings" if old.get("settings") != settings else "classes"
        raise UserError(f"{path}: OUT was prepared with other {what} "
                        f"({old.get('settings') if what == 'settings' else 'another class list'}); use a new OUT")
    return old


def say_labels(items: dict, classes: list, labelling: str, val_source: str | None) -> None:
    if labelling == "imagenet":
        present = len({i.wnid for its in items.values() for i in its})
        print(f"labels: standard ILSVRC-2012 indices ({present} of the 1000 classes present)")
    else:
        print(f"labels: folder names are not ImageNet wnids; using sorted folder order ({len(classes)} classes)")
    if val_source == "class folders":
        print(f"val labels: {val_source}")
    print(flush=True)


def prepare(cfg: PrepareConfig) -> dict:
    """The whole job; returns the manifest."""
    if cfg.tile < 1 or (cfg.tile > 1 and not cfg.center_crop):
        raise UserError(f"--tile must be >= 1, got {cfg.tile}" if cfg.tile < 1
                        else "--tile needs --center-crop (a tile stacks 256x256 squares)")
    items, classes, labelling, val_source = scan(cfg)
    settings = {"short_side": SHORT_SIDE, "center_crop": cfg.center_crop, "quality": cfg.quality,
                "seed": cfg.seed, "shard_size": cfg.shard_size, "resample": f"{RESAMPLE}, antialiased (torch uint8)",
                "labels": labelling, **({"tile": cfg.tile} if cfg.tile > 1 else {})}  # (0.2.5's had no tile)
    old = earlier_manifest(cfg, settings, classes)
    say_labels(items, classes, labelling, val_source)
    splits, t0 = dict(old["splits"]) if old else {}, time.perf_counter()
    try:
        with Pool(cfg.workers, initializer=_init_worker) as pool:
            for split, its in items.items():
                splits[split] = prepare_split(cfg, split, shuffled(its, cfg.seed), pool)
        manifest = {"format": MANIFEST_FORMAT, "alexpipe": __version__, "settings": settings,
                    "val_labels": val_source if val_source else (old or {}).get("val_labels"),
                    "classes": [list(c) for c in classes], "splits": splits}
        write_json(cfg.out / MANIFEST, manifest)
        write_json(cfg.out / "prepare-config.json", config_dict(cfg))
    except KeyboardInterrupt:
        print("\ncomplete shards are kept; rerun the same command to resume", file=sys.stderr)
        raise
    except DiskFull as e:
        raise UserError(f"{cfg.out}: disk full (no space left on device) while writing {e.path.name}; the complete "
                        f"shards are kept: free space and rerun the same command to resume") from None
    dt = time.perf_counter() - t0
    for split in items:
        s = splits[split]
        size = sum(x["bytes"] for x in s["shards"])
        tiles = f" (tiles of {s['tile']}: {s['images']} images)" if s["tile"] > 1 else ""
        print(f"{split}: {s['count']} samples{tiles} in {len(s['shards'])} shards ({size / 1e6:.1f} MB), "
              f"{s['rejected']} rejected (see {cfg.out / split / 'rejected.tsv'})")
    n_images = sum(len(its) for its in items.values())
    print(f"done in {dt:.1f} s ({n_images / dt:.0f} images/s with {cfg.workers} workers); "
          f"manifest: {cfg.out / MANIFEST}")
    return manifest


# ---------------------------------------------------------------------------- verify

def verify_shard(out: Path, shard: dict, center_crop: bool) -> list[str]:
    """Problems found in one shard (its "tile": images per sample, default 1): size, sha256,
    index, sample count, decodability, geometry, labels."""
    tar_path, idx_path, tile = out / shard["tar"], out / shard["idx"], shard.get("tile", 1)
    if not tar_path.exists():
        return [f"{tar_path}: missing"]
    problems = []
    if tar_path.stat().st_size != shard["bytes"] or sha256_file(tar_path) != shard["sha256"]:
        problems.append(f"{tar_path}: size or sha256 differs from the manifest")
    try:
        samples = collections.defaultdict(dict)
        with tarfile.open(tar_path) as tar:
            for m in tar:
                key, ext = m.name.split(".", 1)
                samples[key][ext] = tar.extractfile(m).read()
    except (tarfile.TarError, OSError, ValueError) as e:
        return problems + [f"{tar_path}: unreadable tar ({e})"]
    if len(samples) != shard["count"]:
        problems.append(f"{tar_path}: {len(samples)} samples, manifest says {shard['count']}")
    for key, s in samples.items():
        if set(s) != {"jpg", "cls", "json"}:
            problems.append(f"{tar_path}: sample {key} has components {sorted(s)}")
            continue
        try:
            with Image.open(io.BytesIO(s["jpg"])) as img:
                img.load()
                w, h = img.size
            ok = (w, h) == (SHORT_SIDE, SHORT_SIDE * tile) if center_crop else min(w, h) == SHORT_SIDE
            if img.format != "JPEG" or not ok:
                problems.append(f"{tar_path}: sample {key} is {img.format} {w}x{h}")
            if len([int(label) for label in s["cls"].split()]) != tile:
                problems.append(f"{tar_path}: sample {key} has labels {s['cls'].decode()!r}, not {tile}")
        except Exception as e:  # noqa: BLE001
            problems.append(f"{tar_path}: sample {key} does not decode ({type(e).__name__}: {e})")
    if not idx_path.exists():
        problems.append(f"{idx_path}: missing")
    elif idx_path.read_text() != index_text(tar_path)[0]:
        problems.append(f"{idx_path}: does not match the tar")
    return problems


def verify(out: Path, workers: int) -> int:
    manifest = read_manifest(out)
    center_crop = manifest["settings"]["center_crop"]
    shards = [{**s, "tile": split.get("tile", 1)} for split in manifest["splits"].values() for s in split["shards"]]
    problems, n = [], 0
    with Pool(workers, initializer=_init_worker) as pool:
        check = partial(verify_shard, out, center_crop=center_crop)
        for shard, found in zip(shards, Bar(pool.imap(check, shards), total=len(shards), unit="shard")):
            problems += found
            n += shard["count"]
    for p in problems:
        print(p)
    if problems:
        print(f"verify: {len(problems)} problems in {out}")
        return 1
    print(f"verify: OK - {len(shards)} shards, {n} samples, every sha256 and index matches, every JPEG decodes")
    return 0


# ---------------------------------------------------------------------------- CLI

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="alexpipe-prepare", formatter_class=Help,
        description="Turn an ImageNet tree into shuffled 256-px WebDataset shards with DALI "
                    "index files and a manifest. `alexpipe-prepare --verify OUT` checks them.")
    p.add_argument("src", type=Path, nargs="?", help="ImageNet root with train/<wnid>/ and val/")
    p.add_argument("out", type=Path, nargs="?", help="output directory")
    p.add_argument("--split", choices=["train", "val", "both"], default="both",
                   help="which split to prepare; splits can be added to an OUT one at a time")
    p.add_argument("--workers", type=int, default=default_workers(),
                   help="processes (default: all cores, here %(default)s)")
    p.add_argument("--shard-size", type=int, default=PrepareConfig.shard_size, help="samples per shard")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of the re-encoded images")
    p.add_argument("--center-crop", action=argparse.BooleanOptionalAction, default=False,
                   help="store the central 256x256 square (the paper) instead of the short-side-256 image")
    p.add_argument("--tile", type=int, default=1, metavar="K",
                   help="store K train images per JPEG (their 256x256 squares stacked; needs --center-crop): the "
                        "GPU decoder's per-JPEG work is then paid once per K images (docs/design.md)")
    p.add_argument("--strict", action=argparse.BooleanOptionalAction, default=False,
                   help="fail on the first unreadable image instead of skipping it")
    p.add_argument("--val-labels", type=Path, default=None,
                   help="label file for a flat val folder (LOC_val_solution.csv or the devkit's "
                        "ILSVRC2012_validation_ground_truth.txt) (default: found beside SRC)")
    p.add_argument("--verify", type=Path, metavar="OUT", default=None,
                   help="re-read every shard of OUT against its manifest and exit (default: prepare)")
    return p


def parse_args(argv):
    p = parser()
    args = p.parse_args(argv)
    if args.verify is None and (args.src is None or args.out is None):
        p.error("SRC and OUT are required (or --verify OUT)")
    for name in ("workers", "shard_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    if not 1 <= args.quality <= 100:
        raise UserError(f"--quality must be in 1..100, got {args.quality}")
    return args


def _main(argv) -> int:
    args = parse_args(argv)
    if args.verify is not None:
        return verify(args.verify, args.workers)
    cfg = PrepareConfig(src=args.src, out=args.out, split=args.split, workers=args.workers,
                        shard_size=args.shard_size, seed=args.seed, quality=args.quality,
                        center_crop=args.center_crop, tile=args.tile, strict=args.strict,
                        val_labels=args.val_labels)
    print_config("alexpipe-prepare", cfg)
    prepare(cfg)
    return 0


def main(argv=None) -> int:
    return run_main("alexpipe-prepare", _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
