r"""Slot cosine matching (design.md 3.2, SlotMatch distillation): the cosine of every pair of slots, the
maximum-cosine assignment of student slots to teacher slots, and the matching loss.

Notation: B batch, K student slots, M teacher slots, D feature dim.
"""

from __future__ import annotations

import torch

from ._common import accumulator_dtype, normalize, promoted_dtype, reduce_terms, upcast


def slot_cosine_similarity(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    r"""Cosine similarity of every pair of slots, per batch element.

    .. math::

        \mathrm{cos}[b, i, m] = \frac{\langle a_{b,i}, b_{b,m}\rangle}
                                     {\max(\lVert a_{b,i}\rVert, \epsilon)\,\max(\lVert b_{b,m}\rVert, \epsilon)}

    Computed as ``normalize(a) @ normalize(b)^T`` with ``normalize(x) = x / ||x||.clamp_min(eps)``,
    so the autograd of this function *is* the definition of the gradient. A zero vector has cosine
    0 with everything (no NaN); NaN inputs propagate.

    Args:
        a: (B, K, D) floating.
        b: (B, M, D) floating.
        eps: lower bound of each norm.

    Returns:
        (B, K, M) in the promoted input dtype.
    """
    out = promoted_dtype(a, b)
    acc = accumulator_dtype(out)
    an = normalize(upcast(a, acc), eps)
    bn = normalize(upcast(b, acc), eps)
    return torch.bmm(an, bn.transpose(1, 2)).to(out)


def slot_assignment(similarity: torch.Tensor) -> torch.Tensor:
    r"""Maximum-total-similarity assignment of rows (student slots) to columns (teacher slots).

    For each batch element ``b`` it returns the injective map :math:`\pi_b: \{0..K-1\} \to \{0..M-1\}`
    maximising :math:`\sum_i \mathrm{similarity}[b, i, \pi_b(i)]` (the Hungarian / linear sum
    assignment problem), computed by ``scipy.optimize.linear_sum_assignment(maximize=True)`` on a
    detached CPU float64 copy. scipy is deterministic, so ties are broken the same way every call.
    No gradient (the assignment is piecewise constant).

    Args:
        similarity: (B, K, M) floating with K <= M, finite.

    Returns:
        int64 (B, K) on ``similarity``'s device: ``out[b, i] = pi_b(i)`` (rows in order 0..K-1).
    """
    # imported here so that importing the reference needs torch only
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    sim = similarity.detach().to(device="cpu", dtype=torch.float64).numpy()
    B, K, _ = sim.shape
    out = np.empty((B, K), dtype=np.int64)
    for bi in range(B):
        rows, cols = linear_sum_assignment(sim[bi], maximize=True)
        out[bi, rows] = cols
    return torch.from_numpy(out).to(similarity.device)


def slot_match_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    matching: str = "index",
    reduction: str = "mean",
    eps: float = 1e-8,
) -> torch.Tensor:
    r"""SlotMatch distillation loss: 1 - cosine between each student slot and its teacher slot.

    .. math::

        \ell[b, i] = 1 - \cos(s_{b,i},\, t_{b,\pi_b(i)})

    with the eps-safe cosine of :func:`slot_cosine_similarity`, and

    * ``matching="index"``: :math:`\pi_b(i) = i` (needs M == K);
    * ``matching="hungarian"``: :math:`\pi_b = ` :func:`slot_assignment` of
      ``slot_cosine_similarity(student.detach(), teacher.detach(), eps)``, maximising the total
      cosine per batch element (no gradient through the assignment; K <= M).

    The teacher is detached: it never receives a gradient.

    Args:
        student: (B, K, D) floating.
        teacher: (B, M, D) floating.
        matching: "index" | "hungarian" (anything else raises ValueError).
        reduction: "mean" (over the B*K pairs) | "sum" | "none" (returns (B, K)); anything else raises ValueError.
        eps: lower bound of each norm.

    Returns:
        Scalar (or (B, K) for "none") in the promoted input dtype.
    """
    out = promoted_dtype(student, teacher)
    acc = accumulator_dtype(out)
    s = upcast(student, acc)
    t = upcast(teacher.detach(), acc)
    if matching == "index":
        t_matched = t
    elif matching == "hungarian":
        assign = slot_assignment(slot_cosine_similarity(s.detach(), t, eps))  # (B, K)
        t_matched = torch.gather(t, 1, assign.unsqueeze(-1).expand(-1, -1, t.shape[-1]))
    else:
        raise ValueError(f"matching must be 'index' or 'hungarian', got {matching!r}")
    # the cosine of matched pairs only (not the whole (B, K, M) table): K dot products per batch element
    cos = (normalize(s, eps) * normalize(t_matched, eps)).sum(-1)  # (B, K)
    loss = 1.0 - cos
    return reduce_terms(loss, reduction).to(out)
