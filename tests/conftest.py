"""Shared test data: a synthetic tree (always available) and a tree built from the 500
real ILSVRC-2012 images in ../shared (tests that need it skip where it is absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from alexpipe.prepare import PrepareConfig, prepare
from alexpipe.sample import SampleConfig, make_sample

REPO = Path(__file__).resolve().parents[1]
REAL_SAMPLE = REPO.parent / "shared" / "data" / "imagenet-sample"
# which data a claim is tested on: always the package's own; the real sample too where present
# (not collected where absent, so a clone without it runs every claim and skips nothing)
DATA = ["made"] + (["real"] if REAL_SAMPLE.is_dir() else [])
N_REAL_VAL = 50  # of the 500 real images, these also form a flat val split


def real_images() -> list[Path]:
    if not REAL_SAMPLE.is_dir():
        pytest.skip(f"{REAL_SAMPLE} not present (real ImageNet sample images are not shipped)")
    return sorted(REAL_SAMPLE.glob("*.JPEG"))


@pytest.fixture(scope="session")
def real_tree(tmp_path_factory) -> Path:
    """SRC/train/<wnid>/<file> for all 500 real images, and a flat SRC/val of 50 of them
    (ILSVRC2012_val_NNNNNNNN.JPEG) with Kaggle's LOC_val_solution.csv. Symlinks, no copies."""
    images = real_images()
    root = tmp_path_factory.mktemp("real")
    for p in images:
        wnid = p.name.split("_")[0]
        (root / "train" / wnid).mkdir(parents=True, exist_ok=True)
        os.symlink(p, root / "train" / wnid / p.name)
    (root / "val").mkdir()
    rows = ["ImageId,PredictionString"]
    for i, p in enumerate(images[::len(images) // N_REAL_VAL][:N_REAL_VAL]):
        name = f"ILSVRC2012_val_{i + 1:08d}"
        os.symlink(p, root / "val" / f"{name}.JPEG")
        rows.append(f"{name},{p.name.split('_')[0]} 1 2 3 4")
    (root / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="session")
def real_out(real_tree, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("real_out")
    prepare(PrepareConfig(src=real_tree, out=out, workers=2, shard_size=128))
    return out


@pytest.fixture(scope="session")
def real_ready(real_out) -> Path:
    """real_out with its pca.json."""
    from alexpipe import pca
    if not (real_out / "pca.json").exists():
        assert pca.main([str(real_out), "--device", "cpu"]) == 0
    return real_out


@pytest.fixture(scope="session", params=DATA)
def any_prepared(request) -> tuple[Path, Path]:
    """(OUT, SRC): the synthetic ImageNet-layout tree alexpipe-sample writes (wnid folders,
    odd and broken files, flat val with its label file), or the real-image sample where it
    is present: every claim tested on the second also holds on the first, on any clone."""
    if request.param == "made":
        return request.getfixturevalue("synth_out"), request.getfixturevalue("synth_tree")
    return request.getfixturevalue("real_out"), request.getfixturevalue("real_tree")


@pytest.fixture(scope="session", params=DATA)
def any_ready(request) -> Path:
    """Prepared, with pca.json, every label naming its sample: unique_out (made here), or the
    real sample (one image per class) where it is present."""
    return request.getfixturevalue("unique_out" if request.param == "made" else "real_ready")


@pytest.fixture(scope="session")
def synth_tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "tree"
    make_sample(SampleConfig(dir=root, classes=4, train_per_class=12, val_per_class=3))
    return root


@pytest.fixture(scope="session")
def synth_out(synth_tree, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth_out")
    prepare(PrepareConfig(src=synth_tree, out=out, workers=2, shard_size=16))
    return out


@pytest.fixture(scope="session")
def synth_ready(synth_out) -> Path:
    """synth_out with its pca.json (standard ILSVRC labels, 1000 classes)."""
    from alexpipe import pca
    if not (synth_out / "pca.json").exists():
        assert pca.main([str(synth_out), "--device", "cpu"]) == 0
    return synth_out


@pytest.fixture(scope="session")
def shapes_out(tmp_path_factory) -> Path:
    """4 learnable classes named by shape (labels 0..3): 160 train, 40 val, with pca.json."""
    from alexpipe import pca
    root = tmp_path_factory.mktemp("shapes")
    make_sample(SampleConfig(dir=root / "src", names="shape"))
    prepare(PrepareConfig(src=root / "src", out=root / "out", workers=2, shard_size=64))
    assert pca.main([str(root / "out"), "--device", "cpu"]) == 0
    return root / "out"


@pytest.fixture(scope="session")
def shapes_run(shapes_out, tmp_path_factory) -> Path:
    """alexpipe-train on shapes_out: torchvision arch, batch 32, peak lr 0.025 (0.1 x 32/128)
    after a 2-epoch warmup, 10 epochs (~90 s on 2 cores; seen reaching 5% val error)."""
    from alexpipe import train
    run = tmp_path_factory.mktemp("shapes_run")
    args = [str(shapes_out), "--arch", "torchvision", "--device", "cpu", "--epochs", "10", "--batch-size", "32",
            "--lr", "0.1", "--warmup-epochs", "2", "--run-dir", str(run), "--log-every", "5"]
    assert train.main(args) == 0
    return run


@pytest.fixture(scope="session")
def unique_tree(tmp_path_factory) -> Path:
    """Made by the package alone: 150 generated images, each in its own class folder (labels
    0..149, so a label names its sample), and a val split of the first 20."""
    import numpy as np

    from alexpipe.sample import CLASS_DESIGNS, draw_image
    root = tmp_path_factory.mktemp("unique") / "src"
    rng = np.random.default_rng(0)
    for i in range(150):
        _, shape, hue = CLASS_DESIGNS[i % len(CLASS_DESIGNS)]
        for split in ("train", "val") if i < 20 else ("train",):
            (root / split / f"c{i:03d}").mkdir(parents=True)
            draw_image(rng, shape, hue).save(root / split / f"c{i:03d}" / "img.JPEG", quality=90)
    return root


@pytest.fixture(scope="session")
def unique_out(unique_tree) -> Path:
    """unique_tree prepared in shards of 32 (the last one short), with pca.json."""
    from alexpipe import pca
    out = unique_tree.parent / "out"
    prepare(PrepareConfig(src=unique_tree, out=out, workers=2, shard_size=32))
    assert pca.main([str(out), "--device", "cpu"]) == 0
    return out


@pytest.fixture(scope="session")
def tiled_out(unique_tree) -> Path:
    """unique_tree's central squares, train in tiles of 4 (38 samples, the last of 2 images
    and 2 repeats) in shards of 8, with pca.json."""
    from alexpipe import pca
    out = unique_tree.parent / "tiled"
    prepare(PrepareConfig(src=unique_tree, out=out, workers=2, shard_size=8, center_crop=True, tile=4))
    assert pca.main([str(out), "--device", "cpu"]) == 0
    return out


def error_lines(stderr: str) -> list[str]:
    """What a command printed to stderr, less its progress bars (tqdm redraws with \\r)."""
    return [line for line in stderr.replace("\r", "\n").splitlines() if line.strip() and "%|" not in line]


def cpu(rank: int = 0, world: int = 1, precision: str = "fp32", channels_last: bool = False):
    """Where a loader puts its batches: the CPU, as rank `rank` of `world` (no process group)."""
    import torch

    from alexpipe.runtime import Runtime
    return Runtime(torch.device("cpu"), precision, rank, world, 0, channels_last)


def cuda(rank: int = 0, world: int = 1, precision: str = "bf16", channels_last: bool = True):
    """The same on the first GPU."""
    import torch

    from alexpipe.runtime import Runtime
    return Runtime(torch.device("cuda", 0), precision, rank, world, 0, channels_last)
