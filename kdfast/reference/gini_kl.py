r"""Gini impurity and KL reductions (design.md 3.4): the discriminability loss of arXiv 2202.07073.

Every function here is built from the same three stages, each written once:

1. the batch statistics: the pooled magnitudes ``m = mean_hw |a|`` (:func:`_pooled_abs`), their per-class sums
   (:func:`_class_sums`) and the class counts ``n_c``. These are sums over the batch, so they add up across
   data-parallel ranks (:func:`gini_kl_statistics` returns them);
2. the small (F, C) table ``S, Z, p, t`` from the statistics (:func:`_table`);
3. the finish: ``gini`` and ``kl`` from the table, and backwards the table's gradient ``dS`` in closed form
   (:func:`_table_backward`), spread back over the batch through the pooling (:func:`_through_pooling`).

:func:`gini_kl` runs them in the accumulation dtype with autograd; :func:`gini_kl_backward` and the two-stage
functions (``gini_kl_from_statistics(*gini_kl_statistics(a, y, C))`` is ``gini_kl(a, y, C)`` with the finish
in float64) run in float64, for the reason given in :func:`gini_kl_backward`.

Notation: B batch, F features, H, W spatial dims, C classes, delta the stabiliser.
"""

from __future__ import annotations

import torch

from ._common import accumulator_dtype, upcast

TARGETS = ("batch", "uniform")


def gini_impurity(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    r"""Gini impurity of distributions along ``dim``: :math:`1 - \sum p^2`. Output in ``p``'s dtype."""
    return _impurity(upcast(p, accumulator_dtype(p.dtype)), dim).to(p.dtype)


def _impurity(p: torch.Tensor, dim: int) -> torch.Tensor:
    """1 - sum p^2 along ``dim``, in p's dtype."""
    return 1.0 - (p * p).sum(dim)


def _kl(t: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(t || q) = sum_c t_c (log t_c - log q_c); xlogy makes the t_c = 0 terms exactly 0 with a zero (not NaN)
    gradient."""
    return (torch.xlogy(t, t) - torch.xlogy(t, q)).sum()


# ----------------------------------------------------------------------------------------------
# The three stages
# ----------------------------------------------------------------------------------------------


def _pooled_abs(a: torch.Tensor) -> torch.Tensor:
    """m[b, f] = mean over the spatial dims of |a[b, f, ...]| (|a| itself for (B, F) input): (B, F) in a's dtype."""
    return a.abs() if a.dim() == 2 else a.abs().flatten(2).mean(-1)


def _class_sums(m: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """class_sums[c, f] = sum_{b: y_b = c} m[b, f]: (C, F) in m's dtype, rows of absent classes 0."""
    return torch.zeros(num_classes, m.shape[1], dtype=m.dtype, device=m.device).index_add(0, labels, m)


def _class_counts(labels: torch.Tensor, num_classes: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """n_c as a (C,) floating tensor (exact: counts are small integers)."""
    ones = torch.ones(labels.shape[0], dtype=dtype, device=device)
    return torch.zeros(num_classes, dtype=dtype, device=device).index_add(0, labels, ones)


def _table(
    class_sums: torch.Tensor,
    counts: torch.Tensor,
    target: str,
    delta: float,
    batch_size: int | None = None,
):
    r"""The (F, C) table of :func:`gini_kl`, in ``class_sums``' dtype:

    .. math::

        S[f, c] = \mathrm{class\_sums}[c, f] / (n_c + \delta), \quad Z_f = \textstyle\sum_c S[f, c] + \delta, \quad
        p = S / Z, \quad t_c = n_c / B \text{ or } 1 / C

    Returns ``(p (F, C), Z (F, 1), t (C,))``. Classes with count 0 are absent: their rows of class_sums
    are read as 0. ``batch_size`` None means ``counts.sum()``. Any ``target`` other than "batch" is read as
    "uniform" (callers that take it from a user check it first).
    """
    dtype = class_sums.dtype
    n = counts.to(dtype)
    zero = torch.zeros((), dtype=dtype, device=class_sums.device)
    sums = torch.where((counts > 0).unsqueeze(1), class_sums, zero)
    S = (sums / (n + delta).unsqueeze(1)).t()  # (F, C)
    Z = S.sum(dim=1, keepdim=True) + delta  # (F, 1)
    p = S / Z  # each feature's distribution over the classes
    C = class_sums.shape[0]
    if target == "batch":
        t = n / (n.sum() if batch_size is None else batch_size)
    else:
        t = torch.full((C,), 1.0 / C, dtype=dtype, device=class_sums.device)
    return p, Z, t


def _table_backward(g_gini, g_kl, p, Z, t, present, delta):
    r"""dS (F, C): the gradient of ``g_gini * gini + g_kl * kl`` with respect to S, in closed form (derivation
    in :func:`gini_kl_backward`). ``present`` (C,) marks the classes with a nonzero count."""
    P = p.sum(dim=0)  # (C,)
    h = -2.0 * g_gini * p / p.shape[0] - g_kl * t / (P + delta)
    h = torch.where(present, h, torch.zeros_like(h))  # absent classes: p = 0 and nothing reads dS
    return (h - (h * p).sum(dim=1, keepdim=True)) / Z + g_kl * (t.sum() / P.sum()) * delta / (Z * Z)


def _through_pooling(dm: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """da = sign(a) * dm[b, f] / (H W): a per-sample (B, F) gradient of m taken back through the pooled |a|."""
    if a.dim() == 2:
        return torch.sign(a) * dm
    spatial = a[0, 0].numel()
    return torch.sign(a) * (dm / spatial)[(...,) + (None,) * (a.dim() - 2)]


# ----------------------------------------------------------------------------------------------
# gini_kl in one call
# ----------------------------------------------------------------------------------------------


def gini_kl(
    activations: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    target: str = "batch",
    delta: float = 1e-10,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Gini and KL terms of the discriminability-enforcing loss (design 3.4).

    .. math::

        m[b, f] &= \mathrm{mean}_{h,w} |a[b, f, h, w]|          \quad (m = |a| \text{ for (B, F) input}) \\
        n_c     &= \#\{b : y_b = c\} \\
        S[f, c] &= \textstyle\sum_{b: y_b = c} m[b, f] / (n_c + \delta)    \quad (0 \text{ for absent classes}) \\
        p[f, c] &= S[f, c] / (\textstyle\sum_{c'} S[f, c'] + \delta) \\
        \mathrm{gini} &= \mathrm{mean}_f (1 - \textstyle\sum_c p[f, c]^2) \\
        q_c     &= (\textstyle\sum_f p[f, c] + \delta) / \textstyle\sum_{f,c} p[f, c] \\
        t_c     &= n_c / B \ (\text{"batch"}) \quad \text{or} \quad 1 / C \ (\text{"uniform"}) \\
        \mathrm{kl} &= \textstyle\sum_c t_c (\log t_c - \log q_c)   \quad (\text{terms with } t_c = 0 \text{ are } 0)

    The t_c = 0 terms use ``torch.xlogy`` so they are exactly 0 with a zero (not NaN) gradient. Gradients come
    from autograd through these formulas (:func:`gini_kl_backward` is the closed form, in float64).

    Args:
        activations: (B, F, H, W) or (B, F) floating.
        labels: int64 (B,) in [0, C).
        num_classes: C.
        target: "batch" | "uniform" (anything else raises ValueError).
        delta: the stabiliser delta.

    Returns:
        ``(gini, kl)``: two scalars in the activations' dtype.
    """
    if target not in TARGETS:
        raise ValueError(f"target must be 'batch' or 'uniform', got {target!r}")
    out = activations.dtype
    acc = accumulator_dtype(out)
    a = upcast(activations, acc)
    counts = _class_counts(labels, num_classes, acc, a.device)
    class_sums = _class_sums(_pooled_abs(a), labels, num_classes)
    p, _, t = _table(class_sums, counts, target, delta, batch_size=a.shape[0])
    gini = _impurity(p, 1).mean()
    # sum_{f,c} p summed at once (p.sum(), not its column sums' sum: another rounding order). Autograd adds up
    # the gradients p receives in an order set by the order of these uses, so that order is part of the numbers.
    q = (p.sum(dim=0) + delta) / p.sum()  # (C,)
    return gini.to(out), _kl(t, q).to(out)


def gini_kl_backward(
    grad_gini: torch.Tensor,
    grad_kl: torch.Tensor,
    activations: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    target: str = "batch",
    delta: float = 1e-10,
) -> torch.Tensor:
    r"""Gradient of ``grad_gini * gini + grad_kl * kl`` (see ``gini_kl``) with respect to the activations.

    The closed form the fused kernels follow. Autograd through ``gini_kl`` loses accuracy in float32: the KL's
    normaliser contributes ``T / sum P`` to every ``dp[f, c]`` (T = sum_c t_c), and the projection of
    ``p = S / Z`` cancels it back to ``(T / sum P) * delta / Z_f``, leaving float32 rounding of the large term
    on a small gradient. Here that cancellation is done exactly:

    .. math::

        h[f, c]  &= -2\,g_{gini}\, p[f, c] / F - g_{kl}\, t_c / (P_c + \delta), \qquad P_c = \textstyle\sum_f p[f, c] \\
        dS[f, c] &= (h[f, c] - \textstyle\sum_{c'} h[f, c'] p[f, c']) / Z_f
                    + g_{kl}\, (T / \textstyle\sum_c P_c)\, \delta / Z_f^2, \qquad Z_f = \textstyle\sum_c S[f, c] + \delta \\
        dm[b, f] &= dS[f, y_b] / (n_{y_b} + \delta), \qquad
        da[b, f, h, w] = \mathrm{sign}(a[b, f, h, w])\, dm[b, f] / (H W)

    Everything runs in float64 for every input dtype, the pooled features and class sums included, and the
    result is rounded once to the activations' dtype: ``h - sum_c' h p`` still cancels when h is nearly constant
    over the classes present (uniform target, few classes), so float32 rounding of the class sums alone would
    cost up to ~1e-4 relative error. float32 (and half) inputs are exact in float64.

    Absent classes get no gradient (no sample reads them). Any ``target`` other than "batch" is read as
    "uniform" (not checked). Returns a tensor like ``activations``.
    """
    out = activations.dtype
    f64 = torch.float64
    a = upcast(activations, f64)
    counts = _class_counts(labels, num_classes, f64, a.device)
    class_sums = _class_sums(_pooled_abs(a), labels, num_classes)
    p, Z, t = _table(class_sums, counts, target, delta, batch_size=a.shape[0])
    dS = _table_backward(upcast(grad_gini, f64), upcast(grad_kl, f64), p, Z, t, counts > 0, delta)
    dm = (dS / (counts + delta)).t()[labels]  # (B, F)
    return _through_pooling(dm, a).to(out)


# ----------------------------------------------------------------------------------------------
# gini_kl in two stages: batch statistics (sums over the batch, so they add up across data-parallel ranks), then
# the finish on the (C, F) table. ``gini_kl_from_statistics(*gini_kl_statistics(a, y, C))`` is ``gini_kl(a, y, C)``
# with the finish in float64.
# ----------------------------------------------------------------------------------------------


def gini_kl_statistics(
    activations: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The statistics of :func:`gini_kl`: ``class_sums[c, f] = sum_{b: y_b = c} m[b, f]`` (m the spatially
    pooled ``|a|``) in float64 for every input dtype, and ``counts[c] = n_c`` (int64). float64 because the KL
    gradient is ill-conditioned in the sums (see :func:`gini_kl_backward`); lower-precision inputs are exact in
    it."""
    a = upcast(activations, torch.float64)
    counts = torch.bincount(labels, minlength=num_classes)
    return _class_sums(_pooled_abs(a), labels, num_classes), counts


def gini_kl_statistics_backward(
    grad_class_sums: torch.Tensor, activations: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    r"""``da[b, f, h, w] = sign(a[b, f, h, w]) grad_class_sums[y_b, f] / (H W)``, laid out like
    ``torch.empty_like(activations)``. Computed in float64, rounded once to the activations' dtype."""
    a = upcast(activations, torch.float64)
    dm = grad_class_sums.to(torch.float64)[labels]  # (B, F)
    return torch.empty_like(activations).copy_(_through_pooling(dm, a))


def gini_kl_from_statistics(
    class_sums: torch.Tensor, counts: torch.Tensor, target: str = "batch", delta: float = 1e-10
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``(gini, kl)`` of :func:`gini_kl` from its statistics, computed in float64, returned in class_sums' dtype.
    The batch size is ``counts.sum()``; classes with count 0 are absent (their rows are ignored). Any ``target``
    other than "batch" is read as "uniform" (not checked)."""
    p, _, t = _table(class_sums.to(torch.float64), counts, target, delta)
    P = p.sum(dim=0)  # (C,); before the gini, as the order of p's uses sets the order autograd adds their gradients
    gini = _impurity(p, 1).mean()
    q = (P + delta) / P.sum()
    return gini.to(class_sums.dtype), _kl(t, q).to(class_sums.dtype)


def gini_kl_from_statistics_backward(
    grad_gini: torch.Tensor,
    grad_kl: torch.Tensor,
    class_sums: torch.Tensor,
    counts: torch.Tensor,
    target: str = "batch",
    delta: float = 1e-10,
) -> torch.Tensor:
    r"""Gradient of ``grad_gini * gini + grad_kl * kl`` with respect to class_sums: the closed form of
    :func:`gini_kl_backward` before the gather over the labels, ``dS[f, c] / (n_c + delta)``. Rows of classes with
    ``n_c = 0`` are 0 (no sample reads them). Float64 inside; returned in class_sums' dtype. Any ``target`` other
    than "batch" is read as "uniform" (not checked)."""
    f64 = torch.float64
    p, Z, t = _table(class_sums.to(f64), counts, target, delta)
    present = counts > 0
    dS = _table_backward(grad_gini.to(f64), grad_kl.to(f64), p, Z, t, present, delta)
    grad = torch.where(present, dS / (counts.to(f64) + delta), torch.zeros_like(dS)).t()
    return grad.to(class_sums.dtype).contiguous()
