"""The models against the paper: LRN's formula and its gradient, the fused GPU kernels against
it (in Triton's interpreter on the CPU, and compiled where CUDA is), parameter counts, init
and map sizes."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from alexpipe import model as model_module
from alexpipe.model import LRN, alexnet, local_response_norm

# torchvision.models.alexnet().state_dict(), written down from torchvision/models/alexnet.py
TORCHVISION_KEYS = {
    "features.0.weight": (64, 3, 11, 11), "features.0.bias": (64,),
    "features.3.weight": (192, 64, 5, 5), "features.3.bias": (192,),
    "features.6.weight": (384, 192, 3, 3), "features.6.bias": (384,),
    "features.8.weight": (256, 384, 3, 3), "features.8.bias": (256,),
    "features.10.weight": (256, 256, 3, 3), "features.10.bias": (256,),
    "classifier.1.weight": (4096, 9216), "classifier.1.bias": (4096,),
    "classifier.4.weight": (4096, 4096), "classifier.4.bias": (4096,),
    "classifier.6.weight": (1000, 4096), "classifier.6.bias": (1000,),
}


def lrn_numpy(a: np.ndarray, n=5, alpha=1e-4, beta=0.75, k=2.0) -> np.ndarray:
    """The paper's eq. (sec. 3.3), literally: b_i = a_i / (k + alpha sum_{j=max(0,i-n/2)}^{min(N-1,i+n/2)} a_j^2)^beta."""
    out = np.empty_like(a)
    channels = a.shape[1]
    for i in range(channels):
        lo, hi = max(0, i - n // 2), min(channels - 1, i + n // 2)
        out[:, i] = a[:, i] / (k + alpha * (a[:, lo:hi + 1] ** 2).sum(1)) ** beta
    return out


@pytest.mark.parametrize("groups", [1, 2])
def test_lrn_is_the_papers_formula(groups):
    a = np.random.default_rng(0).normal(0, 40, (2, 16, 4, 4))  # large enough that the sum matters
    got = LRN(groups=groups)(torch.from_numpy(a)).numpy()
    want = np.concatenate([lrn_numpy(h) for h in np.split(a, groups, axis=1)], axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-10)
    assert np.abs(want - a).max() > 1.0


@pytest.mark.parametrize("size", [3, 4, 5])
def test_lrn_equals_torchs_for_any_window(size):
    """Even windows too: torch's placement (size // 2 maps before i, the rest after)."""
    x = torch.randn(2, 12, 3, 3, dtype=torch.float64) * 40
    want = torch.nn.functional.local_response_norm(x, size, 1e-4 * size, 0.75, 2.0)
    torch.testing.assert_close(local_response_norm(x, size), want, rtol=1e-12, atol=0)


def test_parameter_counts_are_the_known_totals():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(alexnet("torchvision")) == 61_100_840  # torchvision's AlexNet
    assert count(alexnet("paper", groups=2)) == 60_965_224  # the two-tower net (Caffe's bvlc_alexnet)
    assert count(alexnet("paper", groups=1)) == 62_378_344  # one tower, same layer widths


def test_torchvision_state_dict_keys_and_shapes():
    state = alexnet("torchvision").state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == TORCHVISION_KEYS


def test_paper_init_and_map_sizes():
    torch.manual_seed(0)
    model = alexnet("paper", groups=2)
    convs = [m for m in model.features if isinstance(m, torch.nn.Conv2d)]
    fcs = [m for m in model.classifier if isinstance(m, torch.nn.Linear)]
    for layer in convs + fcs:
        w = layer.weight.detach()
        assert abs(w.mean().item()) < 1e-3 and abs(w.std().item() - 0.01) < 0.0005
    biases = [float(layer.bias.detach().unique().item()) for layer in convs + fcs]
    assert biases == [0, 1, 0, 1, 1, 1, 1, 0]
    sizes = []
    hooks = [m.register_forward_hook(lambda m, i, o: sizes.append(o.shape[-1]))
             for m in model.features if isinstance(m, (torch.nn.Conv2d, torch.nn.MaxPool2d))]
    assert model(torch.zeros(2, 3, 224, 224)).shape == (2, 1000)
    for h in hooks:
        h.remove()
    assert sizes == [55, 27, 27, 13, 13, 13, 13, 6]


@pytest.mark.parametrize("groups", [1, 2])
def test_lrn_gradient_is_the_formulas(groups):
    x = torch.randn(2, 8, 3, 3, dtype=torch.float64) * 40
    assert torch.autograd.gradcheck(lambda t: local_response_norm(t, groups=groups), (x.requires_grad_(),))


@pytest.mark.parametrize("groups", [1, 2])
def test_lrn_channels_last_and_low_precision(groups):
    """Same values in channels_last memory; bf16 in and out, summed in float32."""
    x = torch.randn(2, 16, 5, 5) * 40
    ref = local_response_norm(x.double(), groups=groups)
    cl = local_response_norm(x.contiguous(memory_format=torch.channels_last), groups=groups)
    torch.testing.assert_close(cl.double(), ref, rtol=1e-6, atol=1e-6)
    bf = local_response_norm(x.bfloat16(), groups=groups)
    assert bf.dtype == torch.bfloat16
    torch.testing.assert_close(bf.double(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the compiled GPU pass")
def test_compiled_lrn_on_cuda_equals_the_formula():
    for groups in (1, 2):
        compiled_lrn_against_float64(groups)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the fused kernels on the GPU")
def test_fused_lrn_kernels_on_cuda_equal_the_formula():
    assert model_module._kernels is not None, "Triton did not import beside CUDA torch"
    for groups in (1, 2):
        for size in (3, 4, 5):
            fused_lrn_against_float64("cuda", groups, size, (4, 96, 27, 27))
        fused_lrn_against_float64("cuda", groups, 5, (8, 256, 27, 27), memory=torch.contiguous_format)
    fused_lrn_op_checks("cuda")


def test_fused_lrn_kernels_equal_the_formula_in_tritons_interpreter():
    """The GPU kernels' logic on the CPU: Triton's interpreter runs them as numpy (a process of
    its own, as the interpreter is chosen when the kernels are defined). The test extra installs
    Triton on Linux x86-64, so there it must run."""
    if not (sys.platform == "linux" and platform.machine() == "x86_64"):
        pytest.importorskip("triton")
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_model as t\n"
            "for g in (1, 2):\n"
            "    for n in (3, 4, 5):\n"
            "        t.fused_lrn_against_float64('cpu', g, n, (2, 16, 5, 5))\n"
            "t.fused_lrn_against_float64('cpu', 2, 5, (1, 12, 3, 4), memory=torch.contiguous_format)\n"
            "t.fused_lrn_op_checks('cpu')\n")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", "import torch\n" + code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def fused_lrn_against_float64(device: str, groups: int, size: int, shape, memory=torch.channels_last) -> None:
    """alexpipe's Triton LRN, forward and backward from float32 and bf16, against the float64
    formula (values and gradients); its output in channels_last memory whatever the input's."""
    from alexpipe import _kernels
    x, g, ref, ref_grad = float64_reference(shape, size, groups)
    assert (ref - x).abs().max() > 1.0  # the normalization matters at this scale
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)):
        dev_in = x.to(device, dtype).contiguous(memory_format=memory).requires_grad_()
        out = _kernels.lrn(dev_in, size, 1e-4, 0.75, 2.0, groups)
        out.backward(g.to(device, dtype))
        assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
        scale = ref.abs().max(), ref_grad.abs().max()
        torch.testing.assert_close(out.double().cpu() / scale[0], ref / scale[0], rtol=tol, atol=tol)
        torch.testing.assert_close(dev_in.grad.double().cpu() / scale[1], ref_grad / scale[1], rtol=tol, atol=tol)


def float64_reference(shape, size: int = 5, groups: int = 1):
    """(x, upstream gradient, LRN(x), its input gradient), all float64 on the CPU."""
    x = torch.randn(shape, dtype=torch.float64) * 40
    g = torch.randn_like(x)
    ref_in = x.clone().requires_grad_()
    ref = local_response_norm(ref_in, size, groups=groups)
    ref.backward(g)
    return x, g, ref.detach(), ref_in.grad


def fused_lrn_op_checks(device: str) -> None:
    """The custom op as torch.library checks it (schema, fake tensors, autograd, strides), an
    empty batch, and channels that do not split into the groups refused."""
    from alexpipe import _kernels
    args = (5, 1e-4, 0.75, 2.0, 2)
    for shape, memory in (((2, 8, 3, 3), torch.channels_last), ((2, 8, 3, 3), torch.contiguous_format),
                          ((2, 8, 1, 1), torch.contiguous_format)):
        x = (torch.randn(shape, device=device) * 40).contiguous(memory_format=memory).requires_grad_()
        torch.library.opcheck(_kernels.lrn_forward, (x, *args))
        _, q = _kernels.lrn_forward(x, *args)
        dy = torch.randn_like(x).contiguous(memory_format=memory)
        torch.library.opcheck(_kernels.lrn_backward, (x.detach(), q.contiguous(), dy, *args))
        want = _kernels.lrn_backward(x.detach(), q, dy, *args)
        torch.testing.assert_close(_kernels.lrn_backward(x.detach(), q.contiguous(), dy, *args), want)
    x = (torch.randn(2, 8, 3, 3, device=device) * 40).requires_grad_()
    y = _kernels.lrn(x, *args)
    g = torch.ones_like(y)
    with OpLog() as log:
        y.backward(g)
    assert not [op for op in log.ops if "zero" in op], log.ops  # no zeros made as q's gradient
    empty = torch.zeros(0, 8, 3, 3, device=device, requires_grad=True)
    _kernels.lrn(empty, *args).sum().backward()
    assert empty.grad.shape == empty.shape
    with pytest.raises(ValueError, match="equal groups"):
        _kernels.lrn(torch.ones(1, 5, 2, 2, device=device), *args)


class OpLog(TorchDispatchMode):
    """The aten ops run inside it, by name."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def compiled_lrn_against_float64(groups: int) -> None:
    """The compiled LRN on the GPU (the Triton kernels inside a compiled graph), forward and
    backward, against float64 on the CPU, at the paper's conv1 map size in channels_last memory."""
    x, g, ref, ref_grad = float64_reference((8, 96, 55, 55), groups=groups)
    fn = torch.compile(LRN(groups=groups))
    dev_in = x.float().cuda().contiguous(memory_format=torch.channels_last).requires_grad_()
    out = fn(dev_in)
    out.backward(g.float().cuda())
    torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dev_in.grad.double().cpu(), ref_grad, rtol=1e-4, atol=1e-5)
