"""Benchmarks of SlotContrast's slot-slot contrastive loss (design.md 3.2).

Each case is one pass (``fwd`` or ``fwd+bwd``), one preset shape and one implementation (see conftest.py):
``eager`` is kdfast.reference.slot_contrastive_loss, SlotContrast's own code path (normalise, (T-1, S, S)
logits by matmul, cross-entropy); ``compile`` is torch.compile of it. Run through ``python benchmarks/report.py``,
or directly:

    python -m pytest benchmarks/bench_slot_contrastive_loss.py -p no:cacheprovider
"""

from __future__ import annotations

import pytest
import torch

import kdfast.ops
from kdfast import reference

from .conftest import DEVICE, DTYPE, FWD_BWD, bench_cases, implementation_names, make_implementation, run_case
from .presets import CONTRASTIVE_TEMPERATURE as TEMPERATURE
from .presets import SLOTCONTRAST


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


CASES = bench_cases(["slot_contrastive_loss"], SLOTCONTRAST, lambda op, pass_name: implementation_names(op))


@pytest.mark.parametrize("op, pass_name, preset, impl", CASES)
def test_slot_contrastive_loss(benchmark, op, pass_name, preset, impl):
    # SlotContrast's clips, the slots of the batch pooled (batch_contrast, SlotContrast's default): S = B*K. Small
    # enough for the 2-core CPU machines as they are.
    shapes = SLOTCONTRAST[preset]
    B, T, K, D = shapes.batch, shapes.frames, shapes.slots, shapes.slot_dim
    backward = pass_name == FWD_BWD
    fn = make_implementation(impl, reference_loss, kdfast_loss)
    slots = torch.randn(B, T, K, D, device=DEVICE, dtype=DTYPE, requires_grad=backward)
    run_case(
        benchmark, op=op, pass_name=pass_name, preset=preset, impl=impl,
        forward=lambda: fn(slots),
        wrt=(slots,),
        grad_outputs=torch.randn((), device=DEVICE, dtype=DTYPE),
        shape=f"B={B} T={T} K={K} D={D} S={B * K}",
        cost=cost(B, T, K, D, backward),
    )
