"""Gini impurity and KL reductions of the discriminability-enforcing loss (arXiv 2202.07073; design.md 3.4).

The loss runs in two stages, each a custom op in the ``kdfast`` namespace with a fake implementation and an
autograd formula whose backward is itself a custom op:

    kdfast::gini_kl_statistics(activations, labels, num_classes, backend) -> (class_sums (C, F), counts (C,))
    kdfast::gini_kl_from_statistics(class_sums, counts, target, delta, backend) -> (gini, kl)

The statistics are the only stage that reads the activations: once forward (abs, spatial mean, class-segmented
sum), once backward (``sign(a) * grad_class_sums[y_b] / (H W)``, written in the activations' dtype). The class
sums are accumulated and returned in float64 for every input dtype, and the finish works on that small (C, F)
table in float64: the KL gradient is ill-conditioned in the sums (its projection ``h - sum_c h p`` cancels when
``t_c / P_c`` is nearly constant over the classes present), so float32 sums alone would cost up to ~1e-4 relative
error in it, while float32 inputs are exact in float64. Both statistics are sums over the batch, so
data-parallel training can all-reduce them between the stages and get the loss of the global batch
(kdfast.nn.GiniKLLoss(sync_ddp=True)).

``gini_kl`` chains the two stages: through the two custom ops when torch.compile traces, and in eager mode
through one autograd.Function over the same kernels (it saves the activations, the labels, the small table and, for the
Triton backend, the (F,) and (C,) float64 vectors its finish computed; never a (B, F, H, W) temporary).

``gini_impurity`` is a plain composite of torch ops, not a custom op: one square and one sum over a small
tensor, which torch.compile fuses with its neighbours (a custom op would be opaque to that), and which autograd,
AMP and DDP already handle.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdfast import _backend, reference
from kdfast._backend import Implementation, extension_op, triton_launcher
from kdfast.ops import _validate
from kdfast.ops._autograd import eager_or_traced, wire_autograd

TARGETS = ("batch", "uniform")


# --------------------------------------------------------------------------------------------------------------
# The two stages on each backend

# forward(activations, labels, num_classes) -> (class_sums (C, F) float64, counts (C,) int64);
# backward(grad_class_sums, activations, labels) -> grad_activations
STATISTICS = _backend.register("gini_kl_statistics", {
    "triton": Implementation(
        forward=triton_launcher("gini_kl", "gini_kl_statistics_forward"),
        backward=triton_launcher("gini_kl", "gini_kl_statistics_backward"),
    ),
    "cpp": Implementation(
        forward=extension_op("_gini_kl_statistics"),
        backward=extension_op("_gini_kl_statistics_backward"),
        compiled="_gini_kl_statistics",
    ),
    "reference": Implementation(
        forward=reference.gini_kl_statistics, backward=reference.gini_kl_statistics_backward,
    ),
})


# gini_kl chains both stages on one backend; the statistics decide what this build has for it
_backend.register("gini_kl", STATISTICS)


def _without_table(finish):
    """A finish that keeps nothing for its backward: (gini, kl) -> (gini, kl, ())."""
    return lambda class_sums, counts, uniform, delta: (*finish(class_sums, counts, uniform, delta), ())


def _ignoring_table(finish_backward):
    """A finish backward that recomputes what it needs: the forward's table is dropped."""
    return lambda grad_gini, grad_kl, class_sums, counts, uniform, delta, table: finish_backward(
        grad_gini, grad_kl, class_sums, counts, uniform, delta
    )


def _reference_finish(class_sums, counts, uniform, delta):
    return reference.gini_kl_from_statistics(class_sums, counts, "uniform" if uniform else "batch", delta)


def _reference_finish_backward(grad_gini, grad_kl, class_sums, counts, uniform, delta, table=None):
    target = "uniform" if uniform else "batch"
    return reference.gini_kl_from_statistics_backward(grad_gini, grad_kl, class_sums, counts, target, delta)


# forward(class_sums, counts, uniform, delta) -> (gini, kl, table): table is what the backend's backward can
# reuse instead of recomputing (may be empty); backward(grad_gini, grad_kl, class_sums, counts, uniform, delta,
# table or None) -> grad_class_sums
FROM_STATISTICS = _backend.register("gini_kl_from_statistics", {
    "triton": Implementation(
        forward=triton_launcher("gini_kl", "gini_kl_from_statistics_forward"),
        backward=triton_launcher("gini_kl", "gini_kl_from_statistics_backward"),
    ),
    "cpp": Implementation(
        forward=_without_table(extension_op("_gini_kl_from_statistics")),
        backward=_ignoring_table(extension_op("_gini_kl_from_statistics_backward")),
        compiled="_gini_kl_from_statistics",
    ),
    "reference": Implementation(forward=_without_table(_reference_finish), backward=_reference_finish_backward),
})


def _statistics(activations: Tensor, labels: Tensor, num_classes: int, backend: str) -> tuple[Tensor, Tensor]:
    return STATISTICS[backend].forward(activations, labels, num_classes)


def _statistics_backward(grad_class_sums: Tensor, activations: Tensor, labels: Tensor, backend: str) -> Tensor:
    return STATISTICS[backend].backward(grad_class_sums, activations, labels)


def _finish(
    class_sums: Tensor, counts: Tensor, target: str, delta: float, backend: str
) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
    """(gini, kl, table): table is what the backend's backward can reuse instead of recomputing (may be empty)."""
    return FROM_STATISTICS[backend].forward(class_sums, counts, target == "uniform", delta)


def _finish_backward(
    grad_gini: Tensor | None, grad_kl: Tensor | None, class_sums: Tensor, counts: Tensor, target: str, delta: float,
    backend: str, table: tuple[Tensor, ...] = (),
) -> Tensor:
    zero = class_sums.new_zeros(())
    grad_gini = zero if grad_gini is None else grad_gini
    grad_kl = zero if grad_kl is None else grad_kl
    args = (grad_gini, grad_kl, class_sums, counts, target == "uniform", delta)
    return FROM_STATISTICS[backend].backward(*args, table or None)


# --------------------------------------------------------------------------------------------------------------
# kdfast::gini_kl_statistics


@torch.library.custom_op("kdfast::gini_kl_statistics", mutates_args=())
def _gini_kl_statistics(activations: Tensor, labels: Tensor, num_classes: int, backend: str) -> tuple[Tensor, Tensor]:
    return _statistics(activations, labels, num_classes, backend)


@_gini_kl_statistics.register_fake
def _(activations, labels, num_classes, backend):
    class_sums = activations.new_empty((num_classes, activations.shape[1]), dtype=torch.float64)
    return class_sums, labels.new_empty((num_classes,), dtype=torch.long)


@torch.library.custom_op("kdfast::gini_kl_statistics_backward", mutates_args=())
def _gini_kl_statistics_backward(grad_class_sums: Tensor, activations: Tensor, labels: Tensor, backend: str) -> Tensor:
    return _statistics_backward(grad_class_sums, activations, labels, backend)


@_gini_kl_statistics_backward.register_fake
def _(grad_class_sums, activations, labels, backend):
    return torch.empty_like(activations)


def _statistics_setup(ctx, inputs, output):
    activations, labels, _, ctx.backend = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(activations, labels)


def _statistics_grads(ctx, grad_class_sums, grad_counts, backward):
    activations, labels = ctx.saved_tensors
    return backward(grad_class_sums, activations, labels, ctx.backend), None, None, None


_GiniKLStatistics = wire_autograd(
    _gini_kl_statistics, _statistics, _statistics_setup, _statistics_grads,
    _gini_kl_statistics_backward, _statistics_backward,
)


# --------------------------------------------------------------------------------------------------------------
# kdfast::gini_kl_from_statistics


@torch.library.custom_op("kdfast::gini_kl_from_statistics", mutates_args=())
def _gini_kl_from_statistics(
    class_sums: Tensor, counts: Tensor, target: str, delta: float, backend: str
) -> tuple[Tensor, Tensor]:
    gini, kl, _ = _finish(class_sums, counts, target, delta, backend)
    return gini, kl


@_gini_kl_from_statistics.register_fake
def _(class_sums, counts, target, delta, backend):
    return class_sums.new_empty(()), class_sums.new_empty(())


@torch.library.custom_op("kdfast::gini_kl_from_statistics_backward", mutates_args=())
def _gini_kl_from_statistics_backward(
    grad_gini: Tensor, grad_kl: Tensor, class_sums: Tensor, counts: Tensor, target: str, delta: float, backend: str
) -> Tensor:
    return _finish_backward(grad_gini, grad_kl, class_sums, counts, target, delta, backend)


@_gini_kl_from_statistics_backward.register_fake
def _(grad_gini, grad_kl, class_sums, counts, target, delta, backend):
    return class_sums.new_empty(class_sums.shape)


def _finish_setup(ctx, inputs, output, table=()):
    """Saves the finish's inputs and, in eager mode, the ``table`` its forward computed (a custom op's outputs
    cannot carry it, so the traced backward recomputes it)."""
    class_sums, counts, ctx.target, ctx.delta, ctx.backend = inputs
    ctx.save_for_backward(class_sums, counts, *table)


def _finish_grads(ctx, grad_gini, grad_kl, backward):
    """The gradient of the class sums (None for the other 4 inputs) through ``backward``: the backward op in the
    registered formula, _finish_backward in eager mode."""
    class_sums, counts, *table = ctx.saved_tensors
    args = (grad_gini, grad_kl, class_sums, counts, ctx.target, ctx.delta, ctx.backend, tuple(table))
    return backward(*args), None, None, None, None


def _finish_backward_op(grad_gini, grad_kl, class_sums, counts, target, delta, backend, table):
    # the op's backward takes tensors only: an unused output's gradient becomes a zero; the table is empty here
    zero = class_sums.new_zeros(())
    grad_gini = zero if grad_gini is None else grad_gini
    grad_kl = zero if grad_kl is None else grad_kl
    return _gini_kl_from_statistics_backward(grad_gini, grad_kl, class_sums, counts, target, delta, backend)


_gini_kl_from_statistics.register_autograd(
    lambda ctx, grad_gini, grad_kl: _finish_grads(ctx, grad_gini, grad_kl, _finish_backward_op),
    setup_context=_finish_setup,
)


class _GiniKLFromStatistics(torch.autograd.Function):
    """The eager path of kdfast::gini_kl_from_statistics: the op's setup and gradients, and the table the forward
    computed saved for the backward (which the traced path must recompute)."""

    @staticmethod
    def forward(ctx, class_sums, counts, target, delta, backend):
        gini, kl, table = _finish(class_sums, counts, target, delta, backend)
        _finish_setup(ctx, (class_sums, counts, target, delta, backend), (gini, kl), table)
        return gini, kl

    @staticmethod
    def backward(ctx, grad_gini, grad_kl):
        return _finish_grads(ctx, grad_gini, grad_kl, _finish_backward)


# --------------------------------------------------------------------------------------------------------------
# gini_kl: the two stages chained


class _GiniKL(torch.autograd.Function):
    """Eager gini_kl: both stages in one autograd node (fewer Python round trips than two)."""

    @staticmethod
    def forward(ctx, activations, labels, num_classes, target, delta, backend):
        class_sums, counts = _statistics(activations, labels, num_classes, backend)
        gini, kl, table = _finish(class_sums, counts, target, delta, backend)
        ctx.save_for_backward(activations, labels, class_sums, counts, *table)
        ctx.target, ctx.delta, ctx.backend = target, delta, backend
        return gini.to(activations.dtype), kl.to(activations.dtype)

    @staticmethod
    def backward(ctx, grad_gini, grad_kl):
        activations, labels, class_sums, counts, *table = ctx.saved_tensors
        args = (grad_gini, grad_kl, class_sums, counts, ctx.target, ctx.delta, ctx.backend, tuple(table))
        grad_class_sums = _finish_backward(*args)
        return _statistics_backward(grad_class_sums, activations, labels, ctx.backend), None, None, None, None, None


def _gini_kl_traced(activations, labels, num_classes, target, delta, backend):
    """gini_kl as torch.compile sees it: the two custom ops."""
    class_sums, counts = _gini_kl_statistics(activations, labels, num_classes, backend)
    gini, kl = _gini_kl_from_statistics(class_sums, counts, target, delta, backend)
    return gini.to(activations.dtype), kl.to(activations.dtype)


# --------------------------------------------------------------------------------------------------------------
# Public functions


def _check_activations_and_labels(activations, labels, num_classes) -> None:
    if not isinstance(activations, Tensor) or activations.dim() not in (2, 4):
        shape = tuple(activations.shape) if isinstance(activations, Tensor) else type(activations).__name__
        raise ValueError(f"activations must have shape (B, F, H, W) or (B, F), got {shape}")
    _validate.tensor("activations", activations, "(B, F, H, W)" if activations.dim() == 4 else "(B, F)")
    _validate.nonempty("activations", activations, "(B, F, ...)")
    _validate.tensor("labels", labels, "(B,)", floating=False)
    _check_integer("labels", labels, "(int64 class indices)")
    _validate.same_device(activations=activations, labels=labels)
    _validate.same_size("batch size B", activations=activations.shape[0], labels=labels.shape[0])
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    # One host sync, worth it: a clear error for a label out of range. A compiled graph cannot branch on data; there
    # the kernels guard themselves (cpp raises, Triton ignores such samples, the reference's index_add raises).
    if not torch.compiler.is_compiling():
        low, high = (int(x) for x in torch.stack([labels.min(), labels.max()]).tolist())
        if low < 0 or high >= num_classes:
            raise ValueError(f"labels must lie in [0, num_classes={num_classes}), got min {low}, max {high}")


def _check_integer(name: str, value: Tensor, what: str) -> None:
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor {what}, got {value.dtype}")


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

    Design 3.4: ``m[b, f]`` is the spatial mean of ``|activations|``, ``S[f, c]`` the mean of m over the samples
    of class c, ``p[f, c] = S[f, c] / sum_c S[f, c]``; gini is the mean over features of ``1 - sum_c p^2`` and kl
    is KL(t || q) with ``q_c`` proportional to ``sum_f p[f, c]``. Classes absent from the batch contribute 0.

    Args:
        activations: (B, F, H, W) or (B, F) float16, bfloat16, float32 or float64, any memory format
            (channels-last is read in place, without a copy).
        labels: (B,) integer class labels in [0, num_classes).
        num_classes: C >= 1.
        target: ``batch`` (the batch's label frequencies) or ``uniform`` (1/C) as the KL target.
        delta: the small constant of the paper's code (1e-10), finite and positive.
        backend: ``auto``, ``triton``, ``cpp``, ``reference`` (None: ``KDFAST_BACKEND``, default ``auto``).

    Returns:
        (gini, kl): two scalars in the activations' dtype, differentiable in ``activations``. Deterministic: the
        same inputs give the same bits on every run.
    """
    _check_activations_and_labels(activations, labels, num_classes)
    _validate.choice("target", target, TARGETS)
    delta = _validate.finite("delta", delta, positive=True)
    chosen = _backend.resolve("gini_kl", backend, activations.device.type)
    args = (activations, labels.long(), num_classes, target, delta, chosen)
    return eager_or_traced(_GiniKL, _gini_kl_traced, *args)


def gini_kl_statistics(
    activations: Tensor, labels: Tensor, num_classes: int, *, backend: str | None = None
) -> tuple[Tensor, Tensor]:
    """The batch statistics gini_kl is computed from: sums over the batch, so they add up across processes.

    ``class_sums[c, f] = sum_{b: labels_b = c} mean_{h,w} |activations[b, f, h, w]|`` and ``counts[c]``, the
    number of samples of class c. Pass them (summed over data-parallel ranks if wanted) to
    ``gini_kl_from_statistics``; ``gini_kl`` is the two chained.

    Args:
        activations, labels, num_classes, backend: as in ``gini_kl``.

    Returns:
        (class_sums, counts): (C, F) float64 for every activation dtype (accumulated in float64: the gradient
        of the KL term is ill-conditioned in the sums), differentiable in ``activations``; (C,) int64.
    """
    _check_activations_and_labels(activations, labels, num_classes)
    chosen = _backend.resolve("gini_kl_statistics", backend, activations.device.type)
    args = (activations, labels.long(), num_classes, chosen)
    return eager_or_traced(_GiniKLStatistics, _gini_kl_statistics, *args)


def gini_kl_from_statistics(
    class_sums: Tensor,
    counts: Tensor,
    target: str = "batch",
    delta: float = 1e-10,
    *,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """gini and kl from the statistics of ``gini_kl_statistics`` (of one batch, or summed over ranks).

    Computed in float64. Classes with count 0 are absent: their rows of ``class_sums`` are ignored (taken as 0,
    which is what gini_kl_statistics gives them) and their gradient is 0.

    Args:
        class_sums: (C, F) float32 or float64 (gini_kl_statistics returns float64).
        counts: (C,) integer, non-negative, at least one sample in total, on the same device.
        target, delta, backend: as in ``gini_kl``.

    Returns:
        (gini, kl): two scalars in class_sums' dtype, differentiable in ``class_sums``.
    """
    _validate.tensor("class_sums", class_sums, "(C, F)")
    if class_sums.dtype not in (torch.float32, torch.float64):
        raise TypeError(
            f"class_sums must be a float32 or float64 tensor (as gini_kl_statistics returns), got {class_sums.dtype}"
        )
    _validate.nonempty("class_sums", class_sums, "(C, F)")
    _validate.tensor("counts", counts, "(C,)", floating=False)
    _check_integer("counts", counts, "(samples per class)")
    _validate.same_device(class_sums=class_sums, counts=counts)
    _validate.same_size("number of classes C", class_sums=class_sums.shape[0], counts=counts.shape[0])
    _validate.choice("target", target, TARGETS)
    delta = _validate.finite("delta", delta, positive=True)
    if not torch.compiler.is_compiling():
        low, total = (int(x) for x in torch.stack([counts.min(), counts.sum()]).tolist())
        if low < 0 or total < 1:
            raise ValueError(
                f"counts must be non-negative with at least one sample in total, got min {low}, sum {total}"
            )
    chosen = _backend.resolve("gini_kl_from_statistics", backend, class_sums.device.type)
    args = (class_sums, counts.long(), target, delta, chosen)
    return eager_or_traced(_GiniKLFromStatistics, _gini_kl_from_statistics, *args)


def gini_impurity(p: Tensor, dim: int = -1) -> Tensor:
    """Gini impurity ``1 - sum p^2`` of the distributions along ``dim``.

    Args:
        p: floating tensor with at least one dimension (float16 and bfloat16 are summed in float32).
        dim: the dimension holding each distribution.

    Returns:
        ``p`` reduced over ``dim``, in ``p``'s dtype. Differentiable (gradient ``-2 p``); a composite of torch
        ops, so it runs on every device and fuses under torch.compile.
    """
    if not isinstance(p, Tensor):
        raise TypeError(f"p must be a torch.Tensor, got {type(p).__name__}")
    if p.dtype not in _validate.FLOAT_DTYPES:
        raise TypeError(f"p must be a float16, bfloat16, float32 or float64 tensor, got {p.dtype}")
    if p.dim() == 0:
        raise ValueError("p must have at least one dimension (the distributions lie along dim), got a scalar")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -p.dim() <= dim < p.dim():
        raise ValueError(
            f"dim must be an integer in [{-p.dim()}, {p.dim()}) for p of shape {tuple(p.shape)}, got {dim!r}"
        )
    wide = p if p.dtype in (torch.float32, torch.float64) else p.float()
    return (1.0 - wide.square().sum(dim)).to(p.dtype)
