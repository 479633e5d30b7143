"""slot_contrastive_loss (SlotContrast's InfoNCE between consecutive frames) on every backend against the reference."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from harness import (
    TOLERANCE,
    assert_close,
    dtype_cases,
    dtype_params,
    grads_of,
    implemented_cases,
    leaf,
    rand,
    relative_error,
)

from kdfast import ops, reference

contrastive = importlib.import_module("kdfast.ops.slot_contrastive_loss")
CASES = implemented_cases("slot_contrastive_loss")
DTYPE_CASES = dtype_cases(CASES)  # (device, backend, dtype): each case in every dtype it is tested in
# (B, T, K, D): singletons, D not a power of two, S = B*K not a multiple of 16 (10, 21, 17, 33), S over one
# 16-block and over two (22, 36, 33), D over one Triton chunk.
SHAPES = [(1, 2, 1, 1), (2, 3, 5, 7), (3, 4, 7, 48), (2, 2, 11, 96), (1, 5, 17, 33), (3, 2, 11, 300)]
REDUCTIONS = ("mean", "sum", "none")


def none_shape(B, T, K, batch_contrast):
    return (T - 1, B * K) if batch_contrast else (T - 1, B, K)


# ---------------------------------------------------------------------------------------------------- values


@pytest.mark.parametrize("batch_contrast", [True, False], ids=["batch", "per-element"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(("device", "backend", "dtype"), DTYPE_CASES)
def test_loss_matches_reference(device, backend, dtype, reduction, batch_contrast):
    for B, T, K, D in SHAPES:
        for temperature in (0.05, 1.0):
            slots = leaf(rand(B, T, K, D, dtype=dtype, device=device))
            slots64 = leaf(slots.double())
            out = ops.slot_contrastive_loss(slots, temperature, batch_contrast, reduction, backend=backend)
            ref = reference.slot_contrastive_loss(slots64, temperature, batch_contrast, reduction)
            what = f"{dtype} {(B, T, K, D)} tau={temperature}"
            assert out.dtype == dtype, what
            assert out.shape == (() if reduction != "none" else none_shape(B, T, K, batch_contrast)), what
            assert_close(out, ref, dtype, f"{what} loss")
            grad_out = rand(*ref.shape, dtype=dtype, device=device)
            (got,), (want,) = grads_of(out, (slots,), grad_out), grads_of(ref, (slots64,), grad_out)
            assert got.dtype == dtype
            assert_close(got, want, dtype, f"{what} grad of slots")


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_known_values(device, backend):
    """Identical slots everywhere: every logit equal, loss log S. Orthonormal slots repeated: closed form."""
    B, T, K, D = 2, 3, 5, 16
    same = rand(D, dtype=torch.float64, device=device).expand(B, T, K, D)
    assert ops.slot_contrastive_loss(same, backend=backend).item() == pytest.approx(math.log(B * K), rel=1e-12)
    assert ops.slot_contrastive_loss(same, batch_contrast=False, backend=backend).item() == pytest.approx(math.log(K), rel=1e-12)
    basis = torch.linalg.qr(rand(D, D, dtype=torch.float64, device=device))[0][: B * K]  # (S, D) orthonormal rows
    slots = (basis * rand(B * K, 1, dtype=torch.float64, device=device).abs()).reshape(B, 1, K, D).expand(B, T, K, D)
    for tau in (0.05, 1.0):
        want = math.log(math.exp(1 / tau) + B * K - 1) - 1 / tau
        assert ops.slot_contrastive_loss(slots, tau, backend=backend).item() == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("batch_contrast", [True, False], ids=["batch", "per-element"])
@pytest.mark.parametrize(("device", "backend"), CASES)
def test_single_frame_has_no_pairs(device, backend, batch_contrast, reduction):
    """T == 1: loss 0 ("mean", "sum") or an empty tensor ("none"), and a zero gradient, never NaN."""
    slots = leaf(rand(3, 1, 4, 8, device=device))
    out = ops.slot_contrastive_loss(slots, 0.1, batch_contrast, reduction, backend=backend)
    if reduction == "none":
        assert out.shape == none_shape(3, 1, 4, batch_contrast)
    else:
        assert out.shape == () and out.item() == 0.0
    (grad,) = torch.autograd.grad(out, slots, torch.ones_like(out))
    assert torch.equal(grad, torch.zeros_like(slots))


@pytest.mark.parametrize("dtype", dtype_params(torch.float64, torch.float32))
@pytest.mark.parametrize(("device", "backend"), CASES)
def test_identical_slots_across_frames_are_finite(device, backend, dtype):
    """A static scene: every frame has the same slots (positives at cosine 1), at the smallest temperature.
    The loss is ~exp(-1/tau) ~ 1e-5 there, the difference of two values ~1/tau = 20 in the paper's form: every
    backend must compute it (and the positive's gradient, p[j, j] - 1) without that cancellation."""
    frame = rand(2, 1, 7, 24, device=device)
    slots = leaf(frame.expand(2, 4, 7, 24).to(dtype).contiguous())
    slots64 = leaf(slots.double())
    for batch_contrast in (True, False):
        for temperature in (0.05, 1.0):
            # mean: the fused forward-backward on cpp; none: the forward's statistics, then the backward
            for reduction in ("mean", "none"):
                what = f"{dtype} tau={temperature} batch_contrast={batch_contrast} {reduction}"
                out = ops.slot_contrastive_loss(slots, temperature, batch_contrast, reduction, backend=backend)
                ref = reference.slot_contrastive_loss(slots64, temperature, batch_contrast, reduction)
                assert torch.isfinite(out).all(), what
                assert_close(out, ref, dtype, f"{what} loss")
                grad_out = rand(*ref.shape, dtype=dtype, device=device).abs()
                (got,), (want,) = grads_of(out, (slots,), grad_out), grads_of(ref, (slots64,), grad_out)
                assert torch.isfinite(got).all(), what
                assert_close(got, want, dtype, f"{what} grad")


# float32 only at temperatures where the loss is a normal float32 (see the docstring)
@pytest.mark.parametrize(
    ("dtype", "temperatures"), dtype_params(torch.float64, torch.float32, temperatures=((0.01, 0.05, 0.2), (0.05, 0.2)))
)
@pytest.mark.parametrize(("device", "backend"), CASES)
def test_dominant_positive_loss_is_exp_of_the_log_odds(device, backend, dtype, temperatures):
    """Orthonormal slots repeated across frames: l[j, j] = 1/tau, every other logit 0, so
    loss = log(1 + (S - 1) exp(-1/tau)) in closed form: ~3e-43 for S = 10 at tau = 0.01, which the paper's
    form (logsumexp - diagonal) rounds to 0 even in float64 (float32 only at temperatures where the loss is a
    normal float32)."""
    B, T, K, D = 2, 3, 5, 16
    basis = torch.linalg.qr(rand(D, D, dtype=torch.float64, device=device))[0][: B * K]  # (S, D) orthonormal rows
    slots = (basis * rand(B * K, 1, dtype=torch.float64, device=device).abs()).reshape(B, 1, K, D).expand(B, T, K, D)
    for tau in temperatures:
        for batch_contrast in (True, False):
            S = B * K if batch_contrast else K
            want = math.log1p((S - 1) * math.exp(-1 / tau))
            out = ops.slot_contrastive_loss(slots.to(dtype), tau, batch_contrast, "none", backend=backend)
            assert torch.isfinite(out).all() and (out > 0).all()
            assert_close(out, torch.full(out.shape, want, dtype=torch.float64), dtype, f"{dtype} tau={tau}")


@pytest.mark.parametrize("dtype", dtype_params(torch.float64, torch.float32))
@pytest.mark.parametrize("batch_contrast", [True, False], ids=["batch", "per-element"])
@pytest.mark.parametrize(("device", "backend"), CASES)
def test_single_slot_has_no_negatives(device, backend, batch_contrast, dtype):
    """S == 1 (one slot, no other batch element to contrast with): the softmax has one class, loss 0 and a zero
    gradient, without NaN (the log-sum-exp over no negatives is -inf)."""
    slots = leaf(rand(1, 4, 1, 9, dtype=dtype, device=device))
    for reduction in REDUCTIONS:
        out = ops.slot_contrastive_loss(slots, 0.05, batch_contrast, reduction, backend=backend)
        assert torch.equal(out, torch.zeros_like(out)), reduction
        (grad,) = grads_of(out, (slots,), rand(*out.shape, dtype=dtype, device=device))
        assert torch.equal(grad, torch.zeros_like(grad)), reduction


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_identical_slots_loss_is_log_s_minus_the_diagonal_advantage(device, backend):
    """A static scene: l[i, j] = <z^i, z^j> / tau for every pair of frames, from one frame's Gram matrix, so
    loss[j] = log S - (l[j, j] - log(mean_i exp l[i, j])): log S less the positive's advantage over the mean."""
    B, T, K, D = 2, 3, 6, 20
    frame = rand(B, 1, K, D, dtype=torch.float64, device=device)
    slots = leaf(frame.expand(B, T, K, D))
    for batch_contrast in (True, False):
        for temperature in (0.05, 1.0):
            z = torch.nn.functional.normalize(frame[:, 0], dim=-1)  # (B, K, D)
            z = z.reshape(1, B * K, D) if batch_contrast else z
            logits = z @ z.transpose(1, 2) / temperature  # (groups, S, S), symmetric
            S = logits.shape[-1]
            advantage = torch.diagonal(logits, dim1=1, dim2=2) - (torch.logsumexp(logits, dim=1) - math.log(S))
            want = (math.log(S) - advantage).reshape(-1).repeat(T - 1)  # every pair of frames alike
            out = ops.slot_contrastive_loss(slots, temperature, batch_contrast, "none", backend=backend)
            assert torch.isfinite(out).all()
            torch.testing.assert_close(out.reshape(-1), want, rtol=1e-9, atol=1e-12)
            (grad,) = torch.autograd.grad(out.sum(), slots)
            assert torch.isfinite(grad).all()


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_large_groups_and_dimensions(device, backend):
    """S = 64*24 pooled slots (SlotContrast's batch 64 with 24 slots) and D = 256, against the reference.
    The Triton interpreter runs a smaller S with the same D."""
    interpreted = device == "cpu" and backend == "triton"
    B, T, K, D = (4, 2, 20, 256) if interpreted else (64, 3, 24, 256)
    slots = leaf(rand(B, T, K, D, device=device))
    slots64 = leaf(slots.double())
    for batch_contrast in (True, False):
        out = ops.slot_contrastive_loss(slots, 0.1, batch_contrast, "none", backend=backend)
        ref = reference.slot_contrastive_loss(slots64, 0.1, batch_contrast, "none")
        assert_close(out, ref, torch.float32, f"batch_contrast={batch_contrast} loss")
        grad_out = rand(*ref.shape, device=device)
        got, want = grads_of(out, (slots,), grad_out)[0], grads_of(ref, (slots64,), grad_out)[0]
        assert_close(got, want, torch.float32, f"batch_contrast={batch_contrast} grad")


@pytest.mark.parametrize(("device", "backend"), [c for c in CASES if c.values[1] == "triton"])
def test_triton_tiles_cover_every_slot(device, backend, monkeypatch):
    """Force 16-slot tiles: several programs per pair, several tiles in each online log-sum-exp loop, partial
    last tiles (S = 39 pooled, 13 per element), as a GPU runs the presets."""
    kernels = importlib.import_module("kdfast.kernels.slot_contrastive_loss")
    monkeypatch.setattr(kernels, "_blocks", lambda S, D, programs, dtype, device: (16, 16, 32, 4, 1))
    slots = leaf(rand(3, 3, 13, 20, dtype=torch.float64, device=device))
    for batch_contrast in (True, False):
        for temperature in (0.05, 1.0):
            out = ops.slot_contrastive_loss(slots, temperature, batch_contrast, "none", backend=backend)
            ref = reference.slot_contrastive_loss(slots, temperature, batch_contrast, "none")
            assert_close(out, ref, torch.float64, "loss")
            grad_out = rand(*ref.shape, dtype=torch.float64, device=device)
            assert_close(grads_of(out, (slots,), grad_out)[0], grads_of(ref, (slots,), grad_out)[0], torch.float64, "grad")


@pytest.mark.parametrize("dtype", dtype_params(torch.float32, torch.bfloat16, torch.float64))
def test_triton_launch_settings(dtype):
    """The GPU tiles: powers of two, at least 16 (tl.dot), D in one tile, registers bounded."""
    kernels = importlib.import_module("kdfast.kernels.slot_contrastive_loss")
    cuda = torch.device("cuda")
    for S in (1, 17, 64 * 7, 64 * 11, 64 * 15, 64 * 24):
        for D in (1, 64, 100, 128, 256, kernels.MAX_DIM):
            for programs in (1, 3, 192):
                own, loop, block_d, num_warps, _ = kernels._blocks(S, D, programs, dtype, cuda)
                for block in (own, loop, block_d):
                    assert block >= 16 and block & (block - 1) == 0
                assert block_d >= D and block_d * max(own, loop) <= 16384 and num_warps in (4, 8)


@pytest.mark.parametrize(("device", "backend"), [c for c in CASES if c.values[1] == "triton"])
def test_triton_dimension_limit_names_the_fallback(device, backend):
    kernels = importlib.import_module("kdfast.kernels.slot_contrastive_loss")
    slots = rand(1, 2, 2, kernels.MAX_DIM + 1, device=device)
    with pytest.raises(ValueError, match=r"at most \d+ features.*backend="):
        ops.slot_contrastive_loss(slots, backend="triton")


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_module_matches_the_function(device, backend):
    from kdfast.nn.slot_contrastive_loss import SlotContrastLoss

    slots = leaf(rand(2, 3, 5, 12, device=device))
    for batch_contrast in (True, False):
        module = SlotContrastLoss(0.2, batch_contrast, "none", backend=backend)
        assert "temperature=0.2" in repr(module)
        out = module(slots)
        torch.testing.assert_close(out, ops.slot_contrastive_loss(slots, 0.2, batch_contrast, "none", backend=backend))
        assert out.shape == none_shape(2, 3, 5, batch_contrast)
    assert SlotContrastLoss(backend=backend)(slots[:, :1]).item() == 0.0


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_zero_norm_slots_give_no_nan(device, backend):
    slots = rand(2, 3, 5, 16, device=device)
    slots[0, 1, 2] = 0.0
    slots[1, :, 4] = 0.0  # a slot that is empty in every frame
    slots = leaf(slots)
    for batch_contrast in (True, False):
        for reduction in REDUCTIONS:
            out = ops.slot_contrastive_loss(slots, 0.1, batch_contrast, reduction, backend=backend)
            ref = reference.slot_contrastive_loss(slots.double(), 0.1, batch_contrast, reduction)
            assert torch.isfinite(out).all()
            assert_close(out, ref, torch.float32, f"{reduction} loss")
            grad_out = rand(*out.shape, device=device)
            (got,), (want,) = grads_of(out, (slots,), grad_out), grads_of(ref, (slots,), grad_out)
            assert torch.isfinite(got).all()
            assert_close(got, want, torch.float32, f"{reduction} grad")


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_non_contiguous_and_expanded_inputs(device, backend):
    B, T, K, D = 3, 4, 6, 40
    slots = leaf(rand(T, B, D, K, device=device)).permute(1, 0, 3, 2)  # (B, T, K, D), no unit stride on D
    assert not slots.is_contiguous()
    for reduction in REDUCTIONS:
        out = ops.slot_contrastive_loss(slots, 0.1, True, reduction, backend=backend)
        ref = reference.slot_contrastive_loss(slots.double(), 0.1, True, reduction)
        assert_close(out, ref, torch.float32, f"{reduction} loss")
        grad_out = rand(*out.shape, device=device)
        assert_close(grads_of(out, (slots,), grad_out)[0], grads_of(ref, (slots,), grad_out)[0], torch.float32, "grad")
    # the per-term gradient arriving non-contiguous
    out = ops.slot_contrastive_loss(slots, 0.1, False, "none", backend=backend)
    grad_out = rand(B, K, T - 1, device=device).permute(2, 0, 1)
    ref = reference.slot_contrastive_loss(slots.double(), 0.1, False, "none")
    assert_close(grads_of(out, (slots,), grad_out)[0], grads_of(ref, (slots,), grad_out)[0], torch.float32, "grad")
    expanded = leaf(rand(1, 1, K, D, device=device)).expand(B, T, K, D) + rand(B, T, 1, 1, device=device) * 0.1
    assert_close(
        ops.slot_contrastive_loss(expanded, backend=backend), reference.slot_contrastive_loss(expanded.double()), torch.float32
    )


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_nan_propagates(device, backend):
    slots = rand(2, 3, 4, 8, device=device)
    slots[1, 2, 0, 3] = float("nan")
    out = ops.slot_contrastive_loss(slots, 0.1, False, "none", backend=backend)
    ref = reference.slot_contrastive_loss(slots, 0.1, False, "none")
    assert out.isnan().any()
    assert relative_error(out, ref) <= TOLERANCE[torch.float32]
    assert ops.slot_contrastive_loss(slots, backend=backend).isnan()


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_results_are_deterministic(device, backend):
    slots = leaf(rand(4, 3, 11, 64, device=device))
    runs = []
    for _ in range(2):
        out = ops.slot_contrastive_loss(slots, backend=backend)
        runs.append((out, *torch.autograd.grad(out, slots)))
    assert all(torch.equal(x, y) for x, y in zip(*runs))


# ------------------------------------------------------------------------------------ gradcheck / opcheck


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_gradcheck(device, backend):
    slots = leaf(rand(2, 3, 3, 4, dtype=torch.float64, device=device))
    for batch_contrast in (True, False):
        for reduction, temperature in (("mean", 0.1), ("none", 0.5), ("sum", 1.0)):
            args = (temperature, batch_contrast, reduction)
            assert torch.autograd.gradcheck(lambda s, args=args: ops.slot_contrastive_loss(s, *args, backend=backend), (slots,))


@pytest.mark.parametrize("dtype", dtype_params(torch.float32, torch.float64))
@pytest.mark.parametrize(("device", "backend"), CASES)
def test_custom_op_autograd_matches_reference(device, backend, dtype):
    """Eager calls may take a faster path than the custom op; torch.compile always calls the op, so its autograd
    formula (a backward custom op) is checked directly."""
    op = torch.ops.kdfast.slot_contrastive_loss.default
    B, T, K, D = 3, 4, 7, 20
    slots = leaf(rand(B, T, K, D, dtype=dtype, device=device))
    slots64 = leaf(slots.double())
    for batch_contrast in (True, False):
        for reduction in REDUCTIONS:
            out = op(slots, 0.2, batch_contrast, reduction, backend)
            ref = reference.slot_contrastive_loss(slots64, 0.2, batch_contrast, reduction)
            what = f"{dtype} batch_contrast={batch_contrast} {reduction}"
            assert out.dtype == dtype
            assert_close(out, ref, dtype, f"{what} loss")
            grad_out = rand(*ref.shape, dtype=dtype, device=device)
            assert_close(grads_of(out, (slots,), grad_out)[0], grads_of(ref, (slots64,), grad_out)[0], dtype, f"{what} grad")


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_custom_op_gradcheck(device, backend):
    """The custom op's autograd formula (see test_custom_op_autograd_matches_reference) in float64 gradcheck."""
    op = torch.ops.kdfast.slot_contrastive_loss.default
    slots = leaf(rand(2, 3, 3, 4, dtype=torch.float64, device=device))
    for batch_contrast, reduction in ((True, "mean"), (False, "none")):
        assert torch.autograd.gradcheck(lambda s, a=(batch_contrast, reduction): op(s, 0.3, *a, backend), (slots,))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("batch_contrast", [True, False], ids=["batch", "per-element"])
@pytest.mark.parametrize(("device", "backend"), CASES)
def test_opcheck(device, backend, batch_contrast, reduction):
    kd = torch.ops.kdfast
    B, T, K, D = 2, 3, 4, 5
    slots = leaf(rand(B, T, K, D, device=device))
    torch.library.opcheck(kd.slot_contrastive_loss.default, (slots, 0.1, batch_contrast, reduction, backend))
    # Backward ops are checked on plain tensors: double backward is not supported.
    shape = none_shape(B, T, K, batch_contrast) if reduction == "none" else ()
    args = (rand(*shape, device=device), slots.detach(), 0.1, batch_contrast, reduction, backend)
    torch.library.opcheck(kd.slot_contrastive_loss_backward.default, args)


class _TemporalContrast(torch.nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, slots):
        return ops.slot_contrastive_loss(self.proj(slots), temperature=0.1)


def test_compile_fullgraph_matches_eager():
    module = _TemporalContrast(24)
    slots = leaf(rand(3, 4, 7, 24))
    compiled = torch.compile(module, fullgraph=True)
    eager = module(slots)
    got = compiled(slots)
    torch.testing.assert_close(got, eager)
    wrt = (slots, *module.parameters())
    for g, e in zip(torch.autograd.grad(got, wrt), torch.autograd.grad(eager, wrt)):
        torch.testing.assert_close(g, e)


def test_module_compiles_fullgraph():
    from kdfast.nn.slot_contrastive_loss import SlotContrastLoss

    proj = torch.nn.Linear(16, 16)
    criterion = SlotContrastLoss(temperature=0.1)
    slots = leaf(rand(3, 4, 5, 16))

    def step(x):
        return criterion(proj(x))

    compiled = torch.compile(step, fullgraph=True)
    eager, got = step(slots), compiled(slots)
    torch.testing.assert_close(got, eager)
    wrt = (slots, *proj.parameters())
    for g, e in zip(torch.autograd.grad(got, wrt), torch.autograd.grad(eager, wrt)):
        torch.testing.assert_close(g, e)


# --------------------------------------------------------------------------------------------- bad input

GOOD = (2, 3, 4, 8)


def _bad_inputs():
    s = lambda *shape, **kw: rand(*shape, **kw)
    return [
        ("rank 3", lambda: s(2, 3, 4), {}, ValueError, r"slots must have 4 dimensions \(B, T, K, D\)"),
        ("rank 5", lambda: s(*GOOD, 1), {}, ValueError, r"slots must have 4 dimensions"),
        ("integer slots", lambda: torch.ones(*GOOD, dtype=torch.int64), {}, TypeError, r"slots must be a float"),
        ("bool slots", lambda: torch.ones(*GOOD, dtype=torch.bool), {}, TypeError, r"slots must be a float"),
        ("not a tensor", lambda: [[[[1.0]]]], {}, TypeError, r"slots must be a torch.Tensor"),
        ("B = 0", lambda: s(0, 3, 4, 8), {}, ValueError, r"slots must have no zero-sized dimension"),
        ("T = 0", lambda: s(2, 0, 4, 8), {}, ValueError, r"slots must have no zero-sized dimension"),
        ("K = 0", lambda: s(2, 3, 0, 8), {}, ValueError, r"slots must have no zero-sized dimension"),
        ("D = 0", lambda: s(2, 3, 4, 0), {}, ValueError, r"slots must have no zero-sized dimension"),
        ("temperature nan", lambda: s(*GOOD), {"temperature": float("nan")}, ValueError, r"temperature must be a finite positive"),
        ("temperature inf", lambda: s(*GOOD), {"temperature": float("inf")}, ValueError, r"temperature must be a finite positive"),
        ("temperature 0", lambda: s(*GOOD), {"temperature": 0.0}, ValueError, r"temperature must be a finite positive"),
        ("temperature < 0", lambda: s(*GOOD), {"temperature": -0.1}, ValueError, r"temperature must be a finite positive"),
        ("temperature tensor", lambda: s(*GOOD), {"temperature": torch.tensor(0.1)}, TypeError, r"temperature must be a number"),
        ("reduction", lambda: s(*GOOD), {"reduction": "max"}, ValueError, r"reduction must be one of"),
        ("batch_contrast", lambda: s(*GOOD), {"batch_contrast": 1}, TypeError, r"batch_contrast must be a bool"),
        ("backend", lambda: s(*GOOD), {"backend": "fast"}, ValueError, r"backend must be one of"),
    ]


@pytest.mark.parametrize(("make", "kwargs", "error", "message"), [c[1:] for c in _bad_inputs()], ids=[c[0] for c in _bad_inputs()])
def test_bad_input_gets_a_clear_error(make, kwargs, error, message):
    with pytest.raises(error, match=message):
        ops.slot_contrastive_loss(make(), **kwargs)
