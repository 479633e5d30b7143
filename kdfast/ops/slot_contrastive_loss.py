"""SlotContrast's slot-slot contrastive loss between consecutive frames (design.md 3.2).

    kdfast::slot_contrastive_loss(slots, temperature, batch_contrast, reduction, backend) -> loss

Backends: reference (the fused flash-style kernels land with the contrastive loss issue).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdfast import _backend, reference
from kdfast.ops import _validate
from kdfast.ops._autograd import eager_or_traced, reference_vjp

_IMPLEMENTED = ("reference",)
REDUCTIONS = ("mean", "sum", "none")


@torch.library.custom_op("kdfast::slot_contrastive_loss", mutates_args=())
def _slot_contrastive_loss(slots: Tensor, temperature: float, batch_contrast: bool, reduction: str, backend: str) -> Tensor:
    return _reference_loss(slots, temperature, batch_contrast, reduction, backend).contiguous()


def _reference_loss(slots, temperature, batch_contrast, reduction, backend):
    return reference.slot_contrastive_loss(slots, temperature, batch_contrast, reduction)


@_slot_contrastive_loss.register_fake
def _(slots, temperature, batch_contrast, reduction, backend):
    if reduction != "none":
        return slots.new_empty(())
    B, T, K, _ = slots.shape
    return slots.new_empty((T - 1, B * K) if batch_contrast else (T - 1, B, K))


@torch.library.custom_op("kdfast::slot_contrastive_loss_backward", mutates_args=())
def _slot_contrastive_loss_backward(
    grad: Tensor, slots: Tensor, temperature: float, batch_contrast: bool, reduction: str, backend: str
) -> Tensor:
    args = (temperature, batch_contrast, reduction)
    return reference_vjp(reference.slot_contrastive_loss, (slots,), (grad,), *args)[0]


@_slot_contrastive_loss_backward.register_fake
def _(grad, slots, temperature, batch_contrast, reduction, backend):
    return slots.new_empty(slots.shape)


def _setup(ctx, inputs, output):
    slots, ctx.temperature, ctx.batch_contrast, ctx.reduction, ctx.backend = inputs
    ctx.save_for_backward(slots)


def _backward(ctx, grad):
    (slots,) = ctx.saved_tensors
    args = (ctx.temperature, ctx.batch_contrast, ctx.reduction, ctx.backend)
    return _slot_contrastive_loss_backward(grad, slots, *args), None, None, None, None


_slot_contrastive_loss.register_autograd(_backward, setup_context=_setup)


def slot_contrastive_loss(
    slots: Tensor,
    temperature: float = 0.1,
    batch_contrast: bool = True,
    reduction: str = "mean",
    *,
    backend: str | None = None,
) -> Tensor:
    """SlotContrast's InfoNCE between the slots of consecutive frames.

    For each pair (t, t+1), with S = B*K slots pooled over the batch (``batch_contrast``) or S = K per batch
    element: ``logits[i, j] = <s_t^i, s_{t+1}^j> / temperature`` on L2-normalised slots, and the loss is the
    mean over (t, j) of ``-log softmax_i(logits[:, j])[j]``. T == 1 has no pairs: the loss is 0 with a zero
    gradient.

    Args:
        slots: (B, T, K, D) float16, bfloat16, float32 or float64.
        temperature: finite and positive.
        batch_contrast: pool the slots of the whole batch as negatives (SlotContrast's default).
        reduction: ``mean``, ``sum``, or ``none`` ((T-1, B*K) with batch_contrast, else (T-1, B, K)).
        backend: ``auto`` or ``reference`` (None: ``KDFAST_BACKEND``, default ``auto``).
    """
    _validate.tensor("slots", slots, "(B, T, K, D)")
    _validate.nonempty("slots", slots, "(B, T, K, D)")
    temperature = _validate.finite("temperature", temperature, positive=True)
    _validate.choice("reduction", reduction, REDUCTIONS)
    if not isinstance(batch_contrast, bool):
        raise TypeError(f"batch_contrast must be a bool, got {type(batch_contrast).__name__}")
    chosen = _backend.resolve(
        "slot_contrastive_loss", "_slot_contrastive_loss_forward", backend, slots.device.type, _IMPLEMENTED
    )
    args = (slots, temperature, batch_contrast, reduction, chosen)
    return eager_or_traced(_reference_loss, _slot_contrastive_loss, *args)
