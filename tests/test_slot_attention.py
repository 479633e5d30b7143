"""slot_attention_core (softmax over slots, weighted mean over inputs) on every backend against the float64 reference."""

from __future__ import annotations

import importlib

import pytest
import torch
from eager_slot_attention import EagerSlotAttention
from harness import (
    TOLERANCE, assert_close, dtype_cases, dtype_params, grads_of, implemented_cases, leaf, rand, relative_error,
)

from kdfast import _backend, ops, reference
from kdfast.nn import SlotAttention

slot_attention_module = importlib.import_module("kdfast.ops.slot_attention")

CASES = implemented_cases("slot_attention_core")
# (B, K, N, D, Dv): singletons, N = 1, K = 1, D not a power of two (48, 96), N not a multiple of a tile (37),
# values of another width than the keys, the SlotContrast movi-c slot count (11), the Triton limits (K = 64,
# D = Dv = 256), and N = 300 over two of the cpp backend's 256-token tiles (the second one partial).
SHAPES = [
    (1, 1, 1, 1, 1),
    (2, 3, 1, 16, 16),
    (2, 1, 37, 48, 48),
    (2, 7, 37, 48, 48),
    (3, 11, 64, 96, 96),
    (2, 5, 37, 48, 20),
    (1, 64, 20, 16, 16),
    (1, 3, 9, 256, 256),
    (2, 5, 300, 24, 24),
]


def inputs(B, K, N, D, Dv, dtype=torch.float32, device="cpu"):
    return (
        leaf(rand(B, K, D, dtype=dtype, device=device)),
        leaf(rand(B, N, D, dtype=dtype, device=device)),
        leaf(rand(B, N, Dv, dtype=dtype, device=device)),
    )


# ---------------------------------------------------------------------------------------------------- values


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize(("device", "backend", "dtype"), dtype_cases(CASES))
def test_core_matches_reference(device, backend, shape, dtype):
    B, K, N, D, Dv = shape
    q, k, v = inputs(*shape, dtype=dtype, device=device)
    q64, k64, v64 = (leaf(t.double()) for t in (q, k, v))
    scale = 0.7 * D**-0.5
    updates, attn = ops.slot_attention_core(q, k, v, scale=scale, eps=1e-8, backend=backend)
    ref_updates, ref_attn = reference.slot_attention_core(q64, k64, v64, scale, 1e-8)
    assert updates.dtype == dtype and attn.dtype == dtype
    assert updates.shape == (B, K, Dv) and attn.shape == (B, K, N)
    assert_close(updates, ref_updates, dtype, f"{dtype} updates")
    assert_close(attn, ref_attn, dtype, f"{dtype} attention")
    # Gradients through both outputs (the masks are a loss input in SlotContrast), grad_output random.
    grad_out = (rand(B, K, Dv, dtype=dtype, device=device), rand(B, K, N, dtype=dtype, device=device))
    got = grads_of((updates, attn), (q, k, v), grad_out)
    want = grads_of((ref_updates, ref_attn), (q64, k64, v64), grad_out)
    for name, g, w in zip("qkv", got, want):
        assert g.dtype == dtype and g.shape == w.shape
        if N > 1 or name == "v" or dtype == torch.float64:
            assert_close(g, w, dtype, f"{dtype} grad of {name}")
            continue
        # At N = 1 every slot's update is the one value row whatever q and k are: the gradient through the updates
        # is exactly 0, and a float backend returns the rounding of dW_i = (<G_i, v> - <G_i, U_i>) / Z_i, at most
        # e_i = (Dv + 2) u |G_i| (|v| + |U_i|) / Z_i, which reaches q and k as s A_i (dW_i - sum_j A_j dW_j) times k
        # or q: within s A_i 2 max(e) |k| for dq_i and s sum_i A_i 2 max(e) |q_i| for dk. Beside the masks' own
        # gradient that noise can pass the 1e-5 relative bar (1.05e-5 on k, seed 369409672, reference backend).
        unit = torch.finfo(dtype).eps / 2
        G, U64 = grad_out[0].double(), ref_updates.detach()
        e = (Dv + 2) * unit * G.norm(dim=-1) * (v64.detach().norm(dim=-1) + U64.norm(dim=-1))  # (B, K); Z_i = 1 + eps
        e_max = e.max(dim=1, keepdim=True).values  # (B, 1)
        A = ref_attn.detach()[..., 0]  # (B, K)
        if name == "q":
            bound = scale * A * 2 * e_max * k64.detach()[:, 0].norm(dim=-1, keepdim=True)  # (B, K)
            allowance = bound.norm().item()
        else:
            allowance = (scale * (A * 2 * e_max * q64.detach().norm(dim=-1)).sum(1)).norm().item()
        error = (g.double() - w).norm().item()
        assert error <= TOLERANCE[dtype] * w.norm().item() + allowance, (
            f"{dtype} grad of {name}: error {error:.3g} above {TOLERANCE[dtype]:g} relative + {allowance:.3g} rounding")


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_gradient_through_one_output_only(device, backend):
    """The usual loss reads the updates only (masks unused), or the masks only: the missing gradient is zero."""
    shape = (2, 5, 37, 48, 48)
    q, k, v = inputs(*shape, device=device)
    q64, k64, v64 = (leaf(t.double()) for t in (q, k, v))
    for which in (0, 1):
        out = ops.slot_attention_core(q, k, v, backend=backend)[which]
        ref = reference.slot_attention_core(q64, k64, v64)[which]
        grad_out = rand(*out.shape, device=device)
        got = torch.autograd.grad(out, (q, k, v), grad_out, allow_unused=True)
        want = torch.autograd.grad(ref, (q64, k64, v64), grad_out.double(), allow_unused=True)
        for name, g, w in zip("qkv", got, want):
            if w is None:  # the masks do not depend on v
                assert g is None or not g.any(), f"grad of {name} should be zero"
                continue
            assert_close(g, w, torch.float32, f"output {which}: grad of {name}")


@pytest.mark.parametrize(("device", "backend"), [c for c in CASES if c.values[1] == "cpp"])
def test_cpp_refuses_double_backward(device, backend):
    """The cpp backward (a C++ autograd node) is not differentiable: create_graph gets an error, not a wrong number."""
    q, k, v = inputs(2, 3, 5, 4, 4, dtype=torch.float64, device=device)
    updates, _ = ops.slot_attention_core(q, k, v, backend=backend)
    with pytest.raises(RuntimeError, match="not differentiable.*backend='reference'"):
        torch.autograd.grad(updates.sum(), (q, k, v), create_graph=True)


@pytest.mark.parametrize(("device", "backend"), [c for c in CASES if c.values[1] == "cpp"])
def test_cpp_backward_checks_the_saved_attention(device, backend):
    q, k, v = (t.detach() for t in inputs(2, 3, 5, 4, 4, device=device))
    updates, attn, norm = torch.ops.kdfast._slot_attention_core_cpp(q, k, v, 0.5, 1e-8)
    args = (rand(2, 3, 4, device=device), None, q, k, v, updates, norm, 0.5, 1e-8)
    for bad in (attn[:, :, :4], attn.double()):
        with pytest.raises(RuntimeError, match=r"attn must be the forward's attention, a \(B,K,N\)"):
            torch.ops.kdfast._slot_attention_core_backward(*args, bad)


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_defaults_and_explicit_formula(device, backend):
    """scale=None is D**-0.5; the gradients equal design 3.1's hand-written backward."""
    B, K, N, D = 3, 7, 29, 24
    q, k, v = inputs(B, K, N, D, D, dtype=torch.float64, device=device)
    updates, attn = ops.slot_attention_core(q, k, v, backend=backend)
    ref_updates, ref_attn = reference.slot_attention_core(q, k, v, D**-0.5, 1e-8)
    assert_close(updates, ref_updates, torch.float64, "updates")
    assert_close(attn, ref_attn, torch.float64, "attention")
    grad_updates, grad_attn = rand(B, K, D, dtype=torch.float64, device=device), rand(B, K, N, dtype=torch.float64, device=device)
    got = grads_of((updates, attn), (q, k, v), (grad_updates, grad_attn))
    want = reference.slot_attention_core_backward(grad_updates, grad_attn, q, k, v, D**-0.5, 1e-8)
    for name, g, w in zip("qkv", got, want):
        assert_close(g, w, torch.float64, f"grad of {name}")


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_invariants(device, backend):
    """Masks are a distribution over the slots; with one slot every mask is 1 and the update is the mean value."""
    q, k, v = inputs(2, 6, 41, 32, 32, device=device)
    _, attn = ops.slot_attention_core(q, k, v, backend=backend)
    torch.testing.assert_close(attn.sum(1), torch.ones(2, 41, device=device))
    assert (attn >= 0).all()
    q1 = rand(2, 1, 32, dtype=torch.float64, device=device)
    v64 = v.detach().double()
    updates, attn = ops.slot_attention_core(q1, k.detach().double(), v64, eps=1e-3, backend=backend)
    assert torch.equal(attn, torch.ones_like(attn))
    assert_close(updates, v64.mean(1, keepdim=True), torch.float64, "K=1 updates")


# ------------------------------------------------------------------------------------------- awkward inputs


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_non_contiguous_and_expanded_inputs(device, backend):
    B, K, N, D = 3, 5, 37, 48
    q = leaf(rand(1, K, D, device=device)).expand(B, K, D)  # one slot initialisation broadcast over the batch
    k = leaf(rand(B, D, N, device=device)).transpose(1, 2)  # transposed projection outputs
    v = leaf(rand(B, D, N, device=device)).transpose(1, 2)
    assert not k.is_contiguous() and not v.is_contiguous()
    updates, attn = ops.slot_attention_core(q, k, v, backend=backend)
    ref_updates, ref_attn = reference.slot_attention_core(q.double(), k.double(), v.double())
    assert_close(updates, ref_updates, torch.float32, "updates")
    assert_close(attn, ref_attn, torch.float32, "attention")
    grad_out = (rand(B, D, K, device=device).transpose(1, 2), rand(B, N, K, device=device).transpose(1, 2))
    got = grads_of((updates, attn), (q, k, v), grad_out)
    want = grads_of((ref_updates, ref_attn), (q, k, v), grad_out)
    for name, g, w in zip("qkv", got, want):
        assert_close(g, w, torch.float32, f"grad of {name}")


@pytest.mark.parametrize(("device", "backend"), CASES)
@pytest.mark.parametrize("dtype", dtype_params(torch.float64, torch.float32))
def test_large_logits_stay_finite(device, backend, dtype):
    """scale * 100: the softmax over the slots saturates; no NaN or inf, and still the reference's numbers."""
    B, K, N, D = 2, 7, 37, 48
    q, k, v = inputs(B, K, N, D, D, dtype=dtype, device=device)
    q64, k64, v64 = (leaf(t.double()) for t in (q, k, v))
    scale = 100 * D**-0.5
    updates, attn = ops.slot_attention_core(q, k, v, scale=scale, backend=backend)
    assert torch.isfinite(updates).all() and torch.isfinite(attn).all()
    ref_updates, ref_attn = reference.slot_attention_core(q64, k64, v64, scale)
    assert_close(updates, ref_updates, dtype, f"{dtype} updates")
    assert_close(attn, ref_attn, dtype, f"{dtype} attention")
    grad_out = (rand(B, K, D, dtype=dtype, device=device), rand(B, K, N, dtype=dtype, device=device))
    got = grads_of((updates, attn), (q, k, v), grad_out)
    want = grads_of((ref_updates, ref_attn), (q64, k64, v64), grad_out)
    for name, g, w in zip("qkv", got, want):
        assert torch.isfinite(g).all(), f"{dtype} grad of {name} is not finite"
        # dq and dk carry the logit scale (~14 here, logits ~100): float32 rounding alone leaves ~1e-5 in
        # them, so float32 checks finiteness there and float64 checks the numbers.
        if dtype == torch.float64 or name == "v":
            assert_close(g, w, dtype, f"{dtype} grad of {name}")


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_eps_zero_and_large_eps(device, backend):
    q, k, v = inputs(2, 4, 13, 8, 8, dtype=torch.float64, device=device)
    for eps in (0.0, 0.5):
        updates, _ = ops.slot_attention_core(q, k, v, eps=eps, backend=backend)
        ref_updates, _ = reference.slot_attention_core(q, k, v, None, eps)
        assert_close(updates, ref_updates, torch.float64, f"eps={eps} updates")
        grad_out = rand(2, 4, 8, dtype=torch.float64, device=device)
        for g, w in zip(grads_of(updates, (q, k, v), grad_out), grads_of(ref_updates, (q, k, v), grad_out)):
            assert_close(g, w, torch.float64, f"eps={eps} grad")


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_results_are_deterministic(device, backend):
    q, k, v = inputs(4, 11, 64, 48, 48, device=device)
    grad_out = (rand(4, 11, 48, device=device), rand(4, 11, 64, device=device))
    runs = []
    for _ in range(2):
        outs = ops.slot_attention_core(q, k, v, backend=backend)
        runs.append((*outs, *grads_of(outs, (q, k, v), grad_out)))
    assert all(torch.equal(x, y) for x, y in zip(*runs))


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_nan_propagates_as_in_the_reference(device, backend):
    q, k, v = rand(2, 4, 16, device=device), rand(2, 9, 16, device=device), rand(2, 9, 16, device=device)
    v[1, 3, 5] = float("nan")
    updates, attn = ops.slot_attention_core(q, k, v, backend=backend)
    ref_updates, ref_attn = reference.slot_attention_core(q, k, v)
    assert updates.isnan().any()
    assert relative_error(updates, ref_updates) <= TOLERANCE[torch.float32]
    assert relative_error(attn, ref_attn) <= TOLERANCE[torch.float32]


def test_mixed_dtypes_are_promoted():
    """Slots from a bf16 matmul, keys and values in fp32: computed and returned in fp32, not rejected."""
    q, k, v = rand(2, 5, 16, dtype=torch.bfloat16), rand(2, 11, 16), rand(2, 11, 16)
    updates, attn = ops.slot_attention_core(q, k, v)
    assert updates.dtype == torch.float32 and attn.dtype == torch.float32
    ref_updates, ref_attn = reference.slot_attention_core(q.double(), k.double(), v.double())
    assert_close(updates, ref_updates, torch.float32, "updates")
    assert_close(attn, ref_attn, torch.float32, "attention")
    updates, _ = ops.slot_attention_core(q.float(), k, v.double())
    assert updates.dtype == torch.float64


def test_autocast_mixed_dtypes_compute_in_float32():
    """Under CPU bf16 autocast q comes from a Linear (bf16), k and v are fp32: the op computes in fp32."""
    slots, k, v = rand(2, 5, 24), rand(2, 37, 16), rand(2, 37, 16)
    to_q = torch.nn.Linear(24, 16, bias=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q = to_q(slots)
        updates, attn = ops.slot_attention_core(q, k, v)
    assert q.dtype == torch.bfloat16 and updates.dtype == torch.float32 and attn.dtype == torch.float32
    ref_updates, ref_attn = reference.slot_attention_core(q.double(), k.double(), v.double())
    assert_close(updates, ref_updates, torch.float32, "updates under autocast")
    assert_close(attn, ref_attn, torch.float32, "attention under autocast")
    updates.sum().backward()
    assert to_q.weight.grad is not None and torch.isfinite(to_q.weight.grad).all()


# ------------------------------------------------------------------------------------ gradcheck / opcheck


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_gradcheck(device, backend):
    for shape, scale, eps in [((2, 3, 5, 4, 3), None, 1e-8), ((1, 1, 1, 2, 2), 0.9, 1e-8), ((2, 4, 3, 3, 3), 2.0, 0.0)]:
        q, k, v = inputs(*shape, dtype=torch.float64, device=device)
        fn = lambda q, k, v, scale=scale, eps=eps: ops.slot_attention_core(q, k, v, scale=scale, eps=eps, backend=backend)
        assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize(("device", "backend"), CASES)
@pytest.mark.parametrize("dtype", dtype_params(torch.float32, torch.float64))
def test_custom_op_autograd_matches_reference(device, backend, dtype):
    """Eager calls may take a faster path than the custom op; torch.compile always calls the op, so its autograd
    formula (a backward custom op) is checked directly: values, gradients of both outputs and of each alone."""
    op = torch.ops.kdfast.slot_attention_core.default
    shape = (2, 5, 37, 48, 20)
    q, k, v = inputs(*shape, dtype=dtype, device=device)
    q64, k64, v64 = (leaf(t.double()) for t in (q, k, v))
    updates, attn, norm = op(q, k, v, 0.3, 1e-8, True, backend)
    outs = (updates, attn)
    refs = reference.slot_attention_core(q64, k64, v64, 0.3, 1e-8)
    assert norm.shape == (2, 5) and not norm.requires_grad
    assert_close(norm, (refs[1] + 1e-8).sum(-1), dtype, f"{dtype} norm Z")
    for name, o, r in zip(("updates", "attention"), outs, refs):
        assert o.dtype == dtype
        assert_close(o, r, dtype, f"{dtype} {name}")
    grad_out = [rand(*r.shape, dtype=dtype, device=device) for r in refs]
    for used in ((0, 1), (0,), (1,)):
        got = torch.autograd.grad([outs[i] for i in used], (q, k, v), [grad_out[i] for i in used], retain_graph=True)
        want = torch.autograd.grad(
            [refs[i] for i in used], (q64, k64, v64), [grad_out[i].double() for i in used],
            retain_graph=True, allow_unused=True,
        )
        for name, g, w in zip("qkv", got, want):
            assert_close(g, torch.zeros_like(g) if w is None else w, dtype, f"{dtype} outputs {used}: grad of {name}")
    # Without the masks: an empty (B, K, 0) placeholder, the same updates and gradients.
    updates, attn, _ = op(q, k, v, 0.3, 1e-8, False, backend)
    assert attn.shape == (2, 5, 0)
    assert_close(updates, refs[0], dtype, f"{dtype} updates without masks")
    got = torch.autograd.grad(updates, (q, k, v), grad_out[0])
    want = torch.autograd.grad(refs[0], (q64, k64, v64), grad_out[0].double(), retain_graph=True)
    for name, g, w in zip("qkv", got, want):
        assert_close(g, w, dtype, f"{dtype} without masks: grad of {name}")
    q, k, v = inputs(2, 3, 4, 3, 2, dtype=torch.float64, device=device)
    assert torch.autograd.gradcheck(lambda q, k, v: op(q, k, v, 0.8, 1e-8, True, backend)[:2], (q, k, v))


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_opcheck(device, backend):
    kd = torch.ops.kdfast
    for B, K, N, D, Dv in [(2, 3, 5, 4, 6), (1, 1, 1, 2, 2)]:
        q, k, v = inputs(B, K, N, D, Dv, device=device)
        for return_attn in (True, False):
            torch.library.opcheck(kd.slot_attention_core.default, (q, k, v, D**-0.5, 1e-8, return_attn, backend))
        # Backward ops are checked on plain tensors: double backward is not supported.
        updates, _, norm = kd.slot_attention_core(q.detach(), k.detach(), v.detach(), D**-0.5, 1e-8, False, backend)
        saved = (q.detach(), k.detach(), v.detach(), updates, norm)
        for grad_attn in (rand(B, K, N, device=device), None):
            args = (rand(B, K, Dv, device=device), grad_attn, *saved, D**-0.5, 1e-8, backend)
            torch.library.opcheck(kd.slot_attention_core_backward.default, args)
        if backend == "cpp":  # the cpp backend's eager op, and its kernel backward reading the saved attention
            torch.library.opcheck(kd._slot_attention_core_cpp.default, (q, k, v, D**-0.5, 1e-8))
            updates, attn, norm = kd._slot_attention_core_cpp(q.detach(), k.detach(), v.detach(), D**-0.5, 1e-8)
            for grad_attn in (rand(B, K, N, device=device), None):
                args = (rand(B, K, Dv, device=device), grad_attn, q.detach(), k.detach(), v.detach(), updates, norm)
                torch.library.opcheck(kd._slot_attention_core_backward.default, (*args, D**-0.5, 1e-8, attn))
            # the cpp iterations op (slots of width D), with every layer (GRU, MLP) and with none (then Dv = D)
            w = lambda *shape: leaf(rand(*shape, device=device))
            slots, required = w(B, K, D), (w(D), w(D), w(D, D))
            every = (w(D), w(3 * D, Dv), w(3 * D, D), w(3 * D), w(3 * D), w(D), w(D), w(8, D), w(8), w(D, 8), w(D))
            for optional, hidden_normed, grad_last_only in ((every, True, False), ((None,) * 11, False, True)):
                if optional[1] is None and Dv != D:
                    continue
                args = (slots, k, v, *required, *optional, 2, D**-0.5, 1e-8, 1e-5, hidden_normed, grad_last_only)
                torch.library.opcheck(kd._slot_attention_iterations_cpp.default, args)


class _Grouper(torch.nn.Module):
    """A SlotContrast-style read-out: k/v projections of the features, q from the slots, the core, a loss."""

    def __init__(self, dim: int):
        super().__init__()
        self.to_q = torch.nn.Linear(dim, dim, bias=False)
        self.to_k = torch.nn.Linear(dim, dim, bias=False)
        self.to_v = torch.nn.Linear(dim, dim, bias=False)

    def forward(self, slots, features, target):
        updates, attn = ops.slot_attention_core(self.to_q(slots), self.to_k(features), self.to_v(features))
        return (updates - target).square().mean() + attn.square().mean(), updates, attn


def test_compile_fullgraph_matches_eager():
    module = _Grouper(20)
    slots, features, target = leaf(rand(3, 5, 20)), rand(3, 37, 20), rand(3, 5, 20)
    compiled = torch.compile(module, fullgraph=True)
    eager = module(slots, features, target)
    got = compiled(slots, features, target)
    for g, e in zip(got, eager):
        torch.testing.assert_close(g, e)
    wrt = (slots, *module.parameters())
    for g, e in zip(torch.autograd.grad(got[0], wrt), torch.autograd.grad(eager[0], wrt)):
        torch.testing.assert_close(g, e)


# --------------------------------------------------------------------------------------------- bad input

B, K, N, D = 2, 3, 5, 8


def _bad_inputs():
    s = lambda *shape, **kw: rand(*shape, **kw)
    good = lambda: (s(B, K, D), s(B, N, D), s(B, N, D))
    return [
        ("q rank", lambda: (s(K, D), s(B, N, D), s(B, N, D)), {}, ValueError, r"q must have 3 dimensions \(B, K, D\)"),
        ("k rank", lambda: (s(B, K, D), s(B, N, D, 1), s(B, N, D)), {}, ValueError, r"k must have 3 dimensions \(B, N, D\)"),
        ("v rank", lambda: (s(B, K, D), s(B, N, D), s(N, D)), {}, ValueError, r"v must have 3 dimensions"),
        ("batch mismatch", lambda: (s(B, K, D), s(B + 1, N, D), s(B + 1, N, D)), {}, ValueError, r"batch size B must match"),
        ("D mismatch", lambda: (s(B, K, D), s(B, N, D + 1), s(B, N, D)), {}, ValueError, r"query/key dimension D must match"),
        ("N mismatch", lambda: (s(B, K, D), s(B, N, D), s(B, N + 1, D)), {}, ValueError, r"number of inputs N must match"),
        ("integer q", lambda: (torch.ones(B, K, D, dtype=torch.int64), s(B, N, D), s(B, N, D)), {}, TypeError, r"q must be a float"),
        ("integer v", lambda: (s(B, K, D), s(B, N, D), torch.ones(B, N, D, dtype=torch.int32)), {}, TypeError, r"v must be a float"),
        ("not a tensor", lambda: ([[[1.0]]], s(B, N, D), s(B, N, D)), {}, TypeError, r"q must be a torch.Tensor"),
        ("K = 0", lambda: (s(B, 0, D), s(B, N, D), s(B, N, D)), {}, ValueError, r"q must have no zero-sized dimension"),
        ("N = 0", lambda: (s(B, K, D), s(B, 0, D), s(B, 0, D)), {}, ValueError, r"k must have no zero-sized dimension"),
        ("D = 0", lambda: (s(B, K, 0), s(B, N, 0), s(B, N, D)), {}, ValueError, r"q must have no zero-sized dimension"),
        ("B = 0", lambda: (s(0, K, D), s(0, N, D), s(0, N, D)), {}, ValueError, r"no zero-sized dimension"),
        ("mixed devices", lambda: (s(B, K, D), s(B, N, D, device="meta"), s(B, N, D)), {}, ValueError, r"one device"),
        ("scale nan", good, {"scale": float("nan")}, ValueError, r"scale must be a finite"),
        ("scale inf", good, {"scale": float("inf")}, ValueError, r"scale must be a finite"),
        ("scale not a number", good, {"scale": "1"}, TypeError, r"scale must be a number"),
        ("eps nan", good, {"eps": float("nan")}, ValueError, r"eps must be a finite"),
        ("eps < 0", good, {"eps": -1e-8}, ValueError, r"eps must be a finite number >= 0"),
        ("backend", good, {"backend": "fast"}, ValueError, r"backend must be one of"),
    ]


@pytest.mark.parametrize(("make", "kwargs", "error", "message"), [c[1:] for c in _bad_inputs()], ids=[c[0] for c in _bad_inputs()])
def test_bad_input_gets_a_clear_error(make, kwargs, error, message):
    q, k, v = make()
    with pytest.raises(error, match=message):
        ops.slot_attention_core(q, k, v, **kwargs)


# ================================================================================= iterations and the module


# (inp_dim, slot_dim, options): the defaults, kvq_dim and hidden_dim of their own, no GRU, no MLP, neither.
MODULE_CONFIGS = [
    (24, 16, {}),
    (20, 16, {"kvq_dim": 12, "hidden_dim": 40, "n_iters": 2}),
    (24, 16, {"use_gru": False, "eps": 1e-3}),
    (24, 16, {"use_mlp": False}),
    (24, 16, {"use_gru": False, "use_mlp": False, "n_iters": 1}),
]


def _eager_module(inp_dim, slot_dim, options, dtype=torch.float64):
    eager = EagerSlotAttention(inp_dim, slot_dim, **options).to(dtype)
    with torch.no_grad():  # LayerNorm starts at weight 1, bias 0: move every parameter off its initial value
        for p in eager.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return eager


@pytest.mark.parametrize("config", MODULE_CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c[2].items()) or "defaults")
@pytest.mark.parametrize(("device", "backend"), CASES)
@pytest.mark.parametrize("dtype", dtype_params(torch.float64, torch.float32))
def test_module_matches_eager_module_on_its_state_dict(device, backend, config, dtype):
    """A state_dict saved from the eager module loads unchanged and gives the same slots, masks and gradients
    (of the slots, the features and every parameter), in float64 and in float32 against float64."""
    inp_dim, slot_dim, options = config
    eager = _eager_module(inp_dim, slot_dim, options).to(device)
    state = eager.state_dict()
    B, K, N = 2, 5, 37
    slots64, features64 = leaf(rand(B, K, slot_dim, dtype=torch.float64, device=device)), leaf(rand(B, N, inp_dim, dtype=torch.float64, device=device))
    want = eager(slots64, features64)
    grad_slots = rand(B, K, slot_dim, dtype=torch.float64, device=device)
    grad_masks = rand(B, K, N, dtype=torch.float64, device=device)
    wrt_eager = (slots64, features64, *eager.parameters())
    want_grads = torch.autograd.grad((want["slots"], want["masks"]), wrt_eager, (grad_slots, grad_masks))
    module = SlotAttention(inp_dim, slot_dim, **options, backend=backend).to(device=device, dtype=dtype)
    assert set(module.state_dict()) == set(state)
    module.load_state_dict(state)  # copied into the module's dtype
    slots, features = leaf(slots64.to(dtype)), leaf(features64.to(dtype))
    got = module(slots, features)
    assert set(got) == {"slots", "masks"}
    assert got["slots"].dtype == dtype and got["masks"].shape == (B, K, N)
    assert_close(got["slots"], want["slots"], dtype, f"{dtype} slots")
    assert_close(got["masks"], want["masks"], dtype, f"{dtype} masks")
    names = ["slots", "features", *(name for name, _ in eager.named_parameters())]
    assert names[2:] == [name for name, _ in module.named_parameters()]
    got_grads = torch.autograd.grad((got["slots"], got["masks"]), (slots, features, *module.parameters()),
                                    (grad_slots.to(dtype), grad_masks.to(dtype)))
    for name, g, w in zip(names, got_grads, want_grads):
        assert g.dtype == dtype
        assert_close(g, w, dtype, f"{dtype} grad of {name}")


def test_module_state_dict_round_trip_and_defaults():
    """kdfast's state_dict loads into the eager module too; the defaults are videosaur's."""
    module = SlotAttention(24, 16)
    assert module.to_q.weight.shape == (16, 16) and module.mlp.layers[1].weight.shape == (64, 16)
    assert module.n_iters == 3 and module.eps == 1e-8 and module.scale == 16**-0.5
    expected = {
        "to_q.weight", "to_k.weight", "to_v.weight", "gru.weight_ih", "gru.weight_hh", "gru.bias_ih", "gru.bias_hh",
        "mlp.layers.0.weight", "mlp.layers.0.bias", "mlp.layers.1.weight", "mlp.layers.1.bias", "mlp.layers.3.weight",
        "mlp.layers.3.bias", "norm_features.weight", "norm_features.bias", "norm_slots.weight", "norm_slots.bias",
    }
    assert set(module.state_dict()) == expected
    eager = EagerSlotAttention(24, 16)
    eager.load_state_dict(module.state_dict())
    slots, features = rand(2, 5, 16), rand(2, 9, 24)
    for n_iters in (None, 1, 2):
        got, want = module(slots, features, n_iters=n_iters), eager(slots, features, n_iters=n_iters)
        torch.testing.assert_close(got["slots"], want["slots"])
        torch.testing.assert_close(got["masks"], want["masks"])


@pytest.mark.parametrize(("device", "backend"), CASES)
@pytest.mark.parametrize("dtype", dtype_params(torch.float64, torch.float32))
def test_iterations_match_reference(device, backend, dtype):
    """ops.slot_attention against reference.slot_attention: both GRU hidden states, gradients through every
    iteration or the last only, values and gradients of slots, k, v and every parameter."""
    eager = _eager_module(20, 16, {"kvq_dim": 12, "hidden_dim": 24}).to(device)
    params = {name: leaf(p.detach()) for name, p in eager.named_parameters() if not name.startswith(("to_k", "to_v", "norm_f"))}
    B, K, N = 2, 3, 29
    for gru_hidden in ("normed", "prev"):
        for grad_last_only in (False, True):
            slots, k, v = (leaf(rand(*shape, dtype=dtype, device=device)) for shape in ((B, K, 16), (B, N, 12), (B, N, 12)))
            p = {name: leaf(t.to(dtype)) for name, t in params.items()}
            got = ops.slot_attention(slots, k, v, p, 3, gru_hidden=gru_hidden, grad_last_only=grad_last_only, backend=backend)
            inputs64 = [leaf(t.double()) for t in (slots, k, v)]
            p64 = {name: leaf(t.double()) for name, t in p.items()}
            want = reference.slot_attention(*inputs64, p64, 3, None, 1e-8, gru_hidden, grad_last_only)
            what = f"{gru_hidden}, grad_last_only={grad_last_only}, {dtype}"
            for name, g, w in zip(("slots", "masks"), got, want):
                assert g.dtype == dtype
                assert_close(g, w, dtype, f"{what}: {name}")
            grad_out = (rand(B, K, 16, dtype=dtype, device=device), rand(B, K, N, dtype=dtype, device=device))
            wrt = (slots, k, v, *p.values())
            got_grads = torch.autograd.grad(got, wrt, grad_out, allow_unused=True)
            want_grads = torch.autograd.grad(want, (*inputs64, *p64.values()), [g.double() for g in grad_out], allow_unused=True)
            for name, g, w in zip(("slots", "k", "v", *p), got_grads, want_grads):
                if w is None:  # grad_last_only: the initial slots get no gradient
                    assert g is None or not g.any(), f"{what}: grad of {name} should be zero"
                    continue
                assert_close(g, w, dtype, f"{what}: grad of {name}")


@pytest.mark.parametrize(("device", "backend"), [c for c in CASES if c.values[1] == "cpp"])
@pytest.mark.parametrize("grad_last_only", [False, True])
def test_cpp_whole_loop_equals_the_python_loop(device, backend, grad_last_only):
    """The cpp backend runs every iteration in one C++ call in eager mode (kept for its 2-7% fwd+bwd): the same
    values and gradients as the one Python loop (reference iterations over the cpp core and torch's GRUCell), which
    torch.compile traces. Same ATen layers in the same order: equal to float64 rounding."""
    from kdfast.reference.slot_attention import iterations

    eager = _eager_module(20, 16, {"kvq_dim": 12, "hidden_dim": 24}).to(device)
    p = {name: leaf(t.detach()) for name, t in eager.named_parameters() if not name.startswith(("to_k", "to_v", "norm_f"))}
    slots, k, v = (leaf(rand(*shape, dtype=torch.float64, device=device)) for shape in ((2, 3, 16), (2, 29, 12), (2, 29, 12)))
    got = ops.slot_attention(slots, k, v, p, 3, grad_last_only=grad_last_only, backend=backend)

    def core(q, k, v, last):
        return slot_attention_module._core(q, k, v, 12**-0.5, 1e-8, last, backend)[:2]

    want = iterations(slots, k, v, p, 3, "normed", grad_last_only, core, slot_attention_module._aten_gru_cell)
    grad_out = (rand(2, 3, 16, dtype=torch.float64, device=device), rand(2, 3, 29, dtype=torch.float64, device=device))
    wrt = (k, v, *p.values())
    for name, g, w in zip(("slots", "masks", "k", "v", *p), (*got, *torch.autograd.grad(got, wrt, grad_out)),
                          (*want, *torch.autograd.grad(want, wrt, grad_out))):
        assert_close(g, w, torch.float64, name)


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_iterations_gradcheck(device, backend):
    """fp64 gradcheck through two iterations, every input and parameter at once (fast mode: a random projection
    of the Jacobian, as each full Jacobian column would be two more runs of the interpreted kernels)."""
    eager = _eager_module(6, 4, {"kvq_dim": 3, "hidden_dim": 5}).to(device)
    names = [name for name, _ in eager.named_parameters() if not name.startswith(("to_k", "to_v", "norm_f"))]
    params = [leaf(p.detach()) for name, p in eager.named_parameters() if name in names]
    slots, k, v = (leaf(rand(*shape, dtype=torch.float64, device=device)) for shape in ((2, 3, 4), (2, 5, 3), (2, 5, 3)))

    def fn(slots, k, v, *values):
        return ops.slot_attention(slots, k, v, dict(zip(names, values)), 2, backend=backend)

    assert torch.autograd.gradcheck(fn, (slots, k, v, *params), fast_mode=True)


def test_module_compile_fullgraph_matches_eager():
    module = SlotAttention(20, 16, kvq_dim=12, n_iters=2)
    slots, features = leaf(rand(2, 5, 16)), leaf(rand(2, 37, 20))
    compiled = torch.compile(module, fullgraph=True)
    want, got = module(slots, features), compiled(slots, features)
    for key in ("slots", "masks"):
        torch.testing.assert_close(got[key], want[key])
    wrt = (slots, features, *module.parameters())
    grad_out = (rand(2, 5, 16), rand(2, 5, 37))
    got_grads = torch.autograd.grad((got["slots"], got["masks"]), wrt, grad_out)
    want_grads = torch.autograd.grad((want["slots"], want["masks"]), wrt, grad_out)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)


def _bad_iterations():
    eager = EagerSlotAttention(8, 6, kvq_dim=4)
    params = {name: p.detach() for name, p in eager.named_parameters()}
    good = lambda: (rand(2, 3, 6), rand(2, 5, 4), rand(2, 5, 4), dict(params))
    without = lambda key: (rand(2, 3, 6), rand(2, 5, 4), rand(2, 5, 4), {k: p for k, p in params.items() if k != key})
    reshaped = lambda key: (rand(2, 3, 6), rand(2, 5, 4), rand(2, 5, 4), {**params, key: params[key][:-1]})
    return [
        ("slots rank", lambda: (rand(3, 6), *good()[1:]), {}, ValueError, r"slots must have 3 dimensions"),
        ("k width", lambda: (rand(2, 3, 6), rand(2, 5, 5), rand(2, 5, 4), dict(params)), {}, ValueError, r"to_q.weight'\] must have shape \(5, 6\)"),
        ("batch mismatch", lambda: (rand(3, 3, 6), *good()[1:]), {}, ValueError, r"batch size B must match"),
        ("missing to_q", lambda: without("to_q.weight"), {}, ValueError, r"params is missing 'to_q.weight'"),
        ("gru shape", lambda: reshaped("gru.weight_hh"), {}, ValueError, r"gru.weight_hh'\] must have shape \(18, 6\)"),
        ("mlp part missing", lambda: without("mlp.layers.3.bias"), {}, ValueError, r"params is missing 'mlp.layers.3.bias'"),
        ("params not a mapping", lambda: (*good()[:3], list(params.values())), {}, TypeError, r"params must be a mapping"),
        ("integer param", lambda: (*good()[:3], {**params, "to_q.weight": torch.ones(4, 6, dtype=torch.int64)}), {}, TypeError, r"floating-point"),
        ("n_iters 0", good, {"n_iters": 0}, ValueError, r"n_iters must be an integer >= 1"),
        ("n_iters float", good, {"n_iters": 2.0}, ValueError, r"n_iters must be an integer >= 1"),
        ("gru_hidden", good, {"gru_hidden": "last"}, ValueError, r"gru_hidden must be one of"),
        ("eps nan", good, {"eps": float("nan")}, ValueError, r"eps must be a finite"),
        ("scale inf", good, {"scale": float("inf")}, ValueError, r"scale must be a finite"),
        ("backend", good, {"backend": "fast"}, ValueError, r"backend must be one of"),
    ]


@pytest.mark.parametrize(("make", "kwargs", "error", "message"), [c[1:] for c in _bad_iterations()], ids=[c[0] for c in _bad_iterations()])
def test_iterations_bad_input_gets_a_clear_error(make, kwargs, error, message):
    slots, k, v, params = make()
    with pytest.raises(error, match=message):
        ops.slot_attention(slots, k, v, params, **kwargs)


def test_module_bad_options_get_a_clear_error():
    with pytest.raises(ValueError, match=r"kvq_dim \(12\) must equal slot_dim \(16\)"):
        SlotAttention(8, 16, kvq_dim=12, use_gru=False)
    with pytest.raises(ValueError, match=r"n_iters must be an integer >= 1"):
        SlotAttention(8, 16, n_iters=0)
    with pytest.raises(ValueError, match=r"gru_hidden must be 'normed' or 'prev'"):
        SlotAttention(8, 16, gru_hidden="h")


# ------------------------------------------------------------------------------------------ kernel specifics


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_without_masks(device, backend):
    """return_attn=False: no masks, the same updates and gradients."""
    q, k, v = inputs(2, 5, 37, 48, 20, device=device)
    updates, attn = ops.slot_attention_core(q, k, v, return_attn=False, backend=backend)
    assert attn is None
    ref = reference.slot_attention_core(q.double(), k.double(), v.double())[0]
    assert_close(updates, ref, torch.float32, "updates without masks")
    grad_out = rand(2, 5, 20, device=device)
    for name, g, w in zip("qkv", grads_of(updates, (q, k, v), grad_out), grads_of(ref, (q, k, v), grad_out)):
        assert_close(g, w, torch.float32, f"grad of {name} without masks")


@pytest.mark.parametrize(("device", "backend"), [c for c in CASES if c.values[1] == "triton"])
@pytest.mark.parametrize("return_attn", [True, False])
@pytest.mark.parametrize("dtype", dtype_params(torch.float32, torch.float64))
def test_triton_tiles_and_chunks_cover_every_token(device, backend, return_attn, dtype):
    """Small forced tiles: several chunks per batch element (partial sums reduced in order), several tiles per
    chunk, a partial last tile and chunk, K padded to 16 and D, Dv to powers of two."""
    kernels = importlib.import_module("kdfast.kernels.slot_attention")
    B, K, N, D, Dv = 2, 7, 77, 24, 40
    q, k, v = inputs(B, K, N, D, Dv, dtype=dtype, device=device)
    k = leaf(rand(B, D, N, dtype=dtype, device=device)).transpose(1, 2)  # strided keys
    q64, k64, v64 = (leaf(t.detach().double()) for t in (q, k, v))
    ref_updates, ref_attn = reference.slot_attention_core(q64, k64, v64, 0.4, 1e-8)
    grad_updates = rand(B, K, Dv, dtype=dtype, device=device)
    grad_attn = rand(B, K, N, dtype=dtype, device=device) if return_attn else None
    want = torch.autograd.grad(
        [ref_updates, ref_attn] if return_attn else [ref_updates], (q64, k64, v64),
        [grad_updates.double(), grad_attn.double()] if return_attn else [grad_updates.double()],
    )
    for block_n, chunk in ((16, 32), (16, 16), (32, 96)):
        with torch.no_grad():
            updates, attn, norm = kernels.slot_attention_core_forward(q, k, v, 0.4, 1e-8, return_attn, block_n, chunk)
            grads = kernels.slot_attention_core_backward(
                grad_updates, grad_attn, q, k, v, updates, norm, 0.4, 1e-8, block_n, chunk
            )
        what = f"{dtype}, block_n={block_n}, chunk={chunk}"
        assert_close(updates, ref_updates, dtype, f"{what}: updates")
        assert_close(norm, (ref_attn + 1e-8).sum(-1), dtype, f"{what}: norm")
        if return_attn:
            assert_close(attn, ref_attn, dtype, f"{what}: attention")
        else:
            assert attn.shape == (B, K, 0)
        for name, g, w in zip("qkv", grads, want):
            assert_close(g, w, dtype, f"{what}: grad of {name}")


@pytest.mark.parametrize(("device", "backend"), [c for c in CASES if c.values[1] == "triton"])
def test_triton_limits_name_the_fallback(device, backend, monkeypatch):
    kernels = importlib.import_module("kdfast.kernels.slot_attention")
    q = rand(1, kernels.MAX_SLOTS + 1, 8, device=device)
    k, v = rand(1, 5, 8, device=device), rand(1, 5, 8, device=device)
    with pytest.raises(ValueError, match=r"triton backend handles K <= 64 slots .* use backend='cpp'"):
        ops.slot_attention_core(q, k, v, backend="triton")
    wide = rand(1, 3, kernels.MAX_DIM + 1, device=device)
    with pytest.raises(ValueError, match=r"D, Dv <= 256"):
        ops.slot_attention_core(wide, rand(1, 5, kernels.MAX_DIM + 1, device=device), v, backend="triton")
    # K and D each within their limit, but the (K, D) tile is not (64 x 256: too much shared memory on sm_90)
    q, k = rand(1, 64, 256, device=device), rand(1, 5, 256, device=device)
    with pytest.raises(ValueError, match=r"K x max\(D, Dv\) <= 8192"):
        ops.slot_attention_core(q, k, v, backend="triton")
    # preferred through KDFAST_BACKEND (not requested), the same tile falls back quietly
    monkeypatch.setenv("KDFAST_BACKEND", "triton")
    fallback = "cpp" if device == "cpu" else "reference"
    assert _backend.resolve("slot_attention_core", None, device, (64, 256, 8)) == fallback


# -------------------------------------------------------------------------- fused iterations (Triton)

TRITON_CASES = [c for c in CASES if c.values[1] == "triton"]


def _iteration_params(D, Dq, Dv, Dh, gru=True, gru_bias=True, mlp=True, q_bias=False, dtype=torch.float64, device="cpu"):
    """Random parameters by videosaur key; LayerNorm weights near 1, the rest scaled like a default init."""
    r = lambda *shape: rand(*shape, dtype=dtype, device=device) * shape[-1] ** -0.5
    p = {"norm_slots.weight": 1 + 0.2 * r(D), "norm_slots.bias": 0.2 * r(D), "to_q.weight": r(Dq, D)}
    if q_bias:
        p["to_q.bias"] = r(Dq)
    if gru:
        p.update({"gru.weight_ih": r(3 * D, Dv), "gru.weight_hh": r(3 * D, D)})
        if gru_bias:
            p.update({"gru.bias_ih": r(3 * D), "gru.bias_hh": r(3 * D)})
    if mlp:
        p.update({"mlp.layers.0.weight": 1 + 0.2 * r(D), "mlp.layers.0.bias": 0.2 * r(D), "mlp.layers.1.weight": r(Dh, D),
                  "mlp.layers.1.bias": r(Dh), "mlp.layers.3.weight": r(D, Dh), "mlp.layers.3.bias": r(D)})
    return p


@pytest.mark.parametrize(("gru", "mlp"), [(True, True), (True, False), (False, True), (False, False)])
def test_fused_layout_columns_tile_the_row(gru, mlp):
    """The kernels' act / dact rows: the columns read on the host (the parameter gradients, the fake outputs) are
    the ones the jitted layout functions give the kernels, back to back, each as wide as its layer's output."""
    kernels = importlib.import_module("kdfast.kernels.slot_attention_iterations")
    D, Dq, Dv, Dh = 6, 5, 7, 9
    k, v = torch.empty(1, 1, Dq), torch.empty(1, 1, Dv)
    shapes = {"norm_w": (D,), "norm_b": (D,), "wq": (Dq, D), "bq": None, "w_ih": (3 * D, Dv) if gru else None,
              "w_hh": (3 * D, D) if gru else None, "b_ih": None, "b_hh": None, "mlp_norm_w": (D,) if mlp else None,
              "mlp_norm_b": (D,) if mlp else None, "w1": (Dh, D) if mlp else None, "b1": None,
              "w3": (D, Dh) if mlp else None, "b3": None}
    params = [None if shapes[name] is None else torch.empty(shapes[name]) for name in kernels.PARAMETERS]
    g, m = int(gru), int(mlp)
    want_act = {"slots": D, "xhat": D, "x": D, "q": Dq, "u": Dv, "r": g * D, "z": g * D, "n": g * D, "hn": g * D,
                "h": D, "yhat": m * D, "y": m * D, "a": m * Dh, "rstd_x": 1, "norm": 1, "rstd_y": m}
    want_dact = {"ds": D, "dh": D, "dx": D, "dq": Dq, "dgi": g * 3 * D, "dgh": g * 3 * D, "da": m * Dh, "dy": m * D,
                 "du": g * Dv, "dhid": g * D}
    for layout, want in ((kernels.act_layout(k, v, params), want_act), (kernels.dact_layout(k, v, params), want_dact)):
        assert {name: width for name, (_, width) in layout.items() if name != "C"} == want
        starts = [start for name, (start, _) in layout.items() if name != "C"]
        assert starts == [sum(list(want.values())[:i]) for i in range(len(want))]
        assert layout["C"] == (sum(want.values()), 0)


# (B, K, N, D, Dq, Dv, Dh, layers, gru_hidden, grad_last_only, n_iters): K = 1 and N = 1; widths that are not
# powers of two and span several 32-column chunks (D = 48, Dq = 96, Dv = 40, Dh = 100); a q bias and a GRU
# without biases; no GRU (both hidden states), no MLP, neither; gradients through the last iteration only;
# the slot limit K = 64; N over several token tiles.
FUSED_CONFIGS = [
    (1, 1, 1, 16, 16, 16, 64, {}, "normed", False, 2),
    (2, 5, 37, 48, 96, 40, 100, {}, "prev", False, 3),
    (2, 3, 29, 20, 12, 12, 40, {"q_bias": True, "gru_bias": False}, "normed", False, 2),
    (2, 4, 33, 24, 24, 24, 48, {"gru": False}, "prev", False, 2),
    (2, 4, 33, 24, 24, 24, 0, {"gru": False, "mlp": False}, "normed", False, 3),
    (2, 3, 29, 16, 20, 20, 0, {"mlp": False}, "prev", False, 2),
    (2, 3, 29, 16, 12, 12, 64, {}, "normed", True, 3),
    (1, 64, 20, 16, 16, 16, 32, {}, "normed", False, 2),
    (2, 7, 300, 32, 32, 32, 128, {}, "normed", False, 2),
]


@pytest.mark.parametrize("config", FUSED_CONFIGS, ids=lambda c: "-".join(map(str, c[:7])) + f"-{c[8]}-{c[10]}it" + ("-last" if c[9] else "") + "".join(f"-{k}={v}" for k, v in c[7].items()))
@pytest.mark.parametrize(("device", "backend", "dtype"), dtype_cases(TRITON_CASES))
def test_fused_iterations_match_reference(device, backend, config, dtype):
    """The fused kernels against the float64 reference: slots, masks and the gradients of slots, k, v and every
    parameter, from both outputs and from the masks alone; k and v strided (a transposed projection output)."""
    B, K, N, D, Dq, Dv, Dh, layers, gru_hidden, grad_last_only, n_iters = config
    params64 = _iteration_params(D, Dq, Dv, Dh, **layers, device=device)
    p = {name: leaf(t.to(dtype)) for name, t in params64.items()}
    slots = leaf(rand(B, K, D, dtype=dtype, device=device))
    k = leaf(rand(B, Dq, N, dtype=dtype, device=device)).transpose(1, 2)
    v = leaf(rand(B, Dv, N, dtype=dtype, device=device)).transpose(1, 2)
    got = ops.slot_attention(slots, k, v, p, n_iters, gru_hidden=gru_hidden, grad_last_only=grad_last_only, backend=backend)
    inputs64 = [leaf(t.detach().double()) for t in (slots, k, v)]
    p64 = {name: leaf(t.detach().double()) for name, t in p.items()}
    want = reference.slot_attention(*inputs64, p64, n_iters, None, 1e-8, gru_hidden, grad_last_only)
    for name, g, w in zip(("slots", "masks"), got, want):
        assert g.dtype == dtype and g.shape == w.shape
        assert_close(g, w, dtype, f"{dtype}: {name}")
    grad_out = (rand(B, K, D, dtype=dtype, device=device), rand(B, K, N, dtype=dtype, device=device))
    wrt, wrt64 = (slots, k, v, *p.values()), (*inputs64, *p64.values())
    for used in ((0, 1), (1,)):
        got_grads = torch.autograd.grad([got[i] for i in used], wrt, [grad_out[i] for i in used], allow_unused=True, retain_graph=True)
        want_grads = torch.autograd.grad([want[i] for i in used], wrt64, [grad_out[i].double() for i in used],
                                         allow_unused=True, retain_graph=True)
        for name, g, w in zip(("slots", "k", "v", *p), got_grads, want_grads):
            what = f"{dtype}, outputs {used}: grad of {name}"
            if w is None:  # grad_last_only: the initial slots get none, nor does v from the masks alone
                assert g is None or not g.any(), what
                continue
            assert g.dtype == dtype and g.shape == w.shape, what
            assert_close(g, w, dtype, what)


@pytest.mark.parametrize(("device", "backend"), TRITON_CASES)
@pytest.mark.parametrize("dtype", dtype_params(torch.float64, torch.float32))
def test_fused_iterations_large_logits_and_determinism(device, backend, dtype):
    """scale x 100 saturates the softmax and the GRU's gates. Logits of ~100 make the problem itself
    ill-conditioned for float32 (the float32 reference strays up to ~5e-6 from the float64 one), so, as for the
    core, the numbers, gradients included, are checked in float64 and float32 checks finiteness; in both, two
    runs agree bit for bit (dk and dv add up over the iterations in place, no atomics)."""
    B, K, N, D = 2, 5, 40, 16
    scale = 100 * D**-0.5
    params64 = _iteration_params(D, D, D, 32, device=device)
    inputs64 = [rand(B, n, D, dtype=torch.float64, device=device) for n in (K, N, N)]

    def outputs_and_grads(fn, inputs, params):
        inputs, params = [leaf(t) for t in inputs], {n: leaf(t) for n, t in params.items()}
        out = fn(*inputs, params, 3, scale=scale)
        return (*out, *torch.autograd.grad(out, (*inputs, *params.values()), [torch.ones_like(o) for o in out]))

    fused = lambda *args, **kwargs: ops.slot_attention(*args, **kwargs, backend=backend)
    inputs, params = [t.to(dtype) for t in inputs64], {n: t.to(dtype) for n, t in params64.items()}
    first, second = (outputs_and_grads(fused, inputs, params) for _ in range(2))
    for a, b in zip(first, second):
        assert torch.isfinite(a).all() and torch.equal(a, b), dtype
    if dtype == torch.float64:
        want = outputs_and_grads(reference.slot_attention, inputs64, params64)
        names = ("slots", "masks", "grad of slots", "grad of k", "grad of v", *(f"grad of {n}" for n in params64))
        for name, g, w in zip(names, first, want):
            assert_close(g, w, torch.float64, f"large logits: {name}")


@pytest.mark.parametrize(("device", "backend"), TRITON_CASES)
def test_fused_iterations_opcheck(device, backend):
    kd = torch.ops.kdfast
    names = reference.SLOT_ATTENTION_PARAMS
    B, K, N, D, Dv, Dh = 2, 3, 5, 4, 6, 8
    every = _iteration_params(D, D, Dv, Dh, q_bias=True, dtype=torch.float32, device=device)
    bare = _iteration_params(D, D, D, 0, gru=False, mlp=False, dtype=torch.float32, device=device)
    for p, width, hidden_normed in ((every, Dv, True), (bare, D, False)):
        params = [leaf(p[name]) if name in p else None for name in names]
        slots, k, v = leaf(rand(B, K, D, device=device)), leaf(rand(B, N, D, device=device)), leaf(rand(B, N, width, device=device))
        for n_iters, act_iters in ((2, 2), (3, 1)):
            args = (slots, k, v, *params, n_iters, D**-0.5, 1e-8, hidden_normed, act_iters)
            torch.library.opcheck(kd._slot_attention_iterations_triton.default, args)
            with torch.no_grad():
                _, _, act = kd._slot_attention_iterations_triton(*args)
            detached = [None if t is None else t.detach() for t in params]
            for grad_attn in (rand(B, K, N, device=device), None):
                backward_args = (rand(B, K, D, device=device), grad_attn, k.detach(), v.detach(), act, *detached,
                                 n_iters, D**-0.5, 1e-8, hidden_normed)
                torch.library.opcheck(kd._slot_attention_iterations_triton_backward.default, backward_args)


@pytest.mark.parametrize(("device", "backend"), TRITON_CASES)
def test_fused_iterations_compile_fullgraph(device, backend):
    """torch.compile calls the fused op (opaque to the tracer): the same values and gradients as eager."""
    p = {name: leaf(t.float()) for name, t in _iteration_params(16, 12, 12, 24, device=device).items()}
    slots, k, v = leaf(rand(2, 5, 16, device=device)), leaf(rand(2, 29, 12, device=device)), leaf(rand(2, 29, 12, device=device))

    def fn(slots, k, v, *values):
        return ops.slot_attention(slots, k, v, dict(zip(p, values)), 2, backend=backend)

    compiled = torch.compile(fn, fullgraph=True)
    want, got = fn(slots, k, v, *p.values()), compiled(slots, k, v, *p.values())
    grad_out = (rand(2, 5, 16, device=device), rand(2, 5, 29, device=device))
    wrt = (slots, k, v, *p.values())
    for g, w in zip((*got, *torch.autograd.grad(got, wrt, grad_out)), (*want, *torch.autograd.grad(want, wrt, grad_out))):
        torch.testing.assert_close(g, w)


def test_fused_must_be_a_bool():
    eager = EagerSlotAttention(8, 6, kvq_dim=4)
    params = {name: p.detach() for name, p in eager.named_parameters()}
    with pytest.raises(TypeError, match=r"fused must be a bool, got int"):
        ops.slot_attention(rand(2, 3, 6), rand(2, 5, 4), rand(2, 5, 4), params, fused=1)
