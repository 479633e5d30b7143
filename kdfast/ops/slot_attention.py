"""Slot attention (SlotContrast / videosaur grouper; design.md 3.1).

    kdfast::slot_attention_core(q, k, v, scale, eps, backend) -> (updates (B, K, Dv), attn (B, K, N))

Backends: reference (fused kernels land with the slot attention issue).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdfast import _backend, reference
from kdfast.ops import _validate
from kdfast.ops._autograd import eager_or_traced

_IMPLEMENTED = ("reference",)


def _reference_core(q, k, v, scale, eps, backend):
    return reference.slot_attention_core(q, k, v, scale, eps)


@torch.library.custom_op("kdfast::slot_attention_core", mutates_args=())
def _slot_attention_core(q: Tensor, k: Tensor, v: Tensor, scale: float, eps: float, backend: str) -> tuple[Tensor, Tensor]:
    updates, attn = reference.slot_attention_core(q, k, v, scale, eps)
    return updates.contiguous(), attn.contiguous()


@_slot_attention_core.register_fake
def _(q, k, v, scale, eps, backend):
    B, K, _ = q.shape
    return q.new_empty(B, K, v.shape[2]), q.new_empty(B, K, k.shape[1])


@torch.library.custom_op("kdfast::slot_attention_core_backward", mutates_args=())
def _slot_attention_core_backward(
    grad_updates: Tensor, grad_attn: Tensor, q: Tensor, k: Tensor, v: Tensor, scale: float, eps: float, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    grads = reference.slot_attention_core_backward(grad_updates, grad_attn, q, k, v, scale, eps)
    return tuple(grad.contiguous() for grad in grads)


@_slot_attention_core_backward.register_fake
def _(grad_updates, grad_attn, q, k, v, scale, eps, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _core_setup(ctx, inputs, output):
    q, k, v, ctx.scale, ctx.eps, ctx.backend = inputs
    ctx.save_for_backward(q, k, v)


def _core_backward(ctx, grad_updates, grad_attn):
    q, k, v = ctx.saved_tensors
    if grad_updates is None:
        grad_updates = torch.zeros(q.shape[0], q.shape[1], v.shape[2], dtype=q.dtype, device=q.device)
    if grad_attn is None:
        grad_attn = torch.zeros(q.shape[0], q.shape[1], k.shape[1], dtype=q.dtype, device=q.device)
    grads = _slot_attention_core_backward(grad_updates, grad_attn, q, k, v, ctx.scale, ctx.eps, ctx.backend)
    return *grads, None, None, None


_slot_attention_core.register_autograd(_core_backward, setup_context=_core_setup)


def slot_attention_core(
    q: Tensor, k: Tensor, v: Tensor, scale: float | None = None, eps: float = 1e-8, *, backend: str | None = None
) -> tuple[Tensor, Tensor]:
    """One slot attention read-out: softmax over the slots, then a weighted mean of the values per slot.

    ``A = softmax_K(scale q k^T)``, ``U_i = sum_n (A[i,n] + eps) v_n / sum_n (A[i,n] + eps)``.

    Args:
        q: (B, K, D) slot queries. float16, bfloat16, float32 or float64.
        k: (B, N, D) keys; v: (B, N, Dv) values; same device (mixed dtypes are promoted).
        scale: logit scale, default D ** -0.5; eps: added to the attention before the weighted mean.
        backend: ``auto`` or ``reference`` (None: ``KDFAST_BACKEND``, default ``auto``).

    Returns:
        updates (B, K, Dv) and the attention masks A (B, K, N, before eps), in the inputs' dtype.
    """
    _validate.tensor("q", q, "(B, K, D)")
    _validate.tensor("k", k, "(B, N, D)")
    _validate.tensor("v", v, "(B, N, Dv)")
    _validate.same_device(q=q, k=k, v=v)
    for name, t, layout in (("q", q, "(B, K, D)"), ("k", k, "(B, N, D)"), ("v", v, "(B, N, Dv)")):
        _validate.nonempty(name, t, layout)
    _validate.same_size("batch size B", q=q.shape[0], k=k.shape[0], v=v.shape[0])
    _validate.same_size("query/key dimension D", q=q.shape[2], k=k.shape[2])
    _validate.same_size("number of inputs N", k=k.shape[1], v=v.shape[1])
    scale = q.shape[2] ** -0.5 if scale is None else _validate.finite("scale", scale)
    eps = _validate.finite("eps", eps)
    if eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    dtype = _validate.compute_dtype(q, k, v)
    chosen = _backend.resolve("slot_attention_core", "_slot_attention_core_forward", backend, q.device.type, _IMPLEMENTED)
    q, k, v = _validate.cast(dtype, q, k, v)
    return eager_or_traced(_reference_core, _slot_attention_core, q, k, v, scale, eps, chosen)
