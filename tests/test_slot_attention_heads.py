"""OCLF's slot attention options on every backend: multiple heads (one softmax per token over all (slot, head)
pairs), slot masks (B, K) and biased projections, against the float64 reference and an eager OCLF module."""

from __future__ import annotations

import pytest
import torch
from eager_slot_attention import OCLFSlotAttention, ResidualMLP
from harness import assert_close, dtype_cases, dtype_params, grads_of, implemented_cases, leaf, rand

from kdfast import ops, reference
from kdfast.nn import SlotAttention

CASES = implemented_cases("slot_attention_core")

# (n_heads, masked, B, K, N, Dq, Dv): heads alone, a mask alone, both; odd sizes, a head width of 1, K * H over one
# Triton slot tile (16) and N over several token tiles.
CONFIGS = [(3, False, 2, 5, 37, 12, 9), (1, True, 2, 5, 37, 12, 9), (2, True, 3, 7, 21, 10, 6), (4, True, 1, 5, 70, 4, 8)]


def _mask(B, K, device="cpu"):
    """A (B, K) mask with about a third of the slots out and at least one slot left in every element."""
    mask = torch.rand(B, K, device=device) < 0.35
    mask[:, torch.randint(K, (1,)).item()] = False
    return mask


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"H{c[0]}-{'mask' if c[1] else 'nomask'}-" + "-".join(map(str, c[2:])))
@pytest.mark.parametrize(("device", "backend", "dtype"), dtype_cases(CASES))
def test_core_matches_reference(device, backend, config, dtype):
    """Updates, head-averaged masks and the gradients of q, k and v; masked slots get exactly zero attention and
    exactly zero query gradient."""
    n_heads, masked, B, K, N, Dq, Dv = config
    q, k, v = (leaf(rand(*shape, dtype=dtype, device=device)) for shape in ((B, K, Dq), (B, N, Dq), (B, N, Dv)))
    q64, k64, v64 = (leaf(t.double()) for t in (q, k, v))
    slot_mask = _mask(B, K, device) if masked else None
    updates, attn = ops.slot_attention_core(q, k, v, backend=backend, n_heads=n_heads, slot_mask=slot_mask)
    want_updates, want_attn = reference.slot_attention_core(q64, k64, v64, n_heads=n_heads, slot_mask=slot_mask)
    assert updates.shape == (B, K, Dv) and attn.shape == (B, K, N) and updates.dtype == attn.dtype == dtype
    assert_close(updates, want_updates, dtype, f"{dtype} updates")
    assert_close(attn, want_attn, dtype, f"{dtype} masks")
    grad_out = (rand(B, K, Dv, dtype=dtype, device=device), rand(B, K, N, dtype=dtype, device=device))
    got = grads_of((updates, attn), (q, k, v), grad_out)
    want = grads_of((want_updates, want_attn), (q64, k64, v64), grad_out)
    for name, g, w in zip("qkv", got, want):
        assert_close(g, w, dtype, f"{dtype} grad of {name}")
    if masked:
        assert (attn[slot_mask] == 0).all() and (got[0][slot_mask] == 0).all()
        # a masked slot's update is the plain mean of the values, as in OCLF (the eps-weighted mean of zeros)
        means = v64.mean(1, keepdim=True).expand(B, K, Dv)[slot_mask]
        assert_close(updates[slot_mask], means, dtype, "masked slots' updates")


def test_reference_is_the_single_head_core_at_one_head_without_a_mask():
    """The defaults keep the single-head formula: n_heads=1 without a mask is the same code, bit for bit, and the
    multi-head formula at one head agrees with it to rounding."""
    q, k, v = rand(2, 5, 6, dtype=torch.float64), rand(2, 9, 6, dtype=torch.float64), rand(2, 9, 4, dtype=torch.float64)
    plain = reference.slot_attention_core(q, k, v)
    for got, want in zip(reference.slot_attention_core(q, k, v, n_heads=1, slot_mask=None), plain):
        assert torch.equal(got, want)
    nothing_masked = torch.zeros(2, 5, dtype=torch.bool)
    for got, want in zip(reference.slot_attention_core(q, k, v, slot_mask=nothing_masked), plain):
        torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)


def _oclf(dim, feature_dim, kvq_dim, n_heads, iters, bias, implicit=False, mlp=True):
    torch.manual_seed(17)
    eager = OCLFSlotAttention(dim, feature_dim, kvq_dim, n_heads, iters, ff_mlp=ResidualMLP(dim, 3 * dim) if mlp else None,
                              use_projection_bias=bias, use_implicit_differentiation=implicit).double()
    with torch.no_grad():  # LayerNorm starts at weight 1, bias 0: move every parameter off its initial value
        for p in eager.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return eager


def _loaded_module(eager, feature_dim, n_iters, grad_last_only, backend, dtype):
    """kdfast's module with the OCLF module's weights (its README mapping of the options and the key names)."""
    module = SlotAttention(feature_dim, eager.dim, eager.kvq_dim, n_iters=n_iters, n_heads=eager.n_heads,
                           bias=eager.to_q.bias is not None, gru_hidden="prev", grad_last_only=grad_last_only,
                           use_mlp=eager.ff_mlp is not None, backend=backend,
                           hidden_dim=None if eager.ff_mlp is None else eager.ff_mlp.layers[1].out_features)
    module.double().load_state_dict({_renamed(key): value for key, value in eager.state_dict().items()})
    return module.to(dtype)


def _renamed(oclf_key: str) -> str:
    return oclf_key.replace("norm_input.", "norm_features.").replace("ff_mlp.", "mlp.")


# (n_heads, bias, mask, implicit differentiation, MLP)
MODULE_CONFIGS = [(2, True, True, False, True), (4, False, True, True, True), (1, True, False, False, False),
                  (3, True, False, True, True)]


@pytest.mark.parametrize("config", MODULE_CONFIGS, ids=lambda c: f"H{c[0]}" + "-bias" * c[1] + "-mask" * c[2] + "-implicit" * c[3] + "-mlp" * c[4])
@pytest.mark.parametrize(("device", "backend"), CASES)
@pytest.mark.parametrize("dtype", dtype_params(torch.float64, torch.float32))
def test_module_matches_the_oclf_module(device, backend, config, dtype):
    """OCLF's state_dict loads into kdfast.nn.SlotAttention and gives OCLF's slots, masks and gradients (slots,
    features, every parameter) in float64, and in float32 against float64."""
    n_heads, bias, masked, implicit, mlp = config
    dim, feature_dim, kvq_dim, iters, B, K, N = 12, 10, 12, 2, 2, 5, 23
    eager = _oclf(dim, feature_dim, kvq_dim, n_heads, iters, bias, implicit, mlp).to(device)
    module = _loaded_module(eager, feature_dim, iters + int(implicit), implicit, backend, dtype).to(device)
    slots64, features64 = leaf(rand(B, K, dim, dtype=torch.float64, device=device)), leaf(rand(B, N, feature_dim, dtype=torch.float64, device=device))
    slot_mask = _mask(B, K, device) if masked else None
    want_slots, want_masks = eager(features64, slots64, slot_mask)
    slots, features = leaf(slots64.detach().to(dtype)), leaf(features64.detach().to(dtype))
    got = module(slots, features, slot_mask=slot_mask)
    assert_close(got["slots"], want_slots, dtype, f"{dtype} slots")
    assert_close(got["masks"], want_masks, dtype, f"{dtype} masks")
    grad_out = (rand(B, K, dim, dtype=torch.float64, device=device), rand(B, K, N, dtype=torch.float64, device=device))
    names = ["slots", "features", *(name for name, _ in eager.named_parameters())]
    want = torch.autograd.grad((want_slots, want_masks), (slots64, features64, *eager.parameters()), grad_out,
                               allow_unused=True)
    ours = dict(module.named_parameters())
    got_grads = torch.autograd.grad((got["slots"], got["masks"]),
                                    (slots, features, *(ours[_renamed(name)] for name in names[2:])),
                                    [g.to(dtype) for g in grad_out], allow_unused=True)
    for name, g, w in zip(names, got_grads, want):
        if w is None:  # implicit differentiation: the initial slots get no gradient in either
            assert g is None, name
            continue
        assert_close(g, w, dtype, f"{dtype} grad of {name}")


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_gradcheck(device, backend):
    B, K, N, Dq, Dv = 2, 3, 5, 4, 6
    q, k, v = (leaf(rand(*s, dtype=torch.float64, device=device)) for s in ((B, K, Dq), (B, N, Dq), (B, N, Dv)))
    slot_mask = torch.tensor([[False, True, False], [True, False, False]], device=device)
    fn = lambda q, k, v: ops.slot_attention_core(q, k, v, backend=backend, n_heads=2, slot_mask=slot_mask)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_iterations_with_heads_and_a_mask_compile_fullgraph():
    """torch.compile traces the rewrite and the custom op (the mask's host-side check is skipped while tracing)."""
    B, K, N, D = 2, 4, 9, 8
    eager = _oclf(D, D, D, 2, 2, True)
    module = _loaded_module(eager, D, 2, False, "cpp", torch.float64)
    slots, features = rand(B, K, D, dtype=torch.float64), rand(B, N, D, dtype=torch.float64)
    slot_mask = torch.tensor([[False, True, False, False], [False, False, True, True]])
    want = module(slots, features, slot_mask=slot_mask)
    torch._dynamo.reset()
    got = torch.compile(module, fullgraph=True, backend="aot_eager")(slots, features, slot_mask=slot_mask)
    for key in ("slots", "masks"):
        torch.testing.assert_close(got[key], want[key], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"n_heads": 5}, ValueError, r"n_heads=5 must divide the query/key width Dq=12 and the value width Dv=8"),
    ({"n_heads": 0}, ValueError, r"n_heads must be an integer >= 1, got 0"),
    ({"slot_mask": torch.zeros(2, 5)}, TypeError, r"slot_mask must be a bool tensor \(B, K\) = \(2, 5\)"),
    ({"slot_mask": torch.zeros(2, 4, dtype=torch.bool)}, ValueError, r"slot_mask must have shape \(B, K\) = \(2, 5\), got \(2, 4\)"),
    ({"slot_mask": torch.tensor([[False] * 5, [True] * 5])}, ValueError, r"slot_mask leaves no slot for batch element\(s\) \[1\]"),
])
def test_bad_options_get_a_clear_error(kwargs, error, message):
    q, k, v = rand(2, 5, 12), rand(2, 7, 12), rand(2, 7, 8)
    with pytest.raises(error, match=message):
        ops.slot_attention_core(q, k, v, **kwargs)
    params = {"norm_slots.weight": torch.ones(12), "norm_slots.bias": torch.zeros(12), "to_q.weight": rand(12, 12),
              "gru.weight_ih": rand(36, 8), "gru.weight_hh": rand(36, 12)}
    with pytest.raises(error, match=message):
        ops.slot_attention(rand(2, 5, 12), k, v, params, **kwargs)


def test_module_options_get_a_clear_error():
    with pytest.raises(ValueError, match=r"n_heads must be a positive integer dividing kvq_dim=12, got 5"):
        SlotAttention(8, 12, n_heads=5)
    with pytest.raises(TypeError, match=r"bias must be a bool, got int"):
        SlotAttention(8, 12, bias=1)


def test_module_on_cpp_folds_the_projections_into_the_iteration(monkeypatch):
    """On the CPU with the cpp backend the module never forms k and v (nn.SlotAttention._folds_projections says
    why): to_k and to_v are never called, and slots, masks and every gradient equal the reference backend's, which
    projects first. Where the fold would cost more (inp much wider than kvq_dim) the module projects."""
    torch.manual_seed(3)
    module = SlotAttention(20, 16, backend="cpp").double()
    twin = SlotAttention(20, 16, backend="reference").double()
    twin.load_state_dict(module.state_dict())
    slots, features = leaf(rand(2, 5, 16, dtype=torch.float64)), leaf(rand(2, 31, 20, dtype=torch.float64))
    assert module._folds_projections(slots, features, module.n_iters)
    assert not twin._folds_projections(slots, features, twin.n_iters)
    for layer in (module.to_k, module.to_v):
        monkeypatch.setattr(layer, "forward", lambda x: pytest.fail("the folded forward projected the features"))
    got, want = module(slots, features), twin(slots, features)
    grad_out = (rand(2, 5, 16, dtype=torch.float64), rand(2, 5, 31, dtype=torch.float64))
    got_grads = grads_of((got["slots"], got["masks"]), (slots, features, *module.parameters()), grad_out)
    want_grads = grads_of((want["slots"], want["masks"]), (slots, features, *twin.parameters()), grad_out)
    for g, w in zip((got["slots"], got["masks"], *got_grads), (want["slots"], want["masks"], *want_grads)):
        torch.testing.assert_close(g, w, rtol=1e-11, atol=1e-12)
    wide = SlotAttention(400, 16, kvq_dim=8, backend="cpp")
    assert not wide._folds_projections(rand(2, 5, 16), rand(2, 7, 400), 3)  # 3 * 5 * 392 >= 400 * 8
