"""slot_cosine_similarity, slot_assignment and slot_match_loss on every backend against the float64 reference."""

from __future__ import annotations

import pytest
import torch
from harness import TOLERANCE, assert_close, dtype_cases, grads_of, implemented_cases, leaf, rand, relative_error

from kdfast import ops, reference
from kdfast.nn import SlotMatchLoss
from kdfast.ops import slot_match

CASES = implemented_cases("slot_match_loss")
DTYPE_CASES = dtype_cases(CASES)  # (device, backend, dtype): each case in every dtype it is tested in
# (B, K, M, D): singletons, D not a power of two, D over one Triton chunk, K and M not multiples of 16.
SHAPES = [(1, 1, 1, 1), (2, 3, 5, 7), (3, 11, 13, 48), (2, 15, 15, 96), (1, 7, 9, 300)]





# ---------------------------------------------------------------------------------------------------- values


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize(("device", "backend", "dtype"), DTYPE_CASES)
def test_cosine_similarity_matches_reference(device, backend, dtype, shape):
    B, K, M, D = shape
    a, b = leaf(rand(B, K, D, dtype=dtype, device=device)), leaf(rand(B, M, D, dtype=dtype, device=device))
    a64, b64 = leaf(a.double()), leaf(b.double())
    out = ops.slot_cosine_similarity(a, b, backend=backend)
    ref = reference.slot_cosine_similarity(a64, b64)
    assert out.dtype == dtype and out.shape == (B, K, M)
    assert_close(out, ref, dtype, f"{dtype} cosine")
    grad_out = rand(B, K, M, device=device)
    for name, got, want, x, axis in zip("ab", grads_of(out, (a, b), grad_out), grads_of(ref, (a64, b64), grad_out),
                                        (a, b), (2, 1)):
        if D > 1:
            assert_close(got, want, dtype, f"{dtype} grad of {name}")
            continue
        # At D = 1 all rows are parallel: the true gradient is exactly 0 (want holds float64 rounding only), and a
        # float backend returns the rounding of (b^ - cos a^) / |a| summed over the other side: a few roundings of
        # terms of size |g| / |x| each (plain autograd through x / ||x||, the reference backend, is not exact;
        # the kernels' unit-vector form is), so at most 8 u sum |g| / |x|, which the 1e-5 absolute test is not
        # when |x| is small (3e-5 at |b| = 0.009, seed 3839267311).
        unit = torch.finfo(dtype).eps / 2
        bound = 8 * unit * grad_out.abs().sum(axis).unsqueeze(-1) / x.detach().abs()
        assert (got.abs() <= bound).all(), f"{dtype} grad of {name}: {got.abs().max().item():.3g} above {unit:.3g} rounding"


@pytest.mark.parametrize("matching", ["index", "hungarian"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(("device", "backend", "dtype"), DTYPE_CASES)
def test_match_loss_matches_reference(device, backend, dtype, reduction, matching):
    for B, K, _, D in SHAPES:
        student, teacher = leaf(rand(B, K, D, dtype=dtype, device=device)), rand(B, K, D, dtype=dtype, device=device)
        student64 = leaf(student.double())
        out = ops.slot_match_loss(student, teacher, matching, reduction, backend=backend)
        ref = reference.slot_match_loss(student64, teacher.double(), matching, reduction)
        assert out.dtype == dtype
        assert_close(out, ref, dtype, f"{dtype} {(B, K, D)} {matching} loss")
        grad_out = rand(*ref.shape, device=device)
        (got,), (want,) = grads_of(out, (student,), grad_out), grads_of(ref, (student64,), grad_out)
        assert_close(got, want, dtype, f"{dtype} {(B, K, D)} {matching} grad of student")


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_rectangular_hungarian_matches_reference(device, backend):
    student, teacher = leaf(rand(3, 5, 24, device=device)), rand(3, 9, 24, device=device)
    student64 = leaf(student.double())
    out = ops.slot_match_loss(student, teacher, "hungarian", "none", backend=backend)
    ref = reference.slot_match_loss(student64, teacher.double(), "hungarian", "none")
    assert_close(out, ref, torch.float32)
    grad_out = rand(3, 5, device=device)
    assert_close(grads_of(out, (student,), grad_out)[0], grads_of(ref, (student64,), grad_out)[0], torch.float32)


def test_hungarian_never_loses_to_index_matching():
    student, teacher = rand(16, 7, 32), rand(16, 7, 32)
    index = ops.slot_match_loss(student, teacher, "index", "none").sum(1)
    hungarian = ops.slot_match_loss(student, teacher, "hungarian", "none").sum(1)
    assert (hungarian <= index + 1e-6).all()
    shuffled = teacher[:, torch.randperm(7)]
    torch.testing.assert_close(ops.slot_match_loss(student, shuffled, "hungarian"), hungarian.sum() / (16 * 7))


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_assignment_matches_scipy(device, backend):
    similarity = rand(6, 9, 11, device=device)
    assignment = ops.slot_assignment(similarity)
    assert assignment.dtype == torch.int64 and assignment.device == similarity.device
    assert torch.equal(assignment, reference.slot_assignment(similarity))
    assert all(len(set(row.tolist())) == 9 for row in assignment)


# The batched assignment kernel (CUDA's Hungarian matching) against scipy. Under the Triton interpreter it is slow
# (a sequential algorithm, one numpy call per step): small batches and K there.
TRITON_CASES = [c for c in CASES if c.values[1] == "triton"]


def _total(similarity: torch.Tensor, assignment: torch.Tensor) -> torch.Tensor:
    """Total similarity of each batch element's pairing, in float64."""
    return similarity.double().gather(2, assignment.unsqueeze(-1)).squeeze(-1).sum(1)


def _is_injective(assignment: torch.Tensor, M: int) -> bool:
    return all(len(set(row)) == len(row) and 0 <= min(row) and max(row) < M for row in assignment.tolist())


@pytest.mark.parametrize(("device", "backend"), TRITON_CASES)
def test_assignment_kernel_matches_scipy(device, backend):
    """Random continuous similarities (a unique optimum): exactly scipy's pairing, through the kernel's launcher
    and through the op, square and rectangular, K = 1, K and M not powers of two, strided and float64 input."""
    from kdfast.kernels.slot_match import slot_assignment as launch

    for B, K, M in [(3, 1, 1), (2, 1, 4), (3, 5, 5), (3, 6, 9), (2, 13, 15)]:
        similarity = rand(B, K, M, device=device)
        want = reference.slot_assignment(similarity)
        got = launch(similarity)
        assert got.dtype == torch.int64 and got.device == similarity.device
        assert torch.equal(got, want), f"{(B, K, M)}"
        assert torch.equal(ops.slot_assignment(similarity, backend="triton"), want)
    transposed = rand(2, 7, 6, dtype=torch.float64, device=device).transpose(1, 2)  # (2, 6, 7), strided
    assert torch.equal(launch(transposed), reference.slot_assignment(transposed))


@pytest.mark.parametrize(("device", "backend"), TRITON_CASES)
def test_assignment_kernel_breaks_ties_as_scipy_deterministically(device, backend):
    """Many exact ties (similarities in {0, 1, 2}): a valid optimum, identical run to run, and scipy's pairing:
    the kernel takes scipy's steps (rows in order; among columns of equal reduced cost the one scipy's scan
    keeps, free columns first). A constant matrix gives the identity, as scipy's does."""
    from kdfast.kernels.slot_match import slot_assignment as launch

    for B, K, M in [(4, 6, 6), (4, 5, 8)]:
        similarity = torch.randint(0, 3, (B, K, M), device=device).float()
        got = launch(similarity)
        assert _is_injective(got, M)
        scipy = reference.slot_assignment(similarity)
        assert torch.equal(_total(similarity, got), _total(similarity, scipy))  # an optimum
        assert torch.equal(launch(similarity.clone()), got)
        assert torch.equal(got, scipy)
    constant = torch.full((2, 5, 7), 0.5, device=device)
    assert launch(constant).tolist() == [list(range(5))] * 2


@pytest.mark.parametrize(("device", "backend"), TRITON_CASES)
def test_assignment_kernel_without_an_optimum_returns_the_identity(device, backend):
    """NaN or +inf similarity (scipy raises) or no finite pairing: that batch element gets i -> i, the others
    their optimum; the kernel never hangs and never leaves an index out of range."""
    from kdfast.kernels.slot_match import slot_assignment as launch

    similarity = rand(4, 4, 5, device=device)
    similarity[0, 2, 3] = float("nan")
    similarity[1, 0, 0] = float("inf")
    similarity[2] = float("-inf")  # every pairing forbidden: infeasible
    got = launch(similarity)
    assert got[:3].tolist() == [[0, 1, 2, 3]] * 3
    assert torch.equal(got[3:], reference.slot_assignment(similarity[3:]))


@pytest.mark.parametrize(("device", "backend"), TRITON_CASES)
def test_assignment_slot_limit_names_the_fallback(device, backend):
    from kdfast.kernels.slot_match import MAX_ASSIGNMENT_SLOTS

    similarity = rand(1, 2, MAX_ASSIGNMENT_SLOTS + 1, device=device)
    with pytest.raises(ValueError, match=r"at most \d+ slots.*backend='reference'"):
        ops.slot_assignment(similarity, backend="triton")
    if device == "cuda":  # auto takes scipy above the limit
        assert torch.equal(ops.slot_assignment(similarity), reference.slot_assignment(similarity))


def test_assignment_backends():
    """CPU tensors use scipy unless the Triton interpreter is asked for; bad backends are named."""
    similarity = rand(2, 3, 4)
    assert torch.equal(ops.slot_assignment(similarity, backend="reference"), reference.slot_assignment(similarity))
    with pytest.raises(ValueError, match=r"backend must be one of"):
        ops.slot_assignment(similarity, backend="fast")
    with pytest.raises(ValueError, match=r"no cpp implementation"):
        ops.slot_assignment(similarity, backend="cpp")


# ------------------------------------------------------------------------------------------- awkward inputs


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_non_contiguous_and_expanded_inputs(device, backend):
    B, K, M, D = 3, 5, 6, 40
    a = leaf(rand(B, D, K, device=device)).transpose(1, 2)  # a transposed projection output
    b = leaf(rand(1, M, D, device=device)).expand(B, M, D)  # one set of slots broadcast over the batch
    out = ops.slot_cosine_similarity(a, b, backend=backend)
    assert_close(out, reference.slot_cosine_similarity(a.double(), b.double()), torch.float32)
    grad_out = rand(B, M, K, device=device).transpose(1, 2)  # a non-contiguous incoming gradient
    (ga,) = torch.autograd.grad(out, a, grad_out, retain_graph=True)
    (ga_ref,) = torch.autograd.grad(reference.slot_cosine_similarity(a.double(), b.double()), a, grad_out.double())
    assert_close(ga, ga_ref, torch.float32, "grad of a")

    teacher = rand(B, D, K, device=device).transpose(1, 2)
    loss = ops.slot_match_loss(a, teacher, "hungarian", "none", backend=backend)
    assert_close(loss, reference.slot_match_loss(a.double(), teacher.double(), "hungarian", "none"), torch.float32)


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_zero_vectors_give_zero_cosine_and_finite_gradients(device, backend):
    a, b = rand(2, 4, 16, device=device), rand(2, 5, 16, device=device)
    a[0, 1] = 0.0
    b[1, 3] = 0.0
    a, b = leaf(a), leaf(b)
    out = ops.slot_cosine_similarity(a, b, backend=backend)
    assert (out[0, 1] == 0).all() and (out[1, :, 3] == 0).all()
    ref = reference.slot_cosine_similarity(a.double(), b.double())
    assert_close(out, ref, torch.float32)
    grad_out = rand(2, 4, 5, device=device)
    for got, want in zip(grads_of(out, (a, b), grad_out), grads_of(reference.slot_cosine_similarity(a, b), (a, b), grad_out)):
        assert torch.isfinite(got).all()
        assert_close(got, want, torch.float32)
    loss = ops.slot_match_loss(a, b[:, :4], backend=backend)
    assert torch.isfinite(loss) and torch.isfinite(torch.autograd.grad(loss, a)[0]).all()


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_nan_propagates_as_in_the_reference(device, backend):
    a, b = rand(2, 4, 16, device=device), rand(2, 5, 16, device=device)
    a[1, 2, 7] = float("nan")
    a, b = leaf(a), leaf(b)
    out = ops.slot_cosine_similarity(a, b, backend=backend)
    ref = reference.slot_cosine_similarity(a, b)
    assert out.isnan().any()
    assert relative_error(out, ref) <= TOLERANCE[torch.float32]  # NaN exactly where the reference has it
    grad_out = rand(2, 4, 5, device=device)
    for got, want in zip(grads_of(out, (a, b), grad_out), grads_of(ref, (a, b), grad_out)):
        assert relative_error(got, want) <= TOLERANCE[torch.float32]
    per_slot = ops.slot_match_loss(a, b[:, :4], reduction="none", backend=backend)
    assert relative_error(per_slot, reference.slot_match_loss(a, b[:, :4], reduction="none")) <= 1e-5
    assert ops.slot_match_loss(a, b[:, :4], backend=backend).isnan()


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_results_are_deterministic(device, backend):
    a, b = leaf(rand(4, 11, 64, device=device)), leaf(rand(4, 13, 64, device=device))
    grad_out = rand(4, 11, 13, device=device)
    runs = []
    for _ in range(2):
        out = ops.slot_cosine_similarity(a, b, backend=backend)
        runs.append((out, *grads_of(out, (a, b), grad_out)))
    assert all(torch.equal(x, y) for x, y in zip(*runs))


@pytest.mark.parametrize(("device", "backend"), [c for c in CASES if c.values[1] == "triton"])
def test_triton_slot_limit_names_the_fallback(device, backend):
    from kdfast.kernels.slot_match import MAX_SLOTS

    a = rand(1, MAX_SLOTS + 1, 8, device=device)
    with pytest.raises(ValueError, match=r"at most \d+ slots.*backend="):
        ops.slot_cosine_similarity(a, a, backend="triton")


# ------------------------------------------------------------------------------------ gradcheck / opcheck


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_gradcheck(device, backend):
    a, b = leaf(rand(2, 3, 5, dtype=torch.float64, device=device)), leaf(rand(2, 4, 5, dtype=torch.float64, device=device))
    assert torch.autograd.gradcheck(lambda a, b: ops.slot_cosine_similarity(a, b, backend=backend), (a, b))
    teacher = rand(2, 3, 5, dtype=torch.float64, device=device)
    for matching in ("index", "hungarian"):
        for reduction in ("mean", "none"):
            fn = lambda s, matching=matching, reduction=reduction: ops.slot_match_loss(s, teacher, matching, reduction, backend=backend)
            assert torch.autograd.gradcheck(fn, (a,))


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_opcheck(device, backend):
    a, b = leaf(rand(2, 3, 5, device=device)), leaf(rand(2, 4, 5, device=device))
    kd = torch.ops.kdfast
    torch.library.opcheck(kd.slot_cosine_similarity.default, (a, b, 1e-8, backend))
    # Backward ops are checked on plain tensors: double backward is not supported.
    x, y = a.detach(), b.detach()
    torch.library.opcheck(kd.slot_cosine_similarity_backward.default, (rand(2, 3, 4, device=device), x, y, 1e-8, backend))
    assignment = torch.stack([torch.randperm(4)[:3], torch.randperm(4)[:3]]).to(device)
    for reduction in ("mean", "none"):
        for match in (None, assignment):
            teacher = b if match is not None else b[:, :3]
            torch.library.opcheck(kd.slot_match_loss.default, (a, teacher.detach(), match, reduction, 1e-8, backend))
            grad = rand(2, 3, device=device) if reduction == "none" else rand(device=device)
            args = (grad, x, teacher.detach(), match, reduction, 1e-8, backend)
            torch.library.opcheck(kd.slot_match_loss_backward.default, args)
    assign_backend = backend if backend in slot_match.ASSIGNMENT else "reference"
    torch.library.opcheck(kd.slot_assignment.default, (rand(2, 3, 4, device=device), assign_backend))


def test_compile_fullgraph_matches_eager():
    student, teacher = leaf(rand(4, 6, 24)), rand(4, 6, 24)
    for matching in ("index", "hungarian"):
        module = SlotMatchLoss(matching)
        compiled = torch.compile(module, fullgraph=True)
        eager = module(student, teacher)
        got = compiled(student, teacher)
        torch.testing.assert_close(got, eager)
        torch.testing.assert_close(torch.autograd.grad(got, student)[0], torch.autograd.grad(eager, student)[0])


def test_autocast_mixed_dtypes_compute_in_float32():
    """Under CPU bf16 autocast a Linear's output is bf16 while the teacher stays fp32: promoted, not rejected."""
    x, teacher = rand(3, 5, 16), rand(3, 5, 8)
    linear = torch.nn.Linear(16, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        student = linear(x)
        loss = ops.slot_match_loss(student, teacher)
        similarity = ops.slot_cosine_similarity(student, teacher)
    assert student.dtype == torch.bfloat16 and loss.dtype == torch.float32 and similarity.dtype == torch.float32
    assert_close(loss, reference.slot_match_loss(student.double(), teacher.double()), torch.float32)
    loss.backward()
    assert linear.weight.grad is not None and torch.isfinite(linear.weight.grad).all()


# --------------------------------------------------------------------------------------------- bad input

GOOD = (3, 4, 8)


def _bad_inputs():
    s = lambda *shape, **kw: rand(*shape, **kw)
    return [
        ("student rank", lambda: (s(3, 4), s(*GOOD)), {}, ValueError, r"student must have 3 dimensions \(B, K, D\)"),
        ("teacher rank", lambda: (s(*GOOD), s(3, 4, 8, 1)), {}, ValueError, r"teacher must have 3 dimensions"),
        ("batch mismatch", lambda: (s(*GOOD), s(2, 4, 8)), {}, ValueError, r"batch size B must match"),
        ("dim mismatch", lambda: (s(*GOOD), s(3, 4, 9)), {}, ValueError, r"slot dimension D must match"),
        ("slot mismatch", lambda: (s(*GOOD), s(3, 5, 8)), {}, ValueError, r"matching='index' needs"),
        ("hungarian K > M", lambda: (s(*GOOD), s(3, 2, 8)), {"matching": "hungarian"}, ValueError, r"K <= M"),
        ("integer student", lambda: (torch.ones(*GOOD, dtype=torch.int64), s(*GOOD)), {}, TypeError, r"student must be a float"),
        ("not a tensor", lambda: ([[1.0]], s(*GOOD)), {}, TypeError, r"student must be a torch.Tensor"),
        ("K = 0", lambda: (s(3, 0, 8), s(3, 0, 8)), {}, ValueError, r"student must have no zero-sized dimension"),
        ("D = 0", lambda: (s(3, 4, 0), s(3, 4, 0)), {}, ValueError, r"no zero-sized dimension"),
        ("mixed devices", lambda: (s(*GOOD), s(*GOOD, device="meta")), {}, ValueError, r"one device"),
        ("matching", lambda: (s(*GOOD), s(*GOOD)), {"matching": "greedy"}, ValueError, r"matching must be one of"),
        ("reduction", lambda: (s(*GOOD), s(*GOOD)), {"reduction": "max"}, ValueError, r"reduction must be one of"),
        ("eps nan", lambda: (s(*GOOD), s(*GOOD)), {"eps": float("nan")}, ValueError, r"eps must be a finite positive"),
        ("eps <= 0", lambda: (s(*GOOD), s(*GOOD)), {"eps": 0.0}, ValueError, r"eps must be a finite positive"),
        ("backend", lambda: (s(*GOOD), s(*GOOD)), {"backend": "fast"}, ValueError, r"backend must be one of"),
    ]


@pytest.mark.parametrize(("make", "kwargs", "error", "message"), [c[1:] for c in _bad_inputs()], ids=[c[0] for c in _bad_inputs()])
def test_bad_input_gets_a_clear_error(make, kwargs, error, message):
    student, teacher = make()
    with pytest.raises(error, match=message):
        ops.slot_match_loss(student, teacher, **kwargs)


def test_bad_input_to_similarity_and_assignment():
    with pytest.raises(ValueError, match=r"a must have 3 dimensions"):
        ops.slot_cosine_similarity(rand(4, 8), rand(1, 4, 8))
    with pytest.raises(ValueError, match=r"K <= M"):
        ops.slot_assignment(rand(2, 5, 3))
    with pytest.raises(TypeError, match=r"similarity must be a float"):
        ops.slot_assignment(torch.ones(2, 3, 3, dtype=torch.int32))
