"""alexpipe-train end to end on CPU: it learns, it
resumes exactly, DDP over gloo equals one process, and bad runs stop with a clear line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alexpipe import pca, train
from alexpipe.prepare import PrepareConfig, prepare
from alexpipe.model import alexnet
from conftest import error_lines

def test_schedule_warmup_step_and_plateau():
    s = train.Schedule(warmup_from=0.01, peak_lr=0.08, kind="step", steps_per_epoch=10, warmup_steps=50,
                       step_epochs=30)
    assert s.lr(0, 0) == pytest.approx(0.01 + 0.07 / 50) and s.lr(2, 5) == pytest.approx(0.01 + 0.07 * 26 / 50)
    assert s.lr(4, 9) == pytest.approx(0.08) and s.lr(5, 0) == 0.08
    assert s.lr(30, 0) == pytest.approx(0.008) and s.lr(60, 3) == pytest.approx(0.0008)
    p = train.Schedule(warmup_from=0.0, peak_lr=0.01, kind="plateau", steps_per_epoch=10, patience=2)
    drops = [p.end_epoch(e) for e in [0.9, 0.8, 0.8, 0.7995, 0.801, 0.79, 0.79, 0.79, 0.79]]
    assert drops == [False, False, False, False, True, False, False, False, True]
    assert p.lr(9, 0) == pytest.approx(0.0001)


# ---------------------------------------------------------------------------- the CLI

@pytest.fixture(scope="module")
def small_out(synth_out, tmp_path_factory) -> Path:
    """The synthetic wnid tree (48 train, 12 val, 1000-way labels), with pca.json."""
    out = tmp_path_factory.mktemp("small") / "out"
    shutil.copytree(synth_out, out)
    assert pca.main([str(out), "--device", "cpu"]) == 0
    return out


def test_learns_a_synthetic_dataset(shapes_run):
    run = shapes_run
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, 11))
    assert all(r["val_count"] == 40 for r in rows)
    assert rows[-1]["val_top1_err"] < 0.4  # chance is 0.75
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 0.5
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((run / "config.json").read_text())["arch"] == "torchvision"
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 10 and ckpt["num_classes"] == 4 and ckpt["config"]["lr"] == 0.1


def test_learns_from_tiles(tmp_path):
    """The shapes of shapes_run, their central squares in tiles of 4, trained as shapes_run is:
    each view with its own square's label, or it would stay at chance (0.75)."""
    from alexpipe.sample import SampleConfig, make_sample
    make_sample(SampleConfig(dir=tmp_path / "src", names="shape"))
    prepare(PrepareConfig(src=tmp_path / "src", out=tmp_path / "out", workers=2, shard_size=16, center_crop=True,
                          tile=4))
    assert pca.main([str(tmp_path / "out"), "--device", "cpu"]) == 0
    args = [str(tmp_path / "out"), "--arch", "torchvision", "--device", "cpu", "--epochs", "10", "--batch-size", "32",
            "--lr", "0.1", "--warmup-epochs", "2", "--run-dir", str(tmp_path / "run"), "--log-every", "5"]
    assert train.main(args) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["val_count"] == 40 for r in rows)
    # chance is 0.75; the curves of these 40 images are noisy (seen: 0.1-0.5 over the last 5 epochs)
    assert min(r["val_top1_err"] for r in rows[-5:]) < 0.45
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 0.5


def run_cli(out, run, *extra) -> int:
    return train.main([str(out), "--arch", "paper", "--groups", "2", "--device", "cpu", "--batch-size", "16",
                       "--run-dir", str(run), "--deterministic", "--log-every", "2", *extra])


def test_resume_continues_exactly(small_out, tmp_path):
    """With two loader pipelines (the GPU default), each with its own reader state."""
    assert run_cli(small_out, tmp_path / "straight", "--epochs", "2", "--pipelines", "2") == 0
    assert run_cli(small_out, tmp_path / "split", "--epochs", "1", "--pipelines", "2") == 0
    ckpt = tmp_path / "split" / "checkpoint.pt"
    assert run_cli(small_out, tmp_path / "split", "--epochs", "2", "--resume", str(ckpt), "--pipelines", "2") == 0
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(ckpt, weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["metrics"][1]["train_loss"] == b["metrics"][1]["train_loss"]


def test_nan_stops_the_run_and_keeps_the_checkpoint(small_out, tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli(small_out, run, "--epochs", "1") == 0
    before = (run / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    code = run_cli(small_out, run, "--epochs", "2", "--lr", "1e30", "--resume", str(run / "checkpoint.pt"))
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code == 2 and len(err) == 1
    assert "alexpipe-train: error: loss is not finite at epoch 2, step" in err[0]
    assert (run / "checkpoint.pt").read_bytes() == before


def test_bad_input_is_one_line_and_exit_2(small_out, shapes_out, tmp_path, capsys, monkeypatch):
    def fails(args, expect):
        capsys.readouterr()
        assert train.main(args) == 2
        err = error_lines(capsys.readouterr().err)
        assert len(err) == 1 and expect in err[0], err
    no_pca = tmp_path / "no_pca"
    shutil.copytree(small_out, no_pca)
    (no_pca / "pca.json").unlink()
    fails([str(no_pca), "--device", "cpu"], "pca.json: not found")
    stale = tmp_path / "stale"
    shutil.copytree(small_out, stale)
    shutil.copy(shapes_out / "pca.json", stale / "pca.json")
    fails([str(stale), "--device", "cpu"], "computed for other shards")
    fails([str(tmp_path / "nothing"), "--device", "cpu"], "no such directory")
    run = tmp_path / "run"
    assert run_cli(small_out, run, "--epochs", "1") == 0
    fails([str(small_out), "--device", "cpu", "--arch", "torchvision", "--run-dir", str(tmp_path / "r2"),
           "--resume", str(run / "checkpoint.pt")], "a checkpoint with arch paper, not torchvision")
    fails([str(shapes_out), "--device", "cpu", "--arch", "paper", "--groups", "2", "--run-dir", str(tmp_path / "r3"),
           "--resume", str(run / "checkpoint.pt")], "trained on other shards")
    fails([str(small_out), "--device", "cpu", "--arch", "paper", "--groups", "2", "--pipelines", "2", "--run-dir",
           str(tmp_path / "r4"), "--resume", str(run / "checkpoint.pt")], "a checkpoint with --pipelines 1, not 2")
    fails([str(small_out), "--device", "cpu", "--run-dir", str(run)], "checkpoint.pt exists")
    fails([str(small_out), "--device", "cpu", "--cache", "gpu", "--run-dir", str(tmp_path / "r5")],
          "cache gpu needs a CUDA GPU")
    if not torch.cuda.is_available():
        fails([str(small_out), "--device", "cuda"], "no CUDA GPU is visible")
    monkeypatch.setenv("WORLD_SIZE", "3")
    fails([str(small_out), "--device", "cpu", "--batch-size", "16"], "--batch-size 16 does not divide over 3 ranks")


# ---------------------------------------------------------------------------- DDP on gloo

def _ddp_worker(rank: int, world: int, init: str, x, y, result: str):
    import torch.distributed as tdist
    tdist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)
    model = alexnet("paper", num_classes=10, dropout=0.0)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    per = len(x) // world
    for _ in range(3):
        train.train_step(ddp, x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per], opt, 0.01, scaler, None)
    if rank == 0:
        torch.save(model.state_dict(), result)
    tdist.destroy_process_group()


def test_ddp_two_ranks_equal_one_process_on_the_same_global_batch(tmp_path):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 224, 224, generator=g), torch.randint(0, 10, (8,), generator=g)
    results = {}
    for world in (1, 2):
        out = str(tmp_path / f"w{world}.pt")
        torch.multiprocessing.spawn(_ddp_worker, args=(world, f"file://{tmp_path}/store{world}", x, y, out),
                                    nprocs=world, join=True)
        results[world] = torch.load(out, weights_only=True)
    torch.manual_seed(0)
    init = alexnet("paper", num_classes=10, dropout=0.0).state_dict()
    largest_update = max((a - init[k]).abs().max().item() for k, a in results[1].items())
    assert largest_update > 1e-3  # so the tolerance below is 100x finer than the steps taken
    for key, a in results[1].items():
        torch.testing.assert_close(results[2][key], a, rtol=1e-4, atol=1e-5)


def test_torchrun_two_cpu_ranks_count_every_val_sample_once(small_out, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29517", "-m", "alexpipe.train", str(small_out), "--device", "cpu",
                           "--arch", "torchvision", "--epochs", "1", "--batch-size", "16", "--run-dir", str(run)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["val_count"] == 12  # 12 val images over 2 ranks (6 + 6)
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["world"] == 2 and len(ckpt["loader"]) == 2 and len(ckpt["rng"]) == 2
    assert proc.stdout.count("epoch   1/1") == 1  # rank 0 alone reports


def _runtime_worker(rank: int, world: int, init: str, result: str):
    import torch.distributed as tdist

    from alexpipe.runtime import Runtime
    tdist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    rt = Runtime.start("cpu", distributed=False)  # as a library user's own DDP script calls the loaders
    Path(f"{result}.{rank}").write_text(f"{rt.rank} {rt.world}")
    tdist.destroy_process_group()


def test_a_users_process_group_decides_rank_and_world(tmp_path):
    torch.multiprocessing.spawn(_runtime_worker, args=(2, f"file://{tmp_path / 'init'}", str(tmp_path / "r")), nprocs=2)
    assert [(tmp_path / f"r.{k}").read_text() for k in (0, 1)] == ["0 2", "1 2"]
