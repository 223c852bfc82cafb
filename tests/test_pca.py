"""alexpipe-pca against plain numpy on the same decoded pixels, and on known colours."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from alexpipe import pca
from alexpipe.prepare import PrepareConfig, prepare
from alexpipe.dataset import Prepared
from conftest import error_lines


def numpy_reference(out: Path, split: str = "train"):
    """Plain numpy over every pixel of every stored JPEG, decoded with PIL (libjpeg-turbo,
    the decoder DALI's CPU path also uses)."""
    import webdataset as wds
    manifest = json.loads((out / "manifest.json").read_text())
    urls = [str(out / s["tar"]) for s in manifest["splits"][split]["shards"]]
    n, s, ss, images = 0, np.zeros(3), np.zeros((3, 3)), 0
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        x = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"), np.float64).reshape(-1, 3)
        n, s, ss, images = n + len(x), s + x.sum(0), ss + x.T @ x, images + 1
    mean = s / n
    cov = (ss - n * np.outer(mean, mean)) / (n - 1)
    eigval, eigvec = np.linalg.eigh(cov)
    return images, n, mean, cov, eigval[::-1], eigvec[:, ::-1]


def run(out: Path, *args, name: str = "pca.json") -> dict:
    assert pca.main([str(out), "--device", "cpu", "--output", str(out / name), *args]) == 0
    return json.loads((out / name).read_text())


def test_matches_numpy(any_prepared):
    out, _ = any_prepared
    r = run(out, name="pca-numpy.json")
    images, n, mean, cov, eigval, eigvec = numpy_reference(out)
    count = json.loads((out / "manifest.json").read_text())["splits"]["train"]["count"]
    assert (r["images"], r["pixels"]) == (images, n) == (count, n)
    np.testing.assert_allclose(r["mean"], mean, rtol=1e-6)
    np.testing.assert_allclose(r["cov"], cov, rtol=1e-6)
    np.testing.assert_allclose(r["std"], np.sqrt(np.diag(cov)), rtol=1e-6)
    np.testing.assert_allclose(r["eigval"], eigval, rtol=1e-6)
    v = np.array(r["eigvec"])
    np.testing.assert_allclose(np.abs(v), np.abs(eigvec), rtol=1e-6, atol=1e-9)
    # orthonormal columns, and they are eigenvectors of the covariance
    np.testing.assert_allclose(v.T @ v, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(np.array(r["cov"]) @ v, v * np.array(r["eigval"]), rtol=1e-9, atol=1e-9)
    # the stated sign convention
    for k in range(3):
        assert v[np.argmax(np.abs(v[:, k])), k] > 0
    assert r["eigval"][0] >= r["eigval"][1] >= r["eigval"][2] > 0  # the stated order
    assert r["scale"] == 255 and len(r["manifest_sha256"]) == 64


def test_recovers_a_known_colour_covariance(tmp_path):
    """Flat-colour images whose colours are drawn from N(mu, C): the pixel covariance is the
    covariance of the drawn colours, and its eigenvectors are C's."""
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    true_cov = q @ np.diag([900.0, 150.0, 25.0]) @ q.T
    colours = np.clip(np.round(rng.multivariate_normal([128, 120, 110], true_cov, size=400)), 0, 255)
    src = tmp_path / "src" / "train" / "flat"
    src.mkdir(parents=True)
    for i, c in enumerate(colours):
        Image.new("RGB", (300, 260), tuple(int(v) for v in c)).save(src / f"{i:03d}.png")
    out = tmp_path / "out"
    prepare(PrepareConfig(src=tmp_path / "src", out=out, split="train", workers=2, shard_size=100, center_crop=True))
    r = run(out)
    drawn = np.cov(colours.T)
    d_val, d_vec = np.linalg.eigh(drawn)
    v = np.array(r["eigvec"])
    for k in range(3):  # same eigenvectors as the drawn colours' covariance (JPEG moves flat colours ~1 level)
        assert abs(v[:, k] @ d_vec[:, 2 - k]) > 0.999
        assert abs(v[:, k] @ np.linalg.eigh(true_cov)[1][:, 2 - k]) > 0.98
    np.testing.assert_allclose(r["eigval"], d_val[::-1], rtol=0.05)
    np.testing.assert_allclose(r["mean"], colours.mean(0), atol=1.0)


def test_gpu_and_cpu_reductions_give_the_same_integers():
    """The elementwise form alexpipe-pca uses on CUDA equals the matmul form it uses on CPU,
    and both equal numpy's exact integer sums, including a saturated 255 image."""
    import torch
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (5, 37, 53, 3), dtype=torch.uint8, generator=g)
    images[4] = 255
    a, b = pca.sums_elementwise(images), pca.sums_matmul(images)
    x = images.numpy().reshape(5, -1, 3).astype(np.int64)
    want = (x.sum(1), (x * x).sum(1), (x * np.roll(x, -1, axis=2)).sum(1))
    for got_a, got_b, w in zip(a, b, want):
        assert got_a.dtype == got_b.dtype == torch.int64
        np.testing.assert_array_equal(got_a.numpy(), w)
        np.testing.assert_array_equal(got_b.numpy(), w)


def test_workers_and_batch_size_do_not_change_the_result(synth_out):
    a = run(synth_out, "--workers", "2", name="a.json")
    b = run(synth_out, "--workers", "1", "--batch-size", "7", name="b.json")
    for key in ("sums", "mean", "cov", "eigval", "eigvec", "stderr", "images", "pixels"):
        assert a[key] == b[key], key


def test_pipelines_do_not_change_the_statistics(unique_out):
    """Four pipelines over ranges of unequal sizes (150 samples: 37 or 38 each, which DALI pads
    to 38; batches of 7): every image counted once, the same exact sums (the jackknife groups,
    by arrival order, may differ)."""
    a = run(unique_out, "--workers", "2", name="a.json")
    b = run(unique_out, "--workers", "4", "--pipelines", "4", "--batch-size", "7", name="b.json")
    assert a["images"] == b["images"] == 150
    for key in ("sums", "mean", "cov", "eigval", "eigvec", "pixels"):
        assert a[key] == b[key], key


def test_sums_do_not_depend_on_how_many_batches_are_in_flight(synth_out):
    shards = Prepared.open(synth_out, pca=False).split("train")
    first, _ = pca.accumulate(shards, "cpu", 2, 5, in_flight=0)
    later, _ = pca.accumulate(shards, "cpu", 2, 5, in_flight=3)
    assert first.sum(0)[0] == sum(s["count"] for s in shards)
    assert (first == later).all()


def test_fraction_uses_seeded_whole_shards(any_prepared):
    real_out, _ = any_prepared
    manifest = json.loads((real_out / "manifest.json").read_text())
    counts = {Path(s["tar"]).name: s["count"] for s in manifest["splits"]["train"]["shards"]}
    r = run(real_out, "--fraction", "0.5", name="half.json")
    assert len(r["shards"]) == round(len(counts) / 2) and r["images"] == sum(counts[s] for s in r["shards"])
    assert run(real_out, "--fraction", "0.5", name="half2.json")["shards"] == r["shards"]
    seeds = [run(real_out, "--fraction", "0.5", "--seed", str(k), name=f"half-{k}.json")["shards"] for k in (3, 4, 5)]
    assert any(other != r["shards"] for other in seeds)
    full = run(real_out, name="full.json")
    # the half-data estimate is within a few of its stated standard errors of the full one
    for key in ("mean", "eigval"):
        err = np.abs(np.array(r[key]) - full[key])
        assert np.all(err < 4 * np.array(r["stderr"][key]) + 1e-9), key


def corrupt_copy(src: Path, dst: Path, how: str) -> Path:
    """Damage shard 1 of the train split behind the manifest's back: cut it in half, destroy
    its first JPEG's header, or change a byte of its first .json (every JPEG still decodes)."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    shard = manifest["splits"]["train"]["shards"][1]
    tar = dst / shard["tar"]
    data = bytearray(tar.read_bytes())
    if how == "truncate":
        tar.write_bytes(bytes(data[: len(data) // 2]))
        return tar
    first = (dst / shard["idx"]).read_text().splitlines()[1].split()
    offset = int(first[first.index("jpg" if how == "bad_jpeg" else "json") + 1])
    if how == "bad_jpeg":
        data[offset:offset + 16] = bytes(16)
    else:
        data[offset + 2] ^= 1
    tar.write_bytes(bytes(data))
    return tar


@pytest.mark.parametrize("how", ["sha256", "truncate", "bad_jpeg", "no_manifest", "no_out", "bad_fraction"])
def test_bad_input_names_the_problem(how, synth_out, tmp_path, capsys):
    out = tmp_path / "o"
    expect = None
    if how in ("sha256", "truncate", "bad_jpeg"):
        tar = corrupt_copy(synth_out, out, how)
        key = f"{16:08d}"  # the first sample of shard 1 (shards of 16)
        expect = {"sha256": f"{tar}: sha256 differs", "truncate": f"{tar}: ",
                  "bad_jpeg": f"{tar}: sample {key} does not decode"}[how]
    elif how == "no_manifest":
        shutil.copytree(synth_out, out)
        (out / "manifest.json").unlink()
        expect = "manifest.json: not found"
    elif how == "no_out":
        expect = "no such directory"
    else:
        shutil.copytree(synth_out, out)
        expect = "--fraction"
    if out.exists():
        (out / "pca.json").unlink(missing_ok=True)  # the shared fixture may have one from other tests
    args = ["--fraction", "0"] if how == "bad_fraction" else []
    assert pca.main([str(out), "--device", "cpu", *args]) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("alexpipe-pca: error: ") and expect in err[0], err
    assert not (out / "pca.json").exists()


@pytest.mark.parametrize("edit", ["eigval", "mean", "sums"])
def test_edited_statistics_are_refused_by_train_and_eval(edit, unique_out, tmp_path, capsys):
    """pca.json records the exact sums its numbers come from: a file whose numbers no longer
    follow from them (first eigenvalue or a mean raised by 1%, or a sum changed) is refused by
    alexpipe-train and alexpipe-eval with one line naming it, exit 2."""
    from alexpipe import eval as eval_mod
    from alexpipe import train
    from alexpipe.model import alexnet
    out = tmp_path / "out"
    shutil.copytree(unique_out, out)
    path = out / "pca.json"
    r = json.loads(path.read_text())
    if edit == "sums":
        r["sums"]["s"][0] = str(int(r["sums"]["s"][0]) + 10 ** 6)
    else:
        r[edit][0] *= 1.01
    path.write_text(json.dumps(r))
    torch.save(alexnet("torchvision", 150).state_dict(), tmp_path / "w.pth")
    runs = [lambda: train.main([str(out), "--device", "cpu", "--epochs", "1", "--batch-size", "16",
                                "--run-dir", str(tmp_path / "run")]),
            lambda: eval_mod.main([str(tmp_path / "w.pth"), str(out), "--device", "cpu"])]
    for run_ in runs:
        assert run_() == 2
        err = error_lines(capsys.readouterr().err)
        assert len(err) == 1 and f"{path}: its " in err[0] and "does not follow from its own sums" in err[0]
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
