"""AlexNet, two ways, and loading weights from alexpipe checkpoints or torchvision files.

`paper` (Krizhevsky et al. 2012): conv 96-256-384-384-256 (11x11/4, 5x5, 3x3 x3), ReLU,
local response normalization after conv1 and conv2, overlapping 3/2 max-pooling after
both LRNs and conv5, FC 4096-4096-classes with dropout 0.5 before the first two. With
groups=2, conv2, conv4 and conv5 see only their own half of the previous layer's maps
and the LRNs normalize within each half, as on the paper's two GPUs. The paper's init:
weights N(0, 0.01); biases 1 in conv2, conv4, conv5 and the hidden FC layers, 0 elsewhere.

Input size: the paper says 224x224 crops, but its first layer's 55x55 output needs 227
((227 - 11) / 4 + 1 = 55). We keep the 224 crops and pad conv1 by 2, as torchvision
does: floor((224 + 4 - 11) / 4) + 1 = 55, so every later map has the paper's size
(55, 27, 13, 6) and the flattened features are 6 * 6 * 256 = 9216.

`torchvision`: torchvision.models.alexnet exactly (64-192-384-256-256, no LRN, adaptive
6x6 average pool, default PyTorch init): the same module tree, so its state_dict keys and
shapes are torchvision's and weights load either way.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from .util import UserError, atomic_file, imagenet_classes

try:  # the LRN's GPU kernels; CUDA builds of torch bring Triton, CPU builds need not
    from . import _kernels
except ImportError:
    _kernels = None

ARCHS = ("paper", "torchvision")
# What torchvision's ImageNet weights were trained with (0..1 values x 255).
TORCHVISION_NORMALIZE = {"mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375]}
def local_response_norm(x: torch.Tensor, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 2.0,
                        groups: int = 1) -> torch.Tensor:
    """The paper's response normalization, b_i = a_i / (k + alpha * sum_j a_j^2)^beta, the sum
    over the `size` maps centred on i (clipped at the ends, as torch's local_response_norm) within
    each of `groups` channel groups. On a CUDA device, where Triton is, one fused kernel forward
    and one backward (_kernels); elsewhere lrn_gemm (docs/benchmarks.md)."""
    # the kernels index in int32 and sum in float32 (float64 stays exact in lrn_gemm)
    fits = x.dim() == 4 and x.numel() < 2**31 and x.shape[1] % groups == 0
    if _kernels is not None and x.is_cuda and fits and x.dtype in (torch.float32, torch.bfloat16, torch.float16):
        return _kernels.lrn(x, size, alpha, beta, k, groups)
    return lrn_gemm(x, size, alpha, beta, k, groups)


def lrn_gemm(x: torch.Tensor, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 2.0,
             groups: int = 1) -> torch.Tensor:
    """local_response_norm in float32 (bf16 squares lose the sum), the window sums as one matmul
    of the squares with a 0/1 band matrix: faster than torch's pooling formula forward and
    backward, most of all with two groups."""
    c = x.shape[1]
    i = torch.arange(c, device=x.device)
    offset = i[:, None] - i[None, :]  # [j, i]: map j is in i's window
    group = i * groups // c
    band = (offset >= -(size // 2)) & (offset <= (size - 1) // 2) & (group[:, None] == group[None, :])
    with torch.autocast(x.device.type, enabled=False):  # autocast would multiply in bf16
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        sums = torch.matmul(wide.square().movedim(1, -1), band.to(wide.dtype)).movedim(-1, 1)
        return (wide / (k + alpha * sums).pow(beta)).to(x.dtype)


class LRN(nn.Module):
    """local_response_norm as a layer (the paper's n=5, alpha=1e-4, beta=0.75, k=2)."""

    def __init__(self, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 2.0, groups: int = 1):
        super().__init__()
        self.size, self.alpha, self.beta, self.k, self.groups = size, alpha, beta, k, groups

    def forward(self, x):
        return local_response_norm(x, self.size, self.alpha, self.beta, self.k, self.groups)

    def extra_repr(self) -> str:
        return f"size={self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}, groups={self.groups}"


class AlexNet(nn.Module):
    """features -> avgpool -> flatten -> classifier, torchvision's module tree."""

    def __init__(self, features: nn.Sequential, avgpool: nn.Module, classifier: nn.Sequential):
        super().__init__()
        self.features, self.avgpool, self.classifier = features, avgpool, classifier

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def classifier(num_classes: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(256 * 6 * 6, 4096), nn.ReLU(inplace=True),
                         nn.Dropout(dropout), nn.Linear(4096, 4096), nn.ReLU(inplace=True),
                         nn.Linear(4096, num_classes))


def paper_alexnet(num_classes: int = 1000, groups: int = 1, dropout: float = 0.5) -> AlexNet:
    features = nn.Sequential(
        nn.Conv2d(3, 96, 11, stride=4, padding=2), nn.ReLU(inplace=True), LRN(groups=groups),
        nn.MaxPool2d(3, 2),
        nn.Conv2d(96, 256, 5, padding=2, groups=groups), nn.ReLU(inplace=True), LRN(groups=groups),
        nn.MaxPool2d(3, 2),
        nn.Conv2d(256, 384, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 384, 3, padding=1, groups=groups), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, 3, padding=1, groups=groups), nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2))
    model = AlexNet(features, nn.Identity(), classifier(num_classes, dropout))
    convs = [m for m in features if isinstance(m, nn.Conv2d)]
    fcs = [m for m in model.classifier if isinstance(m, nn.Linear)]
    for layer in convs + fcs:
        nn.init.normal_(layer.weight, 0.0, 0.01)
        nn.init.zeros_(layer.bias)
    for layer in (convs[1], convs[3], convs[4], fcs[0], fcs[1]):
        nn.init.ones_(layer.bias)
    return model


def torchvision_alexnet(num_classes: int = 1000, dropout: float = 0.5) -> AlexNet:
    features = nn.Sequential(
        nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2))
    return AlexNet(features, nn.AdaptiveAvgPool2d((6, 6)), classifier(num_classes, dropout))


def alexnet(arch: str, num_classes: int = 1000, groups: int = 1, dropout: float = 0.5) -> AlexNet:
    if arch == "paper":
        return paper_alexnet(num_classes, groups, dropout)
    if arch == "torchvision":
        if groups != 1:
            raise UserError("--groups applies to the paper's arch only")
        return torchvision_alexnet(num_classes, dropout)
    raise UserError(f"unknown arch {arch!r} (choose {' or '.join(ARCHS)})")


@dataclass
class Checkpoint:
    """What alexpipe-train writes after every epoch: enough to evaluate the model (its arch,
    classes, normalization and weights) and to resume exactly (optimizer, scaler, schedule,
    every rank's loader and RNG state, metrics, config), and the identity of the shards and
    pca.json it was trained on, so that other data is refused."""
    arch: str
    groups: int
    num_classes: int
    classes: list
    normalize: dict  # mean/std on 0..255 the model was trained with
    epoch: int
    model: dict
    world: int = 1
    pipelines: int = 1
    echo: int = 1
    optimizer: dict | None = None
    scaler: dict | None = None
    schedule: dict | None = None
    metrics: list = field(default_factory=list)
    config: dict = field(default_factory=dict)
    manifest_sha256: str | None = None
    pca_sha256: str | None = None
    loader: list | None = None  # per rank
    rng: list | None = None  # per rank

    def save(self, path: Path) -> None:
        """Atomic: the checkpoint before it stays whole until this one is (util.atomic_file)."""
        with atomic_file(path) as f:
            torch.save({f_.name: getattr(self, f_.name) for f_ in fields(self)}, f)

    def check(self, path: Path, **expected) -> None:
        """Refuse a checkpoint whose fields differ from `expected` (what a resume needs the same)."""
        words = {"world": "number of ranks", "pipelines": "--pipelines", "echo": "--echo"}
        for key, want in expected.items():
            if key.endswith("sha256"):
                if getattr(self, key) != want:
                    raise UserError(f"{path}: trained on other shards or another pca.json")
            elif getattr(self, key) != want:
                raise UserError(f"{path}: a checkpoint with {words.get(key, key)} {getattr(self, key)}, not {want}")

    @classmethod
    def load(cls, path: Path) -> Checkpoint:
        return cls.from_state(read_torch_file(path), path)

    @classmethod
    def from_state(cls, state, path: Path, what: str = "an alexpipe-train checkpoint") -> Checkpoint:
        names = {f_.name for f_ in fields(cls)}
        if not (isinstance(state, dict) and {"arch", "model", "epoch"} <= set(state) <= names):
            raise UserError(f"{path}: not {what}")
        return cls(**state)


def read_torch_file(path: Path):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - not a torch file, or not loadable safely
        raise UserError(f"{path}: not a checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None


def load_for_eval(path: Path) -> tuple[AlexNet, dict]:
    """A model from an alexpipe-train checkpoint, or from a bare torchvision-format AlexNet
    state_dict. Returns (model, info): arch, groups, num_classes, classes ([index, wnid,
    name] rows), normalize (the mean/std it was trained with, 0..255) and, for alexpipe
    checkpoints, the manifest sha256 and epoch."""
    state = read_torch_file(path)
    if isinstance(state, dict) and "features.0.weight" in state:
        n = state.get("classifier.6.weight", torch.empty(0, 0)).shape[0]
        info = {"arch": "torchvision", "groups": 1, "num_classes": n, "normalize": TORCHVISION_NORMALIZE,
                "classes": [list(c) for c in imagenet_classes()] if n == 1000 else None,
                "manifest_sha256": None, "epoch": None}
    else:
        ckpt = Checkpoint.from_state(state, path, "an alexpipe checkpoint or a torchvision AlexNet state_dict")
        state = ckpt.model
        info = {k: getattr(ckpt, k) for k in ("arch", "groups", "num_classes", "classes", "normalize",
                                               "manifest_sha256", "epoch")}
    if info["arch"] not in ARCHS:
        raise UserError(f"{path}: unknown arch {info['arch']!r}")
    model = alexnet(info["arch"], info["num_classes"], info["groups"])
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        why = str(e).splitlines()[1].strip()
        raise UserError(f"{path}: weights do not fit the {info['arch']} AlexNet ({why})") from None
    return model, info
