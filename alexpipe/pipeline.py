"""The DALI graphs, as pure @pipeline_def functions of (shards, shard_id, num_shards, ...).

Each takes `device`: "gpu" decodes with the mixed (nvJPEG) decoder and runs every later
op on the GPU; "cpu" is the same graph with the CPU decoder, for machines without a GPU
and for CI (build such pipelines with device_id=None). The PyTorch-facing iterators live
in loader.py; this module knows nothing of torch.
"""

from __future__ import annotations

from nvidia.dali import fn, pipeline_def, types

READER = "Reader"  # the reader's name, for epoch sizes and iterator bookkeeping


def read_shards(shards: list[dict], ext: list[str], shard_id: int, num_shards: int, **kwargs):
    """The webdataset reader over prepared shards, always with their index files (so DALI
    never scans a tar) and failing loudly on a sample that lacks a component."""
    return fn.readers.webdataset(
        paths=[s["tar"] for s in shards], index_paths=[s["idx"] for s in shards], ext=ext,
        shard_id=shard_id, num_shards=num_shards, missing_component_behavior="error",
        name=READER, **kwargs)


def decode(jpegs, device: str, **kwargs):
    if device == "gpu":
        return fn.decoders.image(jpegs, device="mixed", output_type=types.RGB, **kwargs)
    return fn.decoders.image(jpegs, device="cpu", output_type=types.RGB, **kwargs)


@pipeline_def
def rgb_stats_pipeline(shards: list[dict], device: str, shard_id: int = 0, num_shards: int = 1):
    """Per image, exact integer sufficient statistics of its RGB pixels: channel sums
    [r, g, b], squares [rr, gg, bb], cross products [rg, gb, br] (sums over pixels) and
    its shape (H, W, C).

    Reduced on the device so nothing but 12 numbers per image leaves it and images of
    different sizes need no padding. Products are exact in uint16 (255^2 < 2^16), sums in
    uint64. The cross products multiply the image by itself with channels rotated, which
    takes fewer ops than six channel slices (measured 1.3x faster on CPU). Samples come in
    stored order; the shard is padded with its last sample to a whole batch (the caller
    drops the padding).
    """
    jpegs = read_shards(shards, ["jpg"], shard_id, num_shards, pad_last_batch=True)
    shape = fn.peek_image_shape(jpegs)
    x = fn.cast(decode(jpegs, device), dtype=types.UINT16)
    rotated = fn.cat(x[:, :, 1:3], x[:, :, 0:1], axis=2)  # [g, b, r]

    def total(v):
        return fn.reductions.sum(v, axes=[0, 1], dtype=types.UINT64)

    return total(x), total(x * x), total(x * rotated), shape
