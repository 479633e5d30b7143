"""gini_kl (Gini impurity and KL terms of the discriminability loss) on every backend against the float64 reference."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from harness import TOLERANCE, assert_close, implemented_cases, rand, relative_error

import kdfast.ops as ops
from kdfast import reference

# kdfast.ops.gini_kl is the function (re-exported by kdfast.ops); the module holds _IMPLEMENTED.
gini_kl_module = importlib.import_module("kdfast.ops.gini_kl")

CASES = implemented_cases(gini_kl_module._IMPLEMENTED)
# (B, F, spatial, C): spatial None is the pooled (B, F) input. B = 1, C = 1, F not a multiple of 16, C = 1000
# with most classes absent, ResNet-like 4x4 and 7x7 maps.
SHAPES = [
    (1, 1, None, 1),
    (1, 17, (2, 2), 3),
    (6, 37, None, 4),
    (8, 13, (3, 3), 5),
    (16, 33, (4, 4), 10),
    (12, 20, (7, 7), 1000),
    (9, 50, (1, 1), 7),
]
TARGETS = ("batch", "uniform")


def dtypes(device: str, backend: str) -> list[torch.dtype]:
    if device == "cuda":
        return [torch.float32, torch.float16, torch.bfloat16, torch.float64]
    # numpy, which runs the Triton interpreter, has no bfloat16.
    return [torch.float32, torch.float64] + ([] if backend == "triton" else [torch.bfloat16])


def leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().requires_grad_()


def activations(B, F, spatial, dtype=torch.float32, device="cpu"):
    return leaf(rand(B, F, *(spatial or ()), dtype=dtype, device=device))


def target_entropy(labels: torch.Tensor, C: int, target: str) -> float:
    """H(t) = -sum_c t_c log t_c of the KL target t."""
    if target == "uniform":
        return math.log(C)
    t = torch.bincount(labels.cpu().long(), minlength=C).double() / labels.numel()
    return -torch.xlogy(t, t).sum().item()


def assert_close_at_scale(out, ref, dtype, scale: float, what: str) -> None:
    """harness.assert_close, except that a result which is a cancelling sum is measured against the size of its
    terms, ``scale``, when that exceeds ||ref||: ||out - ref|| / max(||ref||, scale) <= TOLERANCE[dtype]."""
    error = relative_error(out, ref)
    if error > TOLERANCE[dtype] and math.isfinite(error):
        difference = (out.detach().double() - ref.detach().double()).norm().item()
        error = difference / max(ref.detach().double().norm().item(), scale, 1e-300)
    assert error <= TOLERANCE[dtype], f"{what}: relative error {error:.3g} > {TOLERANCE[dtype]:g} ({dtype})"


def natural_gradient_scale(a64: torch.Tensor, labels: torch.Tensor, C: int, delta: float) -> torch.Tensor:
    """|d/da| of a quantity of order 1 in p: 1 / (H*W * n_{y_b} * T_f), T_f = sum_c S[f, c] (design 3.4)."""
    a64 = a64.detach()
    m = a64.abs() if a64.dim() == 2 else a64.abs().flatten(2).mean(-1)
    counts = torch.bincount(labels.long(), minlength=C).to(m)
    S = torch.zeros(C, m.shape[1], dtype=m.dtype, device=m.device).index_add(0, labels.long(), m) / (counts + delta)[:, None]
    scale = 1.0 / (counts[labels.long()][:, None] * (S.sum(0) + delta)[None, :])  # (B, F)
    return scale / (a64[0, 0].numel())


def check_against_reference(a, labels, C, target, dtype, what, delta=1e-10, backend=None):
    """Values of (gini, kl) and the gradients of each and of a random combination, against the float64 reference.

    Two quantities cancel, whatever the implementation, and are measured against the size of their terms:
    - kl = H(t, q) - H(t): rounding relative to H(t, q) = kl + H(t), not to kl (a kl of 1e-4 from terms of size
      log C carries ~1e-3 relative error in float32, the float32 reference included);
    - with one label in the whole batch every feature is pure, p = S / (S + delta): gini ~ delta/S and every
      gradient is a delta effect ~ delta/S^2 left over from terms of size 1/S, which float32 cannot resolve and
      float64 resolves to ~1e-7 relative (the float64 oracle included); there the gradients are measured against
      their natural scale (``natural_gradient_scale``) and gini against its terms (1 - sum p^2, size 1).
    The gradient of the sum is measured against the sum of the sizes of its two parts.
    """
    a64 = leaf(a.double())
    outs = ops.gini_kl(a, labels, C, target, delta, backend=backend)
    refs = reference.gini_kl(a64, labels, C, target, delta)
    assert all(o.dtype == dtype and o.shape == () for o in outs)
    degenerate = labels.unique().numel() == 1
    kl_scale = abs(refs[1].item()) + target_entropy(labels, C, target)
    assert_close_at_scale(outs[0], refs[0], dtype, 1.0 if degenerate else 0.0, f"{what} gini")
    assert_close_at_scale(outs[1], refs[1], dtype, kl_scale, f"{what} kl")
    grad_out = (rand(dtype=dtype, device=a.device), rand(dtype=dtype, device=a.device))
    natural = natural_gradient_scale(a64, labels, C, delta)
    sizes = []
    for i, name in enumerate(("gini", "kl")):
        (got,) = torch.autograd.grad(outs[i], a, grad_out[i], retain_graph=True)
        (want,) = torch.autograd.grad(refs[i], a64, grad_out[i].double(), retain_graph=True)
        assert got.dtype == dtype and got.shape == a.shape
        scale = (2 * abs(grad_out[i].item()) * natural).norm().item() if degenerate else 0.0
        assert_close_at_scale(got, want, dtype, scale, f"{what} grad of {name} w.r.t. activations")
        sizes.append(max(want.norm().item(), scale))
    (got,) = torch.autograd.grad(outs, a, grad_out)  # both incoming gradients at once
    (want,) = torch.autograd.grad(refs, a64, [g.double() for g in grad_out])
    assert_close_at_scale(got, want, dtype, sum(sizes), f"{what} grad of gini and kl w.r.t. activations")


# ---------------------------------------------------------------------------------------------------- values


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize(("device", "backend"), CASES)
def test_gini_kl_matches_reference(device, backend, shape, target):
    B, F, spatial, C = shape
    for dtype in dtypes(device, backend):
        # Every class present when B >= C; C = 1000 leaves most classes absent (see test_awkward_label_sets too).
        labels = (torch.arange(B) % C)[torch.randperm(B)] if B >= C else torch.randint(0, C, (B,))
        labels = labels.to(device)
        check_against_reference(activations(B, F, spatial, dtype, device), labels, C, target, dtype, f"{dtype}", backend=backend)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize(("device", "backend"), CASES)
def test_awkward_label_sets(device, backend, target):
    """A batch of one class, the last class only, every class, int32 labels, classes missing from the batch.

    Missing classes come last: with the uniform target their float32 KL gradient is where the reference loses
    digits (cancellation in the autograd of the (F, C) epilogue), and a failure there should not hide the others.
    """
    B, F = 10, 19
    for name, labels, C in [
        ("one class", torch.full((B,), 3), 6),
        ("last class only", torch.full((B,), 5), 6),
        ("every class", torch.arange(B) % 6, 6),
        ("int32", (torch.arange(B) % 4).to(torch.int32), 4),
        ("missing classes", torch.tensor([0, 0, 2, 2, 2, 5, 0, 5, 2, 0]), 6),
        ("most classes missing", torch.tensor([0, 0, 2, 2, 2, 5, 0, 5, 2, 999]), 1000),
    ]:
        for spatial in (None, (3, 3)):
            for dtype in (torch.float64, torch.float32):
                a = activations(B, F, spatial, dtype, device=device)
                check_against_reference(a, labels.to(device), C, target, dtype, f"{name} {spatial} {dtype}", backend=backend)


def _kl_gradient_from_float32_features(a: torch.Tensor, labels: torch.Tensor, C: int, target: str) -> torch.Tensor:
    """The float32 floor: the KL gradient computed exactly (float64) from the features pooled in float32, the
    one rounding every float32 implementation makes before the small (F, C) epilogue."""
    m = a.detach().abs().flatten(2).mean(-1).double().requires_grad_()  # pooled in float32, then exact
    (dm,) = torch.autograd.grad(reference.gini_kl(m, labels, C, target)[1], m)
    return torch.sign(a.detach().double()) * (dm / a[0, 0].numel())[:, :, None, None]


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_float32_kl_gradient_over_many_draws(device, backend):
    """Every draw accurate, not most: 100 small batches holding 3 of 12 classes, uniform target, float32.

    The KL gradient projects h[f, c] ~ t_c / P_c through p = S / Z, as h - sum_c h p, which cancels when h is
    nearly constant over the classes (the uniform target, few classes present), so even the float32 rounding of
    the pooled features can leave ~1e-5 in it. The bar: the design's 1e-5, or 10x that floor (the error of an
    exact computation from the features pooled in float32) where the floor is higher. An epilogue rounded in
    float32 misses it on most draws (typically 10-100x the floor); the epilogue in float64 meets it.
    """
    worst, where = 0.0, None
    for draw in range(100):
        labels = torch.randperm(12)[:3][torch.randint(0, 3, (10,))].to(device)
        a = activations(10, 19, (3, 3), torch.float32, device)
        a64 = leaf(a.double())
        (got,) = torch.autograd.grad(ops.gini_kl(a, labels, 12, "uniform", backend=backend)[1], a)
        (want,) = torch.autograd.grad(reference.gini_kl(a64, labels, 12, "uniform")[1], a64)
        floor = relative_error(_kl_gradient_from_float32_features(a, labels, 12, "uniform"), want)
        error = relative_error(got, want)
        excess = error / max(TOLERANCE[torch.float32], 10 * floor)
        if excess > worst:
            worst, where = excess, (draw, labels.tolist(), error, floor)
    assert worst <= 1, f"kl gradient: at draw {where[0]} (labels {where[1]}) relative error {where[2]:.3g}, floor {where[3]:.3g}"


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_known_values(device, backend):
    """A hand-computed case, and a one-class batch: every feature is pure (gini 0) and the batch target is met."""
    a = torch.tensor([[1.0], [-3.0]], dtype=torch.float64, device=device)  # m = |a| = [1, 3], one feature
    gini, kl = ops.gini_kl(a, torch.tensor([0, 1], device=device), 2, backend=backend)
    # p = [1/4, 3/4]: gini = 1 - 1/16 - 9/16; q = p; t = [1/2, 1/2]
    # exact without delta; delta = 1e-10 moves them by a few 1e-10
    assert gini.item() == pytest.approx(0.375, rel=1e-8)
    assert kl.item() == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3), rel=1e-8)
    a = rand(7, 11, 2, 2, dtype=torch.float64, device=device)
    gini, kl = ops.gini_kl(a, torch.full((7,), 2, device=device), 4, backend=backend)
    assert abs(gini.item()) < 1e-9 and abs(kl.item()) < 1e-9
    gini, kl = ops.gini_kl(a, torch.full((7,), 2, device=device), 4, "uniform", backend=backend)
    assert torch.isfinite(kl) and kl.item() > 1.0  # far from uniform, but finite: delta keeps log q finite


def _layouts(B, F, H, W, dtype, device):
    channels_last = leaf(rand(B, F, H, W, dtype=dtype, device=device).contiguous(memory_format=torch.channels_last))
    assert channels_last.is_contiguous(memory_format=torch.channels_last) and not channels_last.is_contiguous()
    return [
        ("channels_last", channels_last),
        ("permuted", leaf(rand(B, H, W, F, dtype=dtype, device=device)).permute(0, 3, 1, 2)),  # a channels-last view
        ("sliced", leaf(rand(B, 2 * F, H, W, dtype=dtype, device=device))[:, ::2]),  # every other channel
        ("pooled", leaf(rand(F, B, dtype=dtype, device=device)).t()),  # (B, F), column-major
        # stride 0 over H and W (an upsampled map); expanding over B would make every sample equal, p uniform
        # and gini stationary: a degenerate input, not a layout.
        ("expanded", leaf(rand(B, F, 1, 1, dtype=dtype, device=device)).expand(B, F, H, W)),
    ]


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_non_contiguous_and_channels_last_inputs(device, backend):
    B, F, H, W, C = 6, 24, 3, 5, 4
    labels = (torch.arange(B) % C)[torch.randperm(B)].to(device)  # every class present: this test is about layout
    for name, a in _layouts(B, F, H, W, torch.float32, device):
        check_against_reference(a, labels, C, "batch", torch.float32, f"{name} batch", backend=backend)
    # The float32 KL gradient of the uniform target is tested in test_awkward_label_sets; here, layouts only.
    for name, a in _layouts(B, F, H, W, torch.float64, device):
        for target in TARGETS:
            check_against_reference(a, labels, C, target, torch.float64, f"{name} {target}", backend=backend)


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_negative_activations_pool_their_magnitude(device, backend):
    a = activations(8, 15, (3, 3), device=device)
    labels = (torch.arange(8) % 5)[torch.randperm(8)].to(device)
    with torch.no_grad():
        a.copy_(-a.abs())
    gini, kl = ops.gini_kl(a, labels, 5, backend=backend)
    gini_abs, kl_abs = ops.gini_kl(a.detach().abs(), labels, 5, backend=backend)
    torch.testing.assert_close((gini, kl), (gini_abs, kl_abs))
    check_against_reference(a, labels, 5, "batch", torch.float32, "all negative", backend=backend)


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_gradient_through_one_output_only(device, backend):
    a = activations(8, 21, (2, 3), device=device)
    a64 = leaf(a.double())
    labels = (torch.arange(8) % 3)[torch.randperm(8)].to(device)
    for which in (0, 1):
        out = ops.gini_kl(a, labels, 3, backend=backend)[which]
        ref = reference.gini_kl(a64, labels, 3)[which]
        (got,), (want,) = torch.autograd.grad(out, a), torch.autograd.grad(ref, a64)
        assert_close(got, want, torch.float32, f"grad through output {which}")


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_delta(device, backend):
    a = activations(6, 9, None, dtype=torch.float64, device=device)
    labels = torch.tensor([0, 1, 1, 3, 3, 3], device=device)
    for delta in (1e-10, 1e-3, 1.0):
        check_against_reference(a, labels, 5, "uniform", torch.float64, f"delta={delta}", delta=delta, backend=backend)


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_nan_propagates(device, backend):
    a = rand(4, 6, 2, 2, device=device)
    a[2, 3, 1, 0] = float("nan")
    labels = torch.tensor([0, 1, 0, 2], device=device)
    gini, kl = ops.gini_kl(a, labels, 3, backend=backend)
    ref_gini, _ = reference.gini_kl(a, labels, 3)
    assert gini.isnan() and kl.isnan()
    assert relative_error(gini, ref_gini) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_results_are_deterministic(device, backend):
    a = activations(32, 64, (4, 4), device=device)
    labels = torch.randint(0, 10, (32,), device=device)
    runs = []
    for _ in range(2):
        gini, kl = ops.gini_kl(a, labels, 10, backend=backend)
        runs.append((gini, kl, *torch.autograd.grad(gini + 0.3 * kl, a)))
    assert all(torch.equal(x, y) for x, y in zip(*runs))


# ------------------------------------------------------------------------------------ gradcheck / opcheck


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_gradcheck(device, backend):
    for shape, labels, C in [((4, 3, 2, 2), [0, 2, 2, 1], 4), ((5, 4), [1, 1, 0, 1, 3], 4), ((1, 2), [0], 1)]:
        a = leaf(rand(*shape, dtype=torch.float64, device=device))
        y = torch.tensor(labels, device=device)
        for target in TARGETS:
            fn = lambda a, y=y, C=C, target=target: ops.gini_kl(a, y, C, target, backend=backend)  # noqa: E731
            assert torch.autograd.gradcheck(fn, (a,))


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_custom_op_autograd_matches_reference(device, backend):
    """Eager calls may take a faster path than the custom op; torch.compile always calls the op, so its autograd
    formula (a backward custom op) is checked directly, with gradients of both outputs and of each alone."""
    op = torch.ops.kdfast.gini_kl.default
    labels = torch.tensor([0, 3, 3, 1, 0, 3, 5, 1], device=device)  # classes 2 and 4 absent
    for spatial in (None, (3, 3)):
        for target in TARGETS:
            for dtype in (torch.float64, torch.float32):
                a = activations(8, 21, spatial, dtype, device)
                a64 = leaf(a.double())
                outs = op(a, labels, 6, target, 1e-10, backend)
                refs = reference.gini_kl(a64, labels, 6, target, 1e-10)
                what = f"{spatial} {target} {dtype}"
                assert_close_at_scale(outs[0], refs[0], dtype, 0.0, f"{what} gini")
                assert_close_at_scale(outs[1], refs[1], dtype, refs[1].item() + target_entropy(labels, 6, target), f"{what} kl")
                grad_out = (rand(dtype=dtype, device=device), rand(dtype=dtype, device=device))
                sizes = []
                for used in ((0,), (1,), (0, 1)):
                    (got,) = torch.autograd.grad([outs[i] for i in used], a, [grad_out[i] for i in used], retain_graph=True)
                    (want,) = torch.autograd.grad([refs[i] for i in used], a64, [grad_out[i].double() for i in used], retain_graph=True)
                    assert_close_at_scale(got, want, dtype, sum(sizes) if len(used) == 2 else 0.0, f"{what} outputs {used}: grad")
                    sizes.append(want.norm().item())
    a = leaf(rand(4, 3, 2, 2, dtype=torch.float64, device=device))
    y = torch.tensor([0, 2, 2, 1], device=device)
    for target in TARGETS:
        assert torch.autograd.gradcheck(lambda a, target=target: op(a, y, 4, target, 1e-10, backend), (a,))


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_opcheck(device, backend):
    kd = torch.ops.kdfast
    for shape in ((4, 5, 2, 3), (4, 5)):
        a = leaf(rand(*shape, device=device))
        labels = torch.tensor([0, 2, 2, 1], device=device)
        for target in TARGETS:
            torch.library.opcheck(kd.gini_kl.default, (a, labels, 4, target, 1e-10, backend))
            # Backward ops are checked on plain tensors: double backward is not supported.
            args = (rand(device=device), rand(device=device), a.detach(), labels, 4, target, 1e-10, backend)
            torch.library.opcheck(kd.gini_kl_backward.default, args)


class _DiscriminabilityLoss(torch.nn.Module):
    """The paper's loss on a tiny classifier: CE + 0.5 gini + 0.5 kl on the last feature map."""

    def __init__(self, channels: int, classes: int):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, channels, 3, padding=1)
        self.fc = torch.nn.Linear(channels, classes)
        self.classes = classes

    def forward(self, images, labels):
        features = self.conv(images)
        logits = self.fc(features.mean((2, 3)))
        gini, kl = ops.gini_kl(features, labels, self.classes)
        return torch.nn.functional.cross_entropy(logits, labels) + 0.5 * gini + 0.5 * kl


def test_compile_fullgraph_matches_eager():
    module = _DiscriminabilityLoss(12, 5)
    images, labels = leaf(rand(6, 3, 4, 4)), torch.tensor([0, 1, 1, 4, 4, 4])
    compiled = torch.compile(module, fullgraph=True)
    eager = module(images, labels)
    got = compiled(images, labels)
    torch.testing.assert_close(got, eager)
    wrt = (images, *module.parameters())
    for g, e in zip(torch.autograd.grad(got, wrt), torch.autograd.grad(eager, wrt)):
        torch.testing.assert_close(g, e)


# --------------------------------------------------------------------------------------------- bad input

B, F, C = 4, 6, 3


def _bad_inputs():
    s = lambda *shape, **kw: rand(*shape, **kw)  # noqa: E731
    y = lambda *values, **kw: torch.tensor(values, **kw)  # noqa: E731
    good_labels = lambda: y(0, 1, 2, 1)  # noqa: E731
    return [
        ("rank 3", lambda: (s(B, F, 2), good_labels()), {}, ValueError, r"activations must have shape \(B, F, H, W\) or \(B, F\)"),
        ("rank 1", lambda: (s(B), good_labels()), {}, ValueError, r"activations must have shape \(B, F, H, W\) or \(B, F\)"),
        ("rank 5", lambda: (s(B, F, 2, 2, 1), good_labels()), {}, ValueError, r"activations must have shape"),
        ("not a tensor", lambda: ([[1.0] * F] * B, good_labels()), {}, ValueError, r"activations must have shape"),
        ("integer activations", lambda: (torch.ones(B, F, dtype=torch.int64), good_labels()), {}, TypeError, r"activations must be a float"),
        ("B = 0", lambda: (s(0, F), y(dtype=torch.int64)), {}, ValueError, r"activations must have no zero-sized dimension"),
        ("F = 0", lambda: (s(B, 0, 2, 2), good_labels()), {}, ValueError, r"activations must have no zero-sized dimension"),
        ("H = 0", lambda: (s(B, F, 0, 2), good_labels()), {}, ValueError, r"activations must have no zero-sized dimension"),
        ("labels rank", lambda: (s(B, F), good_labels()[:, None]), {}, ValueError, r"labels must have 1 dimensions \(B,\)"),
        ("labels not a tensor", lambda: (s(B, F), [0, 1, 2, 1]), {}, TypeError, r"labels must be a torch.Tensor"),
        ("float labels", lambda: (s(B, F), good_labels().float()), {}, TypeError, r"labels must be an integer tensor"),
        ("bool labels", lambda: (s(B, F), good_labels() > 0), {}, TypeError, r"labels must be an integer tensor"),
        ("batch mismatch", lambda: (s(B, F), y(0, 1, 2)), {}, ValueError, r"batch size B must match"),
        ("label too large", lambda: (s(B, F), y(0, 1, 3, 1)), {}, ValueError, r"labels must lie in \[0, num_classes=3\)"),
        ("negative label", lambda: (s(B, F), y(0, -1, 2, 1)), {}, ValueError, r"labels must lie in \[0, num_classes=3\)"),
        ("num_classes 0", lambda: (s(B, F), good_labels()), {"num_classes": 0}, ValueError, r"num_classes must be an integer >= 1"),
        ("num_classes float", lambda: (s(B, F), good_labels()), {"num_classes": 3.0}, ValueError, r"num_classes must be an integer >= 1"),
        ("num_classes bool", lambda: (s(B, F), good_labels()), {"num_classes": True}, ValueError, r"num_classes must be an integer >= 1"),
        ("mixed devices", lambda: (s(B, F), good_labels().to("meta")), {}, ValueError, r"one device"),
        ("target", lambda: (s(B, F), good_labels()), {"target": "none"}, ValueError, r"target must be one of"),
        ("delta 0", lambda: (s(B, F), good_labels()), {"delta": 0.0}, ValueError, r"delta must be a finite positive"),
        ("delta < 0", lambda: (s(B, F), good_labels()), {"delta": -1e-10}, ValueError, r"delta must be a finite positive"),
        ("delta nan", lambda: (s(B, F), good_labels()), {"delta": float("nan")}, ValueError, r"delta must be a finite positive"),
        ("delta inf", lambda: (s(B, F), good_labels()), {"delta": float("inf")}, ValueError, r"delta must be a finite positive"),
        ("backend", lambda: (s(B, F), good_labels()), {"backend": "fast"}, ValueError, r"backend must be one of"),
    ]


@pytest.mark.parametrize(("make", "kwargs", "error", "message"), [c[1:] for c in _bad_inputs()], ids=[c[0] for c in _bad_inputs()])
def test_bad_input_gets_a_clear_error(make, kwargs, error, message):
    a, labels = make()
    kwargs = {"num_classes": C, **kwargs}
    with pytest.raises(error, match=message):
        ops.gini_kl(a, labels, **kwargs)
