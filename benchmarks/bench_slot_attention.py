"""Benchmarks of slot attention (design.md 3.1): the core, and the SlotAttention module (2 and 3 iterations).

Each case is one op, one pass (``fwd`` or ``fwd+bwd``), one preset shape and one implementation (see
conftest.py). The module's baselines are an eager SlotContrast-style module written from the formula
(tests/eager_slot_attention.py, shared with the tests)
and torch.compile of it; kdfast's module loads its state_dict. Run through ``python benchmarks/report.py``, or

    python -m pytest benchmarks/bench_slot_attention.py -p no:cacheprovider
"""

from __future__ import annotations

import pytest
import torch

import kdfast.nn
import kdfast.ops
from kdfast import reference
from tests.eager_slot_attention import EagerSlotAttention, OCLFSlotAttention, ResidualMLP

from .conftest import DEVICE, DTYPE, FWD_BWD, bench_cases, implementation_names, make_implementation, run_case
from .presets import SLOT_ATTENTION_CPU_BATCH, SLOTCONTRAST


def reference_core(q, k, v):
    return reference.slot_attention_core(q, k, v)


def kdfast_core(q, k, v, backend):
    return kdfast.ops.slot_attention_core(q, k, v, backend=backend)


def make_core(B, N, inp_dim, D, K, backward, iters):
    q = torch.randn(B, K, D, device=DEVICE, dtype=DTYPE, requires_grad=backward)
    k = torch.randn(B, N, D, device=DEVICE, dtype=DTYPE, requires_grad=backward)
    v = torch.randn(B, N, D, device=DEVICE, dtype=DTYPE, requires_grad=backward)
    return reference_core, kdfast_core, (q, k, v), (q, k, v), lambda out: out[0]


def make_module(B, N, inp_dim, D, K, backward, iters):
    eager = EagerSlotAttention(inp_dim, D, n_iters=iters).to(DEVICE, DTYPE)
    fused = kdfast.nn.SlotAttention(inp_dim, D, n_iters=iters).to(DEVICE, DTYPE)
    fused.load_state_dict(eager.state_dict())
    slots = torch.randn(B, K, D, device=DEVICE, dtype=DTYPE, requires_grad=backward)
    features = torch.randn(B, N, inp_dim, device=DEVICE, dtype=DTYPE, requires_grad=backward)

    def kdfast_module(slots, features, backend):
        # "triton-loop": the core kernels between torch layers instead of the fused iteration kernels
        fused.backend, fused.fused = backend.removesuffix("-loop"), not backend.endswith("-loop")
        return fused(slots, features)

    wrt = (slots, features, *eager.parameters(), *fused.parameters()) if backward else ()
    return eager, kdfast_module, (slots, features), wrt, lambda out: out["slots"]


def make_oclf_module(n_heads: int, masked: bool):
    """OCLF's options (tests/eager_slot_attention.py's OCLFSlotAttention as the eager baseline): ``n_heads`` heads,
    and with ``masked`` a slot mask leaving out every other slot."""

    def make(B, N, inp_dim, D, K, backward, iters):
        eager = OCLFSlotAttention(D, inp_dim, D, n_heads, iters, ff_mlp=ResidualMLP(D, 4 * D)).to(DEVICE, DTYPE)
        ours = kdfast.nn.SlotAttention(inp_dim, D, n_iters=iters, n_heads=n_heads, gru_hidden="prev").to(DEVICE, DTYPE)
        ours.load_state_dict({key.replace("norm_input.", "norm_features.").replace("ff_mlp.", "mlp."): value
                              for key, value in eager.state_dict().items()})
        slots = torch.randn(B, K, D, device=DEVICE, dtype=DTYPE, requires_grad=backward)
        features = torch.randn(B, N, inp_dim, device=DEVICE, dtype=DTYPE, requires_grad=backward)
        slot_mask = (torch.arange(K, device=DEVICE) % 2 == 1).expand(B, K) if masked else None

        def eager_module(slots, features):
            return {"slots": eager(features, slots, slot_mask)[0]}

        def kdfast_module(slots, features, backend):
            ours.backend = backend
            return ours(slots, features, slot_mask=slot_mask)

        wrt = (slots, features, *eager.parameters(), *ours.parameters()) if backward else ()
        return eager_module, kdfast_module, (slots, features), wrt, lambda out: out["slots"]

    return make


# name -> (maker: (B, N, inp_dim, D, K, backward, iters) -> (eager, kdfast, inputs, wrt, output), iterations,
# presets it runs at)
OPS = {
    "slot_attention_core": (make_core, 0, SLOTCONTRAST),
    "SlotAttention[2 iters]": (make_module, 2, SLOTCONTRAST),
    "SlotAttention[3 iters]": (make_module, 3, SLOTCONTRAST),
    "SlotAttention[3 iters, half the slots masked]": (make_oclf_module(1, True), 3, SLOTCONTRAST),
    "SlotAttention[3 iters, 4 heads]": (make_oclf_module(4, False), 3, ["movi-e"]),
}


def cost(B, N, inp_dim, D, K, iters, backward) -> tuple[int, int]:
    """(bytes, flops): the least memory traffic and the approximate floating-point operations.

    Core forward: read q, k, v, write the updates and the (B, K, N) masks; 4 B K N D flops (logits and the
    weighted sum). Backward: read q, k, v, the updates and their gradient, write dq, dk, dv; 10 B K N D.
    Module: the features read and k, v written once, then per iteration the core without masks, plus the
    last iteration's masks; the slot-sized layers are negligible next to them.
    """
    size = DTYPE.itemsize
    slots, tokens = B * K * D, B * N * D
    if iters == 0:
        nbytes = (2 * slots + 2 * tokens + B * K * N) * size
        grads = (3 * slots + 4 * tokens) * size
        return nbytes + (grads if backward else 0), 4 * B * K * N * D + (10 * B * K * N * D if backward else 0)
    nbytes = (B * N * inp_dim + 2 * tokens + iters * (2 * tokens) + B * K * N) * size
    flops = 4 * B * N * inp_dim * D + iters * 4 * B * K * N * D
    if backward:
        nbytes += (B * N * inp_dim + 2 * tokens + iters * 4 * tokens) * size
        flops += 8 * B * N * inp_dim * D + iters * 10 * B * K * N * D
    return nbytes, flops


def _implementations(op_name: str, pass_name: str) -> list[str]:
    names = implementation_names("slot_attention_core")
    if op_name in ("SlotAttention[2 iters]", "SlotAttention[3 iters]") and "kdfast-triton" in names:
        names.insert(names.index("kdfast-triton") + 1, "kdfast-triton-loop")  # the step before the fused iterations
    return names


CASES = [case for op_name, (_, _, presets) in OPS.items()
         for case in bench_cases([op_name], presets, _implementations)]


@pytest.mark.parametrize("op_name, pass_name, preset, impl", CASES)
def test_slot_attention(benchmark, op_name, pass_name, preset, impl):
    make, iters, _ = OPS[op_name]
    shapes = SLOTCONTRAST[preset]  # one frame of a clip; the 2-core CPU machines run it at a smaller batch
    B = SLOT_ATTENTION_CPU_BATCH if DEVICE.type == "cpu" else shapes.batch
    N, inp_dim, D, K = shapes.tokens, shapes.inp_dim, shapes.slot_dim, shapes.slots
    backward = pass_name == FWD_BWD
    reference_fn, kdfast_fn, inputs, wrt, output_of = make(B, N, inp_dim, D, K, backward, iters)
    fn = make_implementation(impl, reference_fn, kdfast_fn)
    run_case(
        benchmark, op=op_name, pass_name=pass_name, preset=preset, impl=impl,
        forward=lambda: output_of(fn(*inputs)),
        wrt=[t for t in wrt if t.requires_grad],
        grad_outputs=torch.randn(B, K, D, device=DEVICE, dtype=DTYPE),
        allow_unused=True,
        shape=f"B={B} N={N} inp={inp_dim} D={D} K={K}",
        cost=cost(B, N, inp_dim, D, K, iters, backward),
    )
