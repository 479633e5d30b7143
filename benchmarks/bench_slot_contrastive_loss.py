"""Benchmarks of SlotContrast's slot-slot contrastive loss (design.md 3.2).

Each case is one pass (``fwd`` or ``fwd+bwd``), one preset shape and one implementation (see conftest.py):
``eager`` is kdfast.reference.slot_contrastive_loss, SlotContrast's own code path (normalise, (T-1, S, S)
logits by matmul, cross-entropy); ``compile`` is torch.compile of it. Run through ``python benchmarks/report.py``,
or directly:

    python -m pytest benchmarks/bench_slot_contrastive_loss.py -p no:cacheprovider
"""

from __future__ import annotations

import importlib

import pytest
import torch

import kdfast.ops
from kdfast import reference

from .conftest import DEVICE, DTYPE, implementation_names, make_implementation, measure, synchronize

contrastive_ops = importlib.import_module("kdfast.ops.slot_contrastive_loss")

# SlotContrast configs (design.md 3.1): batch 64 per GPU, clips of 4 frames; the slots of the batch are pooled
# (batch_contrast, SlotContrast's default), S = B*K. Small enough for the 2-core CPU machines as they are.
PRESETS = {"movi-c": (64, 4, 11, 64), "movi-e": (64, 4, 15, 128), "ytvis": (64, 4, 7, 64)}  # (B, T, K, D)
TEMPERATURE = 0.1  # SlotContrast's

PASSES = ("fwd", "fwd+bwd")


# A named function rather than a partial: torch.compile gets a plain function with a code object of its own.
def reference_loss(slots):
    return reference.slot_contrastive_loss(slots, TEMPERATURE, True)


def kdfast_loss(slots, backend):
    return kdfast.ops.slot_contrastive_loss(slots, TEMPERATURE, True, backend=backend)


def cost(B: int, T: int, K: int, D: int, backward: bool) -> tuple[int, int]:
    """(bytes, flops): the least memory traffic the op needs, and its floating-point operations.

    Bytes: the forward reads the slots and writes a scalar; the backward reads them again and writes their
    gradient. The S x S logits are not counted (the fused kernels never write them). Flops: the logits of
    each of the T-1 pairs (2 S^2 D) forward, the two gradient products (4 S^2 D) backward; the exponentials,
    norms and the backward's recomputation of the logits are not counted.
    """
    S = B * K
    nbytes = B * T * K * D * DTYPE.itemsize
    flops = 2 * (T - 1) * S * S * D
    if backward:
        nbytes += 2 * B * T * K * D * DTYPE.itemsize
        flops += 4 * (T - 1) * S * S * D
    return nbytes, flops


CASES = [
    pytest.param(pass_name, preset, impl, id=f"slot_contrastive_loss-{pass_name}-{preset}-{impl}")
    for pass_name in PASSES
    for preset in PRESETS
    for impl in implementation_names("slot_contrastive_loss")
]


@pytest.mark.parametrize("pass_name, preset, impl", CASES)
def test_slot_contrastive_loss(benchmark, pass_name, preset, impl):
    B, T, K, D = PRESETS[preset]
    backward = pass_name == "fwd+bwd"
    fn = make_implementation(impl, reference_loss, kdfast_loss)
    slots = torch.randn(B, T, K, D, device=DEVICE, dtype=DTYPE, requires_grad=backward)
    grad_output = torch.randn((), device=DEVICE, dtype=DTYPE)

    def step():
        out = fn(slots)
        if backward:
            torch.autograd.grad(out, slots, grad_output)
        synchronize()

    nbytes, flops = cost(B, T, K, D, backward)
    measure(
        benchmark,
        step,
        group=f"slot_contrastive_loss {pass_name} {preset}",
        impl=impl,
        op="slot_contrastive_loss",
        **{"pass": pass_name},
        preset=preset,
        shape=f"B={B} T={T} K={K} D={D} S={B * K}",
        bytes=nbytes,
        flops=flops,
    )
