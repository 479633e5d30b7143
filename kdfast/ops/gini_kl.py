"""Gini impurity and KL reductions of the discriminability-enforcing loss (arXiv 2202.07073; design.md 3.4).

    kdfast::gini_kl(activations, labels, num_classes, target, delta, backend) -> (gini, kl)

Backends: reference (the fused kernels land with the Gini/KL issue).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdfast import _backend, reference
from kdfast.ops import _validate
from kdfast.ops._autograd import eager_or_traced

_IMPLEMENTED = ("reference",)
TARGETS = ("batch", "uniform")


def _gini_kl_forward(activations, labels, num_classes, target, delta, backend):
    return reference.gini_kl(activations, labels, num_classes, target, delta)


def _gini_kl_backward_impl(grad_gini, grad_kl, activations, labels, num_classes, target, delta, backend):
    # The closed form, not autograd through the reference: autograd's float32 result cancels badly (see
    # kdfast.reference.gini_kl_backward).
    return reference.gini_kl_backward(grad_gini, grad_kl, activations, labels, num_classes, target, delta)


@torch.library.custom_op("kdfast::gini_kl", mutates_args=())
def _gini_kl(
    activations: Tensor, labels: Tensor, num_classes: int, target: str, delta: float, backend: str
) -> tuple[Tensor, Tensor]:
    gini, kl = _gini_kl_forward(activations, labels, num_classes, target, delta, backend)
    return gini, kl


@_gini_kl.register_fake
def _(activations, labels, num_classes, target, delta, backend):
    return activations.new_empty(()), activations.new_empty(())


@torch.library.custom_op("kdfast::gini_kl_backward", mutates_args=())
def _gini_kl_backward(
    grad_gini: Tensor, grad_kl: Tensor, activations: Tensor, labels: Tensor,
    num_classes: int, target: str, delta: float, backend: str,
) -> Tensor:
    return _gini_kl_backward_impl(grad_gini, grad_kl, activations, labels, num_classes, target, delta, backend)


@_gini_kl_backward.register_fake
def _(grad_gini, grad_kl, activations, labels, num_classes, target, delta, backend):
    return activations.new_empty(activations.shape)


def _setup(ctx, inputs, output):
    activations, labels, ctx.num_classes, ctx.target, ctx.delta, ctx.backend = inputs
    ctx.save_for_backward(activations, labels)


def _grads(ctx, grad_gini, grad_kl):
    """Missing output gradients as zeros, and the extra arguments of the backward."""
    activations, _ = ctx.saved_tensors
    zero = activations.new_zeros(())
    grad_gini = zero if grad_gini is None else grad_gini
    grad_kl = zero if grad_kl is None else grad_kl
    return grad_gini, grad_kl, *ctx.saved_tensors, ctx.num_classes, ctx.target, ctx.delta, ctx.backend


def _op_backward(ctx, grad_gini, grad_kl):
    return _gini_kl_backward(*_grads(ctx, grad_gini, grad_kl)), None, None, None, None, None


_gini_kl.register_autograd(_op_backward, setup_context=_setup)


class _GiniKL(torch.autograd.Function):
    """The eager path: the same forward and backward as the custom op, without the dispatcher round trips."""

    @staticmethod
    def forward(ctx, activations, labels, num_classes, target, delta, backend):
        _setup(ctx, (activations, labels, num_classes, target, delta, backend), None)
        return _gini_kl_forward(activations, labels, num_classes, target, delta, backend)

    @staticmethod
    def backward(ctx, grad_gini, grad_kl):
        return _gini_kl_backward_impl(*_grads(ctx, grad_gini, grad_kl)), None, None, None, None, None


def gini_kl(
    activations: Tensor,
    labels: Tensor,
    num_classes: int,
    target: str = "batch",
    delta: float = 1e-10,
    *,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """The Gini impurity of each feature's class distribution, and KL(label distribution || feature classes).

    Args:
        activations: (B, F, H, W) or (B, F) float16, bfloat16, float32 or float64 (any memory format).
        labels: (B,) integer class labels in [0, num_classes).
        num_classes: C >= 1.
        target: ``batch`` (the batch's label frequencies) or ``uniform`` (1/C) as the KL target.
        delta: the small constant of the paper's code (1e-10), finite and positive.
        backend: ``auto`` or ``reference`` (None: ``KDFAST_BACKEND``, default ``auto``).

    Returns:
        (gini, kl): two scalars in the activations' dtype, differentiable in ``activations``.
    """
    if not isinstance(activations, Tensor) or activations.dim() not in (2, 4):
        shape = tuple(activations.shape) if isinstance(activations, Tensor) else type(activations).__name__
        raise ValueError(f"activations must have shape (B, F, H, W) or (B, F), got {shape}")
    _validate.tensor("activations", activations, "(B, F, H, W)" if activations.dim() == 4 else "(B, F)")
    _validate.nonempty("activations", activations, "(B, F, ...)")
    _validate.tensor("labels", labels, "(B,)", floating=False)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor (int64 class indices), got {labels.dtype}")
    _validate.same_device(activations=activations, labels=labels)
    _validate.same_size("batch size B", activations=activations.shape[0], labels=labels.shape[0])
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    _validate.choice("target", target, TARGETS)
    delta = _validate.finite("delta", delta, positive=True)
    # One host sync, worth it: an out-of-range label would otherwise index out of bounds in a kernel. A compiled
    # graph cannot branch on data, so there the range check is the indexing op's own.
    if not torch.compiler.is_compiling() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, num_classes={num_classes}), got min {int(labels.min())}, max {int(labels.max())}")
    chosen = _backend.resolve("gini_kl", "_gini_kl_forward", backend, activations.device.type, _IMPLEMENTED)
    args = (activations, labels.long(), num_classes, target, delta, chosen)
    return eager_or_traced(_GiniKL, _gini_kl, *args)
