"""Autocast: every public op follows its rule in kdfast/ops/_autocast.py, in eager mode, compiled, and called
through ``torch.ops.kdfast`` directly.

The rules, as torch's autocast op lists: the slot ops and the Gini/KL reductions cast float16/bfloat16 inputs to
float32 and return float32 (torch's float32 list); the LoRA ops cast float32 inputs to the region's dtype and
return it (torch's lower-precision list, like F.linear). CPU autocast stands in for CUDA's: the rules and the code
are the same for both device types.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from harness import CASES, TOLERANCE, leaf, rand, relative_error

from kdfast import _backend, ops, reference
from kdfast.ops import _autocast

BF16, FP16 = torch.bfloat16, torch.float16


@dataclass
class Op:
    """A public op: ``make(low)`` gives its tensor inputs (leaves; ``low`` is the autocast dtype, for inputs that
    a Linear in the region would have produced), ``call(inputs, backend)`` and ``ref(inputs)`` its outputs."""

    table: str
    make: Callable[[torch.dtype], dict]
    call: Callable[[dict, str], tuple]
    ref: Callable[[dict], tuple]
    grad: tuple[str, ...]
    grad_tolerance: dict | None = None  # autocast dtype -> tolerance, where the design's is not attainable
    tolerance: dict | None = None  # the same for the outputs


def _tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _slot_attention_params(D=8, Dq=8, Dv=8, Dh=16) -> dict:
    p = {
        "norm_slots.weight": 1 + 0.3 * rand(D), "norm_slots.bias": 0.3 * rand(D), "to_q.weight": 0.3 * rand(Dq, D),
        "gru.weight_ih": 0.3 * rand(3 * D, Dv), "gru.weight_hh": 0.3 * rand(3 * D, D),
        "gru.bias_ih": 0.1 * rand(3 * D), "gru.bias_hh": 0.1 * rand(3 * D),
        "mlp.layers.0.weight": 1 + 0.3 * rand(D), "mlp.layers.0.bias": 0.3 * rand(D),
        "mlp.layers.1.weight": 0.3 * rand(Dh, D), "mlp.layers.1.bias": 0.1 * rand(Dh),
        "mlp.layers.3.weight": 0.3 * rand(D, Dh), "mlp.layers.3.bias": 0.1 * rand(D),
    }
    return {f"p:{name}": leaf(value) for name, value in p.items()}


def _params(inputs: dict) -> dict:
    return {name[2:]: value for name, value in inputs.items() if name.startswith("p:")}


def _pair(inputs, name):
    return inputs[f"{name}_a"], inputs[f"{name}_b"]


def _lora_pairs(C, r, names):
    pairs = {}
    for name in names:
        pairs[f"{name}_a"], pairs[f"{name}_b"] = leaf(0.3 * rand(r, C)), leaf(0.3 * rand(C, r))
    return pairs


OPS = {
    # float32 rule: the slots come from a Linear in the region (low precision); a teacher, a target or a
    # parameter stays float32
    "slot_cosine_similarity": Op(
        "slot_cosine_similarity",
        lambda low: {"a": leaf(rand(2, 3, 12, dtype=low)), "b": leaf(rand(2, 5, 12))},
        lambda t, be: ops.slot_cosine_similarity(t["a"], t["b"], backend=be),
        lambda t: reference.slot_cosine_similarity(t["a"], t["b"]),
        ("a", "b"),
    ),
    "slot_match_loss": Op(
        "slot_match_loss",
        lambda low: {"student": leaf(rand(2, 4, 12, dtype=low)), "teacher": rand(2, 4, 12)},
        lambda t, be: ops.slot_match_loss(t["student"], t["teacher"], reduction="none", backend=be),
        lambda t: reference.slot_match_loss(t["student"], t["teacher"], reduction="none"),
        ("student",),
    ),
    "slot_contrastive_loss": Op(
        "slot_contrastive_loss",
        lambda low: {"slots": leaf(rand(2, 3, 4, 12, dtype=low))},
        lambda t, be: ops.slot_contrastive_loss(t["slots"], backend=be),
        lambda t: reference.slot_contrastive_loss(t["slots"]),
        ("slots",),
    ),
    "slot_attention_core": Op(
        "slot_attention_core",
        lambda low: {"q": leaf(rand(2, 5, 12, dtype=low)), "k": leaf(rand(2, 19, 12, dtype=low)),
                     "v": leaf(rand(2, 19, 10))},
        lambda t, be: ops.slot_attention_core(t["q"], t["k"], t["v"], backend=be),
        lambda t: reference.slot_attention_core(t["q"], t["k"], t["v"]),
        ("q", "k", "v"),
    ),
    "slot_attention": Op(
        "slot_attention_core",
        lambda low: {"slots": leaf(rand(2, 4, 8)), "k": leaf(rand(2, 11, 8, dtype=low)),
                     "v": leaf(rand(2, 11, 8, dtype=low)), **_slot_attention_params()},
        lambda t, be: ops.slot_attention(t["slots"], t["k"], t["v"], _params(t), n_iters=2, backend=be),
        lambda t: reference.slot_attention(t["slots"], t["k"], t["v"], _params(t), n_iters=2),
        ("slots", "k", "v", "p:to_q.weight", "p:gru.weight_ih"),
    ),
    "gini_kl": Op(
        "gini_kl",
        lambda low: {"activations": leaf(rand(6, 5, 2, 3, dtype=low)), "labels": torch.tensor([0, 2, 1, 2, 0, 3])},
        lambda t, be: ops.gini_kl(t["activations"], t["labels"], 4, backend=be),
        lambda t: reference.gini_kl(t["activations"], t["labels"], 4),
        ("activations",),
    ),
    "gini_kl_statistics": Op(
        "gini_kl_statistics",
        lambda low: {"activations": leaf(rand(6, 5, 2, 3, dtype=low)), "labels": torch.tensor([0, 2, 1, 2, 0, 3])},
        lambda t, be: ops.gini_kl_statistics(t["activations"], t["labels"], 4, backend=be)[:1],
        lambda t: reference.gini_kl_statistics(t["activations"], t["labels"], 4)[:1],
        ("activations",),
    ),
    "gini_kl_from_statistics": Op(
        "gini_kl_from_statistics",
        # float32 sums (bfloat16 is refused: the sums need more than 8 bits); under the rule they stay float32
        lambda low: {"class_sums": leaf(rand(4, 5).abs() + 0.1), "counts": torch.tensor([2, 1, 2, 1])},
        lambda t, be: ops.gini_kl_from_statistics(t["class_sums"], t["counts"], backend=be),
        lambda t: reference.gini_kl_from_statistics(t["class_sums"], t["counts"]),
        ("class_sums",),
    ),
    # lower-precision rule: the input and the LoRA weights float32, as module parameters are
    "lora_linear": Op(
        "lora_linear",
        lambda low: {"x": leaf(rand(3, 5, 16)), "weight": rand(10, 16), "bias": rand(10),
                     "lora_a": leaf(0.3 * rand(4, 16)), "lora_b": leaf(0.3 * rand(10, 4))},
        lambda t, be: ops.lora_linear(t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], 0.5, backend=be),
        lambda t: reference.lora_linear(t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], 0.5),
        ("x", "lora_a", "lora_b"),
    ),
    "lora_qkv": Op(
        "lora_qkv",
        lambda low: {"x": leaf(rand(2, 5, 8)), "w_qkv": rand(24, 8), "b_qkv": rand(24),
                     **_lora_pairs(8, 3, ("q", "v"))},
        lambda t, be: ops.lora_qkv(t["x"], t["w_qkv"], t["b_qkv"], _pair(t, "q"), None, _pair(t, "v"), 0.5, 2,
                                   backend=be),
        lambda t: reference.lora_qkv(t["x"], t["w_qkv"], t["b_qkv"], _pair(t, "q"), None, _pair(t, "v"), 0.5, 2),
        ("x", "q_a", "v_b"),
    ),
    # weights at a trained layer's scale (std C**-0.5): unit-scale weights give logits of about 4 whose bf16
    # softmax gradient is off by up to 15%, in torch's own autocast of the reference too
    "lora_attention": Op(
        "lora_qkv",
        lambda low: {"x": leaf(rand(2, 5, 8)), "w_qkv": rand(24, 8) / 8 ** 0.5, "b_qkv": 0.1 * rand(24),
                     "w_proj": rand(8, 8) / 8 ** 0.5, "b_proj": 0.1 * rand(8), **_lora_pairs(8, 3, ("q", "k", "v", "proj"))},
        lambda t, be: ops.lora_attention(t["x"], t["w_qkv"], t["b_qkv"], _pair(t, "q"), _pair(t, "k"),
                                         _pair(t, "v"), t["w_proj"], t["b_proj"], _pair(t, "proj"), 0.5, 2,
                                         backend=be),
        lambda t: reference.lora_attention(t["x"], t["w_qkv"], t["b_qkv"], _pair(t, "q"), _pair(t, "k"),
                                           _pair(t, "v"), t["w_proj"], t["b_proj"], _pair(t, "proj"), 0.5, 2),
        ("x", "k_a", "proj_b"),
        # Its gradients pass through SDPA's softmax backward, A * (dA - sum A dA), run in bf16 by autocast: the
        # subtraction cancels, and q, k, v and the attention output are rounded to bf16 between the three steps.
        # Measured over 200 seeds at these sizes, relative error of the gradients: max 1.8% (lora k's A), median
        # 0.5%; torch's autocast of reference.lora_attention on the same inputs: max 2.1%, median 0.65%. The
        # kernels' own gradients are held to 1e-2 in the lora_qkv and lora_linear cases.
        grad_tolerance={torch.bfloat16: 3e-2},
        # Its output chains three bf16 roundings (q, k, v; the attention output; the projection), and the Triton
        # path rounds each LoRA intermediate x A^T to bf16 once more before its product. Measured over 60 seeds at
        # these sizes, relative error of the output: Triton interpreter max 1.16%, median 0.85%; reference backend
        # max 0.61%; torch's autocast of reference.lora_attention max 0.94%. The single ops are held to 1e-2.
        tolerance={torch.bfloat16: 2e-2},
    ),
}
LOWER_OPS = ("lora_linear", "lora_qkv", "lora_attention")


def _cases():
    """(op, device, backend, autocast dtype): on CPU the cpp and Triton-interpreter kernels (the reference for the
    lora ops, which have no cpp kernels); on CUDA the Triton and CUDA kernels."""
    params = []
    for name, op in OPS.items():
        implemented = _backend.implementations(op.table)
        for case in CASES:
            device, backend = case.values
            wanted = ("cpp", "triton") if device == "cpu" else ("triton", "cuda")
            if backend not in implemented or (backend not in wanted and not (backend == "reference" and (
                    device == "cpu" and "cpp" not in implemented))):
                continue
            for low in (BF16, FP16) if name in LOWER_OPS else (BF16,):
                dt = "bf16" if low == BF16 else "fp16"
                params.append(pytest.param(name, device, backend, low, id=f"{name}-{device}-{backend}-{dt}",
                                           marks=case.marks))
    return params


def _on(inputs: dict, device: str) -> dict:
    """The inputs on ``device``, leaves again."""
    return {n: t.detach().to(device).requires_grad_(t.requires_grad) for n, t in inputs.items()}


# gini_kl_statistics' class sums are float64 for every input dtype
OUTPUT_DTYPES = {"gini_kl_statistics": torch.float64}


def _expected(name: str, low: torch.dtype) -> torch.dtype:
    """The outputs' dtype under ``low`` autocast."""
    return OUTPUT_DTYPES.get(name, low if name in LOWER_OPS else torch.float32)


def _grads(outputs, inputs: dict, names, weights):
    pairs = [(o, w) for o, w in zip(outputs, weights) if o.is_floating_point() and o.requires_grad]
    total = sum((o.double() * w).sum() for o, w in pairs)
    return torch.autograd.grad(total, [inputs[n] for n in names])


def _run(name, device, backend, low, inputs):
    with torch.autocast(device, dtype=low):
        return _tuple(OPS[name].call(inputs, backend))


@pytest.mark.parametrize(("name", "device", "backend", "low"), _cases())
def test_dtype_values_and_gradients_under_autocast(name, device, backend, low):
    """Outputs in the rule's dtype, equal to the float64 reference on the inputs as given: at the float32
    tolerance where the op runs in float32 (casting bf16 up is exact), at the bf16/fp16 tolerance where it runs in
    the autocast dtype. Gradients reach every input in its own dtype, against the reference's."""
    op = OPS[name]
    inputs = _on(op.make(low), device)
    outputs = _run(name, device, backend, low, inputs)
    expected = _expected(name, low)
    assert [o.dtype for o in outputs] == [expected] * len(outputs), f"{name} under {low} autocast"
    # the reference on the inputs as the rule casts them: exact for the float32 rule, rounded to the autocast
    # dtype for the lower one (that rounding is the policy, not an error of the op)
    cast = low if name in LOWER_OPS else torch.float32
    wide = {n: t.detach().to(cast).double().requires_grad_(t.requires_grad) if t.is_floating_point() else t
            for n, t in inputs.items()}
    ref = _tuple(op.ref(wide))
    for i, (out, r) in enumerate(zip(outputs, ref)):
        tolerance = max(TOLERANCE[expected], (op.tolerance or {}).get(low, 0.0))
        error = relative_error(out, r)
        assert error <= tolerance, f"{name} output {i}: relative error {error:.3g} > {tolerance:g}"
    weights = [rand(*o.shape, dtype=torch.float64, device=device) for o in outputs]
    # backward outside the region, as torch recommends: it runs in the dtypes the forward chose
    got = _grads(outputs, inputs, op.grad, weights)
    want = _grads(ref, wide, op.grad, weights)
    for n, g, w in zip(op.grad, got, want):
        assert g.dtype == inputs[n].dtype, f"{name}: gradient of {n} is {g.dtype}, the input {inputs[n].dtype}"
        # rounded to its input's dtype, and computed in the autocast dtype under the lower rule
        tolerance = max(TOLERANCE[expected], TOLERANCE[g.dtype], (op.grad_tolerance or {}).get(low, 0.0))
        error = relative_error(g, w)
        assert error <= tolerance, f"{name}: gradient of {n}: relative error {error:.3g} > {tolerance:g}"


@pytest.mark.parametrize(("name", "device", "backend", "low"), _cases())
def test_compiled_matches_eager_under_autocast(name, device, backend, low):
    """torch.compile(fullgraph=True) in the same region: the same dtypes, values and gradients as eager."""
    op = OPS[name]
    inputs = _on(op.make(low), device)
    eager = _run(name, device, backend, low, inputs)
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: _tuple(op.call(t, backend)), fullgraph=True, backend="aot_eager")
    # torch traces a compiled region's backward under the forward's autocast by default (backward_pass_autocast
    # "same_as_forward", pytorch/pytorch#153044), even inside an autocast(enabled=False) block (#179804), where
    # eager runs the backward outside the region: slot_attention's torch layers between the cores (LayerNorm,
    # to_q, the GRU) would differentiate in bf16 (gradients off by about 5e-3). "off" is eager's behaviour; the
    # kdfast ops alone match eager under either setting.
    setting = "off" if name == "slot_attention" else torch._functorch.config.backward_pass_autocast
    with torch.autocast(device, dtype=low), torch._functorch.config.patch(backward_pass_autocast=setting):
        got = compiled(inputs)
    assert [o.dtype for o in got] == [o.dtype for o in eager]
    for g, e in zip(got, eager):
        torch.testing.assert_close(g, e)
    weights = [rand(*o.shape, dtype=torch.float64, device=device) for o in eager]
    for g, e in zip(_grads(got, inputs, op.grad, weights), _grads(eager, inputs, op.grad, weights)):
        assert g.dtype == e.dtype
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("low", [BF16, FP16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", [name for name, rule in _autocast.RULES.items() if name not in _autocast.COMPOSITES])
def test_custom_op_called_directly_follows_its_rule(name, low):
    """torch.ops.kdfast.<op> in a region casts through its registered autocast kernel, as the public function
    does, eager and compiled."""
    op = getattr(torch.ops.kdfast, name).default
    args = _direct_args(name, low)
    expected = low if _autocast.RULES[name] == _autocast.LOWER else OUTPUT_DTYPES.get(name, torch.float32)
    with torch.autocast("cpu", dtype=low):
        outputs = _tuple(op(*args))
        torch._dynamo.reset()
        compiled = _tuple(torch.compile(lambda *a: op(*a), fullgraph=True, backend="aot_eager")(*args))
    floating = [o.dtype for o in outputs if o.is_floating_point() and o.numel()]
    assert floating == [expected] * len(floating) and (floating or name == "slot_assignment"), name
    assert [o.dtype for o in compiled] == [o.dtype for o in outputs], name


def _direct_args(name: str, low: torch.dtype) -> tuple:
    """Arguments of each custom op on the reference backend (the Triton fused iterations on the interpreter),
    the tensors in float32 or ``low`` (mixed, as in a region)."""
    x, w = rand(2, 5, 8, dtype=low), rand(24, 8)
    slots, k, v = rand(2, 3, 8, dtype=low), rand(2, 7, 8), rand(2, 7, 8, dtype=low)
    labels = torch.tensor([0, 1, 1, 2])
    if name == "_slot_attention_iterations_triton":
        if not _backend.triton_interpreting():
            pytest.skip("the fused iterations run on CUDA tensors or under TRITON_INTERPRET=1")
        p = {n[2:]: t.detach() for n, t in _slot_attention_params().items()}
        params = [p.get(n) for n in reference.SLOT_ATTENTION_PARAMS]  # no to_q bias: None
        return (slots, k, v, *params, 2, 8 ** -0.5, 1e-8, True, 1)
    return {
        "slot_cosine_similarity": (slots, k, 1e-8, "reference"),
        "slot_assignment": (rand(2, 3, 4, dtype=low), "reference"),
        "slot_match_loss": (slots, rand(2, 3, 8), None, "mean", 1e-8, "reference"),
        "slot_contrastive_loss": (rand(2, 3, 4, 8, dtype=low), 0.1, True, "mean", "reference"),
        "slot_attention_core": (slots, k, v, 8 ** -0.5, 1e-8, True, "reference"),
        "gini_kl_statistics": (rand(4, 5, dtype=low), labels, 3, "reference"),
        "gini_kl_from_statistics": (rand(3, 5).abs() + 0.1, torch.tensor([1, 2, 1]), "batch", 1e-10, "reference"),
        "lora_linear": (x, w[:10], None, rand(3, 8), rand(10, 3), 0.5, 0.0, None, "reference"),
        "lora_qkv": (x.float(), w, rand(24), rand(3, 8), rand(8, 3), None, None, None, None, 0.5, 2, "reference"),
    }[name]


def test_every_custom_op_has_one_rule_and_backward_ops_none():
    """Each forward custom op of the kdfast namespace is in the table and has an autocast kernel for CPU and CUDA;
    the backward ops have none (they take the dtypes their forward saved)."""
    names = {n.split("::")[1] for n in torch._library.custom_ops.OPDEFS if n.startswith("kdfast::")}
    forward = {n for n in names if not n.endswith("_backward")}
    assert forward == set(_autocast.RULES) - set(_autocast.COMPOSITES)
    for name in names:
        for key in _autocast.AUTOCAST_KEYS.values():
            has = torch._C._dispatch_has_kernel_for_dispatch_key(f"kdfast::{name}", key)
            assert has == (name in forward), f"kdfast::{name} {'lacks' if name in forward else 'has'} a {key} kernel"


def test_float64_stays_float64():
    """As in torch, autocast never casts float64; mixed with float64 the LoRA op computes in float64."""
    a, b = rand(2, 3, 8, dtype=torch.float64), rand(2, 3, 8, dtype=torch.float64)
    x, w, lora_a, lora_b = rand(3, 8, dtype=torch.float64), rand(5, 8), rand(2, 8), rand(5, 2)
    with torch.autocast("cpu", dtype=BF16):
        assert ops.slot_match_loss(a, b).dtype == torch.float64
        assert ops.lora_linear(x, w, None, lora_a, lora_b).dtype == torch.float64
        assert ops.lora_linear(x.float(), w, None, lora_a, lora_b).dtype == BF16


def test_nothing_changes_outside_autocast():
    """Outside a region the ops keep their inputs' dtype (the policy of kdfast/ops/_validate.py)."""
    a = rand(2, 3, 8, dtype=BF16)
    x, w, lora_a, lora_b = rand(3, 8), rand(5, 8), rand(2, 8), rand(5, 2)
    assert ops.slot_match_loss(a, a + 1).dtype == BF16
    assert ops.lora_linear(x, w, None, lora_a, lora_b).dtype == torch.float32
    with torch.autocast("cpu", dtype=BF16, enabled=False):
        assert ops.slot_cosine_similarity(a, a).dtype == BF16
