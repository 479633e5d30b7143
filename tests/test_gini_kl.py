"""gini_kl (Gini impurity and KL terms of the discriminability loss) on every backend against the float64 reference."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from harness import TOLERANCE, assert_close, dtype_cases, dtype_params, implemented_cases, leaf, rand, relative_error

from kdfast import ops, reference
from kdfast.nn.gini_kl import GiniKLLoss

gini_kl_module = importlib.import_module("kdfast.ops.gini_kl")

CASES = implemented_cases("gini_kl")
DTYPE_CASES = dtype_cases(CASES)  # (device, backend, dtype): each case in every dtype it is tested in
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
    # F = 70 spans several feature blocks of every kernel and a 9 x 9 map several position chunks; B = 1 with
    # C = 1000 is a one-sample batch among many absent classes
    (5, 70, (9, 9), 7),
    (1, 70, (3, 3), 1000),
]
TARGETS = ("batch", "uniform")


def activations(B, F, spatial, dtype=torch.float32, device="cpu"):
    return leaf(rand(B, F, *(spatial or ()), dtype=dtype, device=device))


def check_against_reference(a, labels, C, target, dtype, what, delta=None, backend=None):
    """Values of (gini, kl) and the gradients of each and of a random combination, against the float64 reference,
    at the tolerance of ``dtype``.

    The class sums are accumulated in float64 for every dtype, which is what makes the float32 KL gradient
    comparable at 1e-5: its projection h - sum_c h p through p = S / Z cancels when t_c / P_c is nearly constant
    over the classes present (uniform target, few classes), and float32 sums alone would leave up to ~1e-4 in it.

    delta (None: the default 1e-10) is 1 for a batch of one class: there every feature is pure, p = S / (S + delta),
    and with delta = 1e-10 gini ~ delta / S and every gradient is a delta effect ~ delta / S^2 left over from terms
    of size 1 / S, which no precision resolves (float64 to ~1e-7). With delta = 1 the same code paths compute
    quantities of order 1. (test_known_values checks such a batch at delta = 1e-10, by absolute error.)
    """
    if delta is None:
        delta = 1.0 if labels.unique().numel() == 1 else 1e-10
    a64 = leaf(a.double())
    outs = ops.gini_kl(a, labels, C, target, delta, backend=backend)
    refs = reference.gini_kl(a64, labels, C, target, delta)
    assert all(o.dtype == dtype and o.shape == () for o in outs)
    assert_close(outs[0], refs[0], dtype, f"{what} gini")
    assert_close(outs[1], refs[1], dtype, f"{what} kl")
    grad_out = (rand(dtype=dtype, device=a.device), rand(dtype=dtype, device=a.device))
    for i, name in enumerate(("gini", "kl")):
        (got,) = torch.autograd.grad(outs[i], a, grad_out[i], retain_graph=True)
        (want,) = torch.autograd.grad(refs[i], a64, grad_out[i].double(), retain_graph=True)
        assert got.dtype == dtype and got.shape == a.shape
        assert_close(got, want, dtype, f"{what} grad of {name} w.r.t. activations")
    (got,) = torch.autograd.grad(outs, a, grad_out)  # both incoming gradients at once
    (want,) = torch.autograd.grad(refs, a64, [g.double() for g in grad_out])
    assert_close(got, want, dtype, f"{what} grad of gini and kl w.r.t. activations")


# ---------------------------------------------------------------------------------------------------- values


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize(("device", "backend", "dtype"), DTYPE_CASES)
def test_gini_kl_matches_reference(device, backend, dtype, shape, target):
    B, F, spatial, C = shape
    # Every class present when B >= C; C = 1000 leaves most classes absent (see test_awkward_label_sets too).
    labels = (torch.arange(B) % C)[torch.randperm(B)] if B >= C else torch.randint(0, C, (B,))
    labels = labels.to(device)
    check_against_reference(activations(B, F, spatial, dtype, device), labels, C, target, dtype, f"{dtype}", backend=backend)


@pytest.mark.parametrize("dtype", dtype_params(torch.float64, torch.float32))
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize(("device", "backend"), CASES)
def test_awkward_label_sets(device, backend, target, dtype):
    """A batch of one class, the last class only, every class, int32 labels, classes missing from the batch.

    The one-class batches run at delta = 1 (see check_against_reference). Missing classes come last: with the
    uniform target their float32 KL gradient is the worst conditioned, and a failure there should not hide the
    others.
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
            a = activations(B, F, spatial, dtype, device=device)
            check_against_reference(a, labels.to(device), C, target, dtype, f"{name} {spatial} {dtype}", backend=backend)


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_float32_kl_gradient_over_many_draws(device, backend):
    """Every draw accurate, not most: 200 small batches holding 2 of 12 classes, uniform target, float32.

    The KL gradient projects h[f, c] ~ t_c / P_c through p = S / Z, as h - sum_c h p, which cancels when h is
    nearly constant over the classes (the uniform target, few classes present). With the pooled features and
    class sums accumulated in float64 every draw is within float32 output rounding of the float64 reference
    (worst ~3e-8 over 1000 draws). Pooled features and class sums accumulated in float32 miss 1e-5 on ~5% of
    these draws (by up to 300x), so 200 draws catch that with near certainty.
    """
    worst, where = 0.0, None
    for draw in range(200):
        labels = torch.randperm(12)[:2][torch.randint(0, 2, (16,))].to(device)
        a = activations(16, 32, (4, 4), torch.float32, device)
        a64 = leaf(a.double())
        (got,) = torch.autograd.grad(ops.gini_kl(a, labels, 12, "uniform", backend=backend)[1], a)
        (want,) = torch.autograd.grad(reference.gini_kl(a64, labels, 12, "uniform")[1], a64)
        error = relative_error(got, want)
        if error > worst:
            worst, where = error, (draw, labels.tolist())
    assert worst <= TOLERANCE[torch.float32], (
        f"kl gradient: at draw {where[0]} (labels {where[1]}) relative error {worst:.3g} > {TOLERANCE[torch.float32]:g}"
    )


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
        (grad,) = torch.autograd.grad(ops.gini_kl(a, labels, C, backend=backend)[0], a)
        if name == "channels_last":  # the gradient keeps the layout (no copy to NCHW and back)
            assert grad.stride() == a.stride(), f"{name}: gradient strides {grad.stride()} != {a.stride()}"
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


def fast_mode(backend: str) -> bool:
    """gradcheck's fast mode (one random direction instead of the full Jacobian) for Triton on CPU tensors: the
    interpreter costs tens of milliseconds per forward, and a full Jacobian takes two forwards per input element.
    The other CPU backends, which follow the same closed form, get the full check."""
    return backend == "triton" and not torch.cuda.is_available()


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_gradcheck(device, backend):
    for shape, labels, C in [((4, 3, 2, 2), [0, 2, 2, 1], 4), ((5, 4), [1, 1, 0, 1, 3], 4), ((1, 2), [0], 1)]:
        a = leaf(rand(*shape, dtype=torch.float64, device=device))
        y = torch.tensor(labels, device=device)
        for target in TARGETS:
            fn = lambda a, y=y, C=C, target=target: ops.gini_kl(a, y, C, target, backend=backend)
            assert torch.autograd.gradcheck(fn, (a,), fast_mode=fast_mode(backend))


def custom_op_gini_kl(a, labels, num_classes, target, delta, backend):
    """gini_kl as torch.compile runs it: the statistics custom op, then the finish custom op."""
    kd = torch.ops.kdfast
    class_sums, counts = kd.gini_kl_statistics.default(a, labels, num_classes, backend)
    gini, kl = kd.gini_kl_from_statistics.default(class_sums, counts, target, delta, backend)
    return gini.to(a.dtype), kl.to(a.dtype)


@pytest.mark.parametrize("dtype", dtype_params(torch.float64, torch.float32))
@pytest.mark.parametrize(("device", "backend"), CASES)
def test_custom_op_autograd_matches_reference(device, backend, dtype):
    """Eager calls may take a faster path than the custom ops; torch.compile always calls the ops, so their
    autograd formulas (backward custom ops) are checked directly, with gradients of both outputs and of each alone."""
    op = custom_op_gini_kl
    labels = torch.tensor([0, 3, 3, 1, 0, 3, 5, 1], device=device)  # classes 2 and 4 absent
    for spatial in (None, (3, 3)):
        for target in TARGETS:
            a = activations(8, 21, spatial, dtype, device)
            a64 = leaf(a.double())
            outs = op(a, labels, 6, target, 1e-10, backend)
            refs = reference.gini_kl(a64, labels, 6, target, 1e-10)
            what = f"{spatial} {target} {dtype}"
            assert_close(outs[0], refs[0], dtype, f"{what} gini")
            assert_close(outs[1], refs[1], dtype, f"{what} kl")
            grad_out = (rand(dtype=dtype, device=device), rand(dtype=dtype, device=device))
            for used in ((0,), (1,), (0, 1)):
                (got,) = torch.autograd.grad([outs[i] for i in used], a, [grad_out[i] for i in used], retain_graph=True)
                (want,) = torch.autograd.grad([refs[i] for i in used], a64, [grad_out[i].double() for i in used], retain_graph=True)
                assert_close(got, want, dtype, f"{what} outputs {used}: grad")


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_custom_op_gradcheck(device, backend):
    """The custom ops' autograd formulas (see test_custom_op_autograd_matches_reference) in float64 gradcheck."""
    op = custom_op_gini_kl
    a = leaf(rand(4, 3, 2, 2, dtype=torch.float64, device=device))
    y = torch.tensor([0, 2, 2, 1], device=device)
    for target in TARGETS:
        assert torch.autograd.gradcheck(lambda a, target=target: op(a, y, 4, target, 1e-10, backend), (a,), fast_mode=fast_mode(backend))


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_opcheck(device, backend):
    kd = torch.ops.kdfast
    labels = torch.tensor([0, 2, 2, 1], device=device)  # class 3 absent
    for shape in ((4, 5, 2, 3), (4, 5)):
        a = leaf(rand(*shape, device=device))
        torch.library.opcheck(kd.gini_kl_statistics.default, (a, labels, 4, backend))
        class_sums, counts = kd.gini_kl_statistics.default(a.detach(), labels, 4, backend)
        # Backward ops are checked on plain tensors: double backward is not supported.
        torch.library.opcheck(kd.gini_kl_statistics_backward.default, (rand(4, 5, device=device), a.detach(), labels, backend))
        for target in TARGETS:
            torch.library.opcheck(kd.gini_kl_from_statistics.default, (class_sums.requires_grad_(), counts, target, 1e-10, backend))
            args = (rand(device=device), rand(device=device), class_sums.detach(), counts, target, 1e-10, backend)
            torch.library.opcheck(kd.gini_kl_from_statistics_backward.default, args)
    channels_last = leaf(rand(4, 5, 2, 3, device=device).contiguous(memory_format=torch.channels_last))
    torch.library.opcheck(kd.gini_kl_statistics.default, (channels_last, labels, 4, backend))
    torch.library.opcheck(kd.gini_kl_statistics_backward.default, (rand(4, 5, device=device), channels_last.detach(), labels, backend))


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
    s = lambda *shape, **kw: rand(*shape, **kw)
    y = lambda *values, **kw: torch.tensor(values, **kw)
    good_labels = lambda: y(0, 1, 2, 1)
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


# ------------------------------------------------------------------------------ the two stages (for DDP)

gini_kl_statistics = gini_kl_module.gini_kl_statistics
gini_kl_from_statistics = gini_kl_module.gini_kl_from_statistics


@pytest.mark.parametrize("dtype", dtype_params(torch.float32, torch.float64))
@pytest.mark.parametrize(("device", "backend"), CASES)
def test_statistics_match_reference(device, backend, dtype):
    labels = torch.tensor([4, 0, 4, 2, 0, 4, 1], device=device)  # classes 3 and 5 absent
    for shape in ((7, 70, 9, 9), (7, 19), (7, 5, 1, 3)):
        a = activations(*shape[:2], shape[2:] or None, dtype, device)
        class_sums, counts = gini_kl_statistics(a, labels, 6, backend=backend)
        ref_sums, ref_counts = reference.gini_kl_statistics(a.detach().double(), labels, 6)
        # float64 for every dtype, to float64 accuracy (float32 inputs are exact in it): the KL gradient is
        # ill-conditioned in the sums
        assert class_sums.dtype == torch.float64 and class_sums.shape == (6, shape[1]) and class_sums.is_contiguous()
        assert counts.dtype == torch.int64 and torch.equal(counts, ref_counts)
        assert_close(class_sums, ref_sums, torch.float64, f"{shape} {dtype} class sums")
        assert (class_sums[[3, 5]] == 0).all()  # absent classes: exactly 0
        grad = rand(6, shape[1], dtype=torch.float64, device=device)
        (got,) = torch.autograd.grad(class_sums, a, grad)
        assert got.dtype == dtype
        a64 = leaf(a.double())
        (want,) = torch.autograd.grad(reference.gini_kl_statistics(a64, labels, 6)[0], a64, grad)
        assert_close(got, want, dtype, f"{shape} {dtype} grad of class sums")


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize(("device", "backend"), CASES)
def test_statistics_of_split_batches_add_up(device, backend, target):
    """The premise of the DDP option: the statistics of two halves of a batch sum to those of the whole, and the
    finish on the sums is gini_kl of the whole batch, gradients included."""
    a, labels = activations(9, 21, (3, 3), torch.float64, device), torch.tensor([0, 3, 3, 1, 0, 3, 2, 1, 3], device=device)
    whole = ops.gini_kl(a, labels, 5, target, backend=backend)
    parts = [gini_kl_statistics(a[i:j], labels[i:j], 5, backend=backend) for i, j in ((0, 4), (4, 9))]
    class_sums, counts = parts[0][0] + parts[1][0], parts[0][1] + parts[1][1]
    split = gini_kl_from_statistics(class_sums, counts, target, backend=backend)
    for w, s in zip(whole, split):
        torch.testing.assert_close(s, w, rtol=1e-12, atol=1e-14)
    grad_out = (rand(dtype=torch.float64, device=device), rand(dtype=torch.float64, device=device))
    (got,) = torch.autograd.grad(split, a, grad_out)
    (want,) = torch.autograd.grad(whole, a, grad_out)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("dtype", dtype_params(torch.float32, torch.float64))
@pytest.mark.parametrize(("device", "backend"), CASES)
def test_from_statistics_matches_reference(device, backend, dtype):
    C, F = 7, 40
    counts = torch.tensor([3, 0, 1, 5, 0, 2, 1], device=device)
    class_sums = leaf(rand(C, F, dtype=dtype, device=device).abs() * counts[:, None].to(dtype))
    for target in TARGETS:
        out = gini_kl_from_statistics(class_sums, counts, target, backend=backend)
        ref = reference.gini_kl_from_statistics(class_sums.detach().double(), counts, target)
        assert all(o.dtype == dtype and o.shape == () for o in out)
        assert_close(out[0], ref[0], dtype, f"{dtype} {target} gini")
        assert_close(out[1], ref[1], dtype, f"{dtype} {target} kl")
        grad_out = (rand(dtype=dtype, device=device), rand(dtype=dtype, device=device))
        (got,) = torch.autograd.grad(out, class_sums, grad_out)
        want = reference.gini_kl_from_statistics_backward(*[g.double() for g in grad_out], class_sums.detach().double(), counts, target)
        assert_close(got, want, dtype, f"{dtype} {target} grad of class sums")
        assert (got[[1, 4]] == 0).all()  # absent classes: documented as 0
        ignored = class_sums.detach().clone()
        ignored[[1, 4]] = 5.0  # rows of absent classes are ignored
        torch.testing.assert_close(gini_kl_from_statistics(ignored, counts, target, backend=backend), out, rtol=0, atol=0)


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_stage_gradcheck(device, backend):
    labels = torch.tensor([0, 2, 2, 1], device=device)
    for shape in ((4, 3, 2, 2), (4, 3)):
        a = leaf(rand(*shape, dtype=torch.float64, device=device))
        assert torch.autograd.gradcheck(lambda a: gini_kl_statistics(a, labels, 3, backend=backend)[0], (a,), fast_mode=fast_mode(backend))
    counts = torch.tensor([2, 1, 3], device=device)  # every class present: the gradient is smooth there
    class_sums = leaf(rand(3, 4, dtype=torch.float64, device=device).abs() + 0.5)
    for target in TARGETS:
        fn = lambda s, t=target: gini_kl_from_statistics(s, counts, t, backend=backend)
        assert torch.autograd.gradcheck(fn, (class_sums,), fast_mode=fast_mode(backend))


def _bad_stage_inputs():
    s = lambda *shape, **kw: rand(*shape, **kw).abs()
    counts = lambda: torch.tensor([1, 2, 0])
    return [
        ("class_sums rank", lambda: (s(3), counts()), {}, ValueError, r"class_sums must have 2 dimensions \(C, F\)"),
        ("class_sums bf16", lambda: (s(3, 4, dtype=torch.bfloat16), counts()), {}, TypeError, r"class_sums must be a float32 or float64"),
        ("class_sums F = 0", lambda: (s(3, 0), counts()), {}, ValueError, r"class_sums must have no zero-sized dimension"),
        ("float counts", lambda: (s(3, 4), counts().float()), {}, TypeError, r"counts must be an integer tensor"),
        ("counts rank", lambda: (s(3, 4), counts()[None]), {}, ValueError, r"counts must have 1 dimensions"),
        ("C mismatch", lambda: (s(3, 4), torch.tensor([1, 2])), {}, ValueError, r"number of classes C must match"),
        ("negative count", lambda: (s(3, 4), torch.tensor([1, -2, 3])), {}, ValueError, r"counts must be non-negative"),
        ("no samples", lambda: (s(3, 4), torch.zeros(3, dtype=torch.long)), {}, ValueError, r"at least one sample"),
        ("mixed devices", lambda: (s(3, 4), counts().to("meta")), {}, ValueError, r"one device"),
        ("target", lambda: (s(3, 4), counts()), {"target": "none"}, ValueError, r"target must be one of"),
        ("delta", lambda: (s(3, 4), counts()), {"delta": 0.0}, ValueError, r"delta must be a finite positive"),
    ]


@pytest.mark.parametrize(("make", "kwargs", "error", "message"), [c[1:] for c in _bad_stage_inputs()], ids=[c[0] for c in _bad_stage_inputs()])
def test_bad_statistics_get_a_clear_error(make, kwargs, error, message):
    class_sums, counts = make()
    with pytest.raises(error, match=message):
        gini_kl_from_statistics(class_sums, counts, **kwargs)


def test_statistics_check_their_inputs_like_gini_kl():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, num_classes=3\)"):
        gini_kl_statistics(rand(4, 5), torch.tensor([0, 1, 3, 1]), 3)
    with pytest.raises(TypeError, match=r"labels must be an integer tensor"):
        gini_kl_statistics(rand(4, 5), torch.tensor([0.0, 1.0, 2.0, 1.0]), 3)
    with pytest.raises(ValueError, match=r"batch size B must match"):
        gini_kl_statistics(rand(4, 5), torch.tensor([0, 1, 2]), 3)
    with pytest.raises(ValueError, match=r"num_classes must be an integer >= 1"):
        gini_kl_statistics(rand(4, 5), torch.tensor([0, 0, 0, 0]), 0)


@pytest.mark.parametrize(("device", "backend"), [c for c in CASES if c.values[1] == "cpp"])
def test_cpp_kernels_check_labels_themselves(device, backend):
    """The compiled kernels do not trust the caller: an out-of-range label is an error, not a wild read."""
    with pytest.raises(RuntimeError, match=r"out of range \[0, num_classes=3\)"):
        torch.ops.kdfast._gini_kl_statistics(rand(4, 5), torch.tensor([0, 1, 7, 1]), 3)
    with pytest.raises(RuntimeError, match=r"out of range"):
        torch.ops.kdfast._gini_kl_statistics_backward(rand(3, 5), rand(4, 5), torch.tensor([0, -1, 2, 1]))


@pytest.mark.parametrize(("device", "backend"), [c for c in CASES if c.values[1] == "triton"])
def test_triton_kernels_ignore_labels_out_of_range(device, backend):
    """Under torch.compile no host check runs: the Triton kernels then skip such samples, never read out of bounds."""
    from kdfast.kernels import gini_kl as kernels

    a, labels = rand(5, 7, 2, 2, device=device), torch.tensor([0, 7, 2, -1, 2], device=device)
    class_sums, counts = kernels.gini_kl_statistics_forward(a, labels, 3)
    assert counts.tolist() == [1, 0, 2] and torch.isfinite(class_sums).all() and (class_sums[1] == 0).all()
    grad = kernels.gini_kl_statistics_backward(torch.ones(3, 7, device=device), a, labels)
    assert (grad[[1, 3]] == 0).all() and (grad[[0, 2, 4]] != 0).all()


# ------------------------------------------------------------------------------------------- gini_impurity


@pytest.mark.parametrize("dtype", dtype_params(torch.float32, torch.float64, torch.bfloat16))
def test_gini_impurity_matches_reference(dtype):
    for shape, dim in [((5,), 0), ((3, 7), -1), ((3, 7), 0), ((2, 3, 4), 1)]:
        p = leaf(torch.softmax(rand(*shape), dim).to(dtype))
        out = gini_kl_module.gini_impurity(p, dim)
        ref = reference.gini_impurity(p.detach().double(), dim)
        assert out.dtype == dtype and out.shape == ref.shape
        assert_close(out, ref, dtype, f"{shape} dim {dim} {dtype}")
        grad = rand(*ref.shape)
        (got,) = torch.autograd.grad(out, p, grad.to(dtype))
        want = -2.0 * p.detach().double() * grad.double().unsqueeze(dim)
        assert_close(got, want, dtype, f"{shape} dim {dim} {dtype} gradient")


def test_gini_impurity_known_values_and_gradcheck():
    one_hot = torch.eye(4)
    torch.testing.assert_close(gini_kl_module.gini_impurity(one_hot), torch.zeros(4))
    torch.testing.assert_close(gini_kl_module.gini_impurity(torch.full((4,), 0.25)), torch.tensor(0.75))
    p = leaf(torch.softmax(rand(3, 5, dtype=torch.float64), -1))
    assert torch.autograd.gradcheck(lambda p: gini_kl_module.gini_impurity(p, 1), (p,))


def test_gini_impurity_bad_input():
    gini_impurity = gini_kl_module.gini_impurity
    with pytest.raises(TypeError, match=r"p must be a torch.Tensor"):
        gini_impurity([0.5, 0.5])
    with pytest.raises(TypeError, match=r"p must be a float16, bfloat16, float32 or float64"):
        gini_impurity(torch.tensor([1, 0]))
    with pytest.raises(ValueError, match=r"at least one dimension"):
        gini_impurity(torch.tensor(0.5))
    with pytest.raises(ValueError, match=r"dim must be an integer in \[-2, 2\)"):
        gini_impurity(torch.ones(2, 3), dim=2)


# --------------------------------------------------------------------------------------------- GiniKLLoss


def test_module_is_the_weighted_sum_and_exposes_the_terms():
    a, labels = activations(8, 12, (3, 3)), torch.tensor([0, 1, 1, 2, 2, 2, 4, 0])
    criterion = GiniKLLoss(5, lambda_gini=0.3, lambda_kl=0.7, target="uniform")
    loss = criterion(a, labels)
    gini, kl = ops.gini_kl(a, labels, 5, "uniform")
    torch.testing.assert_close(loss, 0.3 * gini + 0.7 * kl)
    torch.testing.assert_close((criterion.gini, criterion.kl), (gini.detach(), kl.detach()))
    assert not criterion.gini.requires_grad and loss.requires_grad
    (got,) = torch.autograd.grad(loss, a)
    (want,) = torch.autograd.grad(0.3 * gini + 0.7 * kl, a)
    torch.testing.assert_close(got, want)
    assert "num_classes=5" in repr(criterion)


def test_module_warmup_counts_training_steps_and_survives_state_dict():
    a, labels = activations(6, 10, None), torch.tensor([0, 1, 1, 2, 2, 0])
    criterion = GiniKLLoss(3, warmup_steps=2)
    for step in range(2):
        loss = criterion(a, labels)
        assert loss.item() == 0.0 and criterion.gini.item() > 0  # switched off, terms still reported
        (grad,) = torch.autograd.grad(loss, a)
        assert (grad == 0).all()
    state = criterion.state_dict()
    assert state["steps"].item() == 2
    resumed = GiniKLLoss(3, warmup_steps=2)
    resumed.load_state_dict(state)
    assert resumed(a, labels).item() > 0 and resumed.steps.item() == 3
    criterion.eval()  # evaluation neither counts nor switches off
    fresh = GiniKLLoss(3, warmup_steps=2).eval()
    assert fresh(a, labels).item() > 0 and fresh.steps.item() == 0


def test_module_bad_arguments():
    with pytest.raises(ValueError, match=r"num_classes must be an integer >= 1"):
        GiniKLLoss(0)
    with pytest.raises(ValueError, match=r"warmup_steps must be an integer >= 0"):
        GiniKLLoss(3, warmup_steps=-1)
    with pytest.raises(ValueError, match=r"target must be one of"):
        GiniKLLoss(3, target="labels")
    with pytest.raises(ValueError, match=r"lambda_kl must be a finite"):
        GiniKLLoss(3, lambda_kl=float("nan"))


class _SmallConvNet(torch.nn.Module):
    def __init__(self, classes: int):
        super().__init__()
        self.block1 = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU())
        self.block2 = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1, stride=2), torch.nn.ReLU())
        self.head = torch.nn.Linear(16, classes)

    def forward(self, x):
        return self.head(self.block2(self.block1(x)).mean((2, 3)))


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_module_on_a_forward_hook(device, backend):
    """The docstring's recipe: the loss on an intermediate layer's output, caught by a forward hook."""
    net = _SmallConvNet(4).to(device)
    features = {}
    net.block1.register_forward_hook(lambda module, args, output: features.update(block1=output))
    criterion = GiniKLLoss(4, backend=backend)
    images, labels = rand(6, 3, 5, 5, device=device), torch.tensor([0, 1, 1, 3, 3, 3], device=device)
    net(images)
    loss = criterion(features["block1"], labels)
    wrt = list(net.block1.parameters())
    got = torch.autograd.grad(loss, wrt)
    # the same by hand, through the reference in float64
    net64 = _SmallConvNet(4).to(device).double()
    net64.load_state_dict(net.state_dict())
    gini, kl = reference.gini_kl(net64.block1(images.double()), labels, 4)
    want = torch.autograd.grad(0.5 * gini + 0.5 * kl, list(net64.block1.parameters()))
    assert_close(loss, 0.5 * gini + 0.5 * kl, torch.float32, "loss")
    for g, w in zip(got, want):
        assert_close(g, w, torch.float32, "gradient of block1's parameters")


class _CompiledLoss(torch.nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.net = _SmallConvNet(5)
        self.criterion = GiniKLLoss(5, warmup_steps=1, backend=backend)

    def forward(self, images, labels):
        features = self.net.block2(self.net.block1(images))
        logits = self.net.head(features.mean((2, 3)))
        return torch.nn.functional.cross_entropy(logits, labels) + self.criterion(features, labels)


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_module_compiles_fullgraph(device, backend):
    """GiniKLLoss (warm-up counter included) under torch.compile(fullgraph=True), on every backend."""
    module = _CompiledLoss(backend).to(device)
    images, labels = rand(6, 3, 6, 6, device=device), torch.tensor([0, 1, 1, 4, 4, 4], device=device)
    compiled = torch.compile(module, fullgraph=True)
    torch._dynamo.reset()
    reference_module = _CompiledLoss("reference").to(device)
    reference_module.load_state_dict(module.state_dict())
    for step in range(2):  # warm-up step, then the loss switched on
        got = compiled(images, labels)
        want = reference_module(images, labels)
        torch.testing.assert_close(got, want)
        params, ref_params = list(module.parameters()), list(reference_module.parameters())
        for g, w in zip(torch.autograd.grad(got, params), torch.autograd.grad(want, ref_params)):
            torch.testing.assert_close(g, w)
    assert module.criterion.steps.item() == 2
