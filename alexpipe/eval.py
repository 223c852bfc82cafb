"""Evaluation: center-crop and the paper's ten-crop protocol, exact on 1..N ranks.

Ten-crop (Krizhevsky et al. 2012, sec. 4): the four corner and the center 224 patches of
the central 256x256 square, and their mirror images; the network's softmax is averaged
over the ten (probabilities, not logits), then top-1 and top-5 error. --full-image takes
the corners of the whole short-side-256 image instead of the central square.

Top-k rule, stated because ties happen with low-precision logits: a sample is correct at k
when fewer than k classes have a probability strictly greater than the true class's
(ties count in the model's favour; NaN outputs count as wrong). Every rank evaluates its own samples once; counts are
summed over ranks, so the total equals the split's size in the manifest.
"""

from __future__ import annotations

import torch

from . import dist


def crop_probabilities(model, images: torch.Tensor) -> torch.Tensor:
    """Softmax per sample; for (B, 10, 3, H, W) ten-crop input, averaged over the crops."""
    if images.dim() == 5:
        b, c = images.shape[:2]
        logits = model(images.flatten(0, 1))
        return logits.float().softmax(-1).view(b, c, -1).mean(1)
    return model(images).float().softmax(-1)


def topk_correct(probs: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """(B,) bool: fewer than k classes score strictly above the true class (a NaN score
    counts as above, and a NaN true score is wrong, so a diverged model scores 0)."""
    p_true = probs.gather(1, labels[:, None])
    above = (probs > p_true) | probs.isnan()
    return (above.sum(1) < k) & ~p_true.squeeze(1).isnan()


def evaluate(model, loader, amp_dtype: torch.dtype | None, num_classes: int) -> dict:
    """Loss (NLL of the averaged softmax), top-1/top-5 error and per-class top-1 accuracy
    over every sample of every rank's loader, summed over ranks."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    count = torch.zeros(num_classes, dtype=torch.float64, device=device)
    hits1, hits5 = torch.zeros_like(count), torch.zeros_like(count)
    nll = torch.zeros(1, dtype=torch.float64, device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        for images, labels in loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            probs = crop_probabilities(model, images)
            p_true = probs.gather(1, labels[:, None]).squeeze(1)
            nll -= torch.log(p_true.double().clamp_min(1e-30)).sum()
            count += torch.bincount(labels, minlength=num_classes)
            hits1 += torch.bincount(labels, weights=topk_correct(probs, labels, 1).double(), minlength=num_classes)
            hits5 += torch.bincount(labels, weights=topk_correct(probs, labels, 5).double(), minlength=num_classes)
    totals = dist.all_reduce_sum(torch.cat([count, hits1, hits5, nll])).cpu()
    model.train(was_training)
    count, hits1, hits5, nll = totals[:num_classes], totals[num_classes:2 * num_classes], \
        totals[2 * num_classes:3 * num_classes], float(totals[-1])
    n = int(count.sum())
    per_class = {int(c): float(hits1[c] / count[c]) for c in torch.nonzero(count).flatten()}
    return {"count": n, "loss": nll / max(n, 1), "top1_err": 1 - float(hits1.sum()) / max(n, 1),
            "top5_err": 1 - float(hits5.sum()) / max(n, 1), "per_class_top1": per_class}
