"""The DALI loader on CPU: pixels against a numpy reference of the paper's transforms,
the statistics of the random augmentation, exact coverage over ranks, resumable state."""

from __future__ import annotations

import io
import json
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from nvidia.dali import types
from PIL import Image

from alexpipe.dataset import Prepared, iter_samples
from alexpipe.loader import (CACHE_RESERVE_GB, LoaderOptions, cache_gb_needed, cuda_queues_note, eval_loader,
                             parse_labels, plan_cache, train_loader)
from alexpipe.pipeline import train_pipeline
from alexpipe.util import UserError
from conftest import cpu, cuda


def read_jpeg(source: str) -> np.ndarray:
    """A sample's pixels from its DALI source_info 'tar:offset:key.jpg', decoded with PIL."""
    tar, offset, _ = source.rsplit(":", 2)
    idx = Path(tar).with_suffix(".idx").read_text().split()
    size = int(idx[idx.index(offset) + 1])
    with open(tar, "rb") as f:
        f.seek(int(offset))
        return np.asarray(Image.open(io.BytesIO(f.read(size))).convert("RGB"))


def anchor(pos: float, free: int) -> int:
    return int(np.floor(pos * free + 0.5))  # DALI's crop placement: round half up


def reference_train(img, pos_x, pos_y, mirror, alpha, p) -> np.ndarray:
    """The paper's transform in numpy: crop, flip, add eigvec @ (alpha * eigval/255), normalize."""
    h, w, _ = img.shape
    y0, x0 = anchor(pos_y, h - 224), anchor(pos_x, w - 224)
    crop = img[y0:y0 + 224, x0:x0 + 224].astype(np.float64)
    if mirror:
        crop = crop[:, ::-1]
    shift = np.array(p["eigvec"]) @ (np.asarray(alpha, np.float64) * np.array(p["eigval"]) / 255)
    return ((crop + shift - np.array(p["mean"])) / np.array(p["std"])).transpose(2, 0, 1)


def run_train_params(out: Path, batches: int, batch_size: int = 16, seed: int = 0, **kw):
    data = Prepared.open(out)
    p, shards = data.pca, data.split("train")
    pipe = train_pipeline(shards, "cpu", 0, 1, p["mean"], p["std"], p["eigval"], p["eigvec"], with_params=True,
                          dtype=kw.pop("dtype", types.FLOAT), batch_size=batch_size, num_threads=2, device_id=None,
                          seed=seed, **kw)
    pipe.build()
    rows = []
    for _ in range(batches):
        out_, labels, px, py, mir, alpha, src = pipe.run()
        parsed = parse_labels(torch.from_numpy(np.array(labels.as_tensor())))
        for i in range(len(labels)):
            rows.append(dict(x=np.array(out_[i]), label=int(parsed[i]), px=float(np.array(px[i])),
                             py=float(np.array(py[i])), mirror=int(np.array(mir[i])), alpha=np.array(alpha[i]),
                             src=bytes(np.array(src[i])).decode()))
    return p, rows


def test_train_pixels_equal_the_papers_transform(any_ready):
    p, rows = run_train_params(any_ready, batches=3)
    flips = 0
    for r in rows:
        img = read_jpeg(r["src"])
        ref = reference_train(img, r["px"], r["py"], r["mirror"], r["alpha"], p)
        assert r["x"].shape == (3, 224, 224)
        np.testing.assert_allclose(r["x"], ref, atol=2e-4)
        flips += r["mirror"]
    assert 0 < flips < len(rows)
    _, half = run_train_params(any_ready, batches=1, dtype=types.FLOAT16)
    for r in half:
        ref = reference_train(read_jpeg(r["src"]), r["px"], r["py"], r["mirror"], r["alpha"], p)
        np.testing.assert_allclose(r["x"].astype(np.float64), ref, atol=4e-3)  # fp16 rounding at |x| < 4


def test_parse_labels():
    texts = [b"0", b"7", b"42", b"999", b"1000", b"12345678"]
    padded = torch.tensor([list(t.ljust(8, b"\0")) for t in texts], dtype=torch.uint8)
    assert parse_labels(padded).tolist() == [0, 7, 42, 999, 1000, 12345678]
    tiles = [b"0 7 42 999", b"12345678 1 0 3", b"5 5 5 5"]
    padded = torch.tensor([list(t.ljust(36, b"\0")) for t in tiles], dtype=torch.uint8)
    assert parse_labels(padded, 4).tolist() == [[0, 7, 42, 999], [12345678, 1, 0, 3], [5, 5, 5, 5]]


@pytest.mark.parametrize("echo", [1, 2])
def test_tile_views_are_the_papers_transform_of_their_square(tiled_out, echo):
    """A tile of 4 gives 4 x echo views a sample, view v the paper's transform of square
    v // echo (its own crop window inside the square, flip and lighting), and the 4 labels."""
    data = Prepared.open(tiled_out)
    p, n = data.pca, 4 * echo
    pipe = train_pipeline(data.split("train"), "cpu", 0, 1, p["mean"], p["std"], p["eigval"], p["eigvec"], tile=4,
                          echo=echo, with_params=True, dtype=types.FLOAT, batch_size=8, num_threads=2, device_id=None,
                          seed=3)
    pipe.build()
    outs = pipe.run()
    views, labels, params, sources = outs[:n], outs[n], outs[n + 1:5 * n + 1], outs[5 * n + 1]
    parsed = parse_labels(torch.from_numpy(np.array(labels.as_tensor())), 4)
    corners = set()
    for i in range(8):
        source = bytes(np.array(sources[i])).decode()
        tile = read_jpeg(source)
        assert tile.shape == (1024, 256, 3)
        tar, _, name = source.rsplit(":", 2)
        cls = next(s["cls"] for s in iter_samples({"tar": tar, "idx": str(Path(tar).with_suffix(".idx"))})
                   if s["__key__"] == name.split(".")[0])
        assert parsed[i].tolist() == [int(v) for v in cls.split()]
        for v in range(n):
            px, py, mirror, alpha = (np.array(x[i]) for x in params[4 * v:4 * v + 4])
            k = v // echo
            ref = reference_train(tile[256 * k:256 * (k + 1)], float(px), float(py), int(mirror), alpha, p)
            np.testing.assert_allclose(np.array(views[v][i]), ref, atol=2e-4)
            corners.add(anchor(float(py), 32))
    assert len(corners) > 8  # the windows move within their squares


def test_labels_are_the_cls_components(any_ready):
    _, rows = run_train_params(any_ready, batches=2)
    for r in rows:
        key = r["src"].rsplit(":", 1)[1].split(".")[0]
        tar = r["src"].rsplit(":", 2)[0]
        idx = Path(tar).with_suffix(".idx").read_text().splitlines()[1:]
        line = next(line.split() for line in idx if line.split()[3].startswith(key + "."))
        cls_off, cls_size = int(line[line.index("cls") + 1]), int(line[line.index("cls") + 2])
        with open(tar, "rb") as f:
            f.seek(cls_off)
            assert int(f.read(cls_size)) == r["label"]


def test_augmentation_statistics(any_ready):
    """Over 960 draws: crop positions uniform, flips ~ 0.5, and the lighting shift measured
    from the output pixels has covariance eigvec diag((0.1 eigval / 255)^2) eigvec^T."""
    p, rows = run_train_params(any_ready, batches=15, batch_size=64)
    n = len(rows)
    px = np.array([r["px"] for r in rows])
    assert abs(px.mean() - 0.5) < 4 * np.sqrt(1 / 12 / n) and abs(px.var() - 1 / 12) < 0.012
    assert np.histogram(px, bins=4, range=(0, 1))[0].min() > n / 4 * 0.8
    flips = np.mean([r["mirror"] for r in rows])
    assert abs(flips - 0.5) < 4 * np.sqrt(0.25 / n)
    shifts = []
    for r in rows:
        img = read_jpeg(r["src"])
        plain = reference_train(img, r["px"], r["py"], r["mirror"], np.zeros(3), p)
        shifts.append(((r["x"] - plain) * np.array(p["std"])[:, None, None]).mean(axis=(1, 2)))
    shifts = np.array(shifts)
    v, lam = np.array(p["eigvec"]), np.array(p["eigval"])
    expected = v @ np.diag((0.1 * lam / 255) ** 2) @ v.T
    measured = np.cov(shifts.T)
    # sampling error of a variance from n draws: ~ sqrt(2/n) ~ 5%
    assert np.abs(measured - expected).max() < 0.15 * expected.max()
    assert abs(shifts.mean(0)).max() < 4 * np.sqrt(expected.max() / n)


def reference_ten(img: np.ndarray, full_image: bool) -> list[np.ndarray]:
    """The four corners and the center (tl, tr, bl, br, center), then the mirror images of
    tr, tl, br, bl, center: torchvision's TenCrop order (its flipped top-left is the mirrored
    top-right), and the mirrored center is the mirror of the same window. From the central
    256 square unless full_image."""
    def center(a, size):
        h, w = a.shape[:2]
        y, x = anchor(0.5, h - size), anchor(0.5, w - size)
        return a[y:y + size, x:x + size]
    if not full_image:
        img = center(img, 256)
    h, w = img.shape[:2]

    tl, tr, bl, br = img[:224, :224], img[:224, w - 224:], img[h - 224:, :224], img[h - 224:, w - 224:]
    c = center(img, 224)
    return [tl, tr, bl, br, c] + [v[:, ::-1] for v in (tr, tl, br, bl, c)]


def stored(out: Path, split: str):
    import webdataset as wds
    m = json.loads((out / "manifest.json").read_text())
    return list(wds.WebDataset([str(out / s["tar"]) for s in m["splits"][split]["shards"]],
                               shardshuffle=False, empty_check=False))


@pytest.mark.parametrize("full_image", [False, True])
def test_ten_crop_equals_reference_crops_in_order(any_ready, full_image):
    p = Prepared.open(any_ready).pca
    samples = stored(any_ready, "val")
    loader = eval_loader(any_ready, LoaderOptions(batch_size=16), runtime=cpu(), ten_crop=True, full_image=full_image)
    seen = 0
    for images, labels in loader:
        assert images.shape[1:] == (10, 3, 224, 224) and images.dtype == torch.float32
        for crops, label in zip(images.numpy(), labels.tolist()):
            s = samples[seen]
            assert int(s["cls"]) == label
            img = np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB"), np.float64)
            for got, ref in zip(crops, reference_ten(img, full_image)):
                want = ((ref - np.array(p["mean"])) / np.array(p["std"])).transpose(2, 0, 1)
                np.testing.assert_allclose(got, want, atol=2e-4)
            seen += 1
    assert seen == len(samples) > 16


def test_center_crop_and_layouts(any_ready):
    p = Prepared.open(any_ready).pca
    samples = stored(any_ready, "val")
    loader = eval_loader(any_ready, LoaderOptions(batch_size=16), runtime=cpu(precision="fp16", channels_last=True))
    images, labels = next(iter(loader))
    assert images.shape == (16, 3, 224, 224) and images.dtype == torch.float16
    assert images.is_contiguous(memory_format=torch.channels_last) and labels.dtype == torch.int64
    img = np.asarray(Image.open(io.BytesIO(samples[0]["jpg"])).convert("RGB"), np.float64)
    h, w = img.shape[:2]
    y, x = anchor(0.5, h - 224), anchor(0.5, w - 224)
    want = ((img[y:y + 224, x:x + 224] - np.array(p["mean"])) / np.array(p["std"])).transpose(2, 0, 1)
    np.testing.assert_allclose(images[0].float().numpy(), want, atol=4e-3)
    bf = next(iter(eval_loader(any_ready, LoaderOptions(batch_size=4), runtime=cpu(precision="bf16"))))[0]
    assert bf.dtype == torch.bfloat16 and torch.allclose(bf.float(), images[:4].float(), atol=0.03)


@pytest.mark.parametrize("world,pipelines", [(1, 1), (1, 2), (2, 2), (3, 3)])
def test_every_sample_once_per_epoch_across_ranks(any_ready, world, pipelines):
    """Val (the label names the sample): each exactly once over all ranks, last batches
    partial. Train, each rank with its pipelines: the same number of batches on every rank,
    no sample twice in an epoch, fewer than world*pipelines*batch left out."""
    counts = {s: Prepared.open(any_ready).count(s) for s in ("train", "val")}
    batch = 32 if counts["train"] >= 500 else 8
    val = Counter()
    for r in range(world):
        for _, labels in eval_loader(any_ready, LoaderOptions(batch_size=batch // 4), runtime=cpu(rank=r, world=world)):
            val.update(labels.tolist())
    assert sum(val.values()) == counts["val"] and set(val.values()) == {1}
    lengths, train = set(), Counter()
    for r in range(world):
        loader = train_loader(any_ready, LoaderOptions(batch_size=batch, seed=1, pipelines=pipelines),
                              runtime=cpu(rank=r, world=world))
        lengths.add(len(loader))
        n = 0
        for _, labels in loader:
            assert len(labels) == batch
            train.update(labels.tolist())
            n += 1
        assert n == len(loader)
    assert len(lengths) == 1 and set(train.values()) == {1}
    assert counts["train"] - world * pipelines * batch < sum(train.values()) <= counts["train"]


@pytest.mark.parametrize("pipelines", [1, 2])
def test_uneven_ranges_stay_aligned_over_epochs(synth_ready, any_ready, pipelines):
    """DALI pads every reader shard's range to the largest one: a shorter range must still
    drop exactly that padding, or a batch of one repeated sample leaks into its next epoch.
    Val 12 over 5 ranks (ranges 2 or 3) in batches of 2, three epochs; train N (one sample per
    label) over W ranks x `pipelines` in batches of N // 2W, W = 3 or 4 so that the ranges are
    uneven, three epochs: two batches a rank (N = 500: ranges 166/167 with one pipeline,
    83/84 with two; N = 150: 37/38 and 18/19)."""
    expected = Counter(l for _, y in eval_loader(synth_ready, LoaderOptions(batch_size=12),
                                                 runtime=cpu()) for l in y.tolist())
    loaders = [eval_loader(synth_ready, LoaderOptions(batch_size=2), runtime=cpu(rank=r, world=5)) for r in range(5)]
    for epoch_counts in zip(*[[Counter(l for _, y in loader for l in y.tolist()) for _ in range(3)]
                              for loader in loaders]):
        assert sum(epoch_counts, Counter()) == expected and sum(expected.values()) == 12
    n = Prepared.open(any_ready).count("train")
    world = 3 if n % 3 else 4
    for r in range(world):
        loader = train_loader(any_ready, LoaderOptions(batch_size=n // (2 * world), pipelines=pipelines),
                              runtime=cpu(rank=r, world=world))
        for _ in range(3):
            batches = [y.tolist() for _, y in loader]
            assert len(batches) == 2 and all(len(set(b)) == n // (2 * world) for b in batches)


def labels_of(loader, batches=None):
    out = []
    for i, (images, labels) in enumerate(loader):
        out.append((labels.clone(), images[0, 0, 0, :8].clone()))
        if batches is not None and i + 1 == batches:
            break
    return out


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def test_deterministic_and_resumable(synth_ready):
    # a small shuffle buffer: restoring mid-epoch, DALI 2.4 reserves ~4 MB of heap address
    # space per buffered sample (16 GB at the default 4096), which could stop later forks
    def make(state=None, seed=0, pipelines=2):
        return train_loader(synth_ready, LoaderOptions(batch_size=8, seed=seed, pipelines=pipelines, initial_fill=64),
                            runtime=cpu(), state=state)
    straight = make()
    epochs = [labels_of(straight) for _ in range(3)]
    assert same(labels_of(make()), epochs[0])
    assert not same(labels_of(make(seed=1)), epochs[0])
    assert not same(epochs[1], epochs[0])  # reshuffled every epoch
    # stop after epoch 1, resume from the state in a new loader
    first = make()
    labels_of(first)
    resumed = make(state=first.state_dict())
    assert resumed.epoch == 1
    assert same(labels_of(resumed), epochs[1]) and same(labels_of(resumed), epochs[2])
    # mid-epoch: three batches into epoch 0, so the two pipelines stand at different batches
    mid = make()
    it = iter(mid)
    next(it), next(it), next(it)
    rest = make(state=mid.state_dict())
    assert same(labels_of(rest), epochs[0][3:]) and same(labels_of(rest), epochs[1])
    with pytest.raises(UserError, match="loader state was written with pipelines=2, not pipelines=1"):
        make(state=mid.state_dict(), pipelines=1)


def test_errors_name_what_is_wrong(synth_ready, tmp_path):
    out = tmp_path / "o"
    shutil.copytree(synth_ready, out)
    (out / "pca.json").unlink()
    with pytest.raises(UserError, match="pca.json: not found"):
        train_loader(out, LoaderOptions(batch_size=4), runtime=cpu())
    shutil.copy(synth_ready / "pca.json", out / "pca.json")
    original = (out / "manifest.json").read_text()
    m = json.loads(original)
    (out / "manifest.json").write_text(json.dumps({**m, "alexpipe": "other"}))
    with pytest.raises(UserError, match="computed for other shards"):
        train_loader(out, LoaderOptions(batch_size=4), runtime=cpu())
    (out / "manifest.json").write_text(original)
    shard = out / m["splits"]["train"]["shards"][2]["tar"]
    data = shard.read_bytes()
    shard.write_bytes(data[:1000])
    with pytest.raises(UserError, match=f"{shard}: 1000 bytes"):
        train_loader(out, LoaderOptions(batch_size=4), runtime=cpu())
    shard.unlink()
    with pytest.raises(UserError, match=f"{shard}: shard missing"):
        train_loader(out, LoaderOptions(batch_size=4), runtime=cpu())
    broken = bytearray(data)
    first = (out / m["splits"]["train"]["shards"][2]["idx"]).read_text().splitlines()[1].split()
    off = int(first[first.index("jpg") + 1])
    broken[off:off + 16] = bytes(16)
    shard.write_bytes(bytes(broken))
    with pytest.raises(UserError, match=f"{shard}: sample {first[3].split('.')[0]} does not decode"):
        train_loader(out, LoaderOptions(batch_size=4), runtime=cpu())
    with pytest.raises(UserError, match=r"batch size 64 x 1 rank\(s\) x 1 pipeline\(s\) is more than the 48 samples$"):
        train_loader(synth_ready, LoaderOptions(batch_size=64), runtime=cpu())
    with pytest.raises(UserError, match=r"batch size 32 x 1 rank\(s\) x 2 pipeline\(s\) is more than the 48 samples "
                       r"\(lower the batch size or pass pipelines=1\)"):
        train_loader(synth_ready, LoaderOptions(batch_size=32, pipelines=2), runtime=cpu())
    with pytest.raises(UserError, match="pipelines must be >= 1, got 0"):
        train_loader(synth_ready, LoaderOptions(batch_size=4, pipelines=0), runtime=cpu())


def test_cuda_queues_note(monkeypatch):
    """A note, naming the value, unless the process has 32 or more hardware queues."""
    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS", raising=False)
    assert "CUDA_DEVICE_MAX_CONNECTIONS=unset (8); export CUDA_DEVICE_MAX_CONNECTIONS=32" in cuda_queues_note()
    for value, note in [("8", True), ("x", True), ("32", False), ("64", False)]:
        monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", value)
        assert (cuda_queues_note() is not None) == note
        assert not note or f"CUDA_DEVICE_MAX_CONNECTIONS={value};" in cuda_queues_note()


def stored_labels(out: Path) -> list[int]:
    """Every train sample's label in stored order (shard by shard, as the index files list them)."""
    return [int(s["cls"]) for shard in Prepared.open(out).split("train") for s in iter_samples(shard)]


@pytest.mark.parametrize("world,pipelines", [(1, 2), (2, 1), (3, 2)])
def test_fixed_share_keeps_each_ranks_samples_and_reshuffles_them(unique_out, world, pipelines):
    """What a per-GPU decoder cache needs: rank r sees only samples [N*r//W, N*(r+1)//W) of
    the stored order, every epoch, each at most once, in a new order; every rank gives the
    same number of full batches, and fewer than world x pipelines x batch are left out."""
    order = stored_labels(unique_out)
    n, seen_all = len(order), Counter()
    lengths = set()
    for r in range(world):
        share = set(order[n * r // world:n * (r + 1) // world])
        options = LoaderOptions(batch_size=8, pipelines=pipelines, fixed_share=True, initial_fill=16)
        loader = train_loader(unique_out, options, runtime=cpu(rank=r, world=world))
        lengths.add(len(loader))
        epochs = [[label for _, y in loader for label in y.tolist()] for _ in range(3)]
        for labels in epochs:
            assert len(labels) == len(loader) * 8 and len(set(labels)) == len(labels)
            assert set(labels) <= share and len(share) - len(labels) < world * pipelines * 8
        assert epochs[0] != epochs[1] != epochs[2]
        seen_all.update(epochs[0])
    assert len(lengths) == 1 and set(seen_all.values()) == {1}


def test_cache_plan_sizes_each_share_and_says_why(unique_out, monkeypatch):
    """The decoder cache's size comes from prepare's pixel counts: the whole split's is its
    decoded images' bytes (H x W x 3), the rank shares add up to it; the plan caches all, part
    or none of a share by the GPU memory free and says so; on the CPU gpu is an error."""
    shards = Prepared.open(unique_out).split("train")
    decoded = sum(3 * np.prod(Image.open(io.BytesIO(s["jpg"])).size) for sh in shards for s in iter_samples(sh))
    raw = [[(cache_gb_needed(shards, r, w) - 0.05) / 1.01 for r in range(w)] for w in (1, 2, 3)]
    assert raw[0][0] == pytest.approx(decoded / 1e9) and all(sum(w) == pytest.approx(raw[0][0]) for w in raw)
    need, gb = 50.0, 1e9

    def plan(free_gb, **kw):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (free_gb * gb, 141 * gb))
        return plan_cache(LoaderOptions(**kw), need, cuda())

    size, note = plan(100, cache="auto")
    assert size == need and "for all of this rank's share (50.0 GB; 100.0 GB free)" in note
    size, note = plan(40, cache="auto")  # 50 GB do not fit beside the reserve: off, saying why
    assert size == 0 and "needs 50.0 GB, 40.0 GB of GPU memory is free" in note and "--cache-gb" in note
    size, note = plan(40, cache="gpu")  # as much as fits beside the reserve
    assert size == 40 - CACHE_RESERVE_GB and "48% of this rank's share" in note
    size, note = plan(100, cache="gpu", cache_gb=10)
    assert size == 10 and "20% of this rank's share" in note
    assert plan(10, cache="gpu")[0] == 0 and plan(100, cache="off") == (0.0, "decoder cache off")
    assert plan_cache(LoaderOptions(cache="auto"), need, cpu()) == (0.0, "decoder cache off (no GPU)")
    with pytest.raises(UserError, match="cache gpu needs a CUDA GPU"):
        train_loader(unique_out, LoaderOptions(cache="gpu"), runtime=cpu())


@pytest.mark.parametrize("world,pipelines", [(1, 1), (1, 2), (3, 2)])
def test_echo_gives_k_different_views_in_different_batches(unique_out, world, pipelines):
    """echo 2: every sample of an epoch comes twice, never twice in one batch, and its two
    views differ; epoch counts stay equal and exact over ranks."""
    lengths, total = set(), Counter()
    for r in range(world):
        loader = train_loader(unique_out, LoaderOptions(batch_size=8, pipelines=pipelines, echo=2, initial_fill=16),
                              runtime=cpu(rank=r, world=world, precision="fp32"))
        plain = train_loader(unique_out, LoaderOptions(batch_size=8, pipelines=pipelines),
                             runtime=cpu(rank=r, world=world))
        assert len(loader) == 2 * len(plain)
        lengths.add(len(loader))
        views, batches = {}, 0
        for x, y in loader:
            assert len(set(y.tolist())) == len(y) == 8
            for image, label in zip(x, y.tolist()):
                views.setdefault(label, []).append(image)
            batches += 1
        assert batches == len(loader)
        assert all(len(v) == 2 and not torch.equal(v[0], v[1]) for v in views.values())
        total.update(views.keys())
    assert len(lengths) == 1 and set(total.values()) == {1}


def resumes_between_rounds(make, first_epoch, per_round: int) -> None:
    """A loader left after one round of batches resumes to the rest of its epoch; one batch
    later its state is refused (not exact)."""
    mid = make()
    it = iter(mid)
    for _ in range(per_round):
        next(it)
    assert same(labels_of(make(state=mid.state_dict())), first_epoch[per_round:])
    next(it)
    with pytest.raises(ValueError, match="exact only between rounds"):
        mid.state_dict()


def test_echo_and_fixed_share_resume_exactly(unique_out):
    def make(state=None, echo=2, fixed_share=True):
        options = LoaderOptions(batch_size=8, pipelines=2, echo=echo, fixed_share=fixed_share, initial_fill=16)
        return train_loader(unique_out, options, runtime=cpu(), state=state)
    straight = make()
    epochs = [labels_of(straight) for _ in range(3)]
    first = make()
    labels_of(first)
    resumed = make(state=first.state_dict())
    assert same(labels_of(resumed), epochs[1]) and same(labels_of(resumed), epochs[2])
    resumes_between_rounds(make, epochs[0], 4)  # one round: 2 pipelines x 2 views
    with pytest.raises(UserError, match="written with echo=2, not echo=1"):
        make(state=first.state_dict(), echo=1)
    with pytest.raises(UserError, match="written with fixed_share=True, not fixed_share=False"):
        make(state=first.state_dict(), fixed_share=False)


@pytest.mark.parametrize("echo", [1, 2])
def test_handover_gives_the_same_batches_and_states(unique_out, echo):
    """Batches made on the handover thread equal, bit for bit, those made on the caller's, over
    epochs; its state mid-epoch resumes exactly though the thread has run ahead; a loader left
    mid-epoch refuses to go on; an error on the thread is raised to the caller."""
    def make(handover, state=None):
        options = LoaderOptions(batch_size=8, pipelines=2, echo=echo, initial_fill=16, handover=handover)
        return train_loader(unique_out, options, runtime=cpu(), state=state)

    def whole(loader, epochs):
        return [[(y.clone(), x.clone()) for x, y in loader] for _ in range(epochs)]

    plain = whole(make(False), 2)
    assert all(equal_batches(a, b) for a, b in zip(whole(make(True), 2), plain))
    mid, steps = make(True), 2 * echo  # one round of 2 pipelines x echo views
    it = iter(mid)
    taken = [next(it) for _ in range(steps)]
    assert equal_batches([(y, x) for x, y in taken], plain[0][:steps])
    deadline = time.time() + 60
    while mid.batch <= steps and time.time() < deadline:  # the thread runs ahead of what was taken
        time.sleep(0.01)
    assert mid.batch > steps
    rest = whole(make(True, state=mid.state_dict()), 2)
    assert equal_batches(rest[0], plain[0][steps:]) and equal_batches(rest[1], plain[1])
    del it
    with pytest.raises(ValueError, match="left mid-way"):
        next(iter(mid))
    exact = make(True)  # an epoch taken to its last batch without asking for more is over
    assert len(list(zip(range(len(exact)), exact))) == len(plain[0])
    assert equal_batches(whole(exact, 1)[0], plain[1])
    broken = make(True)
    broken.pipes[1].run = lambda: (_ for _ in ()).throw(RuntimeError("shard unreadable"))
    with pytest.raises(RuntimeError, match="shard unreadable"):
        whole(broken, 1)


def equal_batches(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(ya, yb) and torch.equal(xa, xb) for (ya, xa), (yb, xb) in zip(a, b))


def test_sources_name_each_batch_sample(unique_out):
    """sources=True: every sample's "tar:offset:key.jpg", whose .cls is its label; an epoch
    names each sample once (train with echo 2: twice), eval in stored order."""
    by_source = {}
    for shard in Prepared.open(unique_out).split("train"):
        lines = Path(shard["idx"]).read_text().splitlines()[1:]
        for line, sample in zip(lines, iter_samples(shard)):
            fields = line.split()
            by_source[f"{shard['tar']}:{fields[fields.index('jpg') + 1]}:{sample['__key__']}.jpg"] = int(sample["cls"])
    for echo in (1, 2):
        seen = Counter()
        options = LoaderOptions(batch_size=8, pipelines=2, echo=echo, sources=True)
        for _, labels, sources in train_loader(unique_out, options, runtime=cpu()):
            assert [by_source[s] for s in sources] == labels.tolist()
            seen.update(sources)
        assert set(seen.values()) == {echo} and len(seen) > 140
    keys = [s.rsplit(":", 1)[1] for _, _, batch in eval_loader(unique_out, LoaderOptions(batch_size=6, sources=True),
                                                               runtime=cpu())
            for s in batch]
    assert keys == sorted(keys) and len(keys) == 20


def test_eval_ignores_the_training_options(unique_out):
    """One LoaderOptions for both loaders (as alexpipe-train passes): echo, pipelines and the
    fixed share shape training only; evaluation still gives every sample once, in order."""
    options = LoaderOptions(batch_size=6, pipelines=2, echo=2, fixed_share=True, sources=True)
    keys = [s.rsplit(":", 1)[1] for _, _, batch in eval_loader(unique_out, options, runtime=cpu()) for s in batch]
    assert keys == sorted(keys) and len(keys) == 20


def test_eval_refuses_more_ranks_than_samples_on_every_rank(unique_out):
    """20 val samples over 25 ranks: each rank refuses alike (decided from the global numbers),
    so none is left waiting in a collective."""
    for r in (0, 19, 24):
        with pytest.raises(UserError, match="20 samples are fewer than the 25 ranks"):
            eval_loader(unique_out, LoaderOptions(batch_size=4), runtime=cpu(rank=r, world=25))


def test_a_state_without_the_newer_keys_still_resumes(synth_ready):
    """A loader state written before echo and fixed shares existed resumes as echo 1, moving."""
    def make(state=None):
        return train_loader(synth_ready, LoaderOptions(batch_size=8, initial_fill=64), runtime=cpu(), state=state)
    first = make()
    for _ in first:
        pass
    state = {k: v for k, v in first.state_dict().items() if k not in ("echo", "fixed_share")}
    assert make(state=state).epoch == 1


def resident_file_mb() -> float:
    """This process's resident file-backed pages (Linux), in MB."""
    line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("RssFile:"))
    return int(line.split()[1]) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists() or "RssFile" not in Path("/proc/self/status").read_text(),
                    reason="needs Linux's /proc/self/status")
def test_reading_the_shards_gives_the_same_batches_with_a_flat_resident_set(tmp_path):
    """mmap=False: the same pixels and labels as the default mapped reader, while the shard
    pages it reads stay out of the process's resident set (mapped, they all count in it)."""
    from alexpipe import pca
    from alexpipe.prepare import PrepareConfig, prepare
    rng = np.random.default_rng(0)
    for i in range(240):  # noise compresses badly: ~2.7 MB a shard of 48 at q90
        (tmp_path / "src" / "train" / f"c{i % 4}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(
            tmp_path / "src" / "train" / f"c{i % 4}" / f"{i}.JPEG", quality=95)
    prepare(PrepareConfig(src=tmp_path / "src", out=tmp_path / "out", split="train", workers=2, shard_size=48))
    assert pca.main([str(tmp_path / "out"), "--device", "cpu"]) == 0
    shard_mb = sum(t.stat().st_size for t in (tmp_path / "out" / "train").glob("*.tar")) / 2**20
    batches, growth = {}, {}
    for mmap in (False, True):
        loader = eval_loader(tmp_path / "out", LoaderOptions(batch_size=16, verify=False, mmap=mmap), runtime=cpu(),
                             split="train")
        it = iter(loader)
        first = next(it)
        start = resident_file_mb()
        batches[mmap] = [(x.clone(), y.clone()) for x, y in [first, *it]]
        growth[mmap] = resident_file_mb() - start
        del loader, it, first
    assert len(batches[False]) == len(batches[True]) == 15
    for (xa, ya), (xb, yb) in zip(batches[False], batches[True]):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert shard_mb > 10
    assert growth[True] > 0.5 * shard_mb, (growth, shard_mb)  # the measurement sees mapped shard pages
    assert growth[False] < 0.1 * shard_mb, (growth, shard_mb)


@pytest.mark.parametrize("world,pipelines,b,echo", [(1, 1, 8, 1), (3, 2, 4, 1), (1, 2, 4, 2)])
def test_tiles_give_every_image_once_an_epoch_over_ranks(tiled_out, world, pipelines, b, echo):
    """Tiles of 4: a batch holds views of as many tiles, each image comes once an epoch (echo
    times with echo; the repeats in the one short tile at most twice that), epoch lengths are
    equal over ranks."""
    lengths, total = set(), Counter()
    for r in range(world):
        loader = train_loader(tiled_out, LoaderOptions(batch_size=b, pipelines=pipelines, initial_fill=16, echo=echo),
                              runtime=cpu(rank=r, world=world))
        lengths.add(len(loader))
        batches = 0
        for x, y in loader:
            assert x.shape == (b, 3, 224, 224) and len(set(y.tolist())) == b
            total.update(y.tolist())
            batches += 1
        assert batches == len(loader) and len(loader) % (4 * echo * pipelines) == 0
    assert len(lengths) == 1 and sum(total.values()) == world * lengths.pop() * b
    assert set(total) <= set(range(150)) and all(c % echo == 0 for c in total.values())
    assert max(total.values()) <= 2 * echo and list(total.values()).count(2 * echo) <= 2


def test_tiles_resume_exactly_and_are_not_for_evaluation(tiled_out):
    def make(state=None):
        return train_loader(tiled_out, LoaderOptions(batch_size=4, pipelines=2, initial_fill=16), runtime=cpu(),
                            state=state)
    resumes_between_rounds(make, labels_of(make()), 8)  # one round: 2 pipelines x 4 squares
    with pytest.raises(UserError, match="split 'train' holds tiles of 4 images"):
        eval_loader(tiled_out, LoaderOptions(batch_size=4), runtime=cpu(), split="train")
    assert sum(len(y) for _, y in eval_loader(tiled_out, LoaderOptions(batch_size=8), runtime=cpu())) == 20


def test_tiles_default_to_one_pipeline_on_a_gpu(tiled_out, unique_out):
    """A tiled train split takes PIPELINES_TILES_GPU pipelines by default on a GPU (one makes
    enough images and slows the model less), the usual shards PIPELINES_GPU, the CPU 1; a
    number given wins; alexpipe-train reads the tile from OUT's manifest for its config."""
    from alexpipe.train import parse_args
    o = LoaderOptions()
    assert [o.resolved(cuda(), True, t).pipelines for t in (1, 4)] == [4, 1]
    assert [o.resolved(cpu(), True, t).pipelines for t in (1, 4)] == [1, 1]
    assert LoaderOptions(pipelines=3).resolved(cuda(), True, 4).pipelines == 3
    assert o.resolved(cuda(), False, 1).pipelines == 1
    got = {out.name: parse_args([str(out), "--device", "cuda"]).pipelines for out in (tiled_out, unique_out)}
    assert got == {"tiled": 1, "out": 4}
    assert parse_args([str(tiled_out), "--device", "cuda", "--pipelines", "2"]).pipelines == 2
    assert parse_args([str(tiled_out), "--device", "cpu"]).pipelines == 1
