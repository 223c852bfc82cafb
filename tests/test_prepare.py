"""alexpipe-prepare on real ImageNet images and on the synthetic tree with its odd files."""

from __future__ import annotations

import io
import json
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from alexpipe import prepare as prep
from alexpipe.util import imagenet_classes, sha256_file
from conftest import error_lines

WNID_INDEX = {w: i for i, w, _ in imagenet_classes()}


def read_split(out: Path, split: str) -> list[dict]:
    manifest = json.loads((out / "manifest.json").read_text())
    urls = [str(out / s["tar"]) for s in manifest["splits"][split]["shards"]]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def decode(jpg: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(jpg)) as img:
        assert img.format == "JPEG" and img.mode == "RGB"
        return np.asarray(img)


def psnr(a, b) -> float:
    mse = ((np.asarray(a, float) - np.asarray(b, float)) ** 2).mean()
    return float("inf") if mse == 0 else 10 * np.log10(255 ** 2 / mse)


def reference(path: Path, size: tuple[int, int]) -> np.ndarray:
    """Independent reference: full PIL decode, RGB by the textbook rule for each mode,
    antialiased bicubic resize of the whole image."""
    with Image.open(path) as img:
        img.load()
        if img.mode in ("RGBA", "P"):
            rgba = np.asarray(img.convert("RGBA"), float)
            a = rgba[..., 3:] / 255
            rgb = Image.fromarray(np.round(rgba[..., :3] * a + 255 * (1 - a)).astype(np.uint8))
        elif img.mode == "L":
            rgb = Image.fromarray(np.repeat(np.asarray(img)[..., None], 3, axis=2))
        else:
            rgb = img.convert("RGB")
    return np.asarray(rgb.resize(size, Image.Resampling.BICUBIC), float)


def expected_size(w: int, h: int) -> tuple[int, int]:
    s = 256 / min(w, h)
    return round(w * s), round(h * s)


# ---------------------------------------------------------------------------- both trees

def test_labels_are_standard_indices(any_prepared):
    """wnid folders give the standard ILSVRC-2012 indices; a flat val split takes its labels
    from LOC_val_solution.csv."""
    out, tree = any_prepared
    manifest = json.loads((out / "manifest.json").read_text())
    train = read_split(out, "train")
    assert len(train) == manifest["splits"]["train"]["count"] > 40
    for s in train:
        meta = json.loads(s["json"])
        folder_wnid = Path(meta["src"]).parts[1]
        assert meta["wnid"] == folder_wnid
        assert int(s["cls"]) == WNID_INDEX[folder_wnid]
    val = read_split(out, "val")
    assert len(val) == manifest["splits"]["val"]["count"] > 10
    truth = dict(line.split(",")[0:2] for line in (tree / "LOC_val_solution.csv").read_text().split()[1:]
                 if "," in line)
    for s in val:
        meta = json.loads(s["json"])
        assert truth[Path(meta["src"]).stem] == meta["wnid"]
        assert int(s["cls"]) == WNID_INDEX[meta["wnid"]]


def test_every_image_has_short_side_256_and_its_aspect(any_prepared):
    out, _ = any_prepared
    for split in ("train", "val"):
        for s in read_split(out, split):
            meta = json.loads(s["json"])
            pixels = decode(s["jpg"])
            h, w, c = pixels.shape
            assert c == 3 and min(w, h) == 256
            assert (w, h) == expected_size(*meta["size"])


def test_manifest_counts_each_shards_stored_pixels(synth_out):
    """H*W summed over each shard's stored images: what a decoded-image cache needs to size itself."""
    manifest = json.loads((synth_out / "manifest.json").read_text())
    for shard in manifest["splits"]["train"]["shards"]:
        samples = list(wds.WebDataset([str(synth_out / shard["tar"])], shardshuffle=False, empty_check=False))
        assert shard["pixels"] == sum(decode(s["jpg"]).shape[0] * decode(s["jpg"]).shape[1] for s in samples) > 0


def test_pixels_match_full_decode_reference(any_prepared):
    """Stored images equal a full-decode reference up to JPEG q90 (and, for large
    sources, draft-mode) error; grayscale sources come out with R = G = B."""
    out_dir, tree = any_prepared
    gray_seen = 0
    for s in read_split(out_dir, "train")[:120]:
        meta = json.loads(s["json"])
        out = decode(s["jpg"])
        ref = reference(tree / meta["src"], (out.shape[1], out.shape[0]))
        assert psnr(out, ref) > 28, meta["src"]
        if meta["mode"] == "L":
            gray_seen += 1
            spread = out.astype(int).max(axis=2) - out.astype(int).min(axis=2)
            assert spread.mean() < 1.0
    assert gray_seen >= 1


def test_draft_mode_psnr_against_full_decode():
    """Draft (DCT-domain) decoding of large JPEGs stays close to a full decode: measured on
    the real sample's 25 sources with short side >= 512, mean 39.3 dB, min 31.8 dB (the q90
    re-encode itself costs ~36 dB on the same images)."""
    from conftest import real_images
    values = []
    for p in real_images():
        with Image.open(p) as img:
            if min(img.size) < 512:
                continue
        drafted, _ = prep.load_resized(p, center_crop=False, draft=True)
        full, _ = prep.load_resized(p, center_crop=False, draft=False)
        assert drafted.size == full.size
        values.append(psnr(drafted, full))
    assert len(values) >= 10
    assert np.mean(values) > 37 and min(values) > 30


def test_shards_read_back_with_dali_using_index_files(any_prepared):
    from nvidia.dali import fn, pipeline_def, types
    real_out, _ = any_prepared
    manifest = json.loads((real_out / "manifest.json").read_text())
    shards = manifest["splits"]["val"]["shards"]

    @pipeline_def(batch_size=10, num_threads=2, device_id=None)
    def pipe():
        jpg, cls = fn.readers.webdataset(
            paths=[str(real_out / s["tar"]) for s in shards],
            index_paths=[str(real_out / s["idx"]) for s in shards],
            ext=["jpg", "cls"], missing_component_behavior="error")
        return fn.decoders.image(jpg, device="cpu", output_type=types.RGB), cls

    p = pipe()
    p.build()
    expected = read_split(real_out, "val")
    got = []
    for _ in range(5):
        images, labels = p.run()
        got += [(np.array(images[i]), bytes(np.array(labels[i]))) for i in range(len(images))]
    assert len(got) == 50 and len(expected) == manifest["splits"]["val"]["count"] > 10
    for (pixels, label), s in zip(got, expected):
        assert label == s["cls"]
        assert np.abs(pixels.astype(int) - decode(s["jpg"])).max() <= 1


# ---------------------------------------------------------------------------- synthetic tree

def test_odd_files_become_correct_rgb(synth_out, synth_tree):
    modes = {}
    for s in read_split(synth_out, "train"):
        meta = json.loads(s["json"])
        key = (meta["format"], meta["mode"])
        if key in modes:
            continue
        out = decode(s["jpg"])
        modes[key] = out
        ref = reference(synth_tree / meta["src"], (out.shape[1], out.shape[0]))
        assert psnr(out, ref) > 30, key  # q90 on noisy synthetic images: 33-40 dB; a wrong conversion < 15
    assert {("JPEG", "RGB"), ("JPEG", "L"), ("JPEG", "CMYK"), ("PNG", "RGBA"), ("GIF", "P")} <= set(modes)
    # the PNG's transparent border is composited on white
    png = modes[("PNG", "RGBA")]
    assert png[0, 0].min() > 230 and png[-1, -1].min() > 230


def test_broken_files_are_rejected_and_counted(synth_out):
    lines = (synth_out / "train" / "rejected.tsv").read_text().splitlines()
    assert lines[0] == "path\treason"
    rejected = dict(line.split("\t") for line in lines[1:])
    assert {Path(p).name for p in rejected} == {"n01443537_truncated.JPEG", "n01443537_empty.JPEG"}
    assert "truncated" in rejected["train/n01443537/n01443537_truncated.JPEG"]
    assert "cannot identify image" in rejected["train/n01443537/n01443537_empty.JPEG"]
    manifest = json.loads((synth_out / "manifest.json").read_text())
    train = manifest["splits"]["train"]
    assert (train["source_files"], train["count"], train["rejected"]) == (50, 48, 2)  # README.txt ignored
    assert sum(s["count"] for s in train["shards"]) == 48 == len(read_split(synth_out, "train"))
    for s in train["shards"]:
        assert sha256_file(synth_out / s["tar"]) == s["sha256"]
        assert (synth_out / s["tar"]).stat().st_size == s["bytes"]


def test_strict_fails_naming_the_file(synth_tree, tmp_path, capsys):
    assert prep.main([str(synth_tree), str(tmp_path / "o"), "--strict", "--workers", "2"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and err[0].startswith("alexpipe-prepare: error: ")
    assert "--strict" in err[0] and "n01443537_" in err[0]


def test_center_crop_gives_central_square(synth_tree, tmp_path):
    out = tmp_path / "cc"
    assert prep.main([str(synth_tree), str(out), "--center-crop", "--split", "val", "--workers", "2"]) == 0
    for s in read_split(out, "val"):
        meta = json.loads(s["json"])
        pixels = decode(s["jpg"])
        assert pixels.shape == (256, 256, 3)
        w, h = expected_size(*meta["size"])
        full = reference(synth_tree / meta["src"], (w, h))
        left, top = (w - 256) // 2, (h - 256) // 2
        assert psnr(pixels, full[top:top + 256, left:left + 256]) > 30


def test_tiles_stack_each_images_central_square_with_its_label(synth_tree, tmp_path, capsys):
    """--tile 4: each train sample is 4 consecutive images of the shuffle as 256x256 squares
    top to bottom (each square the untiled center crop's pixels), its .cls their 4 labels;
    every readable image is in exactly one tile, the 2 unreadable ones are rejected and the
    tiles short of images repeat their own, marked; val is not tiled; verify passes."""
    square, tiled = tmp_path / "square", tmp_path / "tiled"
    assert prep.main([str(synth_tree), str(square), "--center-crop", "--workers", "2", "--shard-size", "5"]) == 0
    assert prep.main([str(synth_tree), str(tiled), "--center-crop", "--tile", "4", "--workers", "2",
                      "--shard-size", "5"]) == 0
    assert "train: 13 samples (tiles of 4: 48 images)" in capsys.readouterr().out
    alone = {json.loads(s["json"])["src"]: (decode(s["jpg"]), int(s["cls"])) for s in read_split(square, "train")}
    seen, repeats, sources = Counter(), 0, [it.path for it in prep.shuffled(prep.scan(
        prep.PrepareConfig(src=synth_tree, out=tmp_path / "x", split="train"))[0]["train"], 0)]
    for s in read_split(tiled, "train"):
        pixels, labels, metas = decode(s["jpg"]), [int(v) for v in s["cls"].split()], json.loads(s["json"])["tile"]
        assert pixels.shape == (1024, 256, 3) and len(labels) == len(metas) == 4
        for k, (label, meta) in enumerate(zip(labels, metas)):
            ref, ref_label = alone[meta["src"]]
            assert label == meta["label"] == ref_label
            assert psnr(pixels[256 * k:256 * (k + 1)], ref) > 38  # the same square, encoded once more
            repeats += meta.get("repeat", False)
            seen[meta["src"]] += not meta.get("repeat", False)
        key = int(s["__key__"])  # tile n holds images 4n..4n+3 of the shuffle (less the unreadable ones)
        assert metas[0]["src"] in sources[4 * key:4 * key + 4]
    manifest = json.loads((tiled / "manifest.json").read_text())
    train = manifest["splits"]["train"]
    assert (train["tile"], train["count"], train["images"], train["rejected"]) == (4, 13, 48, 2)
    assert set(seen) == set(alone) and set(seen.values()) == {1} and repeats == 13 * 4 - 48
    assert manifest["splits"]["val"]["tile"] == 1 and decode(read_split(tiled, "val")[0]["jpg"]).shape == (256, 256, 3)
    assert prep.main(["--verify", str(tiled), "--workers", "2"]) == 0


def test_same_seed_same_bytes_other_seed_other_order(synth_tree, synth_out, tmp_path):
    again = tmp_path / "again"
    prep.prepare(prep.PrepareConfig(src=synth_tree, out=again, workers=1, shard_size=16))
    assert (again / "manifest.json").read_bytes() == (synth_out / "manifest.json").read_bytes()
    other = tmp_path / "other"
    prep.prepare(prep.PrepareConfig(src=synth_tree, out=other, workers=2, shard_size=16, seed=1, split="train"))
    order = [json.loads(s["json"])["src"] for s in read_split(synth_out, "train")]
    order1 = [json.loads(s["json"])["src"] for s in read_split(other, "train")]
    assert sorted(order) == sorted(order1) and order != order1
    # shuffled across classes: the first shard is not one class
    assert len({int(s["cls"]) for s in read_split(synth_out, "train")[:16]}) > 1


def test_killed_run_resumes_to_identical_bytes(synth_tree, tmp_path):
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    args = ["--shard-size", "4", "--workers", "1", "--split", "train"]
    assert prep.main([str(synth_tree), str(clean), *args]) == 0
    proc = subprocess.Popen([sys.executable, "-m", "alexpipe.prepare", str(synth_tree), str(killed), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = killed / "train" / ".parts"
    deadline = time.time() + 60
    while time.time() < deadline and len(list(parts.glob("*.json")) if parts.exists() else []) < 3:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_done = len(list(parts.glob("*.json")))
    assert 3 <= n_done < 13 and not (killed / "manifest.json").exists()
    assert prep.main([str(synth_tree), str(killed), *args]) == 0
    names = sorted(p.relative_to(clean) for p in clean.rglob("*") if p.is_file() and p.name != "prepare-config.json")
    assert len(names) > 20
    assert names == sorted(p.relative_to(killed) for p in killed.rglob("*")
                           if p.is_file() and p.name != "prepare-config.json")
    for name in names:
        assert (clean / name).read_bytes() == (killed / name).read_bytes(), name


def test_rerun_into_out_of_another_job_is_refused(synth_tree, synth_out, tmp_path, capsys):
    out = tmp_path / "o"
    shutil.copytree(synth_out, out)
    (out / "manifest.json").unlink()
    assert prep.main([str(synth_tree), str(out), "--shard-size", "16", "--seed", "5", "--workers", "2"]) == 2
    assert "another run" in capsys.readouterr().err


def test_splits_are_added_one_at_a_time_and_a_finished_job_reruns_as_a_no_op(synth_tree, synth_out, tmp_path):
    """train, then val into the same OUT: one manifest with both, shards equal to a two-split
    run's; the same commands again change no file (bytes or times)."""
    out = tmp_path / "o"
    common = ["--shard-size", "16", "--workers", "2"]
    for split in ("train", "val"):
        assert prep.main([str(synth_tree), str(out), "--split", split, *common]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    both = json.loads((synth_out / "manifest.json").read_text())
    assert manifest["splits"] == both["splits"] and manifest["classes"] == both["classes"]
    files = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*.tar")}
    assert len(files) == len(both["splits"]["train"]["shards"]) + len(both["splits"]["val"]["shards"])
    for split in ("train", "val", "both"):
        assert prep.main([str(synth_tree), str(out), "--split", split, *common]) == 0
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*.tar")} == files
    assert json.loads((out / "manifest.json").read_text()) == manifest


def test_verify_accepts_good_and_names_corrupt_shard(synth_out, tmp_path, capsys):
    assert prep.main(["--verify", str(synth_out), "--workers", "2"]) == 0
    bad = tmp_path / "bad"
    shutil.copytree(synth_out, bad)
    tar = bad / "train" / "train-000001.tar"
    data = bytearray(tar.read_bytes())
    data[3000:3400] = bytes(400)  # inside the first JPEG
    tar.write_bytes(bytes(data))
    capsys.readouterr()
    assert prep.main(["--verify", str(bad), "--workers", "2"]) == 1
    out = capsys.readouterr().out
    assert "train-000001.tar: size or sha256 differs" in out and "train-000000" not in out


# ---------------------------------------------------------------------------- layouts and labels

def test_val_in_class_folders_and_folder_labels(tmp_path, capsys):
    src = tmp_path / "src"
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("dogs", "cats"):
            (src / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(
                    src / split / cls / f"{i}.jpg")
    assert prep.main([str(src), str(tmp_path / "o"), "--workers", "2"]) == 0
    assert "sorted folder order" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["classes"] == [[0, "cats", "cats"], [1, "dogs", "dogs"]]
    assert manifest["val_labels"] == "class folders"
    for split in ("train", "val"):
        for s in read_split(tmp_path / "o", split):
            assert int(s["cls"]) == {"cats": 0, "dogs": 1}[json.loads(s["json"])["wnid"]]


def test_flat_val_with_devkit_labels(tmp_path, capsys):
    from scipy.io import savemat
    classes = imagenet_classes()
    src = tmp_path / "src"
    (src / "val").mkdir(parents=True)
    # the devkit numbers classes in its own order, not sorted wnids
    ids = np.random.default_rng(0).permutation(1000) + 1
    synsets = np.zeros(1001, dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")])
    for (index, wnid, _), ilsvrc_id in zip(classes, ids):
        synsets[index] = (int(ilsvrc_id), wnid, 0)
    synsets[1000] = (1001, "n00000000", 3)  # an inner node of the hierarchy
    data = src / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    savemat(str(data / "meta.mat"), {"synsets": synsets})
    truth = [5, 500, 999]  # standard indices of val images 1..3
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{ids[t]}\n" for t in truth))
    for i in range(3):
        Image.new("RGB", (320, 240), (i * 80, 0, 0)).save(src / "val" / f"ILSVRC2012_val_{i + 1:08d}.JPEG")
    assert prep.main([str(src), str(tmp_path / "o"), "--split", "val", "--workers", "2"]) == 0
    assert "val labels: devkit" in capsys.readouterr().out
    got = {json.loads(s["json"])["src"]: int(s["cls"]) for s in read_split(tmp_path / "o", "val")}
    assert got == {f"val/ILSVRC2012_val_{i + 1:08d}.JPEG": t for i, t in enumerate(truth)}


@pytest.mark.parametrize("case", ["missing_src", "empty_tree", "out_not_writable", "unknown_labels",
                                  "unlabelled_val", "bad_quality", "tile_without_center_crop"])
def test_bad_input_gives_one_line_and_exit_2(case, synth_tree, tmp_path, capsys):
    src, out, extra = synth_tree, tmp_path / "o", []
    if case == "missing_src":
        src = tmp_path / "nope"
    elif case == "empty_tree":
        src = tmp_path / "empty"
        (src / "train" / "n01443537").mkdir(parents=True)
        extra = ["--split", "train"]
    elif case == "out_not_writable":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "o"
    elif case == "unknown_labels":
        (tmp_path / "labels.xml").write_text("<x/>")
        extra = ["--val-labels", str(tmp_path / "labels.xml")]
    elif case == "unlabelled_val":
        src = tmp_path / "src"
        shutil.copytree(synth_tree, src)
        lines = (src / "LOC_val_solution.csv").read_text().splitlines()
        (src / "LOC_val_solution.csv").write_text("\n".join(lines[:-1]) + "\n")
    elif case == "tile_without_center_crop":
        extra = ["--tile", "4"]
    else:
        extra = ["--quality", "0"]
    assert prep.main([str(src), str(out), *extra]) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1, err
    assert "error" in err[-1]
    assert not (out / "manifest.json").exists()


def test_index_files_equal_dalis_wds2idx(synth_out, tmp_path):
    """The .idx next to each tar is byte-identical to what DALI's own wds2idx tool writes."""
    wds2idx = pytest.importorskip("wds2idx")  # shipped with nvidia-dali
    manifest = json.loads((synth_out / "manifest.json").read_text())
    shards = [s for split in manifest["splits"].values() for s in split["shards"]]
    for s in shards:
        theirs = tmp_path / "theirs.idx"
        with wds2idx.IndexCreator(str(synth_out / s["tar"]), str(theirs), verbose=False) as ic:
            ic.create_index()
        assert theirs.read_bytes() == (synth_out / s["idx"]).read_bytes(), s["tar"]
