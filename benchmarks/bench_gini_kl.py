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

from .conftest import DEVICE, DTYPE, implementation_names, make_implementation, measure, synchronize

# The module: kdfast.ops re-exports the function gini_kl under the module's name.
gini_kl_module = importlib.import_module("kdfast.ops.gini_kl")

# (B, F, H, W, C): the penultimate feature maps of the paper's classifiers (design.md 3.4).
PRESETS = {
    "resnet50-cifar100": (200, 2048, 4, 4, 100),
    "resnet18": (128, 512, 4, 4, 100),
    "imagenet": (256, 2048, 7, 7, 1000),
}
# On the 2-core CPU machines the ImageNet map (100 MB of float32, ~0.3 s per eager fwd+bwd) is run at a quarter of
# the batch; the CIFAR presets run as they are.
CPU_PRESETS = {**PRESETS, "imagenet": (64, 2048, 7, 7, 1000)}

PASSES = ("fwd", "fwd+bwd")


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


CASES = [
    pytest.param(pass_name, preset, impl, id=f"gini_kl-{pass_name}-{preset}-{impl}")
    for pass_name in PASSES
    for preset in PRESETS
    for impl in implementation_names("gini_kl")
]


@pytest.mark.parametrize("pass_name, preset, impl", CASES)
def test_gini_kl(benchmark, pass_name, preset, impl):
    B, F, H, W, C = (CPU_PRESETS if DEVICE.type == "cpu" else PRESETS)[preset]
    backward = pass_name == "fwd+bwd"
    fn = make_implementation(impl, reference_gini_kl, gini_kl_module.gini_kl)

    generator = torch.Generator().manual_seed(0)
    activations = torch.randn(B, F, H, W, generator=generator).to(DEVICE, DTYPE).requires_grad_(backward)
    labels = torch.randint(0, C, (B,), generator=generator).to(DEVICE)
    grad_outputs = (torch.ones((), device=DEVICE, dtype=DTYPE), torch.full((), 0.5, device=DEVICE, dtype=DTYPE))

    def step():
        out = fn(activations, labels, C)
        if backward:
            torch.autograd.grad(out, (activations,), grad_outputs)
        synchronize()

    nbytes, flops = cost(B, F, H, W, C, backward)
    measure(
        benchmark,
        step,
        group=f"gini_kl {pass_name} {preset}",
        impl=impl,
        op="gini_kl",
        **{"pass": pass_name},
        preset=preset,
        shape=f"B={B} F={F} H={H} W={W} C={C}",
        bytes=nbytes,
        flops=flops,
    )
