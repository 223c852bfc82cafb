"""Ten-crop evaluation: crops and probabilities against references, the top-k rule,
exact counts over 1..3 gloo ranks, both checkpoint kinds, the figures, predict."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from alexpipe import eval as ev
from alexpipe.dataset import Prepared
from alexpipe.loader import LoaderOptions, eval_loader
from alexpipe.model import TORCHVISION_NORMALIZE, alexnet, load_for_eval
from conftest import DATA, cpu, error_lines
from test_loader import reference_ten, stored


def test_predict_crops_equal_the_pipelines(any_ready):
    """ten_crops() (numpy, for alexpipe-predict) cuts what the DALI ten-crop graph cuts."""
    p = Prepared.open(any_ready).pca
    samples = stored(any_ready, "val")
    images, _ = next(iter(eval_loader(any_ready, LoaderOptions(batch_size=6),
                                      runtime=cpu(), ten_crop=True)))
    mean, std = np.array(p["mean"]), np.array(p["std"])
    for got, s in zip(images.numpy(), samples):
        img = np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB"))
        want = ((ev.ten_crops(img).astype(np.float64) - mean) / std).transpose(0, 3, 1, 2)
        np.testing.assert_allclose(got, want, atol=2e-4)
        np.testing.assert_array_equal(ev.ten_crops(img), np.stack(reference_ten(img, full_image=False)))


def test_ten_crop_probabilities_are_the_mean_softmax_of_the_crops(any_ready):
    torch.manual_seed(0)
    model = alexnet("torchvision").eval()
    with torch.no_grad():
        model.classifier[6].weight *= 1000  # confident, crop-dependent outputs: averaging softmax != logits
    p = Prepared.open(any_ready).pca
    samples = stored(any_ready, "val")
    images, _ = next(iter(eval_loader(any_ready, LoaderOptions(batch_size=3),
                                      runtime=cpu(), ten_crop=True)))
    with torch.no_grad():
        got = ev.crop_probabilities(model, images)
        for i, s in enumerate(samples[:3]):
            img = np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB"), np.float64)
            crops = [(c - np.array(p["mean"])) / np.array(p["std"]) for c in reference_ten(img, full_image=False)]
            x = torch.from_numpy(np.stack(crops).transpose(0, 3, 1, 2).copy()).float()
            want = torch.softmax(model(x), dim=1).mean(0)
            torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-7)
            assert not torch.allclose(want, torch.softmax(model(x).mean(0), dim=0), atol=1e-6)  # not logits


def test_topk_rule_on_known_scores():
    nan = float("nan")
    probs = torch.tensor([[0.5, 0.2, 0.2, 0.1],
                          [0.5, 0.2, 0.2, 0.1],
                          [0.1, 0.2, 0.3, 0.4],
                          [nan, 0.2, 0.3, 0.5],
                          [0.1, nan, 0.3, 0.5]])
    labels = torch.tensor([2, 1, 0, 3, 1])
    # row 0: one class strictly above -> wrong at 1, right at 2; row 1: tied with class 2 -> the same;
    # row 3: the NaN counts as above; row 4: a NaN true score is always wrong
    assert ev.topk_correct(probs, labels, 1).tolist() == [False, False, False, False, False]
    assert ev.topk_correct(probs, labels, 2).tolist() == [True, True, False, True, False]
    assert ev.topk_correct(probs, labels, 4).tolist() == [True, True, True, True, False]


class Logits(torch.nn.Module):
    """A 'model' whose input is already its output, to evaluate known logits."""

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return x


def test_evaluate_errors_equal_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(103, 20, generator=g).round(decimals=1)  # coarse: many ties
    labels = torch.randint(0, 20, (103,), generator=g)
    batches = [(logits[i:i + 16], labels[i:i + 16]) for i in range(0, 103, 16)]
    r = ev.evaluate(Logits(), batches, None, 20)
    probs = torch.softmax(logits, 1).numpy()
    rank = np.array([(probs[i] > probs[i, labels[i]]).sum() for i in range(103)])
    assert r["count"] == 103
    assert r["top1_err"] == pytest.approx(1 - np.mean(rank < 1))
    assert r["top5_err"] == pytest.approx(1 - np.mean(rank < 5))
    assert r["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits.double(), labels)))


def test_both_checkpoint_kinds_load(shapes_run, tmp_path):
    model, info = load_for_eval(shapes_run / "checkpoint.pt")
    assert (info["arch"], info["num_classes"], info["epoch"]) == ("torchvision", 4, 10)
    assert [c[1] for c in info["classes"]] == ["disk_020", "ring_300", "square_120", "triangle_230"]
    tv = alexnet("torchvision")
    torch.save(tv.state_dict(), tmp_path / "alexnet-owt.pth")
    model, info = load_for_eval(tmp_path / "alexnet-owt.pth")
    assert info["arch"] == "torchvision" and info["normalize"] == TORCHVISION_NORMALIZE
    assert info["classes"][0][2] == "tench" and len(info["classes"]) == 1000
    for k, v in tv.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)


def test_filters_png_has_one_tile_per_kernel():
    for arch, n, cols in (("paper", 96, 12), ("torchvision", 64, 8)):
        model = alexnet(arch)
        grid = np.asarray(ev.filters_image(model, scale=4, gap=2))
        rows = n // cols
        assert grid.shape == (rows * 46 + 2, cols * 46 + 2, 3)
        k = model.features[0].weight.detach()[n - 1]
        k = ((k - k.min()) / (k.max() - k.min()) * 255).round().byte().permute(1, 2, 0).numpy()
        y, x = 2 + (rows - 1) * 46, 2 + (cols - 1) * 46
        np.testing.assert_array_equal(grid[y:y + 44:4, x:x + 44:4], k)  # the last tile is the last kernel


def eval_json(ckpt, out, tmp_path, world: int, port: int) -> dict:
    j = tmp_path / f"eval{world}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port", str(port),
           "-m", "alexpipe.eval", str(ckpt), str(out), "--device", "cpu", "--batch-size", "32", "--json", str(j),
           "--figures", str(tmp_path / f"fig{world}")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(j.read_text())


def test_one_two_three_ranks_count_every_sample_once(shapes_run, shapes_out, tmp_path):
    """40 val images, batches of 32 center crops or 3 ten-crop samples: no world size or
    batch divides 40, and every rank count gives the same numbers."""
    results = [eval_json(shapes_run / "checkpoint.pt", shapes_out, tmp_path, w, 29600 + w) for w in (1, 2, 3)]
    for r in results:
        for mode in ("center", "ten"):
            assert r["results"][mode]["count"] == 40
            for key in ("top1_err", "top5_err", "per_class_top1"):
                assert r["results"][mode][key] == results[0]["results"][mode][key], (mode, key)
            assert r["results"][mode]["loss"] == pytest.approx(results[0]["results"][mode]["loss"], rel=1e-5)
    assert results[0]["results"]["ten"]["top1_err"] < 0.4
    assert set(results[0]["results"]["center"]["per_class_top1"]) == {"disk_020", "ring_300", "square_120",
                                                                      "triangle_230"}
    sha = Prepared.open(shapes_out).identity[:8]  # the predictions of other shards get a file of their own
    assert (tmp_path / "fig1" / "filters.png").exists() and (tmp_path / "fig1" / f"predictions-val-{sha}.png").exists()


@pytest.mark.parametrize("which", DATA)
def test_torchvision_weights_evaluate_on_imagenet_shards(which, request, tmp_path, capsys):
    """A bare torchvision state_dict (1000 classes, its own normalization) on shards with the
    standard ILSVRC labels: the synthetic wnid tree, or the real sample where present."""
    out = request.getfixturevalue("synth_ready" if which == "made" else "real_ready")
    torch.manual_seed(0)
    torch.save(alexnet("torchvision").state_dict(), tmp_path / "tv.pth")
    assert ev.main([str(tmp_path / "tv.pth"), str(out), "--device", "cpu", "--crops", "center",
                    "--json", str(tmp_path / "e.json"), "--figures", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "e.json").read_text())
    count = json.loads((out / "manifest.json").read_text())["splits"]["val"]["count"]
    assert r["results"]["center"]["count"] == count > 10 and r["arch"] == "torchvision"
    assert "center crop" in capsys.readouterr().out


def test_predict_names_top_classes(shapes_run, shapes_out, capsys):
    src = shapes_out.parent / "src" / "val" / "square_120"
    images = sorted(src.glob("*.JPEG"))[:2]
    assert ev.predict_main([str(shapes_run / "checkpoint.pt"), *map(str, images), "--device", "cpu"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 * (1 + 4) and out[0] == str(images[0]) and out[5] == str(images[1])  # 4 classes: all shown
    for block in (out[1:5], out[6:10]):
        probs = [float(line.split()[0]) for line in block]
        assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 1e-3
        assert block[0].split()[1] == "square_120"


def test_predict_reports_unreadable_files_and_predicts_the_others(shapes_run, shapes_out, tmp_path, capsys):
    good = sorted((shapes_out.parent / "src" / "val" / "square_120").glob("*.JPEG"))[0]
    bad, missing = tmp_path / "x.jpg", tmp_path / "gone.jpg"
    bad.write_bytes(b"not an image")
    code = ev.predict_main([str(shapes_run / "checkpoint.pt"), str(bad), str(missing), str(good), "--device", "cpu"])
    captured = capsys.readouterr()
    out, err = captured.out.splitlines(), captured.err.strip().splitlines()
    assert code == 1 and out[0] == str(good) and len(out) == 5
    assert err == [f"alexpipe-predict: {bad}: not a readable image " + err[0].split("not a readable image ")[1],
                   f"alexpipe-predict: {missing}: not found",
                   "alexpipe-predict: 2 of 3 files could not be read"]


@pytest.mark.parametrize("case", ["not_a_checkpoint", "wrong_classes", "no_split"])
def test_bad_input_is_one_line_and_exit_2(case, shapes_run, shapes_out, unique_out, tmp_path, capsys):
    ckpt, out, extra, expect = shapes_run / "checkpoint.pt", shapes_out, [], ""
    if case == "not_a_checkpoint":
        ckpt = tmp_path / "junk.pt"
        ckpt.write_bytes(os.urandom(100))
        expect = f"{ckpt}: not a checkpoint"
    elif case == "wrong_classes":
        out, expect = unique_out, "a model of 4 classes, but"
    else:
        extra, expect = ["--split", "test"], "split 'test' was not prepared"
    code = ev.main([str(ckpt), str(out), "--device", "cpu", *extra])
    err = error_lines(capsys.readouterr().err)
    assert code == 2 and len(err) == 1 and expect in err[0], err
