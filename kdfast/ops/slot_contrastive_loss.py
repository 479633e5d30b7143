"""SlotContrast's slot-slot contrastive loss between consecutive frames (design.md 3.2).

    kdfast::slot_contrastive_loss(slots, temperature, batch_contrast, reduction, backend)                 -> loss
    kdfast::slot_contrastive_loss_backward(grad, slots, temperature, batch_contrast, reduction, backend) -> grad

Backends: ``triton`` (kdfast.kernels.slot_contrastive_loss: flash-style, the S x S logits never reach memory),
``cpp`` (csrc/cpu/slot_contrastive_loss.cpp), ``reference``. Every backend computes each term as
softplus(r[j]), r[j] = logsumexp_{i != j} (l[i, j] - l[j, j]), not as the difference logsumexp - l[j, j],
which cancels when the positive dominates (see kdfast.reference.slot_contrastive_loss). The kernels' forward
also returns per column r and the negatives' log-sum-exp, which are all their backward needs besides the
slots. Eager calls take an autograd.Function that saves them (one kernel each way; on CPU a mean or sum
computes its gradient in the forward's pass, see _SlotContrastiveLoss); the custom op's backward, which
torch.compile calls, only has the op's inputs, so it recomputes them with the forward kernel first (two
kernels backward).
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

from kdfast import _backend, reference
from kdfast._backend import Implementation, extension_op, triton_launcher
from kdfast.ops import _validate
from kdfast.ops._autograd import eager_or_traced, reference_vjp

REDUCTIONS = ("mean", "sum", "none")
# F.normalize's default, as SlotContrast normalises its slots.
EPS = reference.CONTRASTIVE_NORMALIZE_EPS


def _kernels():
    return importlib.import_module("kdfast.kernels.slot_contrastive_loss")


def _triton_dim_limit(D: int) -> str | None:
    """Triton tiles hold at most ``MAX_DIM`` features per slot."""
    limit = _kernels().MAX_DIM
    return None if D <= limit else f"the triton backend handles slots of at most {limit} features, got D={D}"


def _reference_loss(slots, temperature, batch_contrast, reduction, backend="reference"):
    # backend: the custom op's last argument, which eager_or_traced passes to the eager call too
    return reference.slot_contrastive_loss(slots, temperature, batch_contrast, reduction)


def _reference_backward(grad, slots, temperature, batch_contrast, reduction):
    return reference_vjp(reference.slot_contrastive_loss, (slots,), (grad,), temperature, batch_contrast, reduction)[0]


def _reduce(losses: Tensor, slots: Tensor, batch_contrast: bool, reduction: str) -> Tensor:
    """The kernels' (T-1, B*K) terms, reduced as the reference does, in the slots' dtype."""
    if reduction == "mean":
        # one reduction kernel; an empty set of terms (T == 1) has mean 0
        losses = losses.mean() if losses.numel() else losses.sum()
    elif reduction == "sum":
        losses = losses.sum()
    elif not batch_contrast:
        B, _, K, _ = slots.shape
        losses = losses.view(losses.shape[0], B, K)
    return losses if losses.dtype == slots.dtype else losses.to(slots.dtype)


class _Kernels:
    """One backend's kernels. ``forward(slots, temperature, batch_contrast, eps)`` -> (losses, log_odds,
    negatives_lse): the per-term losses and the per-column statistics of the backward, each (T-1, B*K) in the
    accumulator dtype; ``backward(grad_losses (T-1, B, K), slots, log_odds, negatives_lse, temperature,
    batch_contrast, eps, grad_scale)`` -> the slots' gradient; ``forward_backward`` (optional): the losses and the
    gradient of their sum in one pass."""

    def __init__(self, forward, backward, forward_backward=None):
        self.forward, self.backward, self.forward_backward = forward, backward, forward_backward

    def loss(self, slots, temperature, batch_contrast, reduction):
        losses, _, _ = self.forward(slots, temperature, batch_contrast, EPS)
        return _reduce(losses, slots, batch_contrast, reduction).contiguous()

    def recomputing_backward(self, grad, slots, temperature, batch_contrast, reduction):
        # Only the op's inputs reach the custom op's backward: the statistics are recomputed by the forward kernel.
        _, *stats = self.forward(slots, temperature, batch_contrast, EPS)
        return _kernel_backward(self, grad, slots, stats, temperature, batch_contrast, reduction)

    def eager(self, slots, temperature, batch_contrast, reduction, backend):
        fused = self.forward_backward is not None and reduction != "none" and slots.requires_grad and torch.is_grad_enabled()
        return _SlotContrastiveLoss.apply(slots, temperature, batch_contrast, reduction, self, fused)

    def implementation(self, **entries) -> Implementation:
        return Implementation(forward=self.loss, backward=self.recomputing_backward, eager=self.eager, **entries)


def _kernel_backward(
    kernels: _Kernels,
    grad: Tensor,
    slots: Tensor,
    stats: tuple[Tensor, Tensor],
    temperature: float,
    batch_contrast: bool,
    reduction: str,
) -> Tensor:
    """The slots' gradient from the forward's (log_odds, negatives_lse) ``stats``."""
    B, T, K, _ = slots.shape
    if reduction == "none":
        # (T-1, B*K) or (T-1, B, K), any strides: a view as (T-1, B, K) (splitting a dimension needs no copy)
        grad_losses, grad_scale = grad.view(T - 1, B, K), 1.0
    else:
        # Mean and sum reach every term with the same gradient: expand (no copy) and scale inside the kernel.
        grad_losses = grad.expand(T - 1, B, K)
        grad_scale = 1.0 / max((T - 1) * B * K, 1) if reduction == "mean" else 1.0
    return kernels.backward(grad_losses, slots, *stats, temperature, batch_contrast, EPS, grad_scale)


# forward(slots, temperature, batch_contrast, reduction) -> loss; backward(grad, slots, temperature,
# batch_contrast, reduction) -> grad_slots; eager: the same call; limit(D)
CONTRASTIVE_LOSS = _backend.register("slot_contrastive_loss", {
    "triton": _Kernels(
        triton_launcher("slot_contrastive_loss", "slot_contrastive_loss_forward"),
        triton_launcher("slot_contrastive_loss", "slot_contrastive_loss_backward"),
    ).implementation(limit=_triton_dim_limit),
    "cpp": _Kernels(
        extension_op("_slot_contrastive_loss_forward"),
        extension_op("_slot_contrastive_loss_backward"),
        extension_op("_slot_contrastive_loss_forward_backward"),
    ).implementation(compiled="_slot_contrastive_loss_forward"),
    "reference": Implementation(forward=_reference_loss, backward=_reference_backward, eager=_reference_loss),
})


@torch.library.custom_op("kdfast::slot_contrastive_loss", mutates_args=())
def _slot_contrastive_loss(slots: Tensor, temperature: float, batch_contrast: bool, reduction: str, backend: str) -> Tensor:
    return CONTRASTIVE_LOSS[backend].forward(slots, temperature, batch_contrast, reduction).contiguous()


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
    return CONTRASTIVE_LOSS[backend].backward(grad, slots, temperature, batch_contrast, reduction)


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


class _SlotContrastiveLoss(torch.autograd.Function):
    """The eager path of the kernel backends, in one of two ways.

    ``fused`` (cpp, a mean or sum, a gradient wanted): the upstream gradient of a scalar loss is a constant, so
    the forward computes the gradient of the summed terms in the same pass over the logits tiles, and the
    backward only scales it: the logits are formed once. Else the forward saves its per-column statistics and
    the backward recomputes the logits tile by tile (one kernel each way).
    """

    @staticmethod
    def forward(ctx, slots, temperature, batch_contrast, reduction, kernels, fused):
        ctx.temperature, ctx.batch_contrast, ctx.reduction, ctx.kernels = temperature, batch_contrast, reduction, kernels
        ctx.fused = fused
        if fused:
            losses, grad = kernels.forward_backward(slots, temperature, batch_contrast, EPS)
            ctx.save_for_backward(grad)
            ctx.dtype, ctx.count = slots.dtype, losses.numel()
        else:
            losses, *stats = kernels.forward(slots, temperature, batch_contrast, EPS)
            ctx.save_for_backward(slots, *stats)
        return _reduce(losses, slots, batch_contrast, reduction)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        if ctx.fused:
            (grad_sum,) = ctx.saved_tensors
            scale = 1.0 / max(ctx.count, 1) if ctx.reduction == "mean" else 1.0
            return (grad_sum * (grad * scale)).to(ctx.dtype), None, None, None, None, None
        slots, *stats = ctx.saved_tensors
        args = (ctx.temperature, ctx.batch_contrast, ctx.reduction)
        return _kernel_backward(ctx.kernels, grad, slots, stats, *args), None, None, None, None, None


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
    element: ``logits[i, j] = <s_t^i, s_{t+1}^j> / temperature`` on L2-normalised slots
    (``F.normalize``: ``s / max(||s||, 1e-12)``), and the loss is the mean over (t, j) of
    ``-log softmax_i(logits[:, j])[j]``. T == 1 has no pairs: the loss is 0 (``mean``, ``sum``; an empty
    tensor for ``none``) with a zero gradient.

    The kernel backends never form the S x S logits in memory (an online log-sum-exp over tiles of i); they
    accumulate in float32 (float64 for float64 slots) and are deterministic.

    Args:
        slots: (B, T, K, D) float16, bfloat16, float32 or float64.
        temperature: finite and positive.
        batch_contrast: pool the slots of the whole batch as negatives (SlotContrast's default).
        reduction: ``mean``, ``sum``, or ``none`` ((T-1, B*K) with batch_contrast, else (T-1, B, K)).
        backend: ``auto``, ``triton``, ``cpp`` or ``reference`` (None: ``KDFAST_BACKEND``, default ``auto``).
            Triton handles D up to ``kdfast.kernels.slot_contrastive_loss.MAX_DIM`` (512).

    Returns:
        The loss in the slots' dtype. Differentiable in ``slots``.
    """
    _validate.tensor("slots", slots, "(B, T, K, D)")
    _validate.same_device(slots=slots)
    _validate.nonempty("slots", slots, "(B, T, K, D)")
    temperature = _validate.finite("temperature", temperature, positive=True)
    _validate.choice("reduction", reduction, REDUCTIONS)
    if not isinstance(batch_contrast, bool):
        raise TypeError(f"batch_contrast must be a bool, got {type(batch_contrast).__name__}")
    device_type = slots.device.type
    chosen = _backend.resolve("slot_contrastive_loss", backend, device_type, (slots.shape[3],))
    eager = CONTRASTIVE_LOSS[chosen].eager
    return eager_or_traced(eager, _slot_contrastive_loss, slots, temperature, batch_contrast, reduction, chosen)
