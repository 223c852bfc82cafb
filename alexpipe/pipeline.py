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
    never scans a tar) and failing loudly on a sample that lacks a component. By default it
    maps the tars into memory (dont_use_mmap=False): every shard page it has read then counts
    in the process's resident set while any reader lives (file pages the kernel can drop)."""
    return fn.readers.webdataset(
        paths=[s["tar"] for s in shards], index_paths=[s["idx"] for s in shards], ext=ext,
        shard_id=shard_id, num_shards=num_shards, missing_component_behavior="error",
        name=READER, **kwargs)


def decode(jpegs, device: str, hw_decoder_load: float = 1.0, cache_mb: int = 0):
    """RGB uint8 HWC. On the GPU: nvJPEG, `hw_decoder_load` of each batch on the hardware
    JPEG engines (1.0: all; they take no SMs from the model, and every image then comes from
    one decoder, so the pixels never depend on its place in the batch); with `cache_mb`, DALI's
    decoder cache keeps every decoded image (keyed by its source, per GPU) until that many MB
    are full, and later epochs copy cached images instead of decoding them."""
    if device != "gpu":
        return fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
    cache = {}
    if cache_mb:
        cache = dict(cache_size=cache_mb, cache_type="threshold", cache_threshold=0, cache_batch_copy=True)
    return fn.decoders.image(jpegs, device="mixed", output_type=types.RGB, hw_decoder_load=hw_decoder_load, **cache)


@pipeline_def
def decoded_pipeline(shards: list[dict], device: str, shard_id: int = 0, num_shards: int = 1,
                     hw_decoder_load: float = 1.0):
    """Every image in stored order, decoded to RGB, flattened to (H*W, 3) pixels and
    zero-padded to the batch's largest pixel count (so the batch is one dense tensor;
    zeros add nothing to pixel sums), with its true shape (H, W, C). Padding the flat
    pixels, not to the largest height and width, keeps a batch of mixed portrait and
    landscape images small. The shard is padded with its last sample to a whole batch (the
    caller drops the padding)."""
    jpegs = read_shards(shards, ["jpg"], shard_id, num_shards, pad_last_batch=True)
    pixels = fn.reshape(decode(jpegs, device, hw_decoder_load), shape=[-1, 3])
    return fn.pad(pixels, fill_value=0), fn.peek_image_shape(jpegs)


# The paper's ten crops in torchvision's TenCrop order: top-left, top-right, bottom-left,
# bottom-right, center, then the mirror images of top-right, top-left, bottom-right,
# bottom-left and center (= the five crops of the flipped image; the mirrored center is the
# mirror of the same window, which torchvision may place 1 px off on odd margins).
# As (crop_pos_x, crop_pos_y, mirror).
TEN_CROPS = [(0.0, 0.0, 0), (1.0, 0.0, 0), (0.0, 1.0, 0), (1.0, 1.0, 0), (0.5, 0.5, 0),
             (1.0, 0.0, 1), (0.0, 0.0, 1), (1.0, 1.0, 1), (0.0, 1.0, 1), (0.5, 0.5, 1)]
MAX_LABEL_DIGITS = 8
TILE_SIDE = 256  # a tile's squares (alexpipe-prepare --tile), stacked top to bottom


def label_bytes(cls, device: str, tile: int = 1):
    """A .cls component (ASCII decimal; a tile's: `tile` of them, space-separated) zero-padded
    to tile * (MAX_LABEL_DIGITS + 1) bytes, on the output device; loader.parse_labels turns a
    batch of them into int64 (parsing in the graph takes ~40 tiny CPU ops a sample; one pad
    is free)."""
    padded = fn.pad(cls, shape=[MAX_LABEL_DIGITS if tile == 1 else tile * (MAX_LABEL_DIGITS + 1)], fill_value=0)
    return padded.gpu() if device == "gpu" else padded


def lighting_mean(mean, eigval, eigvec, sigma: float):
    """AlexNet's PCA lighting folded into the normalization: a per-sample mean
    MEAN - eigvec @ (alpha * eigval / 255), alpha ~ N(0, sigma) per channel, so that
    (x - mean_s) / std = (x + shift - MEAN) / std with no extra pass over the pixels.

    eigval is for pixels on 0..255; the shift follows fb.resnet.torch and the paper with
    pixels on 0..1 (eigenvalues of the 0..1 covariance, eigval / 255^2) scaled back by 255:
    255 * eigvec @ (alpha * eigval / 255^2). One coord_transform on alpha (as a 1x3 point)
    does it, where per-channel arithmetic would cost a pass. Returns (mean_s, alpha)."""
    alpha = fn.random.normal(stddev=sigma, shape=(1, 3), dtype=types.FLOAT)
    m = [-eigvec[i][j] * eigval[j] / 255.0 for i in range(3) for j in range(3)]
    mean_s = fn.reshape(fn.coord_transform(alpha, M=m, T=list(mean)), shape=[3])
    return mean_s, fn.reshape(alpha, shape=[3])


def normalize(images, mean, std, crop: int, dtype, layout: str, **position):
    return fn.crop_mirror_normalize(images, crop=(crop, crop), mean=mean, std=list(std), dtype=dtype,
                                    output_layout=layout, **position)


def augment(images, mean, std, eigval, eigvec, lighting: float, crop: int, dtype, layout: str,
            square: int = 0, tile: int = 1):
    """One random view: crop window, flip, PCA lighting, normalization; and its draws. In a
    tile, the window lies in its square number `square`: pos_y places it in that square as
    DALI places a crop in a lone square (round-half-up(pos_y * (256 - crop)) from its top)."""
    pos_x = fn.random.uniform(range=(0.0, 1.0))
    pos_y = fn.random.uniform(range=(0.0, 1.0))
    mirror = fn.random.coin_flip(probability=0.5)
    mean_s, alpha = lighting_mean(mean, eigval, eigvec, lighting)
    in_tile = pos_y if tile == 1 else (square * TILE_SIDE + pos_y * (TILE_SIDE - crop)) / (tile * TILE_SIDE - crop)
    out = normalize(images, mean_s, std, crop, dtype, layout, crop_pos_x=pos_x, crop_pos_y=in_tile, mirror=mirror)
    return out, (pos_x, pos_y, mirror, alpha)


@pipeline_def(enable_checkpointing=True)
def train_pipeline(shards: list[dict], device: str, shard_id: int, num_shards: int, mean, std, eigval, eigvec,
                   lighting: float = 0.1, crop: int = 224, dtype=types.FLOAT16, layout: str = "CHW",
                   initial_fill: int = 4096, shuffle_seed: int = 0, hw_decoder_load: float = 1.0,
                   cache_mb: int = 0, echo: int = 1, tile: int = 1, with_params: bool = False,
                   with_sources: bool = False, mmap: bool = True):
    """AlexNet's training augmentation: a random crop x crop window at a uniformly random
    position, a horizontal flip with p = 0.5, PCA lighting, normalization; label bytes.
    Returns `echo` such views of each decoded image (independent draws), then the labels.
    A sample that is a tile of `tile` squares gives `echo` views of each square, square by
    square (view v is in square v // echo), and its labels hold `tile` numbers.

    Order: the order of the tar shards is reshuffled every epoch (same seed in every pipeline,
    so the num_shards reader shards read disjoint ranges of one order) and samples are mixed
    in a buffer of `initial_fill`; prepare already shuffled the samples across all shards.
    DALI pads each reader shard's range to the largest one's and to whole batches (the
    iterator drops the padding).
    The window's corner is at round-half-up(pos * (size - crop)), pos ~ U(0, 1), as DALI
    places crops. With `with_params` each view's drawn pos_x, pos_y (in its square), flip and
    alpha and each sample's source ("tar:offset:key.jpg") are returned too, for tests and inspection;
    with `with_sources`, the sources after the labels.
    """
    jpegs, cls = read_shards(shards, ["jpg", "cls"], shard_id, num_shards, random_shuffle=True,
                             initial_fill=initial_fill, shuffle_after_epoch=True,
                             shuffle_after_epoch_seed=shuffle_seed, pad_last_batch=True, dont_use_mmap=not mmap)
    images = decode(jpegs, device, hw_decoder_load, cache_mb)
    views = [augment(images, mean, std, eigval, eigvec, lighting, crop, dtype, layout, k, tile)
             for k in range(tile) for _ in range(echo)]
    labels = label_bytes(cls, device, tile)
    sources = fn.get_property(jpegs, key="source_info")
    if with_params:  # every view, the labels, each view's draws, the sources
        return (*[out for out, _ in views], labels, *[x for _, params in views for x in params], sources)
    return (*[out for out, _ in views], labels, *([sources] if with_sources else []))


@pipeline_def(enable_checkpointing=True)
def eval_pipeline(shards: list[dict], device: str, shard_id: int, num_shards: int, mean, std,
                  crop: int = 224, dtype=types.FLOAT16, layout: str = "CHW", ten_crop: bool = False,
                  full_image: bool = False, square: int = 256, with_sources: bool = False, mmap: bool = True):
    """Evaluation views in stored order, each rank a fixed disjoint range, padded to the
    largest rank's and to whole batches (the iterator drops the padding, so every sample
    counts exactly once).

    Center: the central crop x crop window. Ten-crop (the paper): the four corners and the
    center of the central square x square patch (of the whole image with full_image), each
    also mirrored, stacked as (10, ...) per sample in TEN_CROPS order.
    """
    jpegs, cls = read_shards(shards, ["jpg", "cls"], shard_id, num_shards, random_shuffle=False,
                             pad_last_batch=True, stick_to_shard=True, dont_use_mmap=not mmap)
    images = decode(jpegs, device)
    labels = label_bytes(cls, device)
    extra = [fn.get_property(jpegs, key="source_info")] if with_sources else []
    if not ten_crop:
        return normalize(images, mean, std, crop, dtype, layout, crop_pos_x=0.5, crop_pos_y=0.5), labels, *extra
    if not full_image:
        images = fn.crop(images, crop=(square, square), crop_pos_x=0.5, crop_pos_y=0.5)
    views = [normalize(images, mean, std, crop, dtype, layout, crop_pos_x=x, crop_pos_y=y, mirror=m)
             for x, y, m in TEN_CROPS]
    return fn.stack(*views), labels, *extra
