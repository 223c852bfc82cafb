"""Where CUDA is: DALI's GPU decoder cache against the uncached GPU loader, bit for bit, over
epochs, ranks, a full and a partial cache, and a resume. (Skipped on machines without a GPU;
the layout these rely on, one fixed share per rank, is tested on the CPU in test_loader.py.)"""

from __future__ import annotations

import gc
import math
from collections import Counter

import pytest
import torch

from alexpipe.loader import LoaderOptions, train_loader
from conftest import cuda
from test_loader import equal_batches as equal, stored_labels

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def epochs_of(out, epochs=3, state=None, **kw):
    """Every batch of `epochs` epochs (labels, images on the CPU), and the loader's state after
    the first; the loader is gone on return, and with it DALI's cache for this GPU."""
    loader = train_loader(out, LoaderOptions(batch_size=8, pipelines=2, initial_fill=16, **kw),
                          runtime=cuda(precision="fp32"), state=state)
    result, first_state = [], None
    for e in range(epochs):
        result.append([(y.cpu(), x.cpu()) for x, y in loader])
        first_state = first_state or loader.state_dict()
    del loader
    gc.collect()
    return result, first_state


def test_cached_batches_equal_uncached_bit_for_bit(unique_out):
    """With all of the ~40 MB share cached, and about half of it."""
    plain, _ = epochs_of(unique_out, cache="off", fixed_share=True)
    assert not equal(plain[0], plain[1])
    for cache_gb in (None, 0.02):
        cached, _ = epochs_of(unique_out, cache="gpu", cache_gb=cache_gb)
        assert all(equal(a, b) for a, b in zip(plain, cached)), cache_gb


def test_cached_epochs_count_exactly_over_ranks(unique_out):
    for world in (1, 2, 3):
        for cache_gb in (None, 0.01):
            counts_over_ranks(unique_out, world, cache_gb)


def counts_over_ranks(unique_out, world: int, cache_gb: float | None) -> None:
    """Each rank within its fixed share every epoch, each sample at most once, equal counts."""
    lengths, seen, order = set(), Counter(), stored_labels(unique_out)
    for r in range(world):
        share = set(order[len(order) * r // world:len(order) * (r + 1) // world])
        loader = train_loader(unique_out, LoaderOptions(batch_size=8, pipelines=2, cache="gpu", cache_gb=cache_gb,
                                                        initial_fill=16), runtime=cuda(rank=r, world=world))
        lengths.add(len(loader))
        epochs = [[label for _, y in loader for label in y.tolist()] for _ in range(3)]
        assert all(len(set(e)) == len(e) == len(loader) * 8 for e in epochs)
        assert all(set(e) <= share for e in epochs)
        seen.update(epochs[0])
        del loader
        gc.collect()
    assert len(lengths) == 1 and set(seen.values()) == {1} and 150 - world * 2 * 8 < sum(seen.values()) <= 150


def test_resume_with_a_cache_continues_exactly(unique_out):
    straight, state = epochs_of(unique_out, cache="gpu")
    resumed, _ = epochs_of(unique_out, epochs=2, state=state, cache="gpu")  # the cache refills in epoch 2
    assert equal(resumed[0], straight[1]) and equal(resumed[1], straight[2])


def test_training_runs_on_a_highest_priority_stream(synth_ready, tmp_path, monkeypatch):
    """alexpipe-train on CUDA: every step on the model's highest-priority stream (the loader's
    kernels wait where both are ready), and the run learns and checkpoints as on the CPU."""
    from alexpipe import train
    seen, step = [], train.train_step

    def recording(*args, **kwargs):
        seen.append(torch.cuda.current_stream().priority)
        return step(*args, **kwargs)
    monkeypatch.setattr(train, "train_step", recording)
    run = tmp_path / "run"
    assert train.main([str(synth_ready), "--arch", "paper", "--device", "cuda", "--batch-size", "16", "--epochs", "2",
                       "--pipelines", "1", "--run-dir", str(run), "--log-every", "2"]) == 0
    assert len(seen) == 2 * (48 // 16) and set(seen) == {torch.cuda.Stream.priority_range()[1]}
    assert torch.cuda.current_stream() == torch.cuda.default_stream()  # given back after the run
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and all(math.isfinite(m["train_loss"]) for m in ckpt["metrics"])


def test_tiles_on_the_gpu_cached_and_not(tiled_out):
    """Tiles of 4 through nvJPEG: each image at most once an epoch (the short tile's repeats
    twice), full batches of distinct images, and a decoder cache of tiles bit for bit."""
    plain, _ = epochs_of(tiled_out, cache="off", fixed_share=True)
    for epoch in plain:
        labels = [label for y, _ in epoch for label in y.tolist()]
        assert len(epoch) % 8 == 0 and len(labels) == 8 * len(epoch) and max(Counter(labels).values()) <= 2
        assert all(len(set(y.tolist())) == 8 for y, _ in epoch)
    cached, _ = epochs_of(tiled_out, cache="gpu")
    assert all(equal(a, b) for a, b in zip(plain, cached))
