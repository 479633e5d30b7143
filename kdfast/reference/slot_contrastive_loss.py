r"""Slot-slot contrast between consecutive frames (design.md 3.2, SlotContrast's temporal InfoNCE loss).

Notation: B batch, T frames, K slots per frame, D slot dim, S slots contrasted per frame pair (B*K or K).
"""

from __future__ import annotations

import torch

from ._common import accumulator_dtype, normalize, reduce_terms, upcast

#: eps of the slot normalisation in :func:`slot_contrastive_loss`. SlotContrast normalises with
#: ``torch.nn.functional.normalize(slots, p=2, dim=-1)``, whose default eps is 1e-12.
CONTRASTIVE_NORMALIZE_EPS = 1e-12


def slot_contrastive_loss(
    slots: torch.Tensor,
    temperature: float = 0.1,
    batch_contrast: bool = True,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""SlotContrast's slot-slot contrastive loss between consecutive frames (InfoNCE).

    Normalise every slot, :math:`z = s / \max(\lVert s\rVert, 10^{-12})` (exactly
    ``F.normalize(slots, dim=-1)`` as SlotContrast does; see :data:`CONTRASTIVE_NORMALIZE_EPS`).
    For every pair of consecutive frames (t, t+1), t = 0..T-2, take a set of S slots:

    * ``batch_contrast=True``: the B*K slots of all batch elements pooled, slot index
      ``i = b*K + k`` (SlotContrast: ``torch.cat(slots.split(1), dim=-2)``);
    * ``batch_contrast=False``: the K slots of each batch element separately.

    .. math::

        \mathrm{logits}_t[i, j] = \langle z_t^i, z_{t+1}^j\rangle / \tau, \qquad
        \ell_t[j] = -\log \frac{\exp \mathrm{logits}_t[j, j]}{\sum_i \exp \mathrm{logits}_t[i, j]}
                  = \mathrm{logsumexp}_i\, \mathrm{logits}_t[i, j] - \mathrm{logits}_t[j, j]

    i.e. for each slot j at t+1 a softmax over the slots i at t whose positive is i = j
    (SlotContrast: ``CrossEntropyLoss`` on the (S, S) logits with class axis i and target eye(S)).
    It is computed as the same quantity in the form

    .. math::

        r_t[j] = \mathrm{logsumexp}_{i \ne j} (\mathrm{logits}_t[i, j] - \mathrm{logits}_t[j, j]), \qquad
        \ell_t[j] = \mathrm{softplus}(r_t[j]) = \log(1 + e^{r_t[j]})

    (:math:`r = -\infty` and :math:`\ell = 0` when S == 1), whose gradient with respect to the positive,
    :math:`-\sigma(r)`, needs no :math:`p_{jj} - 1` either.

    Args:
        slots: (B, T, K, D) floating.
        temperature: tau > 0.
        batch_contrast: pool the slots of the whole batch (True, SlotContrast's default) or
            contrast within each batch element.
        reduction: "mean" over all terms | "sum" over all terms | "none": the per-term tensor,
            shape (T-1, B*K) when ``batch_contrast`` (column b*K+k) else (T-1, B, K). Anything else raises
            ValueError.

    Returns:
        Scalar (or the per-term tensor) in ``slots``' dtype. T == 1 has no pairs: "mean" and
        "sum" return 0 connected to ``slots`` (its gradient is zero), "none" an empty tensor.
    """
    out = slots.dtype
    acc = accumulator_dtype(out)
    B, T, K, D = slots.shape
    z = normalize(upcast(slots, acc), CONTRASTIVE_NORMALIZE_EPS)  # (B, T, K, D)
    if batch_contrast:
        z = z.permute(1, 0, 2, 3).reshape(T, B * K, D)  # (T, S=B*K, D), i = b*K + k
        logits = torch.matmul(z[:-1], z[1:].transpose(-2, -1)) / temperature  # (T-1, S, S) [t, i, j]
        terms = _contrastive_terms(logits)  # (T-1, S)
    else:
        logits = torch.matmul(z[:, :-1], z[:, 1:].transpose(-2, -1)) / temperature  # (B, T-1, K, K)
        terms = _contrastive_terms(logits).transpose(0, 1)  # (T-1, B, K)
    return reduce_terms(terms, reduction).to(out)


def _contrastive_terms(logits: torch.Tensor) -> torch.Tensor:
    """logsumexp_i logits[..., i, j] - logits[..., j, j] for (..., S, S) logits, as softplus(r) (see above)."""
    S = logits.shape[-1]
    diagonal = torch.diagonal(logits, dim1=-2, dim2=-1).unsqueeze(-2)  # (..., 1, S)
    # When the positive dominates (a static scene at a low temperature), logsumexp and the diagonal are both
    # ~1/tau while the loss is ~exp(-1/tau): their difference cancels every digit. Shifting by the diagonal
    # first and leaving it out of the sum keeps the loss (and p_jj - 1 = -sigmoid(r)) to full precision.
    positive = torch.eye(S, dtype=torch.bool, device=logits.device)
    log_odds = torch.logsumexp((logits - diagonal).masked_fill(positive, float("-inf")), dim=-2)  # (..., S)
    return torch.logaddexp(log_odds, torch.zeros_like(log_odds))
