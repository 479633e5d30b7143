"""Tests of kdfast.reference against independent, deliberately naive implementations.

Every oracle here is written from the equations with Python loops over batch elements, slots, pairs,
classes, in float64, at small odd sizes; they share no code with kdfast.reference.
"""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from eager_slot_attention import EagerSlotAttention
from harness import dtype_params
from torch import nn

from kdfast import reference as R

DT = torch.float64


def rnd(*shape, seed=None, gen=None, dtype=DT, requires_grad=False):
    g = gen if gen is not None else torch.Generator().manual_seed(0 if seed is None else seed)
    t = torch.randn(*shape, generator=g, dtype=dtype)
    return t.requires_grad_(requires_grad)


def close(a, b, rtol=1e-10, atol=1e-12):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------------------------
# naive oracles
# ----------------------------------------------------------------------------------------------


def naive_cos(x, y, eps=1e-8):
    nx = math.sqrt(sum(float(e) ** 2 for e in x))
    ny = math.sqrt(sum(float(e) ** 2 for e in y))
    dot = sum(float(p) * float(q) for p, q in zip(x, y))
    return dot / (max(nx, eps) * max(ny, eps))


def brute_force_assignment(sim):
    """sim: (K, M) tensor. Returns (best_perm tuple, best_total) over all injective maps."""
    K, M = sim.shape
    best, best_total = None, -math.inf
    for perm in itertools.permutations(range(M), K):
        total = sum(float(sim[i, perm[i]]) for i in range(K))
        if total > best_total:
            best, best_total = perm, total
    return best, best_total


# ----------------------------------------------------------------------------------------------
# slot_cosine_similarity
# ----------------------------------------------------------------------------------------------


def test_cosine_similarity_matches_per_pair_math():
    g = torch.Generator().manual_seed(1)
    a, b = rnd(3, 5, 7, gen=g), rnd(3, 6, 7, gen=g)
    a[1, 2] = 0.0  # zero vector -> cosine 0
    b[2, 4] = 0.0
    b[0, 1] *= 1e-3  # small but above eps: still a true cosine
    out = R.slot_cosine_similarity(a, b)
    assert out.shape == (3, 5, 6) and out.dtype == DT
    for bi in range(3):
        for i in range(5):
            for m in range(6):
                assert abs(float(out[bi, i, m]) - naive_cos(a[bi, i], b[bi, m])) < 1e-12
    assert torch.all(out[1, 2] == 0) and torch.all(out[2, :, 4] == 0)


def test_cosine_similarity_zero_vector_gradient_finite_and_nan_propagates():
    a = rnd(2, 3, 4, seed=2)
    a[0, 1] = 0.0
    a.requires_grad_(True)
    b = rnd(2, 4, 4, seed=3, requires_grad=True)
    out = R.slot_cosine_similarity(a, b)
    out.sum().backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()

    a2 = rnd(2, 3, 4, seed=2)
    a2[1, 0, 2] = float("nan")
    out = R.slot_cosine_similarity(a2, rnd(2, 4, 4, seed=3))
    assert torch.isnan(out[1, 0]).all()
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[1, 1:]).all()


def test_cosine_similarity_gradcheck():
    a = rnd(2, 3, 5, seed=4, requires_grad=True)
    b = rnd(2, 4, 5, seed=5, requires_grad=True)
    assert torch.autograd.gradcheck(R.slot_cosine_similarity, (a, b))


@pytest.mark.parametrize(("dt", "tol"), dtype_params(torch.float32, torch.bfloat16, torch.float16, tol=(1e-5, 2e-2, 2e-2)))
def test_cosine_similarity_low_precision_dtype(dt, tol):
    a, b = rnd(2, 3, 8, seed=6), rnd(2, 5, 8, seed=7)
    ref = R.slot_cosine_similarity(a, b)
    out = R.slot_cosine_similarity(a.to(dt), b.to(dt))
    assert out.dtype == dt
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


# ----------------------------------------------------------------------------------------------
# slot_assignment
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("K,M", [(1, 1), (1, 4), (3, 3), (4, 6), (5, 5), (6, 6), (5, 7)])
def test_assignment_matches_brute_force(K, M):
    g = torch.Generator().manual_seed(10 * K + M)
    sim = torch.rand(3, K, M, generator=g, dtype=DT)
    out = R.slot_assignment(sim)
    assert out.dtype == torch.int64 and out.shape == (3, K) and out.device == sim.device
    for bi in range(3):
        perm, total = brute_force_assignment(sim[bi])
        assert tuple(out[bi].tolist()) == perm  # continuous random values: unique optimum
        got = sum(float(sim[bi, i, out[bi, i]]) for i in range(K))
        assert abs(got - total) < 1e-12


def test_assignment_maximises_not_minimises():
    sim = torch.tensor([[[0.9, 0.1], [0.2, 0.8]]], dtype=DT)
    assert R.slot_assignment(sim).tolist() == [[0, 1]]
    assert R.slot_assignment(-sim).tolist() == [[1, 0]]


def test_assignment_ties_deterministic_and_valid():
    sim = torch.ones(2, 5, 5, dtype=torch.float32)
    sim[1, :, :2] = 3.0  # only two columns are attractive, many optima
    a1, a2 = R.slot_assignment(sim), R.slot_assignment(sim.clone())
    assert torch.equal(a1, a2)
    for bi in range(2):
        assert sorted(a1[bi].tolist()) == list(range(5))  # a permutation
        _, total = brute_force_assignment(sim[bi].double())
        assert abs(sum(float(sim[bi, i, a1[bi, i]]) for i in range(5)) - total) < 1e-6


def test_assignment_no_grad_and_empty_batch():
    sim = rnd(2, 3, 4, seed=11, requires_grad=True)
    out = R.slot_assignment(sim)
    assert not out.requires_grad
    assert R.slot_assignment(torch.zeros(0, 3, 4)).shape == (0, 3)


# ----------------------------------------------------------------------------------------------
# slot_match_loss
# ----------------------------------------------------------------------------------------------


def naive_match_terms(student, teacher, matching):
    B, K, _ = student.shape
    terms = torch.zeros(B, K, dtype=DT)
    for bi in range(B):
        if matching == "index":
            perm = list(range(K))
        else:
            sim = torch.tensor(
                [[naive_cos(student[bi, i], teacher[bi, m]) for m in range(teacher.shape[1])] for i in range(K)],
                dtype=DT,
            )
            perm, _ = brute_force_assignment(sim)
        for i in range(K):
            terms[bi, i] = 1.0 - naive_cos(student[bi, i], teacher[bi, perm[i]])
    return terms


@pytest.mark.parametrize("matching", ["index", "hungarian"])
def test_match_loss_vs_naive(matching):
    g = torch.Generator().manual_seed(20)
    s = rnd(3, 5, 7, gen=g)
    t = rnd(3, 5, 7, gen=g) if matching == "index" else rnd(3, 6, 7, gen=g)
    terms = naive_match_terms(s, t, matching)
    close(R.slot_match_loss(s, t, matching, reduction="none"), terms)
    close(R.slot_match_loss(s, t, matching, reduction="sum"), terms.sum())
    close(R.slot_match_loss(s, t, matching, reduction="mean"), terms.mean())
    close(R.slot_match_loss(s, t, matching), terms.mean())


def test_match_loss_hungarian_recovers_permutation_and_beats_index():
    s = rnd(2, 6, 9, seed=21)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    t = 2.5 * s[:, perm]  # teacher = scaled, permuted student
    assert float(R.slot_match_loss(s, t, "hungarian")) < 1e-12
    assert float(R.slot_match_loss(s, t, "index")) > 0.1
    t2 = rnd(2, 6, 9, seed=22)
    assert float(R.slot_match_loss(s, t2, "hungarian")) <= float(R.slot_match_loss(s, t2, "index")) + 1e-12


@pytest.mark.parametrize("matching", ["index", "hungarian"])
def test_match_loss_teacher_gets_no_grad_and_gradcheck(matching):
    s = rnd(2, 4, 5, seed=23, requires_grad=True)
    t = rnd(2, 4, 5, seed=24, requires_grad=True)
    R.slot_match_loss(s, t, matching).backward()
    assert t.grad is None
    assert s.grad is not None and torch.isfinite(s.grad).all()
    s2 = s.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: R.slot_match_loss(x, t, matching, reduction="none"), (s2,))


def test_match_loss_zero_student_slot_is_finite():
    s = rnd(2, 3, 4, seed=25)
    s[0, 0] = 0.0
    s.requires_grad_(True)
    t = rnd(2, 3, 4, seed=26)
    loss = R.slot_match_loss(s, t, "hungarian", reduction="none")
    assert abs(float(loss[0, 0].detach()) - 1.0) < 1e-12
    loss.sum().backward()
    assert torch.isfinite(s.grad).all()


# ----------------------------------------------------------------------------------------------
# slot_contrastive_loss
# ----------------------------------------------------------------------------------------------


def naive_contrastive_terms(slots, temperature, batch_contrast):
    """Per-(t, j) terms with loops; (T-1, B*K) pooled or (T-1, B, K)."""
    B, T, K, _D = slots.shape

    def unit(x):
        n = math.sqrt(sum(float(e) ** 2 for e in x))
        return [float(e) / max(n, 1e-12) for e in x]

    z = [[[unit(slots[b, t, k]) for k in range(K)] for t in range(T)] for b in range(B)]

    def term(set_t, set_t1, j):
        logits = [sum(p * q for p, q in zip(set_t[i], set_t1[j])) / temperature for i in range(len(set_t))]
        mx = max(logits)
        lse = mx + math.log(sum(math.exp(x - mx) for x in logits))
        return lse - logits[j]

    if batch_contrast:
        out = torch.zeros(T - 1, B * K, dtype=DT)
        for t in range(T - 1):
            st = [z[b][t][k] for b in range(B) for k in range(K)]
            st1 = [z[b][t + 1][k] for b in range(B) for k in range(K)]
            for j in range(B * K):
                out[t, j] = term(st, st1, j)
    else:
        out = torch.zeros(T - 1, B, K, dtype=DT)
        for t in range(T - 1):
            for b in range(B):
                for j in range(K):
                    out[t, b, j] = term(z[b][t], z[b][t + 1], j)
    return out


def slotcontrast_loss_as_published(slots, temperature, batch_contrast):
    """SlotContrast's Slot_Slot_Contrastive_Loss.forward, transcribed."""
    slots = F.normalize(slots, p=2.0, dim=-1)
    if batch_contrast:
        slots = torch.cat(slots.split(1), dim=-2)
    s1, s2 = slots[:, :-1], slots[:, 1:]
    ss = torch.matmul(s1, s2.transpose(-2, -1)) / temperature
    B, T, S, _ = ss.shape
    ss = ss.reshape(B * T, S, S)
    target = torch.eye(S, dtype=ss.dtype).expand(B * T, S, S)
    return F.cross_entropy(ss, target)


@pytest.mark.parametrize("batch_contrast", [True, False])
@pytest.mark.parametrize("temperature", [0.1, 0.7])
def test_contrastive_vs_naive_loop(batch_contrast, temperature):
    slots = rnd(3, 4, 5, 6, seed=30)
    terms = naive_contrastive_terms(slots, temperature, batch_contrast)
    got = R.slot_contrastive_loss(slots, temperature, batch_contrast, reduction="none")
    assert got.shape == ((3, 15) if batch_contrast else (3, 3, 5))
    close(got, terms)
    close(R.slot_contrastive_loss(slots, temperature, batch_contrast, reduction="sum"), terms.sum())
    close(R.slot_contrastive_loss(slots, temperature, batch_contrast), terms.mean())
    close(R.slot_contrastive_loss(slots, temperature, batch_contrast),
          slotcontrast_loss_as_published(slots, temperature, batch_contrast))


def test_contrastive_single_frame_is_zero_with_zero_grad():
    for bc in (True, False):
        slots = rnd(2, 1, 3, 4, seed=31, requires_grad=True)
        loss = R.slot_contrastive_loss(slots, batch_contrast=bc)
        assert float(loss.detach()) == 0.0
        loss.backward()
        assert slots.grad is not None and torch.all(slots.grad == 0)
        assert float(R.slot_contrastive_loss(slots.detach(), batch_contrast=bc, reduction="sum")) == 0.0
        assert R.slot_contrastive_loss(slots.detach(), batch_contrast=bc, reduction="none").numel() == 0


def test_contrastive_identical_slots_and_zero_slot_are_finite():
    base = rnd(2, 1, 4, 5, seed=32)
    slots = base.expand(2, 3, 4, 5).clone()
    slots[1, :, 2] = 0.0  # a zero slot too
    slots.requires_grad_(True)
    for bc in (True, False):
        loss = R.slot_contrastive_loss(slots, batch_contrast=bc)
        assert torch.isfinite(loss)
        (g,) = torch.autograd.grad(loss, slots)
        assert torch.isfinite(g).all()
        close(loss.detach(), naive_contrastive_terms(slots.detach(), 0.1, bc).mean())


def test_contrastive_normalisation_eps_is_f_normalize():
    # SlotContrast normalises with F.normalize (eps 1e-12): slots of norm ~1e-10 are still unit
    # vectors after normalisation, so the loss is scale-invariant down to there.
    slots = rnd(2, 3, 4, 5, seed=35)
    tiny = slots * 1e-10
    for bc in (True, False):
        close(R.slot_contrastive_loss(tiny, 0.1, bc), R.slot_contrastive_loss(slots, 0.1, bc))
        close(R.slot_contrastive_loss(tiny, 0.1, bc), slotcontrast_loss_as_published(tiny, 0.1, bc))


@pytest.mark.parametrize("batch_contrast", [True, False])
def test_contrastive_gradcheck(batch_contrast):
    slots = rnd(2, 3, 3, 4, seed=33, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x: R.slot_contrastive_loss(x, 0.5, batch_contrast, reduction="none"), (slots,)
    )


def test_contrastive_low_precision_dtype():
    slots = rnd(2, 3, 4, 8, seed=34)
    ref = R.slot_contrastive_loss(slots)
    out = R.slot_contrastive_loss(slots.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)


# ----------------------------------------------------------------------------------------------
# slot_attention_core and its backward
# ----------------------------------------------------------------------------------------------


def naive_core(q, k, v, scale, eps):
    B, K, _D = q.shape
    N, Dv = k.shape[1], v.shape[2]
    U = torch.zeros(B, K, Dv, dtype=DT)
    A = torch.zeros(B, K, N, dtype=DT)
    for b in range(B):
        for n in range(N):
            logits = [scale * float(q[b, i] @ k[b, n]) for i in range(K)]
            mx = max(logits)
            den = sum(math.exp(x - mx) for x in logits)
            for i in range(K):
                A[b, i, n] = math.exp(logits[i] - mx) / den
        for i in range(K):
            z = sum(float(A[b, i, n]) + eps for n in range(N))
            for n in range(N):
                U[b, i] += (float(A[b, i, n]) + eps) * v[b, n] / z
    return U, A


@pytest.mark.parametrize("K,N,D,Dv", [(1, 1, 3, 3), (4, 7, 5, 6), (3, 1, 2, 4), (5, 9, 3, 3)])
@pytest.mark.parametrize("scale", [None, 0.37])
def test_core_vs_naive(K, N, D, Dv, scale):
    g = torch.Generator().manual_seed(K * 100 + N)
    q, k, v = rnd(2, K, D, gen=g), rnd(2, N, D, gen=g), rnd(2, N, Dv, gen=g)
    eps = 1e-3  # large enough to be seen
    U, A = R.slot_attention_core(q, k, v, scale=scale, eps=eps)
    Un, An = naive_core(q, k, v, D ** -0.5 if scale is None else scale, eps)
    close(U, Un)
    close(A, An)
    close(A.sum(1), torch.ones(2, N, dtype=DT))  # softmax over the slots


@pytest.mark.parametrize("with_grad_attn", [False, True])
@pytest.mark.parametrize("scale,eps", [(None, 1e-8), (0.6, 1e-2)])
def test_core_backward_matches_autograd(with_grad_attn, scale, eps):
    g = torch.Generator().manual_seed(40)
    B, K, N, D, Dv = 2, 5, 11, 6, 7
    q, k, v = (rnd(B, K, D, gen=g, requires_grad=True), rnd(B, N, D, gen=g, requires_grad=True),
               rnd(B, N, Dv, gen=g, requires_grad=True))
    G = rnd(B, K, Dv, gen=g)
    GA = rnd(B, K, N, gen=g) if with_grad_attn else None
    U, A = R.slot_attention_core(q, k, v, scale, eps)
    outs, grads = (U, A) if with_grad_attn else (U,), (G, GA) if with_grad_attn else (G,)
    dq_ref, dk_ref, dv_ref = torch.autograd.grad(outs, (q, k, v), grads)
    dq, dk, dv = R.slot_attention_core_backward(G, GA, q.detach(), k.detach(), v.detach(), scale, eps)
    close(dq, dq_ref)
    close(dk, dk_ref)
    close(dv, dv_ref)
    assert not dq.requires_grad


def test_core_backward_is_not_autograd_coincidence():
    # GA must matter: ignoring it would give a different dq
    g = torch.Generator().manual_seed(41)
    q, k, v = rnd(1, 3, 4, gen=g), rnd(1, 5, 4, gen=g), rnd(1, 5, 4, gen=g)
    G, GA = rnd(1, 3, 4, gen=g), rnd(1, 3, 5, gen=g)
    dq0, dk0, dv0 = R.slot_attention_core_backward(G, None, q, k, v)
    dq1, dk1, dv1 = R.slot_attention_core_backward(G, GA, q, k, v)
    assert (dq0 - dq1).abs().max() > 1e-3 and (dk0 - dk1).abs().max() > 1e-3
    close(dv0, dv1)  # v does not see A's gradient


def test_core_gradcheck():
    g = torch.Generator().manual_seed(42)
    q, k, v = (rnd(2, 3, 4, gen=g, requires_grad=True), rnd(2, 5, 4, gen=g, requires_grad=True),
               rnd(2, 5, 3, gen=g, requires_grad=True))
    assert torch.autograd.gradcheck(lambda a, b, c: R.slot_attention_core(a, b, c, eps=1e-3), (q, k, v))


@pytest.mark.parametrize(("dt", "tol"), dtype_params(torch.bfloat16, torch.float16, torch.float32, tol=(3e-2, 3e-2, 1e-5)))
def test_core_low_precision_dtype(dt, tol):
    g = torch.Generator().manual_seed(43)
    q, k, v = rnd(2, 4, 8, gen=g), rnd(2, 9, 8, gen=g), rnd(2, 9, 8, gen=g)
    U, A = R.slot_attention_core(q, k, v)
    Ul, Al = R.slot_attention_core(q.to(dt), k.to(dt), v.to(dt))
    assert Ul.dtype == dt and Al.dtype == dt
    torch.testing.assert_close(Ul.double(), U, rtol=tol, atol=tol)
    torch.testing.assert_close(Al.double(), A, rtol=tol, atol=tol)


# ----------------------------------------------------------------------------------------------
# slot_attention_step / slot_attention vs an eager videosaur-style module
# ----------------------------------------------------------------------------------------------


def make_module(D=6, Dq=6, Dh=10, seed=50, **kw):
    torch.manual_seed(seed)
    m = EagerSlotAttention(D, D, Dq, Dh, **kw).double()
    with torch.no_grad():  # non-trivial LayerNorm affine params
        for mod in m.modules():
            if isinstance(mod, nn.LayerNorm):
                mod.weight.add_(0.3 * torch.randn_like(mod.weight))
                mod.bias.add_(0.3 * torch.randn_like(mod.bias))
    return m


@pytest.mark.parametrize("gru_hidden", ["normed", "prev"])
@pytest.mark.parametrize("use_gru,use_mlp,Dq", [(True, True, 6), (True, True, 5), (False, True, 6),
                                                 (True, False, 6), (False, False, 6)])
def test_step_matches_eager_module(gru_hidden, use_gru, use_mlp, Dq):
    m = make_module(Dq=Dq, use_gru=use_gru, use_mlp=use_mlp, gru_hidden=gru_hidden)
    params = dict(m.state_dict())
    assert ("gru.weight_ih" in params) == use_gru and ("mlp.layers.3.weight" in params) == use_mlp
    g = torch.Generator().manual_seed(51)
    slots, k, v = rnd(3, 4, 6, gen=g), rnd(3, 7, Dq, gen=g), rnd(3, 7, Dq, gen=g)
    ref_s, ref_a = m.step(slots, k, v)
    s, a = R.slot_attention_step(slots, k, v, params, gru_hidden=gru_hidden)
    close(s, ref_s)
    close(a, ref_a)
    # the two hidden-state conventions really differ (when a GRU or a residual uses them)
    other = "prev" if gru_hidden == "normed" else "normed"
    s_other, _ = R.slot_attention_step(slots, k, v, params, gru_hidden=other)
    assert (s - s_other).abs().max() > 1e-3


@pytest.mark.parametrize("n_iters", [1, 3])
def test_slot_attention_iterations_and_grad_last_only(n_iters):
    m = make_module(seed=52)
    params = {name: p for name, p in m.named_parameters()}
    g = torch.Generator().manual_seed(53)
    slots0 = rnd(2, 4, 6, gen=g, requires_grad=True)
    k, v = rnd(2, 9, 6, gen=g, requires_grad=True), rnd(2, 9, 6, gen=g, requires_grad=True)

    ref = slots0
    for _ in range(n_iters):
        ref, ref_a = m.step(ref, k, v)
    s, a = R.slot_attention(slots0, k, v, params, n_iters=n_iters)
    close(s, ref)
    close(a, ref_a)

    w = rnd(2, 4, 6, seed=54)
    full = torch.autograd.grad((s * w).sum(), (slots0, k, v, params["to_q.weight"]))
    ref_full = torch.autograd.grad((ref * w).sum(), (slots0, k, v, m.to_q.weight))
    for x, y in zip(full, ref_full):
        close(x, y)

    s2, a2 = R.slot_attention(slots0, k, v, params, n_iters=n_iters, grad_last_only=True)
    close(s2, s)  # identical forward
    close(a2, a)
    gl = torch.autograd.grad((s2 * w).sum(), (slots0, k, v, params["gru.weight_hh"]), allow_unused=True)
    # oracle: the last eager step applied to the detached slots of the previous iterations
    with torch.no_grad():
        prev = slots0
        for _ in range(n_iters - 1):
            prev, _ = m.step(prev, k, v)
    start = slots0 if n_iters == 1 else prev.detach()
    last, _ = m.step(start, k, v)
    ref_gl = torch.autograd.grad((last * w).sum(), (k, v, m.gru.weight_hh))
    if n_iters == 1:
        close(gl[0], full[0])
    else:
        assert gl[0] is None  # no gradient to the initial slots
        assert (full[1] - gl[1]).abs().max() > 1e-6  # truncation changes the gradient
    for x, y in zip(gl[1:], ref_gl):
        close(x, y)


def test_slot_attention_step_gradcheck():
    m = make_module(D=3, Dq=3, Dh=4, seed=55)
    params = dict(m.state_dict())
    g = torch.Generator().manual_seed(56)
    slots = rnd(1, 3, 3, gen=g, requires_grad=True)
    k, v = rnd(1, 4, 3, gen=g, requires_grad=True), rnd(1, 4, 3, gen=g, requires_grad=True)
    wq = params["to_q.weight"].clone().requires_grad_(True)

    def f(s, kk, vv, w):
        return R.slot_attention(s, kk, vv, {**params, "to_q.weight": w}, n_iters=2)

    assert torch.autograd.gradcheck(f, (slots, k, v, wq))


@pytest.mark.parametrize(("dt", "tol"), dtype_params(torch.bfloat16, torch.float32, tol=(5e-2, 1e-5)))
def test_slot_attention_low_precision_dtype(dt, tol):
    """Inputs in dt, parameters in float32 (as under autocast): the outputs take the inputs' dtype."""
    m = make_module(seed=57)
    params = dict(m.state_dict())
    g = torch.Generator().manual_seed(58)
    slots, k, v = rnd(2, 4, 6, gen=g), rnd(2, 9, 6, gen=g), rnd(2, 9, 6, gen=g)
    ref, _ref_a = R.slot_attention(slots, k, v, params, n_iters=2)
    p32 = {n: t.float() for n, t in params.items()}
    s, a = R.slot_attention(slots.to(dt), k.to(dt), v.to(dt), p32, n_iters=2)
    assert s.dtype == dt and a.dtype == dt
    torch.testing.assert_close(s.double(), ref, rtol=tol, atol=tol)


# ----------------------------------------------------------------------------------------------
# LoRA
# ----------------------------------------------------------------------------------------------


def test_lora_linear_vs_formula():
    g = torch.Generator().manual_seed(60)
    x, W, b = rnd(2, 3, 7, gen=g), rnd(5, 7, gen=g), rnd(5, gen=g)
    A, B = rnd(3, 7, gen=g), rnd(5, 3, gen=g)
    p = 0.3
    mask = (torch.rand(2, 3, 7, generator=g) > p).to(DT) / (1 - p)
    close(R.lora_linear(x, W, b, A, B, 0.7, mask), x @ W.T + b + 0.7 * (x * mask) @ A.T @ B.T)
    close(R.lora_linear(x, W, None, A, B, 0.7), x @ W.T + 0.7 * x @ A.T @ B.T)
    close(R.lora_linear(x, W, b, None, None, 0.7), x @ W.T + b)
    # element loop for one output
    y = R.lora_linear(x, W, b, A, B, 0.7, mask)
    val = float(b[2]) + sum(float(x[1, 2, i] * W[2, i]) for i in range(7))
    val += 0.7 * sum(float(B[2, j]) * sum(float(x[1, 2, i] * mask[1, 2, i] * A[j, i]) for i in range(7))
                     for j in range(3))
    assert abs(float(y[1, 2, 2]) - val) < 1e-12


def test_lora_linear_gradcheck():
    g = torch.Generator().manual_seed(61)
    args = [rnd(2, 3, 4, gen=g), rnd(5, 4, gen=g), rnd(5, gen=g), rnd(2, 4, gen=g), rnd(5, 2, gen=g)]
    args = [a.requires_grad_(True) for a in args]
    mask = (torch.rand(2, 3, 4, generator=g) > 0.5).to(DT) * 2.0
    assert torch.autograd.gradcheck(lambda x, w, b, a, bb: R.lora_linear(x, w, b, a, bb, 1.3, mask), args)


def timm_qkv(x, w, b, loras, scale, H):
    Bn, T, C = x.shape
    qkv = x @ w.T + (b if b is not None else 0)
    for s, pair in enumerate(loras):
        if pair is not None:
            A, B = pair
            delta = scale * (x @ A.T) @ B.T
            qkv = qkv.clone()
            qkv[..., s * C:(s + 1) * C] += delta
    qkv = qkv.reshape(Bn, T, 3, H, C // H).permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]


def make_lora_args(C=12, r=3, seed=62, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = rnd(2, 5, C, gen=g)
    w, b = rnd(3 * C, C, gen=g) / math.sqrt(C), (rnd(3 * C, gen=g) if bias else None)
    lq, lk, lv = [(rnd(r, C, gen=g), rnd(C, r, gen=g)) for _ in range(3)]
    wp, bp = rnd(C, C, gen=g) / math.sqrt(C), rnd(C, gen=g)
    lp = (rnd(r, C, gen=g), rnd(C, r, gen=g))
    return x, w, b, lq, lk, lv, wp, bp, lp


@pytest.mark.parametrize("which", [(1, 1, 1), (1, 0, 1), (0, 0, 0), (0, 1, 0)])
@pytest.mark.parametrize("bias", [True, False])
def test_lora_qkv_vs_timm_layout(which, bias):
    x, w, b, lq, lk, lv, *_ = make_lora_args(bias=bias)
    loras = [pair if on else None for pair, on in zip((lq, lk, lv), which)]
    q, k, v = R.lora_qkv(x, w, b, *loras, 0.5, 3)
    rq, rk, rv = timm_qkv(x, w, b, loras, 0.5, 3)
    assert q.shape == (2, 3, 5, 4)
    close(q, rq)
    close(k, rk)
    close(v, rv)
    # per-head element check: q[b, h, t, d] is output channel h*hd + d of the q slice
    lin = x[1, 4] @ w[:12].T + (b[:12] if bias else 0)
    if which[0]:
        lin = lin + 0.5 * (x[1, 4] @ lq[0].T) @ lq[1].T
    close(q[1, 2, 4], lin[8:12])


class EagerLoRAAttention(nn.Module):
    """timm Attention (qkv Linear with bias, proj Linear) + LoRA on q/k/v slices and proj, eager."""

    def __init__(self, w, b, lq, lk, lv, wp, bp, lp, scale, H):
        super().__init__()
        self.w, self.b, self.loras, self.wp, self.bp, self.lp = w, b, (lq, lk, lv), wp, bp, lp
        self.s, self.H = scale, H

    def forward(self, x):
        Bn, T, C = x.shape
        q, k, v = timm_qkv(x, self.w, self.b, self.loras, self.s, self.H)
        attn = (q * (C // self.H) ** -0.5) @ k.transpose(-2, -1)
        attn = attn.softmax(dim=-1)
        o = (attn @ v).transpose(1, 2).reshape(Bn, T, C)
        y = o @ self.wp.T + self.bp
        if self.lp is not None:
            y = y + self.s * (o @ self.lp[0].T) @ self.lp[1].T
        return y


@pytest.mark.parametrize("proj_lora", [True, False])
def test_lora_attention_vs_eager(proj_lora):
    x, w, b, lq, _lk, lv, wp, bp, lp = make_lora_args(seed=63)
    lp = lp if proj_lora else None
    ref = EagerLoRAAttention(w, b, lq, None, lv, wp, bp, lp, 0.8, 3)(x)
    out = R.lora_attention(x, w, b, lq, None, lv, wp, bp, lp, 0.8, 3)
    assert out.shape == x.shape
    close(out, ref)


def test_lora_attention_gradcheck_and_low_precision():
    x, w, b, lq, lk, lv, wp, bp, lp = make_lora_args(C=6, r=2, seed=64)
    xg = x[:1, :3].clone().requires_grad_(True)
    aq = lq[0].clone().requires_grad_(True)
    bpj = lp[1].clone().requires_grad_(True)
    f = lambda x_, a_, b_: R.lora_attention(x_, w, b, (a_, lq[1]), lk, lv, wp, bp, (lp[0], b_), 0.9, 2)
    assert torch.autograd.gradcheck(f, (xg, aq, bpj))
    ref = R.lora_attention(x, w, b, lq, lk, lv, wp, bp, lp, 0.9, 2)
    low = R.lora_attention(x.bfloat16(), w.bfloat16(), b.bfloat16(), lq, lk, lv, wp, bp, lp, 0.9, 2)
    assert low.dtype == torch.float64  # promoted with the float64 LoRA/proj tensors
    bf = [t.bfloat16() for t in (x, w, b, wp, bp)]
    to_bf = lambda pair: tuple(t.bfloat16() for t in pair)
    low = R.lora_attention(bf[0], bf[1], bf[2], to_bf(lq), to_bf(lk), to_bf(lv), bf[3], bf[4], to_bf(lp), 0.9, 2)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.double(), ref, rtol=5e-2, atol=5e-2)


# ----------------------------------------------------------------------------------------------
# gini_kl
# ----------------------------------------------------------------------------------------------


def naive_gini_kl(a, labels, C, target="batch", delta=1e-10):
    B, Fd = a.shape[0], a.shape[1]
    m = [[float(a[b, f].abs().mean()) for f in range(Fd)] for b in range(B)]
    n = [sum(1 for b in range(B) if int(labels[b]) == c) for c in range(C)]
    S = [[sum(m[b][f] for b in range(B) if int(labels[b]) == c) / (n[c] + delta) for c in range(C)]
         for f in range(Fd)]
    p = [[S[f][c] / (sum(S[f]) + delta) for c in range(C)] for f in range(Fd)]
    gini = sum(1 - sum(p[f][c] ** 2 for c in range(C)) for f in range(Fd)) / Fd
    tot = sum(p[f][c] for f in range(Fd) for c in range(C))
    q = [(sum(p[f][c] for f in range(Fd)) + delta) / tot for c in range(C)]
    t = [n[c] / B for c in range(C)] if target == "batch" else [1.0 / C] * C
    kl = sum(t[c] * (math.log(t[c]) - math.log(q[c])) for c in range(C) if t[c] > 0)
    return gini, kl


@pytest.mark.parametrize("shape", [(7, 5, 3, 2), (7, 5), (6, 4, 1, 1)])
@pytest.mark.parametrize("target", ["batch", "uniform"])
def test_gini_kl_vs_naive_with_absent_classes(shape, target):
    g = torch.Generator().manual_seed(70)
    a = rnd(*shape, gen=g)  # negative activations included
    C = 6
    labels = torch.tensor([0, 2, 2, 5, 0, 2, 0, 5][: shape[0]])  # classes 1, 3, 4 absent
    gini, kl = R.gini_kl(a, labels, C, target)
    gn, kn = naive_gini_kl(a, labels, C, target)
    assert gini.dtype == DT and gini.shape == () and kl.shape == ()
    assert abs(float(gini) - gn) < 1e-10
    assert abs(float(kl) - kn) < 1e-9 * max(1.0, abs(kn))


def test_gini_kl_single_class_batch():
    a = rnd(5, 4, 2, 3, seed=71)
    labels = torch.full((5,), 3)
    gini, kl = R.gini_kl(a, labels, 4)
    gn, kn = naive_gini_kl(a, labels, 4)
    assert abs(float(gini) - gn) < 1e-10 and abs(float(kl) - kn) < 1e-9
    assert abs(float(gini)) < 1e-8  # every feature fully concentrated on one class
    assert abs(float(kl)) < 1e-8


def test_gini_kl_gradient_finite_with_absent_classes_and_gradcheck():
    a = rnd(6, 3, 2, 2, seed=72, requires_grad=True)
    labels = torch.tensor([0, 0, 3, 3, 3, 0])
    gini, kl = R.gini_kl(a, labels, 5)
    ga, = torch.autograd.grad(gini + kl, a)
    assert torch.isfinite(ga).all() and ga.abs().sum() > 0
    for target in ("batch", "uniform"):
        assert torch.autograd.gradcheck(lambda x, target=target: R.gini_kl(x, labels, 5, target), (a,))


@pytest.mark.parametrize(("dt", "tol"), dtype_params(torch.float32, torch.bfloat16, torch.float16, tol=(1e-5, 2e-2, 2e-2)))
def test_gini_kl_low_precision_dtype(dt, tol):
    a = rnd(8, 6, 3, 3, seed=73)
    labels = torch.tensor([0, 1, 1, 2, 0, 3, 1, 2])
    gini, kl = R.gini_kl(a, labels, 4)
    gl, kll = R.gini_kl(a.to(dt), labels, 4)
    assert gl.dtype == dt and kll.dtype == dt
    torch.testing.assert_close(gl.double(), gini, rtol=tol, atol=tol)
    torch.testing.assert_close(kll.double(), kl, rtol=tol, atol=tol)


def test_gini_impurity():
    p = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.2, 0.8]], dtype=DT)
    close(R.gini_impurity(p), torch.tensor([0.5, 0.0, 1 - 0.04 - 0.64], dtype=DT))
    close(R.gini_impurity(p.T, dim=0), R.gini_impurity(p))
    assert R.gini_impurity(p.float()).dtype == torch.float32


@pytest.mark.parametrize(("dt", "tol"), dtype_params(torch.float64, torch.float32, tol=(1e-10, 1e-5)))
@pytest.mark.parametrize("target", ["batch", "uniform"])
@pytest.mark.parametrize("shape", [(12, 20, 7, 7), (9, 13), (3, 5, 3, 3)])
def test_gini_kl_backward_is_autograd_in_float64_and_accurate_in_float32(shape, target, dt, tol):
    torch.manual_seed(7)
    C = 1000 if shape[0] == 12 else 6
    a = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, C, (shape[0],))
    gg, gk = torch.tensor(0.7, dtype=torch.float64), torch.tensor(-1.3, dtype=torch.float64)
    gini, kl = R.gini_kl(a, y, C, target)
    (want,) = torch.autograd.grad(gg * gini + gk * kl, a)
    got = R.gini_kl_backward(gg.to(dt), gk.to(dt), a.detach().to(dt), y, C, target)
    assert got.dtype == dt
    assert ((got.double() - want).norm() / want.norm()).item() < tol
