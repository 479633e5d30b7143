"""Segmentation metrics of object-centric learning, batched in torch: FG-ARI and mBO.

Both take integer label maps of any shape ``(B, ...)``: every position after the batch dimension is one pixel,
so ``(B, T, H, W)`` maps give the *video* metrics (an object must keep its predicted id across frames to score).
``true`` id 0 is the background; predicted ids are arbitrary non-negative integers (e.g. the argmax over slots).
Counts are accumulated in float64, exact for up to 2**53 pixels per sample.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check(true: Tensor, pred: Tensor) -> tuple[Tensor, Tensor]:
    for name, labels in (("true", true), ("pred", pred)):
        if not isinstance(labels, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of integer labels (B, ...), got {type(labels).__name__}")
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer labels, got {labels.dtype}")
        if labels.dim() < 2:
            raise ValueError(f"{name} must be (B, ...) with at least one pixel dimension, got shape {tuple(labels.shape)}")
        if labels.numel() and int(labels.min()) < 0:
            raise ValueError(f"{name} labels must be non-negative, got {int(labels.min())}")
    if true.shape != pred.shape:
        raise ValueError(f"true and pred must have the same shape, got {tuple(true.shape)} and {tuple(pred.shape)}")
    if true.device != pred.device:
        raise ValueError(f"true and pred must be on one device, got {true.device} and {pred.device}")
    return true.flatten(1).long(), pred.flatten(1).long()


def contingency(true: Tensor, pred: Tensor, weight: Tensor | None = None) -> Tensor:
    """(B, N) labels -> (B, Ct, Cp) float64 counts of pixels with true label i and predicted label j."""
    ct, cp = int(true.max()) + 1, int(pred.max()) + 1
    weight = torch.ones_like(true, dtype=torch.float64) if weight is None else weight.to(torch.float64)
    table = torch.zeros(true.shape[0], ct * cp, dtype=torch.float64, device=true.device)
    return table.scatter_add_(1, true * cp + pred, weight).view(-1, ct, cp)


def _pairs(n: Tensor) -> Tensor:
    return n * (n - 1) / 2


def adjusted_rand_index(true: Tensor, pred: Tensor, foreground_only: bool = False) -> Tensor:
    """ARI of each sample's clustering ``pred`` against ``true``: (B, ...) labels -> (B,) float64.

    Equals ``sklearn.metrics.adjusted_rand_score`` per sample, including its convention that two clusterings
    into one cluster each, or into singletons each (no pairs to compare), score 1. With ``foreground_only``
    the pixels with true label 0 are left out (FG-ARI); a sample with fewer than two such pixels scores 1.
    """
    true, pred = _check(true, pred)
    weight = (true != 0).to(torch.float64) if foreground_only else None
    table = contingency(true, pred, weight)
    index = _pairs(table).sum((1, 2))
    rows, cols = _pairs(table.sum(2)).sum(1), _pairs(table.sum(1)).sum(1)
    total = _pairs(table.sum((1, 2)))
    # All sums are integers below 2**53, so these comparisons are exact: they are the cases whose ARI is 0/0.
    degenerate = ((rows == total) & (cols == total)) | ((rows == 0) & (cols == 0))
    expected = rows * cols / total.clamp_min(1)
    denominator = torch.where(degenerate, torch.ones_like(total), (rows + cols) / 2 - expected)
    return torch.where(degenerate, torch.ones_like(total), (index - expected) / denominator)


def fg_ari(true: Tensor, pred: Tensor) -> Tensor:
    """Foreground ARI per sample (B,): the ARI over the pixels whose true label is not 0 (the background)."""
    return adjusted_rand_index(true, pred, foreground_only=True)


def mean_best_overlap(true: Tensor, pred: Tensor) -> Tensor:
    """mBO per sample (B,) float64: over the true objects (labels >= 1) present, the mean of the best IoU that
    any predicted segment reaches with the object. NaN for a sample without objects."""
    true, pred = _check(true, pred)
    table = contingency(true, pred)
    true_area, pred_area = table.sum(2, keepdim=True), table.sum(1, keepdim=True)
    iou = table / (true_area + pred_area - table).clamp_min(1)
    best = iou.max(2).values[:, 1:]
    present = (true_area[:, 1:, 0] > 0).to(torch.float64)
    return (best * present).sum(1) / present.sum(1)


def masks_to_labels(masks: Tensor) -> Tensor:
    """Soft or hard masks (B, K, ...) -> (B, ...) int64 labels: the index of the largest mask at each pixel."""
    return masks.argmax(1)
