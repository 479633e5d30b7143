"""Benchmarks of the Gini impurity and KL reductions (design.md 3.4): gini_kl, forward and forward+backward.

Each case is one pass (``fwd`` or ``fwd+bwd``), one preset shape and one implementation (see conftest.py). Run
through ``python benchmarks/report.py --ops gini_kl``, or directly:

    python -m pytest benchmarks/bench_gini_kl.py -p no:cacheprovider
"""

from __future__ import annotations

import importlib

import pytest
import torch

from kdfast import reference

from .conftest import DEVICE, DTYPE, FWD_BWD, bench_cases, implementation_names, make_implementation, run_case
from .presets import GINI_KL, GINI_KL_CPU

# The module: kdfast.ops re-exports the function gini_kl under the module's name.
gini_kl_module = importlib.import_module("kdfast.ops.gini_kl")


# A named wrapper, not a partial: torch.compile gets a plain function with a code object of its own.
def reference_gini_kl(activations, labels, num_classes):
    return reference.gini_kl(activations, labels, num_classes)


def cost(B: int, F: int, H: int, W: int, C: int, backward: bool) -> tuple[int, int]:
    """(bytes, flops): the least memory traffic the op needs, and its approximate floating-point operations.

    Bytes: the forward reads the activations once (and the labels); the backward reads them once more and writes
    their gradient. The (C, F) table (a few MB at most, against 26-100 MB of activations) is not counted.
    Flops: abs and add per element forward, sign and multiply backward; the table's few per entry.
    """
    elements = B * F * H * W
    nbytes = elements * DTYPE.itemsize + B * 8
    flops = 2 * elements + 10 * C * F
    if backward:
        nbytes += 2 * elements * DTYPE.itemsize + B * 8
        flops += 2 * elements + 15 * C * F
    return nbytes, flops


CASES = bench_cases(["gini_kl"], GINI_KL, lambda op, pass_name: implementation_names(op))


@pytest.mark.parametrize("op, pass_name, preset, impl", CASES)
def test_gini_kl(benchmark, op, pass_name, preset, impl):
    shapes = (GINI_KL_CPU if DEVICE.type == "cpu" else GINI_KL)[preset]
    B, F, H, W, C = shapes.batch, shapes.features, shapes.height, shapes.width, shapes.classes
    backward = pass_name == FWD_BWD
    fn = make_implementation(impl, reference_gini_kl, gini_kl_module.gini_kl)

    generator = torch.Generator().manual_seed(0)
    activations = torch.randn(B, F, H, W, generator=generator).to(DEVICE, DTYPE).requires_grad_(backward)
    labels = torch.randint(0, C, (B,), generator=generator).to(DEVICE)
    run_case(
        benchmark, op=op, pass_name=pass_name, preset=preset, impl=impl,
        forward=lambda: fn(activations, labels, C),
        wrt=(activations,),
        grad_outputs=(torch.ones((), device=DEVICE, dtype=DTYPE), torch.full((), 0.5, device=DEVICE, dtype=DTYPE)),
        shape=f"B={B} F={F} H={H} W={W} C={C}",
        cost=cost(B, F, H, W, C, backward),
    )
