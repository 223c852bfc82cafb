"""alexpipe-neighbors on CPU: the query itself comes first at distance 0, distances and order
equal a direct numpy computation on the same features, the chunked and certified search
equals a one-shot one (ties included), two ranks equal one, outputs and errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from alexpipe import neighbors
from alexpipe.model import TORCHVISION_NORMALIZE, alexnet
from conftest import cpu, error_lines


@pytest.fixture(scope="module")
def weights(unique_out, tmp_path_factory) -> Path:
    """A torchvision-format AlexNet for unique_out's 150 classes (random weights: the search
    does not care what the features mean)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("nn") / "alexnet.pth"
    torch.save(alexnet("torchvision", 150).state_dict(), path)
    return path


def run(weights, out, tmp_path, *args) -> list[dict]:
    json_path = tmp_path / "n.json"
    assert neighbors.main([str(weights), str(out), "--device", "cpu", "--json", str(json_path),
                           "--png", str(tmp_path / "n.png"), "--batch-size", "32", *args]) == 0
    return json.loads(json_path.read_text())


def reference(weights, out, query: str, pool: str, k: int) -> dict[str, list[tuple[str, float]]]:
    """Every query's k nearest by a direct float64 numpy computation on the same features."""
    model = alexnet("torchvision", 150)
    model.load_state_dict(torch.load(weights, weights_only=True))
    data, rt = neighbors.Prepared.open(out), cpu()
    feats = {}
    for split in {query, pool}:
        f, _ = neighbors.features(model, TORCHVISION_NORMALIZE, data, split, rt, 32)
        keys = neighbors.stored_keys(data.split(split))
        feats[split] = (f.double().numpy(), keys)
    pf, pkeys = feats[pool]
    qf, qkeys = feats[query]
    result = {}
    for q, key in zip(qf, qkeys):
        d2 = ((pf - q) ** 2).sum(1)
        order = sorted(range(len(pkeys)), key=lambda i: (d2[i], pkeys[i]))[:k]
        result[key] = [(pkeys[i], float(np.sqrt(d2[i]))) for i in order]
    return result


def test_train_queries_find_themselves_first(weights, unique_out, tmp_path, capsys):
    found = run(weights, unique_out, tmp_path, "--query", "train", "--pool", "train", "--queries", "0", "--k", "4")
    assert len(found) == 150
    for q in found:
        assert q["neighbors"][0] == {"key": q["key"], "label": q["label"], "distance": 0.0}
        assert [n["distance"] for n in q["neighbors"]] == sorted(n["distance"] for n in q["neighbors"])
    assert "150 train queries against 150 train samples" in capsys.readouterr().out
    assert (tmp_path / "n.png").read_bytes()[:4] == b"\x89PNG"


def test_distances_and_order_equal_numpy(weights, unique_out, tmp_path):
    found = run(weights, unique_out, tmp_path, "--query", "val", "--pool", "train", "--queries", "7", "--k", "6",
                "--chunk", "16")
    want = reference(weights, unique_out, "val", "train", 6)
    assert len(found) == 7 and len({q["key"] for q in found}) == 7
    for q in found:
        got = [(n["key"], n["distance"]) for n in q["neighbors"]]
        assert [k for k, _ in got] == [k for k, _ in want[q["key"]]]
        np.testing.assert_allclose([d for _, d in got], [d for _, d in want[q["key"]]], rtol=1e-9)


def test_chunked_equals_one_shot_and_ties_go_by_key():
    """A pool where 40 rows tie with the nearest (more than k + MARGIN candidates): the
    certificate fails, the float64 scan decides, and the smallest keys win."""
    g = torch.Generator().manual_seed(0)
    pool = torch.rand(300, 64, generator=g) * 10
    pool[100:140] = pool[5]
    keys = [f"{i:08d}" for i in range(300)][::-1]  # key order is the reverse of row order
    queries = torch.cat([pool[5:6] + 0.01, torch.rand(9, 64, generator=g) * 10])
    one = neighbors.search(queries, pool, keys, 6, chunk=300)
    for chunk, block in ((7, 4096), (64, 3)):
        many = neighbors.search(queries, pool, keys, 6, chunk=chunk, block=block)
        assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])
    tied = sorted([5, *range(100, 140)], key=lambda i: keys[i])[:6]
    assert one[1][0].tolist() == tied
    d2 = ((queries[:, None].double() - pool[one[1]].double()) ** 2).sum(-1)
    torch.testing.assert_close(one[0], d2, rtol=0, atol=0)


def test_two_ranks_equal_one(weights, unique_out, tmp_path):
    one = run(weights, unique_out, tmp_path, "--queries", "5", "--k", "5")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           "29531", "-m", "alexpipe.neighbors", str(weights), str(unique_out), "--device", "cpu",
                           "--queries", "5", "--k", "5", "--json", str(tmp_path / "two.json"),
                           "--png", str(tmp_path / "two.png")], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two.json").read_text())
    assert [q["key"] for q in two] == [q["key"] for q in one]
    for a, b in zip(one, two):
        assert [n["key"] for n in a["neighbors"]] == [n["key"] for n in b["neighbors"]]
        np.testing.assert_allclose([n["distance"] for n in a["neighbors"]], [n["distance"] for n in b["neighbors"]],
                                   rtol=1e-6)


@pytest.mark.parametrize("case", ["not_a_checkpoint", "no_such_split", "k_too_large", "bad_queries"])
def test_bad_input_is_one_line_and_exit_2(case, weights, unique_out, tmp_path, capsys):
    args = {"not_a_checkpoint": [str(unique_out / "manifest.json"), str(unique_out)],
            "no_such_split": [str(weights), str(unique_out), "--pool", "test"],
            "k_too_large": [str(weights), str(unique_out), "--k", "151"],
            "bad_queries": [str(weights), str(unique_out), "--queries", "-1"]}[case]
    assert neighbors.main([*args, "--device", "cpu", "--json", str(tmp_path / "x.json")]) == 2
    err = error_lines(capsys.readouterr().err)
    want = {"not_a_checkpoint": "not a checkpoint", "no_such_split": "split 'test' was not prepared",
            "k_too_large": "--k 151 is more than the 150 samples", "bad_queries": "--queries must be >= 0"}[case]
    assert len(err) == 1 and err[0].startswith("alexpipe-neighbors: error:") and want in err[0]
    assert not (tmp_path / "x.json").exists()
