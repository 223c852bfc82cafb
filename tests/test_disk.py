"""A disk that fills up: prepare, train and pca stop with one line that names where and says
the disk is full, exit 2, leave nothing partial under a final name, keep what was complete,
and finish after space is freed. On a real tmpfs mounted small (as root; skipped where
mounting is not permitted), and the write mechanism itself everywhere."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess

import pytest
import torch

from alexpipe import pca, prepare, train
from alexpipe.util import DiskFull, atomic_write_bytes
from conftest import error_lines


@pytest.fixture
def small_fs(tmp_path):
    """(mount point, resize(size)): a tmpfs of the size the test asks for, grown by remounting."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    mounted = []

    def resize(size: str):
        opts = ["-o", f"remount,size={size}", str(mnt)] if mounted else ["-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                                                                          str(mnt)]
        if os.geteuid() != 0 or not shutil.which("mount") or subprocess.run(["mount", *opts]).returncode:
            pytest.skip("mounting a tmpfs is not permitted here")
        mounted.append(size)
    yield mnt, resize
    if mounted:
        subprocess.run(["umount", str(mnt)], check=False)


def fill(folder, leave: int = 0) -> None:
    """Take all the free space of folder's filesystem but `leave` bytes."""
    stat = os.statvfs(folder)
    free = stat.f_bavail * stat.f_frsize
    with open(folder / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "x.json"
    path.write_bytes(b"old")

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(DiskFull, match=f"{path}: disk full"):
        atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_prepare_into_a_full_disk_resumes_to_identical_shards(small_fs, synth_tree, synth_out, capsys):
    mnt, resize = small_fs
    want = json.loads((synth_out / "manifest.json").read_text())
    train_bytes = sum(s["bytes"] for s in want["splits"]["train"]["shards"])
    resize(f"{train_bytes // 2}")
    out = mnt / "out"
    args = [str(synth_tree), str(out), "--shard-size", "16", "--workers", "2"]
    assert prepare.main(args) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith(f"alexpipe-prepare: error: {out}: disk full (no space left on device)")
    assert not list(out.rglob("*.tmp")) and not (out / "manifest.json").exists()
    records = {p.stem: json.loads(p.read_text()) for p in (out / "train" / ".parts").glob("*.json")}
    tars = {p.stem for p in (out / "train").glob("*.tar")}
    assert set(records) <= tars and len(tars) < len(want["splits"]["train"]["shards"])
    for name, rec in records.items():  # every recorded shard is whole
        assert (out / "train" / f"{name}.tar").stat().st_size == rec["bytes"]
    resize(f"{4 * train_bytes}")
    assert prepare.main(args) == 0
    got = json.loads((out / "manifest.json").read_text())
    assert got["splits"] == want["splits"]  # sha256 of every shard: byte-identical


def test_train_into_a_full_disk_keeps_its_last_checkpoint(small_fs, shapes_out, capsys):
    """Room for one checkpoint (~460 MB) but not a second beside it: epoch 2's save fails,
    epoch 1's checkpoint stays loadable, and --resume finishes once there is room."""
    mnt, resize = small_fs
    resize("700M")
    run = mnt / "run"
    args = [str(shapes_out), "--arch", "torchvision", "--device", "cpu", "--batch-size", "32", "--epochs", "2",
            "--run-dir", str(run), "--log-every", "5"]
    assert train.main(args) == 2
    err = error_lines(capsys.readouterr().err)
    ckpt = run / "checkpoint.pt"
    assert err == [f"alexpipe-train: error: {run}: disk full (no space left on device) while writing checkpoint.pt; "
                   f"{ckpt} holds epoch 1, intact: free space and add --resume {ckpt}"]
    assert torch.load(ckpt, weights_only=True)["epoch"] == 1 and not list(run.glob(".*.tmp"))
    resize("1500M")
    assert train.main([*args, "--resume", str(ckpt)]) == 0
    assert torch.load(ckpt, weights_only=True)["epoch"] == 2


def test_pca_into_a_full_disk_keeps_the_old_result(small_fs, unique_out, capsys):
    mnt, resize = small_fs
    resize("1M")
    output = mnt / "pca.json"
    output.write_text("old")
    fill(mnt, leave=512)
    assert pca.main([str(unique_out), "--device", "cpu", "--output", str(output)]) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith(f"alexpipe-pca: error: {output}: disk full (no space left on device)")
    assert output.read_text() == "old" and not list(mnt.glob(".*.tmp"))
