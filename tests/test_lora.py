"""lora_linear, lora_qkv and lora_attention (WeCoLoRA, PEFT semantics) on every backend against the float64 reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from harness import TOLERANCE, assert_close, dtype_cases, dtype_params, grads_of, implemented_cases, leaf, rand, relative_error

from kdfast import ops, reference
from kdfast.ops import lora

CASES = implemented_cases("lora_linear")
DTYPE_CASES = dtype_cases(CASES)  # (device, backend, dtype): each case in every dtype it is tested in
# (leading shape of x, in_features I, out_features O, rank r): ranks 1, 7, 64 (over I) and 128, odd I and O,
# x of shape (I,), (N, I), (B, T, I) and (B, T, S, I), singletons.
LINEAR_SHAPES = [
    ((1, 1), 1, 1, 1),
    ((5,), 13, 11, 1),
    ((), 33, 20, 7),
    ((2, 9), 19, 23, 7),
    ((2, 3, 4), 9, 17, 7),
    ((3, 17), 48, 37, 64),
    ((2, 5), 131, 67, 128),
]
# (B, T, C, H): single head, odd T, head_dim 3, 4 and 12.
QKV_SHAPES = [(1, 1, 4, 1), (2, 5, 12, 3), (2, 7, 48, 4)]
# Which of the q, k, v slices carry a LoRA pair.
SLICES = {"qkv": (True, True, True), "qv": (True, False, True), "k": (False, True, False), "none": (False, False, False)}




def fast_mode(backend: str) -> bool:
    """gradcheck's fast mode (one random direction instead of the full Jacobian) for Triton on CPU tensors: the
    interpreter costs milliseconds per launch and a full Jacobian takes two forwards per input element (minutes
    for these ops). The reference backend gets the full check."""
    return backend == "triton" and not torch.cuda.is_available()


def as64(t):
    """The float64 copy of a tensor (a leaf with the same requires_grad), of a LoRA pair, or None."""
    if t is None:
        return None
    if isinstance(t, tuple):
        return tuple(as64(x) for x in t)
    return leaf(t.double(), t.requires_grad)



def linear_inputs(lead, I, O, r, *, bias=True, dtype=torch.float32, device="cpu", base_grad=True):
    x = leaf(rand(*lead, I, dtype=dtype, device=device))
    weight = leaf(rand(O, I, dtype=dtype, device=device) * I**-0.5, base_grad)
    b = leaf(rand(O, dtype=dtype, device=device), base_grad) if bias else None
    a = leaf(rand(r, I, dtype=dtype, device=device) * I**-0.5)
    bb = leaf(rand(O, r, dtype=dtype, device=device))
    return x, weight, b, a, bb


def qkv_inputs(B, T, C, slices, *, bias=True, r=5, dtype=torch.float32, device="cpu"):
    x = leaf(rand(B, T, C, dtype=dtype, device=device))
    w_qkv = leaf(rand(3 * C, C, dtype=dtype, device=device) * C**-0.5)
    b_qkv = leaf(rand(3 * C, dtype=dtype, device=device)) if bias else None
    pairs = [
        (leaf(rand(r + i, C, dtype=dtype, device=device) * C**-0.5), leaf(rand(C, r + i, dtype=dtype, device=device)))
        if on
        else None
        for i, on in enumerate(slices)
    ]
    return x, w_qkv, b_qkv, pairs


def flat(*items):
    """The tensors among items, LoRA pairs unpacked, Nones dropped."""
    out = []
    for item in items:
        if isinstance(item, (tuple, list)):
            out += flat(*item)
        elif item is not None:
            out.append(item)
    return out


# ------------------------------------------------------------------------------------------- lora_linear


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=str)
@pytest.mark.parametrize(("device", "backend", "dtype"), DTYPE_CASES)
def test_linear_matches_reference(device, backend, dtype, shape, bias):
    lead, I, O, r = shape
    tensors = linear_inputs(lead, I, O, r, bias=bias, dtype=dtype, device=device)
    tensors64 = [as64(t) for t in tensors]
    out = ops.lora_linear(*tensors, 0.75, backend=backend)
    ref = reference.lora_linear(*tensors64, 0.75)
    assert out.dtype == dtype and out.shape == (*lead, O)
    # The same computation on absolute values (and its gradients for |grad_out|): what each rounding error scales with.
    magnitude_inputs = [None if t is None else leaf(t.detach().abs()) for t in tensors64]
    magnitude = reference.lora_linear(*magnitude_inputs, 0.75)
    N = math.prod(lead)
    assert_close_to_sums(out, ref, magnitude, dtype, I + r + 2, f"{dtype} output")
    grad_out = rand(*lead, O, dtype=dtype, device=device)
    wrt, wrt64, wrt_magnitude = flat(*tensors), flat(*tensors64), flat(*magnitude_inputs)
    # products summed into one element of each gradient (the bound's term count)
    terms = {"x": O + r + 2, "weight": N + 1, "bias": N + 1, "lora_a": N + O + 1, "lora_b": N + I + 1}
    names = ("x", "weight", "bias", "lora_a", "lora_b") if bias else ("x", "weight", "lora_a", "lora_b")
    for name, got, want, size in zip(names, grads_of(out, wrt, grad_out), grads_of(ref, wrt64, grad_out),
                                     grads_of(magnitude, wrt_magnitude, grad_out.abs())):
        assert got.dtype == dtype and got.shape == want.shape
        assert_close_to_sums(got, want, size, dtype, terms[name], f"{dtype} grad of {name}")


def assert_close_to_sums(got, want, magnitude, dtype, terms, what):
    """assert_close, except where the float64 result ``want`` is a near-cancelling sum (likely at I = r = 1, where
    y = x (w + 0.75 a b)): every output and gradient of lora_linear is a sum of at most ``terms`` products (nested
    sums counted together), and a float32 sum of n products in any order, FMA or not, is within
    gamma_n * sum |products| of exact, gamma_n = n u / (1 - n u) (Higham, Accuracy and Stability of Numerical
    Algorithms, 3.1); ``magnitude`` is that sum of |products| (the computation on absolute values). So the error
    relative to ``want`` is unbounded under cancellation though the result is exact to rounding; there the
    elementwise bound applies instead, plus one rounding of the output to ``dtype``. Away from cancellation the test
    is the 1e-5 relative one it was."""
    if relative_error(got, want) <= TOLERANCE[dtype]:
        return
    unit, out_unit = 2.0**-24, torch.finfo(dtype).eps / 2
    bound = terms * unit / (1 - terms * unit) * magnitude + out_unit * want.abs()
    excess = (got.detach().double() - want.detach()).abs() - bound.detach()
    assert (excess <= 0).all(), f"{what}: relative error {relative_error(got, want):.3g} > {TOLERANCE[dtype]:g} " \
                                f"and {excess.max().item():.3g} above the rounding bound of its sums"


@pytest.mark.parametrize("trainable", ["lora-only", "lora-and-x", "everything"])
@pytest.mark.parametrize(("device", "backend"), CASES)
def test_linear_frozen_base_gets_no_gradient(device, backend, trainable):
    """WeCoLoRA freezes every base weight: weight.grad and bias.grad stay None; LoRA and x gradients are right."""
    x, weight, b, a, bb = linear_inputs((3, 7), 24, 19, 4, device=device, base_grad=trainable == "everything")
    x.requires_grad_(trainable != "lora-only")
    out = ops.lora_linear(x, weight, b, a, bb, 2.0, backend=backend)
    ref = reference.lora_linear(*(as64(t) for t in (x, weight, b, a, bb)), 2.0)
    assert_close(out, ref, torch.float32)
    grad_out = rand(3, 7, 19, device=device)
    (out * grad_out).sum().backward()
    x64, weight64, b64, a64, bb64 = (as64(t) for t in (x, weight, b, a, bb))
    (reference.lora_linear(x64, weight64, b64, a64, bb64, 2.0) * grad_out.double()).sum().backward()
    for name, t, t64 in (("x", x, x64), ("weight", weight, weight64), ("bias", b, b64), ("lora_a", a, a64), ("lora_b", bb, bb64)):
        if not t.requires_grad:
            assert t.grad is None, f"{name} is frozen but got a gradient"
        else:
            assert_close(t.grad, t64.grad, torch.float32, f"grad of {name}")


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_linear_non_contiguous_and_expanded_inputs(device, backend):
    x = leaf(rand(3, 21, 5, device=device)).transpose(1, 2)  # (3, 5, 21)
    weight = leaf(rand(21, 16, device=device)).t()  # (16, 21), a transposed view
    b = leaf(rand(1, device=device)).expand(16)
    a = leaf(rand(21, 6, device=device)).t()
    bb = leaf(rand(16, 6, device=device))
    out = ops.lora_linear(x, weight, b, a, bb, 0.5, backend=backend)
    ref = reference.lora_linear(x.double(), weight.double(), b.double(), a.double(), bb.double(), 0.5)
    assert_close(out, ref, torch.float32)
    grad_out = rand(3, 16, 5, device=device).transpose(1, 2)
    wrt = (x, weight, b, a, bb)
    for got, want in zip(grads_of(out, wrt, grad_out), grads_of(ref, wrt, grad_out)):
        assert_close(got, want, torch.float32, "grad")


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_linear_dropout_is_reproducible_and_the_gradient_follows_its_mask(device, backend):
    p, scale = 0.3, 0.7
    dtype = torch.float64
    x, weight, b, a, bb = linear_inputs((4, 6), 19, 23, 5, dtype=dtype, device=device)
    torch.manual_seed(1234)
    first = ops.lora_linear(x, weight, b, a, bb, scale, p, backend=backend)
    torch.manual_seed(1234)
    second = ops.lora_linear(x, weight, b, a, bb, scale, p, backend=backend)
    assert torch.equal(first, second)
    grad_out = rand(4, 6, 23, dtype=dtype, device=device)
    wrt = (x, weight, b, a, bb)
    first_grads = grads_of(first, wrt, grad_out)
    assert all(torch.equal(g1, g2) for g1, g2 in zip(first_grads, grads_of(second, wrt, grad_out)))

    # The mask depends on the seed and x's shape only: recover it with a zero base and an identity LoRA.
    eye = torch.eye(19, dtype=dtype, device=device)
    torch.manual_seed(1234)
    probe = ops.lora_linear(x.detach(), torch.zeros_like(eye), None, eye, eye, 1.0, p, backend=backend)
    kept = probe != 0
    mask = kept.to(dtype) / (1 - p)
    torch.testing.assert_close(probe, x.detach() * mask)
    assert 0.1 < 1 - kept.double().mean().item() < 0.5, "the drop rate is nowhere near p"
    ref = reference.lora_linear(x, weight, b, a, bb, scale, mask)
    assert_close(first, ref, dtype, "output with dropout")
    for name, got, want in zip(("x", "weight", "bias", "lora_a", "lora_b"), first_grads, grads_of(ref, wrt, grad_out)):
        assert_close(got, want, dtype, f"grad of {name} with dropout")

    torch.manual_seed(4321)
    assert not torch.equal(ops.lora_linear(x, weight, b, a, bb, scale, p, backend=backend), first)
    # Not training: no dropout at all.
    no_dropout = reference.lora_linear(x, weight, b, a, bb, scale)
    assert_close(ops.lora_linear(x, weight, b, a, bb, scale, p, training=False, backend=backend), no_dropout, dtype, "eval")
    assert_close(ops.lora_linear(x, weight, b, a, bb, scale, 0.0, backend=backend), no_dropout, dtype, "p = 0")


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_linear_custom_op_with_a_seed_is_a_deterministic_function(device, backend):
    """With a fixed seed tensor the op is a function of its inputs: same results twice, gradient = finite differences."""
    op = torch.ops.kdfast.lora_linear.default
    x, weight, b, a, bb = linear_inputs((2, 3), 5, 4, 2, dtype=torch.float64, device=device)
    seed = torch.tensor(987654321, dtype=torch.int64)
    first = op(x, weight, b, a, bb, 0.9, 0.4, seed, backend)
    assert torch.equal(first, op(x, weight, b, a, bb, 0.9, 0.4, seed, backend))
    assert not torch.equal(first, op(x, weight, b, a, bb, 0.9, 0.4, seed + 1, backend))
    fn = lambda x, w, b, a, bb: op(x, w, b, a, bb, 0.9, 0.4, seed, backend)
    assert torch.autograd.gradcheck(fn, (x, weight, b, a, bb), fast_mode=fast_mode(backend))


# ---------------------------------------------------------------------------------------------- lora_qkv


def timm_qkv(x, w_qkv, b_qkv, pairs, scale, num_heads):
    """timm Attention's qkv path, written out, with WeCoLoRA's per-slice LoRA added to the fused projection."""
    B, T, C = x.shape
    qkv = F.linear(x, w_qkv, b_qkv)
    delta = [torch.zeros_like(x) if pair is None else scale * F.linear(F.linear(x, pair[0]), pair[1]) for pair in pairs]
    qkv = qkv + torch.cat(delta, dim=-1)
    return qkv.reshape(B, T, 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4).unbind(0)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("slices", list(SLICES), ids=list(SLICES))
@pytest.mark.parametrize(("device", "backend", "dtype"), DTYPE_CASES)
def test_qkv_matches_reference_and_timm_layout(device, backend, dtype, slices, bias):
    for B, T, C, H in QKV_SHAPES:
        x, w_qkv, b_qkv, pairs = qkv_inputs(B, T, C, SLICES[slices], bias=bias, dtype=dtype, device=device)
        x64, w64, b64, pairs64 = as64(x), as64(w_qkv), as64(b_qkv), [as64(p) for p in pairs]
        out = ops.lora_qkv(x, w_qkv, b_qkv, *pairs, scale=0.6, num_heads=H, backend=backend)
        ref = reference.lora_qkv(x64, w64, b64, *pairs64, 0.6, H)
        timm = timm_qkv(x64, w64, b64, pairs64, 0.6, H)
        what = f"{dtype} {(B, T, C, H)}"
        for name, o, r, t in zip("qkv", out, ref, timm):
            assert o.dtype == dtype and o.shape == (B, H, T, C // H)
            assert_close(o, r, dtype, f"{what} {name}")
            assert_close(o, t, dtype, f"{what} {name} against timm's reshape/permute")
        grad_out = [rand(B, H, T, C // H, dtype=dtype, device=device) for _ in range(3)]
        wrt, wrt64 = flat(x, w_qkv, b_qkv, pairs), flat(x64, w64, b64, pairs64)
        for i, (got, want) in enumerate(zip(grads_of(out, wrt, grad_out), grads_of(ref, wrt64, grad_out))):
            assert got.dtype == dtype and got.shape == want.shape
            assert_close(got, want, dtype, f"{what} grad of input {i}")


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_qkv_gradient_through_some_outputs_only(device, backend):
    x, w_qkv, b_qkv, pairs = qkv_inputs(2, 5, 12, SLICES["qkv"], device=device)
    x64, w64, b64, pairs64 = as64(x), as64(w_qkv), as64(b_qkv), [as64(p) for p in pairs]
    out = ops.lora_qkv(x, w_qkv, b_qkv, *pairs, scale=1.0, num_heads=2, backend=backend)
    ref = reference.lora_qkv(x64, w64, b64, *pairs64, 1.0, 2)
    grad_out = rand(2, 2, 5, 6, device=device)
    for used in ((0,), (1, 2)):
        wrt, wrt64 = flat(x, w_qkv, b_qkv, pairs), flat(x64, w64, b64, pairs64)
        got = torch.autograd.grad([out[i] for i in used], wrt, [grad_out] * len(used), retain_graph=True, allow_unused=True)
        want = torch.autograd.grad([ref[i] for i in used], wrt64, [grad_out.double()] * len(used), retain_graph=True, allow_unused=True)
        for i, (g, w) in enumerate(zip(got, want)):
            if w is None:  # a LoRA pair of an unused slice
                assert g is None or not g.any(), f"outputs {used}: input {i} should get a zero gradient"
            else:
                assert_close(g, w, torch.float32, f"outputs {used}: grad of input {i}")


# ------------------------------------------------------------------------------------------ lora_attention


class TimmLoRAAttention(torch.nn.Module):
    """timm's Attention (qkv Linear, SDPA, proj Linear) with WeCoLoRA's LoRA on the q, k, v slices and on proj."""

    def __init__(self, dim, num_heads, rank, *, qkv_bias=True, proj_bias=True, proj_lora=True, dtype=torch.float64):
        super().__init__()
        self.num_heads, self.scale = num_heads, 0.8
        self.qkv = torch.nn.Linear(dim, 3 * dim, bias=qkv_bias, dtype=dtype)
        self.proj = torch.nn.Linear(dim, dim, bias=proj_bias, dtype=dtype)
        new = lambda *shape: torch.nn.Parameter(rand(*shape, dtype=dtype) * 0.3)
        self.lora_q, self.lora_k, self.lora_v = (torch.nn.ParameterList([new(rank, dim), new(dim, rank)]) for _ in range(3))
        self.lora_proj = torch.nn.ParameterList([new(rank, dim), new(dim, rank)]) if proj_lora else None

    def pairs(self):
        return [tuple(p) if p is not None else None for p in (self.lora_q, self.lora_k, self.lora_v, self.lora_proj)]

    def eager(self, x):
        B, N, C = x.shape
        *qkv_pairs, proj_pair = self.pairs()
        q, k, v = timm_qkv(x, self.qkv.weight, self.qkv.bias, qkv_pairs, self.scale, self.num_heads)
        x = F.scaled_dot_product_attention(q, k, v)
        x = x.transpose(1, 2).reshape(B, N, C)
        out = self.proj(x)
        if proj_pair is not None:
            out = out + self.scale * F.linear(F.linear(x, proj_pair[0]), proj_pair[1])
        return out

    def forward(self, x, backend=None):
        *qkv_pairs, proj_pair = self.pairs()
        return ops.lora_attention(
            x, self.qkv.weight, self.qkv.bias, *qkv_pairs, self.proj.weight, self.proj.bias, proj_pair,
            scale=self.scale, num_heads=self.num_heads, backend=backend,
        )


@pytest.mark.parametrize(
    "config",
    [{}, {"qkv_bias": False, "proj_bias": False}, {"proj_lora": False}, {"proj_lora": False, "proj_bias": False}],
    ids=["biases", "no-biases", "no-proj-lora", "no-proj-lora-no-bias"],
)
@pytest.mark.parametrize("dtype", dtype_params(torch.float64, torch.float32))
@pytest.mark.parametrize(("device", "backend"), CASES)
def test_attention_matches_eager_timm_attention(device, backend, config, dtype):
    module = TimmLoRAAttention(24, 3, 4, dtype=dtype, **config).to(device)
    x = leaf(rand(2, 7, 24, dtype=dtype, device=device))
    out = module(x, backend=backend)
    module64 = TimmLoRAAttention(24, 3, 4, **config).to(device)
    module64.load_state_dict({k: v.double() for k, v in module.state_dict().items()})
    x64 = leaf(x.double())
    ref = module64.eager(x64)
    assert out.dtype == dtype and out.shape == (2, 7, 24)
    assert_close(out, ref, dtype, f"{dtype} output")
    assert_close(
        reference.lora_attention(x64, module64.qkv.weight, module64.qkv.bias, *module64.pairs()[:3], module64.proj.weight,
                                 module64.proj.bias, module64.pairs()[3], module64.scale, 3),
        ref, torch.float64, "reference.lora_attention against the eager module",
    )
    grad_out = rand(2, 7, 24, dtype=dtype, device=device)
    params = dict(module.named_parameters())
    params64 = dict(module64.named_parameters())
    got = grads_of(out, [x, *params.values()], grad_out)
    want = grads_of(ref, [x64, *(params64[k] for k in params)], grad_out)
    for name, g, w in zip(["x", *params], got, want):
        assert_close(g, w, dtype, f"{dtype} grad of {name}")


# ------------------------------------------------------------------------------------ gradcheck / opcheck


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_gradcheck(device, backend):
    for lead, bias in (((2, 3), True), ((), False)):
        tensors = [t for t in linear_inputs(lead, 4, 3, 2, bias=bias, dtype=torch.float64, device=device) if t is not None]
        if bias:
            fn = lambda x, w, b, a, bb: ops.lora_linear(x, w, b, a, bb, 0.7, backend=backend)
        else:
            fn = lambda x, w, a, bb: ops.lora_linear(x, w, None, a, bb, 0.7, backend=backend)
        assert torch.autograd.gradcheck(fn, tuple(tensors), fast_mode=fast_mode(backend))
    for slices, bias in (("qkv", True), ("qv", False)):
        x, w_qkv, b_qkv, pairs = qkv_inputs(1, 3, 4, SLICES[slices], bias=bias, r=1, dtype=torch.float64, device=device)
        on = [i for i, pair in enumerate(pairs) if pair is not None]

        def fn(x, w_qkv, *rest, bias=bias, on=on):
            b_qkv, rest = (rest[0], rest[1:]) if bias else (None, rest)
            pairs = [None, None, None]
            for j, i in enumerate(on):
                pairs[i] = (rest[2 * j], rest[2 * j + 1])
            return ops.lora_qkv(x, w_qkv, b_qkv, *pairs, scale=0.5, num_heads=2, backend=backend)

        assert torch.autograd.gradcheck(fn, tuple(flat(x, w_qkv, b_qkv, pairs)), fast_mode=fast_mode(backend))
    module = TimmLoRAAttention(4, 2, 1).to(device)
    x = leaf(rand(1, 3, 4, dtype=torch.float64, device=device))
    names = list(dict(module.named_parameters()))

    def attention(x, *params):
        return torch.func.functional_call(module, dict(zip(names, params)), (x,), {"backend": backend})

    assert torch.autograd.gradcheck(attention, (x, *module.parameters()), fast_mode=fast_mode(backend))


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_custom_ops_autograd_match_reference(device, backend):
    """Eager calls may take a faster path than the custom ops; torch.compile always calls them, so their autograd
    formulas (backward custom ops, with the ``needs`` mask) are checked directly: bias or not, frozen base or not,
    LoRA on some qkv slices only, some outputs unused."""
    kd = torch.ops.kdfast
    for bias, base_grad in ((True, True), (False, True), (True, False)):
        tensors = linear_inputs((2, 5), 13, 11, 3, bias=bias, base_grad=base_grad, device=device)
        tensors64 = [as64(t) for t in tensors]
        out = kd.lora_linear.default(*tensors, 0.6, 0.0, None, backend)
        ref = reference.lora_linear(*tensors64, 0.6)
        assert_close(out, ref, torch.float32, f"bias={bias} base_grad={base_grad} output")
        grad_out = rand(2, 5, 11, device=device)
        (out * grad_out).sum().backward()
        (ref * grad_out.double()).sum().backward()
        for name, t, t64 in zip(("x", "weight", "bias", "lora_a", "lora_b"), tensors, tensors64):
            if t is None or not t.requires_grad:
                assert t is None or t.grad is None, f"{name} is frozen but got a gradient"
            else:
                assert_close(t.grad, t64.grad, torch.float32, f"bias={bias} base_grad={base_grad} grad of {name}")
    for slices, bias in (("qkv", True), ("qv", False), ("none", True)):
        x, w_qkv, b_qkv, pairs = qkv_inputs(2, 5, 12, SLICES[slices], bias=bias, device=device)
        x64, w64, b64, pairs64 = as64(x), as64(w_qkv), as64(b_qkv), [as64(p) for p in pairs]
        loras = [t for pair in pairs for t in (pair if pair is not None else (None, None))]
        outs = kd.lora_qkv.default(x, w_qkv, b_qkv, *loras, 0.6, 3, backend)
        refs = reference.lora_qkv(x64, w64, b64, *pairs64, 0.6, 3)
        for name, o, r in zip("qkv", outs, refs):
            assert_close(o, r, torch.float32, f"{slices} {name}")
        grad_out = [rand(2, 3, 5, 4, device=device) for _ in range(3)]
        wrt, wrt64 = flat(x, w_qkv, b_qkv, pairs), flat(x64, w64, b64, pairs64)
        for used in ((0, 1, 2), (2,)):
            got = torch.autograd.grad([outs[i] for i in used], wrt, [grad_out[i] for i in used], retain_graph=True)
            want = torch.autograd.grad(
                [refs[i] for i in used], wrt64, [grad_out[i].double() for i in used], retain_graph=True, allow_unused=True
            )
            for i, (g, w) in enumerate(zip(got, want)):
                assert_close(g, torch.zeros_like(g) if w is None else w, torch.float32, f"{slices} outputs {used}: input {i}")
    x, w_qkv, b_qkv, pairs = qkv_inputs(1, 3, 4, SLICES["qv"], bias=True, r=1, dtype=torch.float64, device=device)

    def qkv(x, w_qkv, b_qkv, a_q, b_q, a_v, b_v):
        return kd.lora_qkv.default(x, w_qkv, b_qkv, a_q, b_q, None, None, a_v, b_v, 0.5, 2, backend)

    assert torch.autograd.gradcheck(qkv, tuple(flat(x, w_qkv, b_qkv, pairs)), fast_mode=fast_mode(backend))


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_opcheck_linear(device, backend):
    kd = torch.ops.kdfast
    seed = torch.tensor(12345, dtype=torch.int64)
    for bias in (True, False):
        x, weight, b, a, bb = linear_inputs((2, 3), 5, 4, 2, bias=bias, device=device)
        for dropout_p, s in ((0.0, None), (0.25, seed)):
            torch.library.opcheck(kd.lora_linear.default, (x, weight, b, a, bb, 0.5, dropout_p, s, backend))
            # Backward ops are checked on plain tensors: double backward is not supported.
            plain = [None if t is None else t.detach() for t in (x, weight, b, a, bb)]
            for needs in ([True, True, bias, True, True], [False, False, False, True, True]):
                args = (rand(2, 3, 4, device=device), *plain, 0.5, dropout_p, s, needs, backend)
                torch.library.opcheck(kd.lora_linear_backward.default, args)


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_opcheck_qkv(device, backend):
    kd = torch.ops.kdfast
    for slices, bias in (("qkv", True), ("qv", False), ("none", True)):
        x, w_qkv, b_qkv, pairs = qkv_inputs(2, 3, 4, SLICES[slices], bias=bias, r=2, device=device)
        loras = [t for pair in pairs for t in (pair if pair is not None else (None, None))]
        torch.library.opcheck(kd.lora_qkv.default, (x, w_qkv, b_qkv, *loras, 0.5, 2, backend))
        plain = [None if t is None else t.detach() for t in (x, w_qkv, b_qkv, *loras)]
        needs = [t is not None for t in plain]
        grads = [rand(2, 2, 3, 2, device=device) for _ in range(3)]
        torch.library.opcheck(kd.lora_qkv_backward.default, (*grads, *plain, 0.5, 2, needs, backend))
        frozen = [False, False, False] + needs[3:]
        torch.library.opcheck(kd.lora_qkv_backward.default, (*grads, *plain, 0.5, 2, frozen, backend))


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_compile_fullgraph_matches_eager(device, backend):
    module = TimmLoRAAttention(12, 3, 2, dtype=torch.float32)
    x = leaf(rand(2, 5, 12))
    compiled = torch.compile(module, fullgraph=True)
    eager = module(x, backend=backend)
    got = compiled(x, backend=backend)
    torch.testing.assert_close(got, eager)
    grad_out = rand(2, 5, 12)
    wrt = (x, *module.parameters())
    for g, e in zip(grads_of(got, wrt, grad_out), grads_of(eager, wrt, grad_out)):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize(("device", "backend"), [c for c in CASES if c.values[1] == "triton"])
def test_triton_dropout_size_limit_names_the_fallback(device, backend, monkeypatch):
    monkeypatch.setattr(lora._kernels(), "MAX_NUMEL", 20)
    x, weight, b, a, bb = linear_inputs((3, 7), 5, 4, 2, device=device)
    with pytest.raises(ValueError, match=r"at most 20 elements, got 105; use backend='reference'"):
        ops.lora_linear(x, weight, b, a, bb, 1.0, 0.5, backend=backend)
    # Without dropout (or not training) there is no counter, so no limit.
    ops.lora_linear(x, weight, b, a, bb, 1.0, 0.5, training=False, backend=backend)


def test_autocast_runs_in_the_autocast_dtype():
    """Under CPU bf16 autocast x comes from a Linear (bf16) and the LoRA layer's weights are fp32: like F.linear,
    lora_linear runs in bf16 and returns bf16 (the lower-precision rule of kdfast/ops/_autocast.py)."""
    features = rand(3, 5, 16)
    previous = torch.nn.Linear(16, 24)
    weight, b, a, bb = rand(10, 24), rand(10), leaf(rand(4, 24)), leaf(rand(10, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = previous(features)
        out = ops.lora_linear(x, weight, b, a, bb, 0.5)
    assert x.dtype == torch.bfloat16 and out.dtype == torch.bfloat16
    rounded = [t.detach().bfloat16().double() for t in (x, weight, b, a, bb)]
    assert_close(out, reference.lora_linear(*rounded, 0.5), torch.bfloat16)
    out.sum().backward()
    assert previous.weight.grad is not None and torch.isfinite(previous.weight.grad).all()
    assert a.grad is not None and a.grad.dtype == torch.float32 and torch.isfinite(a.grad).all()


# --------------------------------------------------------------------------------------------- bad input

I, O, R = 6, 5, 3


def _bad_linear_inputs():
    s = lambda *shape, **kw: rand(*shape, **kw)
    good = lambda: (s(2, I), s(O, I), s(O), s(R, I), s(O, R))

    def replace(i, value):
        def make():
            args = list(good())
            args[i] = value() if callable(value) else value
            return tuple(args)

        return make

    integer = lambda *shape: torch.ones(*shape, dtype=torch.int64)
    return [
        ("x not a tensor", replace(0, [1.0] * I), {}, TypeError, r"x must be a torch.Tensor of shape \(\.\.\., in_features\)"),
        ("x 0-d", replace(0, lambda: s()), {}, ValueError, r"x must be a tensor of shape \(\.\.\., in_features\)"),
        ("weight rank", replace(1, lambda: s(O, I, 1)), {}, ValueError, r"weight must have 2 dimensions"),
        ("bias rank", replace(2, lambda: s(O, 1)), {}, ValueError, r"bias must have 1 dimensions"),
        ("lora_a rank", replace(3, lambda: s(I)), {}, ValueError, r"lora_a must have 2 dimensions"),
        ("lora_b rank", replace(4, lambda: s(1, O, R)), {}, ValueError, r"lora_b must have 2 dimensions"),
        ("in_features x/weight", replace(0, lambda: s(2, I + 1)), {}, ValueError, r"in_features must match"),
        ("in_features lora_a", replace(3, lambda: s(R, I + 1)), {}, ValueError, r"in_features must match.*lora_a"),
        ("out_features lora_b", replace(4, lambda: s(O + 1, R)), {}, ValueError, r"out_features must match.*lora_b"),
        ("out_features bias", replace(2, lambda: s(O + 1)), {}, ValueError, r"out_features must match.*bias"),
        ("rank mismatch", replace(4, lambda: s(O, R + 1)), {}, ValueError, r"rank r must match"),
        ("integer x", replace(0, lambda: integer(2, I)), {}, TypeError, r"x must be a float"),
        ("integer weight", replace(1, lambda: integer(O, I)), {}, TypeError, r"weight must be a float"),
        ("integer bias", replace(2, lambda: integer(O)), {}, TypeError, r"bias must be a float"),
        ("integer lora_b", replace(4, lambda: integer(O, R)), {}, TypeError, r"lora_b must be a float"),
        ("mixed devices", replace(1, lambda: s(O, I, device="meta")), {}, ValueError, r"one device"),
        ("mixed devices bias", replace(2, lambda: s(O, device="meta")), {}, ValueError, r"one device"),
        ("x zero rows", replace(0, lambda: s(0, I)), {}, ValueError, r"x must have no zero-sized dimension"),
        ("rank 0", lambda: (s(2, I), s(O, I), s(O), s(0, I), s(O, 0)), {}, ValueError, r"lora_a must have no zero-sized"),
        ("in_features 0", lambda: (s(2, 0), s(O, 0), s(O), s(R, 0), s(O, R)), {}, ValueError, r"x must have no zero-sized"),
        ("scale nan", good, {"scale": float("nan")}, ValueError, r"scale must be a finite"),
        ("scale inf", good, {"scale": float("-inf")}, ValueError, r"scale must be a finite"),
        ("dropout_p 1", good, {"dropout_p": 1.0}, ValueError, r"dropout_p must be in \[0, 1\)"),
        ("dropout_p < 0", good, {"dropout_p": -0.1}, ValueError, r"dropout_p must be in \[0, 1\)"),
        ("dropout_p nan", good, {"dropout_p": float("nan")}, ValueError, r"dropout_p must be a finite"),
        ("backend", good, {"backend": "fast"}, ValueError, r"backend must be one of"),
    ]


@pytest.mark.parametrize(
    ("make", "kwargs", "error", "message"), [c[1:] for c in _bad_linear_inputs()], ids=[c[0] for c in _bad_linear_inputs()]
)
def test_bad_linear_input_gets_a_clear_error(make, kwargs, error, message):
    with pytest.raises(error, match=message):
        ops.lora_linear(*make(), **kwargs)


C, H = 8, 2


def _bad_qkv_inputs():
    s = lambda *shape, **kw: rand(*shape, **kw)
    pair = lambda r=R, c=C, **kw: (s(r, c, **kw), s(c, r, **kw))

    def args(x=None, w=None, b="good", q="good", k=None, v="good"):
        return lambda: (
            s(2, 3, C) if x is None else x(),
            s(3 * C, C) if w is None else w(),
            s(3 * C) if b == "good" else b() if callable(b) else b,
            pair() if q == "good" else q() if callable(q) else q,
            k() if callable(k) else k,
            pair() if v == "good" else v() if callable(v) else v,
        )

    return [
        ("x rank", args(x=lambda: s(3, C)), {}, ValueError, r"x must have 3 dimensions \(B, T, C\)"),
        ("integer x", args(x=lambda: torch.ones(2, 3, C, dtype=torch.int64)), {}, TypeError, r"x must be a float"),
        ("x zero-sized", args(x=lambda: s(2, 0, C)), {}, ValueError, r"x must have no zero-sized dimension"),
        ("num_heads not dividing C", args(), {"num_heads": 3}, ValueError, r"num_heads must be a positive integer dividing C=8"),
        ("num_heads 0", args(), {"num_heads": 0}, ValueError, r"num_heads must be a positive integer"),
        ("num_heads float", args(), {"num_heads": 2.0}, ValueError, r"num_heads must be a positive integer"),
        ("num_heads bool", args(), {"num_heads": True}, ValueError, r"num_heads must be a positive integer"),
        ("w_qkv shape", args(w=lambda: s(3 * C, C + 1)), {}, ValueError, r"w_qkv must have shape \(3C, C\)"),
        ("w_qkv rank", args(w=lambda: s(3 * C * C)), {}, ValueError, r"w_qkv must have 2 dimensions"),
        ("integer w_qkv", args(w=lambda: torch.ones(3 * C, C, dtype=torch.int32)), {}, TypeError, r"w_qkv must be a float"),
        ("b_qkv length", args(b=lambda: s(3 * C + 1)), {}, ValueError, r"b_qkv length 3C must match"),
        ("b_qkv rank", args(b=lambda: s(3, C)), {}, ValueError, r"b_qkv must have 1 dimensions"),
        ("lora_q not a pair", args(q=lambda: s(R, C)), {}, TypeError, r"lora_q must be a pair"),
        ("lora_k triple", args(k=lambda: (*pair(), s(1))), {}, TypeError, r"lora_k must be a pair"),
        ("lora_q A in_features", args(q=lambda: (s(R, C + 1), s(C, R))), {}, ValueError, r"lora_q in_features C must match"),
        ("lora_v B out_features", args(v=lambda: (s(R, C), s(C + 1, R))), {}, ValueError, r"lora_v out_features C must match"),
        ("lora_k rank mismatch", args(k=lambda: (s(R, C), s(C, R + 1))), {}, ValueError, r"lora_k rank r must match"),
        ("lora_q A rank", args(q=lambda: (s(C), s(C, R))), {}, ValueError, r"lora_q\[0\] \(A\) must have 2 dimensions"),
        ("integer lora_v B", args(v=lambda: (s(R, C), torch.ones(C, R, dtype=torch.int64))), {}, TypeError, r"lora_v\[1\] \(B\) must be a float"),
        ("lora rank 0", args(q=lambda: pair(r=0)), {}, ValueError, r"lora_q.*no zero-sized dimension"),
        ("mixed devices w_qkv", args(w=lambda: s(3 * C, C, device="meta")), {}, ValueError, r"one device"),
        ("mixed devices lora_v", args(v=lambda: pair(device="meta")), {}, ValueError, r"one device"),
        ("scale nan", args(), {"scale": float("nan")}, ValueError, r"scale must be a finite"),
        ("backend", args(), {"backend": "fast"}, ValueError, r"backend must be one of"),
    ]


@pytest.mark.parametrize(
    ("make", "kwargs", "error", "message"), [c[1:] for c in _bad_qkv_inputs()], ids=[c[0] for c in _bad_qkv_inputs()]
)
def test_bad_qkv_input_gets_a_clear_error(make, kwargs, error, message):
    kwargs = {"num_heads": H, **kwargs}
    with pytest.raises(error, match=message):
        ops.lora_qkv(*make(), **kwargs)


def _bad_attention_inputs():
    s = lambda *shape, **kw: rand(*shape, **kw)
    integer = lambda *shape: torch.ones(*shape, dtype=torch.int64)
    return [
        ("w_proj in_features", lambda: (s(C, C + 1), s(C)), {}, ValueError, r"w_proj|in_features"),
        ("w_proj rank", lambda: (s(C), s(C)), {}, ValueError, r"w_proj|weight must have 2 dimensions"),
        ("b_proj length", lambda: (s(C, C), s(C + 1)), {}, ValueError, r"b_proj|out_features"),
        ("integer b_proj", lambda: (s(C, C), integer(C)), {}, TypeError, r"b_proj|bias must be a float"),
        ("integer w_proj", lambda: (integer(C, C), s(C)), {}, TypeError, r"w_proj|weight must be a float"),
        ("mixed devices w_proj", lambda: (s(C, C, device="meta"), s(C)), {}, ValueError, r"one device"),
        ("num_heads", lambda: (s(C, C), s(C)), {"num_heads": 3}, ValueError, r"num_heads must be a positive integer dividing C"),
    ]


@pytest.mark.parametrize("proj_lora", [True, False], ids=["proj-lora", "no-proj-lora"])
@pytest.mark.parametrize(
    ("make", "kwargs", "error", "message"), [c[1:] for c in _bad_attention_inputs()], ids=[c[0] for c in _bad_attention_inputs()]
)
def test_bad_attention_input_gets_a_clear_error(make, kwargs, error, message, proj_lora):
    """The proj parameters are checked whether or not proj carries a LoRA pair."""
    x, w_qkv, b_qkv = rand(2, 3, C), rand(3 * C, C), rand(3 * C)
    lora_proj = (rand(R, C), rand(C, R)) if proj_lora else None
    w_proj, b_proj = make()
    kwargs = {"num_heads": H, **kwargs}
    with pytest.raises(error, match=message):
        ops.lora_attention(x, w_qkv, b_qkv, None, None, None, w_proj, b_proj, lora_proj, **kwargs)
