"""GiniKLLoss's upstream options: several layers (each term averaged over the layers, as the paper's code does), soft
labels (B, C) (mixup, label smoothing; class statistics weighted by the label probabilities) and an explicit target
distribution (C,). Each is compared with an eager float64 implementation written here from the definition (design.md
3.4), values and gradients, at odd sizes; then the bad arguments."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from harness import leaf, rand

from kdfast import ops
from kdfast.nn import GiniKLLoss

DELTA = 1e-10
TIGHT = {"rtol": 1e-10, "atol": 1e-12}


# ------------------------------------------------------------------------------------- the eager definition


def eager_terms(a: torch.Tensor, weights: torch.Tensor, target, delta: float = DELTA):
    """(gini, kl) of one layer, float64, class by class: ``weights`` (B, C) are one-hot rows for class ids."""
    a, w = a.double(), weights.double()
    B, C = w.shape
    m = a.abs().mean(dim=(2, 3)) if a.dim() == 4 else a.abs()  # (B, F)
    n = w.sum(0)  # the weight of each class in the batch
    columns = []
    for c in range(C):
        if n[c] > 0:
            columns.append(sum(w[b, c] * m[b] for b in range(B)) / (n[c] + delta))
        else:  # an absent class: 0
            columns.append(torch.zeros_like(m[0]))
    S = torch.stack(columns, dim=1)  # (F, C)
    p = S / (S.sum(1, keepdim=True) + delta)
    gini = torch.stack([1 - (p[f] ** 2).sum() for f in range(p.shape[0])]).mean()
    q = (p.sum(0) + delta) / p.sum()
    if isinstance(target, torch.Tensor):
        t = target.double()
    elif target == "batch":
        t = n / B
    else:
        t = torch.full((C,), 1.0 / C, dtype=torch.float64)
    kl = sum(t[c] * (torch.log(t[c]) - torch.log(q[c])) for c in range(C) if t[c] > 0)
    return gini, kl


def eager_loss(layers, labels, num_classes, target="batch", lambda_gini=0.5, lambda_kl=0.5):
    weights = F.one_hot(labels, num_classes).double() if labels.dim() == 1 else labels.double()
    terms = [eager_terms(a, weights, target) for a in layers]
    gini = sum(g for g, _ in terms) / len(terms)
    kl = sum(k for _, k in terms) / len(terms)
    return lambda_gini * gini + lambda_kl * kl, gini, kl


def check_against_eager(criterion, layers, labels, target, tolerance=TIGHT):
    """Loss, the two terms and every layer's gradient (grad_output not 1) against the eager float64 loss."""
    loss = criterion(layers if len(layers) > 1 else layers[0], labels)
    want, gini, kl = eager_loss([a.detach().double().requires_grad_() for a in layers], labels, criterion.num_classes,
                                target, criterion.lambda_gini, criterion.lambda_kl)
    torch.testing.assert_close(loss.double(), want.detach(), **tolerance)
    torch.testing.assert_close(criterion.gini.double(), gini.detach(), **tolerance)
    torch.testing.assert_close(criterion.kl.double(), kl.detach(), **tolerance)
    layers64 = [a.detach().double().requires_grad_() for a in layers]
    want, _, _ = eager_loss(layers64, labels, criterion.num_classes, target, criterion.lambda_gini, criterion.lambda_kl)
    got_grads = torch.autograd.grad(loss * 1.7, layers)
    want_grads = torch.autograd.grad(want * 1.7, layers64)
    for i, (g, w) in enumerate(zip(got_grads, want_grads)):
        assert g.dtype == layers[i].dtype and g.shape == layers[i].shape
        torch.testing.assert_close(g.double(), w, **tolerance, msg=lambda m: f"gradient of layer {i}: {m}")
    return loss


def three_layers(B: int, dtype=torch.float64):
    """Odd sizes: a (B, 5, 3, 2) map, a (B, 7) vector and a (B, 1, 1, 3) map."""
    return [leaf(rand(B, 5, 3, 2, dtype=dtype)), leaf(rand(B, 7, dtype=dtype)), leaf(rand(B, 1, 1, 3, dtype=dtype))]


def mixup(labels: torch.Tensor, num_classes: int, lam: float = 0.7) -> torch.Tensor:
    """mixup's labels: lam * onehot(y) + (1 - lam) * onehot(y of the batch reversed)."""
    one_hot = F.one_hot(labels, num_classes).double()
    return lam * one_hot + (1 - lam) * one_hot.flip(0)


def smoothed(labels: torch.Tensor, num_classes: int, eps: float = 0.1) -> torch.Tensor:
    return (1 - eps) * F.one_hot(labels, num_classes).double() + eps / num_classes


# ------------------------------------------------------------------------------------------------- layers


@pytest.mark.parametrize("target", ["batch", "uniform"])
@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_several_layers_average_each_term(target, backend):
    layers, labels = three_layers(5), torch.tensor([0, 3, 3, 1, 0])  # class 2 absent, C = 4
    criterion = GiniKLLoss(4, lambda_gini=0.3, lambda_kl=0.9, target=target, backend=backend)
    loss = check_against_eager(criterion, layers, labels, target)
    # the same as the ops' terms of each layer averaged
    terms = [ops.gini_kl(a, labels, 4, target, backend=backend) for a in layers]
    torch.testing.assert_close(loss, 0.3 * sum(g for g, _ in terms) / 3 + 0.9 * sum(k for _, k in terms) / 3, **TIGHT)
    # one layer in a list is that layer
    torch.testing.assert_close(criterion([layers[0]], labels), criterion(layers[0], labels), rtol=0, atol=0)


def test_several_layers_float32_and_tuples():
    layers, labels = three_layers(6, torch.float32), torch.tensor([2, 0, 1, 1, 2, 0])
    float32 = {"rtol": 1e-5, "atol": 1e-7}
    loss = check_against_eager(GiniKLLoss(3, backend="reference"), layers, labels, "batch", float32)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(GiniKLLoss(3, backend="reference")(tuple(layers), labels), loss, rtol=0, atol=0)
    mixed = [layers[0], layers[1].detach().double()]  # the widest dtype among the layers
    assert GiniKLLoss(3)(mixed, labels).dtype == torch.float64


# ------------------------------------------------------------------------------------------------- soft labels


@pytest.mark.parametrize("kind", ["mixup", "smoothing", "absent class"])
@pytest.mark.parametrize("target", ["batch", "uniform"])
def test_soft_labels_weight_the_class_statistics(kind, target):
    C, labels = 5, torch.tensor([0, 4, 4, 1, 0, 3, 1])  # class 2 absent
    soft = {"mixup": mixup(labels, C), "smoothing": smoothed(labels, C), "absent class": mixup(labels, C, 0.35)}[kind]
    if kind == "absent class":
        assert (soft[:, 2] == 0).all()  # a class whose weight is exactly 0 is absent
    layers = three_layers(7)
    check_against_eager(GiniKLLoss(C, lambda_gini=0.6, lambda_kl=0.25, target=target), layers, soft, target)
    check_against_eager(GiniKLLoss(C, target=target), layers[:1], soft, target)


def test_soft_labels_float32_and_half_labels():
    labels = torch.tensor([1, 0, 2, 2, 1, 0, 0, 1, 2])
    layers = [leaf(rand(9, 6, 2, 3)), leaf(rand(9, 4))]  # float32 activations, stored as (B, F, H, W) channels-last too
    layers[0] = leaf(layers[0].detach().contiguous(memory_format=torch.channels_last))
    soft = smoothed(labels, 3, 0.2).float()
    loss = check_against_eager(GiniKLLoss(3), layers, soft, "batch", {"rtol": 1e-5, "atol": 1e-7})
    assert loss.dtype == torch.float32
    half = mixup(labels, 3, 0.5).to(torch.bfloat16)  # exact in bfloat16
    check_against_eager(GiniKLLoss(3), layers, half, "batch", {"rtol": 1e-5, "atol": 1e-7})


@pytest.mark.parametrize("target", ["batch", "uniform"])
def test_one_hot_soft_labels_are_the_integer_labels(target):
    layers, labels = three_layers(6), torch.tensor([1, 1, 0, 3, 1, 0])  # class 2 absent
    criterion = GiniKLLoss(4, target=target, backend="reference")
    hard = criterion(layers, labels)
    soft = criterion(layers, F.one_hot(labels, 4).double())
    torch.testing.assert_close(soft, hard, **TIGHT)
    for g, h in zip(torch.autograd.grad(soft, layers), torch.autograd.grad(criterion(layers, labels), layers)):
        torch.testing.assert_close(g, h, **TIGHT)


def test_soft_labels_get_no_gradient_and_the_loss_is_one_sample_per_row():
    layers, soft = three_layers(1), torch.tensor([[0.25, 0.75]], dtype=torch.float64, requires_grad=True)  # B = 1
    loss = check_against_eager(GiniKLLoss(2), layers, soft, "batch")
    assert loss.grad_fn is not None and soft.grad is None
    (grad,) = torch.autograd.grad(loss, soft, allow_unused=True, materialize_grads=True)
    assert (grad == 0).all()


# ------------------------------------------------------------------------------------------ target distribution


@pytest.mark.parametrize("labels_kind", ["ids", "soft"])
def test_target_distribution_tensor(labels_kind):
    C, labels = 4, torch.tensor([3, 0, 0, 1, 3])  # class 2 absent from the batch but wanted by the target
    labels = labels if labels_kind == "ids" else mixup(labels, C, 0.8)
    t = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    layers = three_layers(5)
    check_against_eager(GiniKLLoss(C, lambda_kl=1.3, target=t, backend="reference"), layers, labels, t)
    zero = torch.tensor([0.5, 0.0, 0.0, 0.5])  # classes with t_c = 0 are left out of kl (float32 target)
    check_against_eager(GiniKLLoss(C, target=zero, backend="cpp"), layers, labels, zero)
    listed = GiniKLLoss(C, target=[0.5, 0.0, 0.0, 0.5], backend="cpp")  # a sequence of numbers too
    torch.testing.assert_close(listed(layers, labels), GiniKLLoss(C, target=zero, backend="cpp")(layers, labels))


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_uniform_target_tensor_is_the_uniform_target(backend):
    layers, labels = three_layers(7), torch.tensor([0, 1, 1, 4, 4, 4, 0])
    uniform = GiniKLLoss(5, target="uniform", backend=backend)
    tensor = GiniKLLoss(5, target=torch.full((5,), 0.2, dtype=torch.float64), backend=backend)
    torch.testing.assert_close(tensor(layers, labels), uniform(layers, labels), **TIGHT)
    batch = GiniKLLoss(5, target="batch", backend=backend)
    frequencies = torch.bincount(labels, minlength=5).double() / 7
    frequency_target = GiniKLLoss(5, target=frequencies, backend=backend)
    torch.testing.assert_close(frequency_target(layers, labels), batch(layers, labels), **TIGHT)


def test_target_distribution_is_a_non_persistent_buffer():
    t = torch.tensor([0.25, 0.75])
    criterion = GiniKLLoss(2, target=t, warmup_steps=1)
    assert list(criterion.state_dict()) == ["steps"]
    assert criterion.target_distribution is not t and torch.equal(criterion.target_distribution, t)
    assert criterion.double().target_distribution.dtype == torch.float64
    assert "target=tensor of 2" in repr(criterion)
    a, labels = leaf(rand(4, 3)), torch.tensor([0, 1, 1, 0])
    assert criterion.train()(a, labels).item() == 0.0 and criterion(a, labels).item() > 0  # the warm-up as before
    assert GiniKLLoss(2, target=t, sync_ddp=True)(a, labels).item() > 0  # no process group: the local batch


# ------------------------------------------------------------------------------------------------ bad arguments


def test_bad_activations():
    criterion, labels = GiniKLLoss(3), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="at least one layer's tensor, got an empty list"):
        criterion([], labels)
    with pytest.raises(TypeError, match=r"activations\[1\] must be a tensor \(B, F, H, W\) or \(B, F\), got list"):
        criterion([rand(3, 4), [1.0]], labels)
    with pytest.raises(ValueError, match=r"activations\[1\] must have shape .* got \(3, 4, 5\)"):
        criterion([rand(3, 4), rand(3, 4, 5)], labels)
    mismatch = r"batch size B of every layer must match: activations\[0\] has 3, activations\[1\] has 4"
    with pytest.raises(ValueError, match=mismatch):
        criterion([rand(3, 4), rand(4, 4)], labels)
    with pytest.raises(TypeError, match=r"activations\[0\] must be a float16, bfloat16, float32 or float64 tensor"):
        criterion([torch.ones(3, 4, dtype=torch.long)], labels)
    with pytest.raises(TypeError, match="activations must be a tensor .* or a list of such tensors"):
        criterion({"layer4": rand(3, 4)}, labels)
    with pytest.raises(ValueError, match=r"activations must have shape \(B, F, H, W\) or \(B, F\), got \(3,\)"):
        criterion(rand(3), labels)


def test_bad_soft_labels():
    criterion, a = GiniKLLoss(3), rand(4, 5)
    good = smoothed(torch.tensor([0, 1, 2, 2]), 3)
    with pytest.raises(ValueError, match=r"number of classes C must match: num_classes has 3, labels has 4"):
        criterion(a, smoothed(torch.tensor([0, 1, 2, 2]), 4))
    with pytest.raises(ValueError, match=r"batch size B must match: activations has 4, labels has 3"):
        criterion(a, good[:3])
    with pytest.raises(ValueError, match=r"batch size B must match: activations has 4, labels has 3"):
        criterion([a, a], torch.tensor([0, 1, 2]))  # class ids: checked by kdfast.ops for each layer
    negative = good.clone()
    negative[0] = torch.tensor([1.2, -0.2, 0.0])
    with pytest.raises(ValueError, match=r"soft labels must be non-negative probabilities, got min -0.2"):
        criterion(a, negative)
    with pytest.raises(ValueError, match=r"each row of the soft labels must sum to 1 .* off by 1.000e\+00"):
        criterion(a, good * 2)
    nan = good.clone()
    nan[1, 1] = float("nan")
    with pytest.raises(ValueError, match="soft labels must be finite"):
        criterion(a, nan)
    with pytest.raises(TypeError, match=r"labels \(B,\) must be integer class ids, got torch.float32; soft labels are"):
        criterion(a, torch.tensor([0.0, 1.0, 2.0, 2.0]))
    with pytest.raises(TypeError, match="soft labels .* must be a float16, .* tensor, got torch.int64"):
        criterion(a, torch.ones(4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"or soft labels \(B, C = 3\), got shape \(4, 3, 1\)"):
        criterion(a, good.unsqueeze(-1))
    with pytest.raises(TypeError, match="labels must be a tensor of class ids"):
        criterion(a, [0, 1, 2, 2])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, num_classes=3\)"):
        criterion([a, a], torch.tensor([0, 1, 3, 2]))


def test_bad_target_distribution():
    with pytest.raises(ValueError, match=r"target must have shape \(C,\) = \(3,\), got \(2,\)"):
        GiniKLLoss(3, target=torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match=r"target must have shape \(C,\) = \(3,\), got \(1, 3\)"):
        GiniKLLoss(3, target=torch.full((1, 3), 1 / 3))
    with pytest.raises(ValueError, match="target must be non-negative probabilities, got min -0.5"):
        GiniKLLoss(3, target=torch.tensor([1.0, 0.5, -0.5]))
    with pytest.raises(ValueError, match=r"target must sum to 1 \(within .*\), got 1.5"):
        GiniKLLoss(3, target=torch.tensor([0.5, 0.5, 0.5]))
    with pytest.raises(ValueError, match="target must be finite"):
        GiniKLLoss(3, target=torch.tensor([0.5, float("nan"), 0.5]))
    with pytest.raises(TypeError, match="target must be a floating tensor of class probabilities, got torch.int64"):
        GiniKLLoss(3, target=torch.tensor([1, 0, 0]))
    with pytest.raises(TypeError, match="target must be 'batch', 'uniform' or a \\(C,\\) tensor"):
        GiniKLLoss(3, target={"cat": 1.0})
    with pytest.raises(ValueError, match="target must be one of 'batch', 'uniform'"):
        GiniKLLoss(3, target="frequencies")
