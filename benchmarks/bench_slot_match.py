"""Benchmarks of batched slot cosine matching (design.md 3.2): slot_match_loss and slot_cosine_similarity.

Each case is one op, one pass (``fwd`` or ``fwd+bwd``), one preset shape and one implementation (see
conftest.py). Run through ``python benchmarks/report.py``, or directly:

    python -m pytest benchmarks/bench_slot_match.py -p no:cacheprovider
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

import kdfast.ops
from kdfast import reference

from .conftest import DEVICE, DTYPE, FWD_BWD, bench_cases, implementation_names, make_implementation, run_case
from .presets import SLOTCONTRAST


@dataclass(frozen=True)
class Op:
    """One benchmarked op: its eager baseline, its kdfast entry point and how much work it is."""

    reference: Callable  # (x, y) -> output: the eager baseline, also what torch.compile compiles
    kdfast: Callable  # (x, y, backend=...) -> output
    op: str  # the op whose backend table (kdfast._backend) tells which backends this build has
    pairwise: bool  # output (B, K, M) with gradients for both inputs; else a scalar loss, gradient for x only
    hungarian: bool = False


# Named wrappers rather than partials: torch.compile gets a plain function with a code object of its own.
def reference_index_loss(student, teacher):
    return reference.slot_match_loss(student, teacher, "index")


def reference_hungarian_loss(student, teacher):
    return reference.slot_match_loss(student, teacher, "hungarian")


def reference_cosine_similarity(a, b):
    return reference.slot_cosine_similarity(a, b)


OPS = {
    "slot_match_loss[index]": Op(
        reference_index_loss,
        functools.partial(kdfast.ops.slot_match_loss, matching="index"),
        "slot_match_loss",
        pairwise=False,
    ),
    "slot_match_loss[hungarian]": Op(
        reference_hungarian_loss,
        functools.partial(kdfast.ops.slot_match_loss, matching="hungarian"),
        "slot_match_loss",
        pairwise=False,
        hungarian=True,
    ),
    "slot_cosine_similarity": Op(
        reference_cosine_similarity,
        kdfast.ops.slot_cosine_similarity,
        "slot_cosine_similarity",
        pairwise=True,
    ),
}


def cost(op: Op, B: int, K: int, M: int, D: int, backward: bool) -> tuple[int, int]:
    """(bytes, flops): the least memory traffic the op needs, and its approximate floating-point operations.

    Bytes: forward reads both inputs and writes the output; the backward reads both inputs again and the
    output's gradient, and writes the input gradient(s). Hungarian matching also writes the (B, K, M)
    similarity and reads it back for the solver, and writes and reads the (B, K) int64 assignment.
    """
    size = DTYPE.itemsize
    inputs = (B * K * D + B * M * D) * size
    output = (B * K * M if op.pairwise else 1) * size
    nbytes = inputs + output
    if op.pairwise:
        # Two norms (2 flops per element each), the batched matmul (2 per multiply-add) and the scaling.
        flops = 2 * B * (K + M) * D + 2 * B * K * M * D + B * K * M
        backward_flops = 4 * B * K * M * D + 6 * B * (K + M) * D
        grads = inputs
    else:
        # Per slot pair three dots (<s,t>, |s|^2, |t|^2); the backward is about two more passes over s and t.
        flops = 6 * B * K * D
        backward_flops = 4 * B * K * D
        grads = B * K * D * size
    if op.hungarian:
        nbytes += 2 * B * K * M * size + 2 * B * K * 8
        flops += 2 * B * K * M * D + 2 * B * (K + M) * D
    if backward:
        nbytes += inputs + output + grads
        flops += backward_flops
    return nbytes, flops


CASES = bench_cases(OPS, SLOTCONTRAST, lambda op_name, pass_name: implementation_names(OPS[op_name].op))


@pytest.mark.parametrize("op_name, pass_name, preset, impl", CASES)
def test_slot_match(benchmark, op_name, pass_name, preset, impl):
    op = OPS[op_name]
    shapes = SLOTCONTRAST[preset]  # on CPU too: small enough for the 2-core machines as they are
    B, K, D = shapes.batch, shapes.slots, shapes.slot_dim
    M = K  # teachers have as many slots as students
    backward = pass_name == FWD_BWD
    fn = make_implementation(impl, op.reference, op.kdfast)

    x = torch.randn(B, K, D, device=DEVICE, dtype=DTYPE, requires_grad=backward)
    # The teacher of the loss gets no gradient; both sides of the similarity do.
    y = torch.randn(B, M, D, device=DEVICE, dtype=DTYPE, requires_grad=backward and op.pairwise)
    run_case(
        benchmark, op=op_name, pass_name=pass_name, preset=preset, impl=impl,
        forward=lambda: fn(x, y),
        wrt=(x, y) if op.pairwise else (x,),
        grad_outputs=torch.randn((B, K, M) if op.pairwise else (), device=DEVICE, dtype=DTYPE),
        shape=f"B={B} K={K} M={M} D={D}",
        cost=cost(op, B, K, M, D, backward),
    )


# The assignment behind matching="hungarian", alone: scipy on the host (the reference path: the similarity is
# copied to the host, then one linear_sum_assignment per batch element, then the result copied back) against
# the batched Triton kernel (one program per batch element, no host synchronisation). CUDA only: on CPU
# tensors scipy is kdfast's path too.
ASSIGNMENT_IMPLEMENTATIONS = ("eager", "kdfast-triton")


def reference_assignment(similarity):
    return reference.slot_assignment(similarity)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="the batched assignment kernel runs on CUDA tensors only")
@pytest.mark.parametrize("preset", SLOTCONTRAST)
@pytest.mark.parametrize("impl", ASSIGNMENT_IMPLEMENTATIONS)
def test_slot_assignment(benchmark, preset, impl):
    B, K = SLOTCONTRAST[preset].batch, SLOTCONTRAST[preset].slots
    fn = reference_assignment if impl == "eager" else functools.partial(kdfast.ops.slot_assignment, backend="triton")
    # cosines, in float32 as slot_match_loss computes them for the matching whatever the slots' dtype
    similarity = torch.rand(B, K, K, device=DEVICE) * 2 - 1
    run_case(
        benchmark, op="slot_assignment", pass_name="fwd", preset=preset, impl=impl,
        forward=lambda: fn(similarity),
        shape=f"B={B} K={K} M={K}",
        cost=(B * K * K * similarity.element_size() + B * K * 8, 0),
    )
