"""Batched slot cosine matching: SlotMatch's distillation loss and the slot similarity matrix (design.md 3.2).

Public functions validate their inputs, pick a backend and call one custom op in the ``kdfast`` namespace:

    kdfast::slot_cosine_similarity(a, b, eps, backend)                    -> (B, K, M)
    kdfast::slot_match_loss(student, teacher, assignment, reduction, eps, backend) -> scalar or (B, K)
    kdfast::slot_assignment(similarity, backend)                          -> (B, K) int64

Each differentiable op has a fake implementation and an autograd formula whose backward is itself a custom op
(``..._backward``), so torch.compile(fullgraph=True) traces through them. Eager calls take an
autograd.Function with the same forward and backward instead (``eager_or_traced``): at slot sizes the
dispatcher's Python round trips would cost more than the kernels.
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

from kdfast import _backend, reference
from kdfast._backend import Implementation, extension_op, triton_launcher
from kdfast.ops import _validate
from kdfast.ops._autograd import eager_or_traced, reference_vjp, wire_autograd

MATCHINGS = ("index", "hungarian")
REDUCTIONS = ("mean", "sum", "none")


def _kernels():
    return importlib.import_module("kdfast.kernels.slot_match")


def _triton_slot_limit(*slots: int) -> str | None:
    limit = _kernels().MAX_SLOTS
    if max(slots) <= limit:
        return None
    return f"the triton backend handles at most {limit} slots per batch element, got {max(slots)}"


def _triton_assignment_limit(K: int, M: int) -> str | None:
    limit = _kernels().MAX_ASSIGNMENT_SLOTS
    if max(K, M) <= limit:
        return None
    return f"the triton backend handles at most {limit} slots per side, got K={K}, M={M}"


# --------------------------------------------------------------------------------------------------------------
# kdfast::slot_cosine_similarity
# forward(a, b, eps) -> (B, K, M); backward(grad, a, b, eps) -> (grad_a, grad_b); limit(K, M)

COSINE_SIMILARITY = _backend.register("slot_cosine_similarity", {
    "triton": Implementation(
        forward=triton_launcher("slot_match", "slot_cosine_similarity_forward"),
        backward=triton_launcher("slot_match", "slot_cosine_similarity_backward"),
        limit=_triton_slot_limit,
    ),
    "cpp": Implementation(
        forward=extension_op("_slot_cosine_similarity_forward"),
        backward=extension_op("_slot_cosine_similarity_backward"),
        compiled="_slot_cosine_similarity_forward",
    ),
    "reference": Implementation(
        forward=reference.slot_cosine_similarity,
        backward=lambda grad, a, b, eps: tuple(reference_vjp(reference.slot_cosine_similarity, (a, b), (grad,), eps)),
    ),
})


def _cosine_forward(a: Tensor, b: Tensor, eps: float, backend: str) -> Tensor:
    return COSINE_SIMILARITY[backend].forward(a, b, eps)


def _cosine_backward(grad: Tensor, a: Tensor, b: Tensor, eps: float, backend: str) -> tuple[Tensor, Tensor]:
    return COSINE_SIMILARITY[backend].backward(grad, a, b, eps)


@torch.library.custom_op("kdfast::slot_cosine_similarity", mutates_args=())
def _slot_cosine_similarity(a: Tensor, b: Tensor, eps: float, backend: str) -> Tensor:
    return _cosine_forward(a, b, eps, backend)


@_slot_cosine_similarity.register_fake
def _(a, b, eps, backend):
    return a.new_empty(a.shape[0], a.shape[1], b.shape[1])


@torch.library.custom_op("kdfast::slot_cosine_similarity_backward", mutates_args=())
def _slot_cosine_similarity_backward(grad: Tensor, a: Tensor, b: Tensor, eps: float, backend: str) -> tuple[Tensor, Tensor]:
    return _cosine_backward(grad, a, b, eps, backend)


@_slot_cosine_similarity_backward.register_fake
def _(grad, a, b, eps, backend):
    return a.new_empty(a.shape), b.new_empty(b.shape)


def _cosine_setup(ctx, inputs, output):
    a, b, ctx.eps, ctx.backend = inputs
    ctx.save_for_backward(a, b)


def _cosine_grads(ctx, grad, backward):
    grad_a, grad_b = backward(grad, *ctx.saved_tensors, ctx.eps, ctx.backend)
    return grad_a, grad_b, None, None


_SlotCosineSimilarity = wire_autograd(
    _slot_cosine_similarity, _cosine_forward, _cosine_setup, _cosine_grads,
    _slot_cosine_similarity_backward, _cosine_backward,
)


def slot_cosine_similarity(a: Tensor, b: Tensor, eps: float = 1e-8, *, backend: str | None = None) -> Tensor:
    """Cosine similarity of every pair of slots, per batch element.

    ``out[b, i, m] = <a_i, b_m> / (max(|a_i|, eps) * max(|b_m|, eps))``: a zero vector has cosine 0 with
    everything, and NaN inputs give NaN exactly where the reference does.

    Args:
        a: (B, K, D) float16, bfloat16, float32 or float64.
        b: (B, M, D), same device; a different float dtype is promoted (autocast policy).
        eps: norm clamp, finite and positive.
        backend: ``auto``, ``triton``, ``cpp``, ``reference`` (None: ``KDFAST_BACKEND``, default ``auto``).

    Returns:
        (B, K, M) in the inputs' dtype. Differentiable in ``a`` and ``b``.
    """
    _check_slots("a", a, "b", b)
    eps = _validate.finite("eps", eps, positive=True)
    dtype = _validate.compute_dtype(a, b)
    chosen = _backend.resolve("slot_cosine_similarity", backend, a.device.type, (a.shape[1], b.shape[1]))
    a, b = _validate.cast(dtype, a, b)
    return eager_or_traced(_SlotCosineSimilarity, _slot_cosine_similarity, a, b, eps, chosen)


# --------------------------------------------------------------------------------------------------------------
# kdfast::slot_assignment


# forward(similarity) -> (B, K) int64; no gradient; limit(K, M). scipy (the reference) on CPU tensors: auto never
# takes the Triton interpreter.
ASSIGNMENT = _backend.register("slot_assignment", {
    "triton": Implementation(forward=triton_launcher("slot_match", "slot_assignment"), limit=_triton_assignment_limit),
    "reference": Implementation(forward=reference.slot_assignment),
})


def _assign(similarity: Tensor, backend: str) -> Tensor:
    return ASSIGNMENT[backend].forward(similarity)


@torch.library.custom_op("kdfast::slot_assignment", mutates_args=())
def _slot_assignment(similarity: Tensor, backend: str) -> Tensor:
    return _assign(similarity, backend)


@_slot_assignment.register_fake
def _(similarity, backend):
    return similarity.new_empty(similarity.shape[:2], dtype=torch.long)


def slot_assignment(similarity: Tensor, *, backend: str | None = None) -> Tensor:
    """Hungarian matching: for each batch element, the column assigned to each row maximising the total.

    Args:
        similarity: (B, K, M) float tensor with K <= M, finite.
        backend: ``auto`` (CUDA tensors: the batched Triton kernel when K, M <= 64, else scipy; CPU tensors:
            scipy), ``triton`` or ``reference`` (scipy). None: ``KDFAST_BACKEND``, default ``auto``.

    Returns:
        (B, K) int64 on ``similarity``'s device: row i is matched with column ``out[b, i]``; distinct columns.
        Exactly scipy.optimize.linear_sum_assignment(maximize=True)'s assignment on every backend, ties
        included: the Triton kernel runs scipy's shortest-augmenting-path algorithm step for step in float64
        (rows in order; among columns of equal reduced cost, scipy's scan order with free columns preferred;
        a constant matrix gives the identity). It needs no device-to-host copy. No gradient.
        Non-finite similarity: scipy raises a ValueError; the Triton kernel, which cannot raise without a host
        synchronisation, returns the identity pairing for that batch element.
    """
    _validate.tensor("similarity", similarity, "(B, K, M)")
    _validate.same_device(similarity=similarity)
    _validate.nonempty("similarity", similarity, "(B, K, M)")
    if similarity.shape[1] > similarity.shape[2]:
        raise ValueError(f"similarity (B, K, M) needs K <= M to give every row a column, got {tuple(similarity.shape)}")
    chosen = _backend.resolve("slot_assignment", backend, similarity.device.type, tuple(similarity.shape[1:]))
    return eager_or_traced(_assign, _slot_assignment, similarity.detach(), chosen)


# --------------------------------------------------------------------------------------------------------------
# kdfast::slot_match_loss


def _reference_slot_losses(student: Tensor, teacher: Tensor, assignment: Tensor | None, eps: float) -> Tensor:
    """Per-slot 1 - cos(student_i, teacher_assignment(i)), through the reference: (B, K), in float32 at least:
    1 - cos cancels as cos nears 1, so a cosine rounded to float16 first would lose most of its digits there."""
    B, K, D = student.shape
    wide = torch.promote_types(student.dtype, torch.float32)
    student, teacher = _validate.cast(wide, student, teacher)
    if assignment is not None:
        teacher = teacher.gather(1, assignment.unsqueeze(-1).expand(B, K, D))
    cos = reference.slot_cosine_similarity(student.reshape(B * K, 1, D), teacher.reshape(B * K, 1, D), eps)
    return 1 - cos.view(B, K)


def _reduce(losses: Tensor, reduction: str, dtype: torch.dtype) -> Tensor:
    if reduction == "mean":
        losses = losses.mean()
    elif reduction == "sum":
        losses = losses.sum()
    return losses if losses.dtype == dtype else losses.to(dtype)


def _reference_slot_match_loss(student, teacher, assignment, reduction, eps):
    return _reduce(_reference_slot_losses(student, teacher, assignment, eps), reduction, student.dtype)


def _reference_match_backward(grad, student, teacher, assignment, reduction, eps):
    args = (assignment, reduction, eps)
    return reference_vjp(_reference_slot_match_loss, (student, teacher), (grad,), *args, needs=(True, False))[0]


def _reduced(per_slot_forward):
    """A kernel forward of per-slot losses (B, K), followed by the reduction."""
    def forward(student, teacher, assignment, reduction, eps):
        return _reduce(per_slot_forward(student, teacher, assignment, eps), reduction, student.dtype)
    return forward


def _scaled(per_slot_backward):
    """A kernel backward of per-slot losses: mean and sum reach every slot with the same gradient, so the gradient
    is expanded (no copy) and scaled inside the kernel."""
    def backward(grad, student, teacher, assignment, reduction, eps):
        grad_scale = 1.0 / (student.shape[0] * student.shape[1]) if reduction == "mean" else 1.0
        return per_slot_backward(grad.expand(student.shape[:2]), student, teacher, assignment, eps, grad_scale)
    return backward


# forward(student, teacher, assignment, reduction, eps) -> loss; backward(grad, ...same) -> grad_student;
# limit(K, M)
MATCH_LOSS = _backend.register("slot_match_loss", {
    "triton": Implementation(
        forward=_reduced(triton_launcher("slot_match", "slot_match_loss_forward")),
        backward=_scaled(triton_launcher("slot_match", "slot_match_loss_backward")),
        limit=_triton_slot_limit,
    ),
    "cpp": Implementation(
        forward=_reduced(extension_op("_slot_match_loss_forward")),
        backward=_scaled(extension_op("_slot_match_loss_backward")),
        compiled="_slot_match_loss_forward",
    ),
    "reference": Implementation(forward=_reference_slot_match_loss, backward=_reference_match_backward),
})


def _match_forward(student: Tensor, teacher: Tensor, assignment: Tensor | None, reduction: str, eps: float, backend: str) -> Tensor:
    return MATCH_LOSS[backend].forward(student, teacher, assignment, reduction, eps)


def _match_backward(
    grad: Tensor, student: Tensor, teacher: Tensor, assignment: Tensor | None, reduction: str, eps: float, backend: str
) -> Tensor:
    return MATCH_LOSS[backend].backward(grad, student, teacher, assignment, reduction, eps)


@torch.library.custom_op("kdfast::slot_match_loss", mutates_args=())
def _slot_match_loss(student: Tensor, teacher: Tensor, assignment: Tensor | None, reduction: str, eps: float, backend: str) -> Tensor:
    return _match_forward(student, teacher, assignment, reduction, eps, backend)


@_slot_match_loss.register_fake
def _(student, teacher, assignment, reduction, eps, backend):
    return student.new_empty(student.shape[:2] if reduction == "none" else ())


@torch.library.custom_op("kdfast::slot_match_loss_backward", mutates_args=())
def _slot_match_loss_backward(
    grad: Tensor, student: Tensor, teacher: Tensor, assignment: Tensor | None, reduction: str, eps: float, backend: str
) -> Tensor:
    return _match_backward(grad, student, teacher, assignment, reduction, eps, backend)


@_slot_match_loss_backward.register_fake
def _(grad, student, teacher, assignment, reduction, eps, backend):
    return student.new_empty(student.shape)


def _match_setup(ctx, inputs, output):
    student, teacher, assignment, ctx.reduction, ctx.eps, ctx.backend = inputs
    ctx.save_for_backward(student, teacher, assignment)


def _match_grads(ctx, grad, backward):
    grad_student = backward(grad, *ctx.saved_tensors, ctx.reduction, ctx.eps, ctx.backend)
    return grad_student, None, None, None, None, None


_SlotMatchLoss = wire_autograd(
    _slot_match_loss, _match_forward, _match_setup, _match_grads, _slot_match_loss_backward, _match_backward,
)


def slot_match_loss(
    student: Tensor,
    teacher: Tensor,
    matching: str = "index",
    reduction: str = "mean",
    eps: float = 1e-8,
    *,
    backend: str | None = None,
) -> Tensor:
    """SlotMatch's distillation loss: mean over matched slot pairs of ``1 - cos(student_i, teacher_pi(i))``.

    Args:
        student: (B, K, D) float16, bfloat16, float32 or float64.
        teacher: (B, M, D) on the same device. It gets no gradient. ``index`` needs M == K; ``hungarian`` K <= M.
        matching: ``index`` pairs slot i with teacher slot i; ``hungarian`` pairs the slots so that the total
            cosine per batch element is maximal (kdfast.ops.slot_assignment; no gradient through the pairing). On
            CUDA tensors the pairing is the batched Triton kernel (no device-to-host copy), else scipy.
        reduction: ``mean`` (over B*K pairs) or ``sum``: a scalar; ``none``: per-slot losses (B, K).
        eps: norm clamp, finite and positive: zero vectors have cosine 0.
        backend: ``auto``, ``triton``, ``cpp``, ``reference`` (None: ``KDFAST_BACKEND``, default ``auto``).

    Returns:
        The loss in the inputs' dtype (mixed dtypes are promoted, at least float32).
    """
    _check_slots("student", student, "teacher", teacher)
    _validate.choice("matching", matching, MATCHINGS)
    _validate.choice("reduction", reduction, REDUCTIONS)
    eps = _validate.finite("eps", eps, positive=True)
    K, M = student.shape[1], teacher.shape[1]
    if matching == "index" and K != M:
        raise ValueError(f"matching='index' needs as many teacher as student slots: student has {K}, teacher {M}")
    if matching == "hungarian" and K > M:
        raise ValueError(f"matching='hungarian' needs K <= M: student has {K} slots, teacher {M}")
    dtype = _validate.compute_dtype(student, teacher)
    student, teacher = _validate.cast(dtype, student, teacher.detach())
    device_type = student.device.type
    chosen = _backend.resolve("slot_match_loss", backend, device_type, (K, M))
    assignment = None
    if matching == "hungarian":
        # The pairing is decided on float32 (or float64) cosines: bf16's 8-bit mantissa would turn near-ties
        # into different pairings than the float64 reference finds.
        wide = torch.promote_types(dtype, torch.float32)
        with torch.no_grad():
            student_wide, teacher_wide = _validate.cast(wide, student, teacher)
            similarity = eager_or_traced(_cosine_forward, _slot_cosine_similarity, student_wide, teacher_wide, eps, chosen)
            # scipy where the loss runs on the reference; else what slot_assignment's auto takes: on CUDA
            # tensors the batched Triton kernel (no device-to-host copy) within its limit
            assign = "reference" if chosen == "reference" else _backend.resolve("slot_assignment", "auto", device_type, (K, M))
            assignment = eager_or_traced(_assign, _slot_assignment, similarity, assign)
    return eager_or_traced(_SlotMatchLoss, _slot_match_loss, student, teacher, assignment, reduction, eps, chosen)


def _check_slots(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    _validate.tensor(name_a, a, "(B, K, D)")
    _validate.tensor(name_b, b, "(B, M, D)")
    _validate.same_device(**{name_a: a, name_b: b})
    _validate.nonempty(name_a, a, "(B, K, D)")
    _validate.nonempty(name_b, b, "(B, M, D)")
    _validate.same_size("batch size B", **{name_a: a.shape[0], name_b: b.shape[0]})
    _validate.same_size("slot dimension D", **{name_a: a.shape[2], name_b: b.shape[2]})
