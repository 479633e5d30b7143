"""FG-ARI and mBO (kdfast.train.metrics) against sklearn's adjusted_rand_score and a per-object IoU loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdfast.train import metrics

sklearn_metrics = pytest.importorskip("sklearn.metrics")


def _random_labels(batch: int, pixels: int, classes: int) -> torch.Tensor:
    return torch.randint(0, classes, (batch, pixels))


@pytest.mark.parametrize("pixels,true_classes,pred_classes", [(1, 1, 1), (2, 2, 3), (37, 4, 7), (500, 6, 11), (333, 2, 2)])
def test_ari_equals_sklearn_on_random_labelings(pixels, true_classes, pred_classes):
    true, pred = _random_labels(5, pixels, true_classes), _random_labels(5, pixels, pred_classes)
    got = metrics.adjusted_rand_index(true, pred)
    want = [sklearn_metrics.adjusted_rand_score(t.numpy(), p.numpy()) for t, p in zip(true, pred)]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-10, atol=1e-12)


def test_ari_degenerate_and_correlated_labelings_equal_sklearn():
    n = 60
    ones, singletons = torch.zeros(n, dtype=torch.long), torch.arange(n)
    base = torch.randint(0, 5, (n,))
    noisy = torch.where(torch.rand(n) < 0.2, torch.randint(0, 5, (n,)), base)
    relabelled = torch.randperm(9)[base]  # the same partition under other ids: ARI 1
    pairs = [(ones, ones), (singletons, singletons), (ones, singletons), (singletons, ones), (base, noisy),
             (base, relabelled), (base, ones)]
    true, pred = torch.stack([t for t, _ in pairs]), torch.stack([p for _, p in pairs])
    got = metrics.adjusted_rand_index(true, pred)
    want = torch.tensor([sklearn_metrics.adjusted_rand_score(t.numpy(), p.numpy()) for t, p in pairs], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert got[5] == 1.0


def test_fg_ari_is_the_ari_of_the_foreground_pixels():
    true = _random_labels(6, 400, 5)  # about a fifth background
    pred = torch.where(torch.rand(6, 400) < 0.7, true, _random_labels(6, 400, 8))
    got = metrics.fg_ari(true.view(6, 4, 10, 10), pred.view(6, 4, 10, 10))  # video-shaped: pixels of all frames
    want = [sklearn_metrics.adjusted_rand_score(t[t != 0].numpy(), p[t != 0].numpy()) for t, p in zip(true, pred)]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    # the background's predicted ids do not matter
    scrambled = torch.where(true == 0, _random_labels(6, 400, 8), pred)
    torch.testing.assert_close(metrics.fg_ari(true, scrambled), got, rtol=0, atol=0)


def _mbo_loop(true: np.ndarray, pred: np.ndarray) -> float:
    best = []
    for obj in np.unique(true):
        if obj == 0:
            continue
        g = true == obj
        best.append(max(np.sum(g & (pred == p)) / np.sum(g | (pred == p)) for p in np.unique(pred)))
    return float(np.mean(best)) if best else float("nan")


def test_mbo_equals_a_per_object_iou_loop():
    true, pred = _random_labels(7, 300, 6), _random_labels(7, 300, 9)
    pred[0] = true[0]  # perfect: mBO 1
    got = metrics.mean_best_overlap(true.view(7, 3, 10, 10), pred.view(7, 3, 10, 10))
    want = torch.tensor([_mbo_loop(t.numpy(), p.numpy()) for t, p in zip(true, pred)], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert got[0] == 1.0


def test_mbo_without_objects_is_nan():
    true, pred = torch.zeros(2, 16, dtype=torch.long), _random_labels(2, 16, 3)
    true[1, :4] = 2
    got = metrics.mean_best_overlap(true, pred)
    assert torch.isnan(got[0]) and torch.isfinite(got[1])


def test_masks_to_labels_takes_the_argmax_over_slots():
    masks = torch.rand(3, 5, 2, 4, 4)
    labels = metrics.masks_to_labels(masks)
    assert labels.shape == (3, 2, 4, 4)
    assert torch.equal(labels, masks.argmax(1))


@pytest.mark.parametrize("true,pred,error,match", [
    (torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long), TypeError, "true must hold integer labels"),
    ([[0, 1]], torch.zeros(1, 2, dtype=torch.long), TypeError, "true must be a torch.Tensor"),
    (torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long), ValueError, "at least one pixel dimension"),
    (torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long), ValueError, "same shape"),
    (torch.zeros(2, 3, dtype=torch.long), -torch.ones(2, 3, dtype=torch.long), ValueError, "non-negative"),
])
def test_bad_input_names_the_argument(true, pred, error, match):
    with pytest.raises(error, match=match):
        metrics.fg_ari(true, pred)
