"""Plain-PyTorch reference implementations of every kdfast op.

This module is the executable specification (design.md section 3) and the test oracle of every fused
kernel. It is written to read like the equations, not to be fast. It is standalone: it imports torch and
math only (scipy is imported lazily inside :func:`slot_assignment`) and nothing from kdfast.

Numerics
--------
Every function computes in an *accumulation dtype* and casts its results back to the input dtype:

* float16 / bfloat16 inputs are upcast to float32 (``.float()``) first,
* float32 stays float32, float64 stays float64 (use float64 for gradcheck and as the oracle).

Outputs have the (promoted) floating dtype of the inputs unless a docstring says otherwise. Autograd
flows through everything except where a docstring says "no gradient". There is no input validation
beyond what torch does naturally; the public ops in :mod:`kdfast.ops` validate.

Notation: B batch, K student/query slots, M teacher slots, N tokens, D feature dim, T frames,
C classes, F features, r LoRA rank. ``<x, y>`` is the dot product over the last axis.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "CONTRASTIVE_NORMALIZE_EPS",
    "LAYER_NORM_EPS",
    "gini_impurity",
    "gini_kl",
    "lora_attention",
    "lora_linear",
    "lora_qkv",
    "slot_assignment",
    "slot_attention",
    "slot_attention_core",
    "slot_attention_core_backward",
    "slot_attention_step",
    "slot_contrastive_loss",
    "slot_cosine_similarity",
    "slot_match_loss",
]

#: eps of the slot normalisation in :func:`slot_contrastive_loss`. SlotContrast normalises with
#: ``torch.nn.functional.normalize(slots, p=2, dim=-1)``, whose default eps is 1e-12.
CONTRASTIVE_NORMALIZE_EPS = 1e-12

#: eps of every LayerNorm in the slot-attention iteration (``nn.LayerNorm``'s default).
LAYER_NORM_EPS = 1e-5


# ----------------------------------------------------------------------------------------------
# dtype helpers
# ----------------------------------------------------------------------------------------------


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for ``dtype``: float64 for float64, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _out_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """Promoted dtype of the given (non-None) tensors: the dtype results are cast back to."""
    dtype = None
    for t in tensors:
        if t is None:
            continue
        dtype = t.dtype if dtype is None else torch.promote_types(dtype, t.dtype)
    return dtype


def _up(x: torch.Tensor | None, acc: torch.dtype) -> torch.Tensor | None:
    """``x`` in the accumulation dtype (a no-op when it already is; None stays None)."""
    return None if x is None else x.to(acc)


def _normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / max(||x||_2, eps)`` over the last axis (a zero vector maps to zero, NaN propagates)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


# ----------------------------------------------------------------------------------------------
# 3.2 Slot cosine matching and slot contrast
# ----------------------------------------------------------------------------------------------


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
    out = _out_dtype(a, b)
    acc = _acc_dtype(out)
    an = _normalize(_up(a, acc), eps)
    bn = _normalize(_up(b, acc), eps)
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
        matching: "index" | "hungarian".
        reduction: "mean" (over the B*K pairs) | "sum" | "none" (returns (B, K)).
        eps: lower bound of each norm.

    Returns:
        Scalar (or (B, K) for "none") in the promoted input dtype.
    """
    out = _out_dtype(student, teacher)
    acc = _acc_dtype(out)
    s = _up(student, acc)
    t = _up(teacher.detach(), acc)
    if matching == "index":
        t_matched = t
    elif matching == "hungarian":
        assign = slot_assignment(slot_cosine_similarity(s.detach(), t, eps))  # (B, K)
        t_matched = torch.gather(t, 1, assign.unsqueeze(-1).expand(-1, -1, t.shape[-1]))
    else:
        raise ValueError(f"matching must be 'index' or 'hungarian', got {matching!r}")
    cos = (_normalize(s, eps) * _normalize(t_matched, eps)).sum(-1)  # (B, K)
    loss = 1.0 - cos
    return _reduce(loss, reduction).to(out)


def _reduce(x: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        # an empty set of terms has mean 0 (still connected to the graph: zero gradient)
        return x.sum() / max(x.numel(), 1)
    if reduction == "sum":
        return x.sum()
    if reduction == "none":
        return x
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


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
            shape (T-1, B*K) when ``batch_contrast`` (column b*K+k) else (T-1, B, K).

    Returns:
        Scalar (or the per-term tensor) in ``slots``' dtype. T == 1 has no pairs: "mean" and
        "sum" return 0 connected to ``slots`` (its gradient is zero), "none" an empty tensor.
    """
    out = slots.dtype
    acc = _acc_dtype(out)
    B, T, K, D = slots.shape
    z = _normalize(_up(slots, acc), CONTRASTIVE_NORMALIZE_EPS)  # (B, T, K, D)
    if batch_contrast:
        z = z.permute(1, 0, 2, 3).reshape(T, B * K, D)  # (T, S=B*K, D), i = b*K + k
        logits = torch.matmul(z[:-1], z[1:].transpose(-2, -1)) / temperature  # (T-1, S, S) [t, i, j]
        terms = _contrastive_terms(logits)  # (T-1, S)
    else:
        logits = torch.matmul(z[:, :-1], z[:, 1:].transpose(-2, -1)) / temperature  # (B, T-1, K, K)
        terms = _contrastive_terms(logits).transpose(0, 1)  # (T-1, B, K)
    return _reduce(terms, reduction).to(out)


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


# ----------------------------------------------------------------------------------------------
# 3.1 Slot attention
# ----------------------------------------------------------------------------------------------


def slot_attention_core(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    eps: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Slot-attention core: softmax over the slots, then a weighted mean over the inputs.

    Per batch element, with s = ``scale`` (default :math:`D^{-1/2}`) and e = ``eps``:

    .. math::

        L[i, n] &= s \langle q_i, k_n \rangle                          && (K \times N) \\
        A[i, n] &= \mathrm{softmax}_i(L[:, n])[i]                       && \text{over the SLOTS} \\
        W[i, n] &= A[i, n] + e \\
        Z_i     &= \textstyle\sum_n W[i, n] \\
        U_i     &= \textstyle\sum_n W[i, n]\, v_n / Z_i                 && (K \times D_v)

    Args:
        q: (B, K, D) queries.
        k: (B, N, D) keys.
        v: (B, N, Dv) values.
        scale: logit scale s; None means ``D ** -0.5``.
        eps: e, added to the attention before the normalisation over the inputs.

    Returns:
        ``(U, A)``: updates (B, K, Dv) and the attention masks A (B, K, N) *before* eps, both in
        the promoted input dtype.
    """
    out = _out_dtype(q, k, v)
    acc = _acc_dtype(out)
    q, k, v = _up(q, acc), _up(k, acc), _up(v, acc)
    s = q.shape[-1] ** -0.5 if scale is None else scale
    L = s * torch.bmm(q, k.transpose(1, 2))  # (B, K, N)
    A = torch.softmax(L, dim=1)  # softmax over the slots
    W = A + eps
    Z = W.sum(dim=-1, keepdim=True)  # (B, K, 1)
    U = torch.bmm(W, v) / Z  # (B, K, Dv)
    return U.to(out), A.to(out)


def slot_attention_core_backward(
    grad_updates: torch.Tensor,
    grad_attn: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    eps: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Explicit backward of :func:`slot_attention_core` (design 3.1), written from the formulas.

    Recomputes A, W, Z, U from q, k, v (no autograd). With G = dLoss/dU and GA = dLoss/dA
    (GA = 0 when ``grad_attn`` is None):

    .. math::

        c_i       &= \langle G_i, U_i \rangle \\
        dW[i, n]  &= (\langle G_i, v_n \rangle - c_i) / Z_i \\
        dv_n      &= \textstyle\sum_i W[i, n]\, G_i / Z_i \\
        dA        &= dW + GA \\
        dL[i, n]  &= A[i, n]\,(dA[i, n] - \textstyle\sum_j A[j, n]\, dA[j, n]) \\
        dq_i      &= s \textstyle\sum_n dL[i, n]\, k_n \\
        dk_n      &= s \textstyle\sum_i dL[i, n]\, q_i

    Args:
        grad_updates: (B, K, Dv) G.
        grad_attn: (B, K, N) GA, or None.
        q, k, v, scale, eps: as in :func:`slot_attention_core`.

    Returns:
        ``(dq, dk, dv)`` with the shapes and dtypes of q, k, v.
    """
    acc = _acc_dtype(_out_dtype(q, k, v, grad_updates, grad_attn))
    qa, ka, va = _up(q, acc), _up(k, acc), _up(v, acc)
    G = _up(grad_updates, acc)
    s = q.shape[-1] ** -0.5 if scale is None else scale

    # recompute the forward
    L = s * torch.bmm(qa, ka.transpose(1, 2))  # (B, K, N)
    A = torch.softmax(L, dim=1)
    W = A + eps
    Z = W.sum(dim=-1, keepdim=True)  # (B, K, 1)
    U = torch.bmm(W, va) / Z  # (B, K, Dv)

    c = (G * U).sum(dim=-1, keepdim=True)  # (B, K, 1)
    dW = (torch.bmm(G, va.transpose(1, 2)) - c) / Z  # (B, K, N)
    dv = torch.bmm((W / Z).transpose(1, 2), G)  # (B, N, Dv)
    dA = dW if grad_attn is None else dW + _up(grad_attn, acc)
    dL = A * (dA - (A * dA).sum(dim=1, keepdim=True))  # (B, K, N)
    dq = s * torch.bmm(dL, ka)  # (B, K, D)
    dk = s * torch.bmm(dL.transpose(1, 2), qa)  # (B, N, D)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _gru_cell(
    x: torch.Tensor,
    h: torch.Tensor,
    w_ih: torch.Tensor,
    w_hh: torch.Tensor,
    b_ih: torch.Tensor | None,
    b_hh: torch.Tensor | None,
) -> torch.Tensor:
    r"""``nn.GRUCell`` written out (gate order r, z, n as in PyTorch's weight layout):

    .. math::

        r &= \sigma(W_{ir} x + b_{ir} + W_{hr} h + b_{hr}) \\
        z &= \sigma(W_{iz} x + b_{iz} + W_{hz} h + b_{hz}) \\
        n &= \tanh(W_{in} x + b_{in} + r \odot (W_{hn} h + b_{hn})) \\
        h' &= (1 - z) \odot n + z \odot h
    """
    gi_r, gi_z, gi_n = F.linear(x, w_ih, b_ih).chunk(3, dim=-1)
    gh_r, gh_z, gh_n = F.linear(h, w_hh, b_hh).chunk(3, dim=-1)
    r = torch.sigmoid(gi_r + gh_r)
    z = torch.sigmoid(gi_z + gh_z)
    n = torch.tanh(gi_n + r * gh_n)
    return (1.0 - z) * n + z * h


# The state_dict keys of one iteration's parameters (videosaur SlotAttention without to_k, to_v, norm_features),
# in the order kdfast's compiled iteration ops take them.
SLOT_ATTENTION_PARAMS = (
    "norm_slots.weight", "norm_slots.bias", "to_q.weight", "to_q.bias", "gru.weight_ih", "gru.weight_hh",
    "gru.bias_ih", "gru.bias_hh", "mlp.layers.0.weight", "mlp.layers.0.bias", "mlp.layers.1.weight",
    "mlp.layers.1.bias", "mlp.layers.3.weight", "mlp.layers.3.bias",
)


def _slot_attention_step_acc(slots, k, v, params, scale, eps, gru_hidden):
    """One iteration, everything already in the accumulation dtype ``acc``."""
    acc = slots.dtype

    def p(name):
        t = params.get(name)
        return None if t is None else t.to(acc)

    D = slots.shape[-1]
    x = F.layer_norm(slots, (D,), p("norm_slots.weight"), p("norm_slots.bias"), LAYER_NORM_EPS)
    q = F.linear(x, p("to_q.weight"), p("to_q.bias"))
    U, A = slot_attention_core(q, k, v, scale, eps)

    if gru_hidden == "normed":
        hidden = x
    elif gru_hidden == "prev":
        hidden = slots
    else:
        raise ValueError(f"gru_hidden must be 'normed' or 'prev', got {gru_hidden!r}")

    if "gru.weight_ih" in params:
        h = _gru_cell(
            U, hidden, p("gru.weight_ih"), p("gru.weight_hh"), p("gru.bias_ih"), p("gru.bias_hh")
        )
    else:
        # videosaur/SlotContrast use_gru=False: `slots = slots + updates` on the normed slots
        h = hidden + U

    if "mlp.layers.1.weight" in params:
        y = F.layer_norm(h, (D,), p("mlp.layers.0.weight"), p("mlp.layers.0.bias"), LAYER_NORM_EPS)
        y = F.linear(y, p("mlp.layers.1.weight"), p("mlp.layers.1.bias"))
        y = F.relu(y)
        y = F.linear(y, p("mlp.layers.3.weight"), p("mlp.layers.3.bias"))
        h = h + y  # residual MLP
    return h, A


def slot_attention_step(
    slots: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    params: Mapping,
    scale: float | None = None,
    eps: float = 1e-8,
    gru_hidden: str = "normed",
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""One slot-attention iteration, ``SlotAttention.step`` of videosaur / SlotContrast.

    .. math::

        x &= \mathrm{LayerNorm}_{\text{norm\_slots}}(\mathrm{slots})        && (\epsilon_{LN} = 10^{-5}) \\
        q &= x W_q^T                                                        && \text{to\_q, no bias} \\
        U, A &= \mathrm{core}(q, k, v, s, e)                                && \text{:func:`slot_attention_core`} \\
        h &= \mathrm{GRUCell}(U, \mathrm{hidden})                           && \text{or } h = \mathrm{hidden} + U
              \text{ without GRU} \\
        \mathrm{slots}' &= h + \mathrm{Linear}_3(\mathrm{ReLU}(\mathrm{Linear}_1(\mathrm{LayerNorm}_0(h))))
              && \text{or } \mathrm{slots}' = h \text{ without MLP}

    ``hidden = x`` (normalised slots) for ``gru_hidden="normed"`` (videosaur/SlotContrast) and the
    un-normalised input ``slots`` for ``"prev"`` (Locatello et al.'s original).

    ``params`` maps videosaur ``SlotAttention`` state_dict keys to tensors:

    * ``norm_slots.weight``, ``norm_slots.bias`` (D,); ``to_q.weight`` (Dq, D) (``to_q.bias`` is
      used if present, videosaur has none);
    * ``gru.weight_ih`` (3D, Dq), ``gru.weight_hh`` (3D, D), ``gru.bias_ih``, ``gru.bias_hh`` (3D,):
      an ``nn.GRUCell(Dq, D)``. Absent (``use_gru=False``): h = hidden + U, exactly videosaur's
      ``slots = slots + updates`` on the normalised slots (needs Dq == D);
    * ``mlp.layers.0.{weight,bias}`` (D,) LayerNorm, ``mlp.layers.1.{weight,bias}`` (Dh, D),
      ``mlp.layers.3.{weight,bias}`` (D, Dh): videosaur's residual MLP with initial LayerNorm.
      Absent (``use_mlp=False``): slots' = h.

    Args:
        slots: (B, K, D) slots entering the iteration.
        k: (B, N, Dq) keys, v: (B, N, Dv) values (Dv == Dq in videosaur); both already projected
            from LayerNorm(features) once per forward.
        params: the mapping above.
        scale: logit scale; None means ``Dq ** -0.5`` (videosaur's ``kvq_dim ** -0.5``).
        eps: the core's eps.
        gru_hidden: "normed" | "prev".

    Returns:
        ``(slots', A)``: (B, K, D) in ``slots``' dtype and the masks (B, K, N) of this iteration.
    """
    out = slots.dtype
    acc = _acc_dtype(out)
    new, A = _slot_attention_step_acc(
        _up(slots, acc), _up(k, acc), _up(v, acc), params, scale, eps, gru_hidden
    )
    return new.to(out), A.to(out)


def slot_attention(
    slots: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    params: Mapping,
    n_iters: int = 3,
    scale: float | None = None,
    eps: float = 1e-8,
    gru_hidden: str = "normed",
    grad_last_only: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``n_iters`` iterations of :func:`slot_attention_step` (videosaur ``SlotAttention.forward``
    after the k/v projection).

    .. math::

        \mathrm{slots}^{(0)} = \mathrm{slots}, \quad
        \mathrm{slots}^{(t+1)}, A^{(t+1)} = \mathrm{step}(\mathrm{slots}^{(t)}, k, v), \quad
        t = 0 .. n\_iters - 1

    Gradients flow through every iteration. With ``grad_last_only`` (implicit differentiation,
    Chang et al. 2022) the first ``n_iters - 1`` iterations run under ``torch.no_grad()`` and the
    last one starts from the detached slots: gradients reach k, v and params through the last
    iteration only, and the initial slots get no gradient unless ``n_iters == 1``. The forward
    values are identical either way.

    The iterations run in the accumulation dtype; results are cast back once at the end.

    Args:
        slots, k, v, params, scale, eps, gru_hidden: as in :func:`slot_attention_step`.
        n_iters: number of iterations (>= 1).
        grad_last_only: see above.

    Returns:
        ``(slots, masks)``: (B, K, D) and the masks A of the last iteration (B, K, N).
    """
    out = slots.dtype
    acc = _acc_dtype(out)
    s, k, v = _up(slots, acc), _up(k, acc), _up(v, acc)
    A = None
    for it in range(n_iters):
        last = it == n_iters - 1
        if grad_last_only and not last:
            with torch.no_grad():
                s, A = _slot_attention_step_acc(s, k, v, params, scale, eps, gru_hidden)
        else:
            if grad_last_only and n_iters > 1:
                s = s.detach()
            s, A = _slot_attention_step_acc(s, k, v, params, scale, eps, gru_hidden)
    return s.to(out), A.to(out)


# ----------------------------------------------------------------------------------------------
# 3.3 LoRA
# ----------------------------------------------------------------------------------------------


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    scale: float,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Linear layer with a LoRA adapter (PEFT semantics).

    .. math::

        y = x W^T + b + \mathrm{scale} \cdot ((x \odot \mathrm{mask}) A^T) B^T

    The dropout mask (already divided by 1 - p, i.e. entries 0 or 1/(1-p)) applies to the LoRA
    input only, as PEFT's ``lora_dropout``; None means no dropout. ``lora_a``/``lora_b`` None means no
    adapter (plain linear).

    Args:
        x: (..., I).
        weight: (O, I) base weight W. bias: (O,) or None.
        lora_a: (r, I) A. lora_b: (O, r) B.
        scale: LoRA scaling (alpha / r, or alpha / sqrt(r) with rsLoRA).
        dropout_mask: same shape as x, or None.

    Returns:
        (..., O) in the promoted input dtype.
    """
    out = _out_dtype(x, weight, bias, lora_a, lora_b)
    acc = _acc_dtype(out)
    xa = _up(x, acc)
    y = F.linear(xa, _up(weight, acc), _up(bias, acc))
    if lora_a is not None and lora_b is not None:
        xd = xa if dropout_mask is None else xa * _up(dropout_mask, acc)
        y = y + scale * F.linear(F.linear(xd, _up(lora_a, acc)), _up(lora_b, acc))
    return y.to(out)


def lora_qkv(
    x: torch.Tensor,
    w_qkv: torch.Tensor,
    b_qkv: torch.Tensor | None,
    lora_q: Sequence[torch.Tensor] | None,
    lora_k: Sequence[torch.Tensor] | None,
    lora_v: Sequence[torch.Tensor] | None,
    scale: float,
    num_heads: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""WeCoLoRA's per-slice LoRA on a fused qkv Linear, split into heads.

    .. math::

        [q | k | v] &= x W_{qkv}^T + b_{qkv}                        && (B, T, 3C) \\
        q &\mathrel{+}= \mathrm{scale} \cdot (x A_q^T) B_q^T,\quad
        k \mathrel{+}= \mathrm{scale} \cdot (x A_k^T) B_k^T,\quad
        v \mathrel{+}= \mathrm{scale} \cdot (x A_v^T) B_v^T

    then timm's ``qkv.reshape(B, T, 3, H, C // H).permute(2, 0, 3, 1, 4)``.

    Args:
        x: (B, T, C).
        w_qkv: (3C, C). b_qkv: (3C,) or None.
        lora_q, lora_k, lora_v: each a pair ``(A (r, C), B (C, r))`` or None (no LoRA on that slice).
        scale: LoRA scaling.
        num_heads: H (divides C).

    Returns:
        ``(q, k, v)``, each (B, H, T, C // H) in the promoted input dtype: the layout
        ``F.scaled_dot_product_attention`` takes.
    """
    loras = (lora_q, lora_k, lora_v)
    lora_tensors = [t for pair in loras if pair is not None for t in pair]
    out = _out_dtype(x, w_qkv, b_qkv, *lora_tensors)
    acc = _acc_dtype(out)
    xa = _up(x, acc)
    B, T, C = x.shape
    qkv = F.linear(xa, _up(w_qkv, acc), _up(b_qkv, acc))  # (B, T, 3C)
    parts = list(qkv.split(C, dim=-1))
    for i, pair in enumerate(loras):
        if pair is not None:
            a, b = pair
            parts[i] = parts[i] + scale * F.linear(F.linear(xa, _up(a, acc)), _up(b, acc))
    qkv = torch.cat(parts, dim=-1)
    qkv = qkv.reshape(B, T, 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    return q.to(out), k.to(out), v.to(out)


def lora_attention(
    x: torch.Tensor,
    w_qkv: torch.Tensor,
    b_qkv: torch.Tensor | None,
    lora_q: Sequence[torch.Tensor] | None,
    lora_k: Sequence[torch.Tensor] | None,
    lora_v: Sequence[torch.Tensor] | None,
    w_proj: torch.Tensor,
    b_proj: torch.Tensor | None,
    lora_proj: Sequence[torch.Tensor] | None,
    scale: float,
    num_heads: int,
) -> torch.Tensor:
    r"""timm ``Attention`` (no q/k norm, no dropout) with LoRA on the q, k, v slices and on proj.

    .. math::

        q, k, v &= \mathrm{lora\_qkv}(x, \ldots)                        && (B, H, T, C/H) \\
        o &= \mathrm{softmax}(q k^T / \sqrt{C/H})\, v                     && \text{via } \texttt{F.scaled\_dot\_product\_attention} \\
        y &= \mathrm{lora\_linear}(o \text{ as } (B, T, C), W_{proj}, b_{proj}, A_p, B_p, \mathrm{scale})

    Args:
        x: (B, T, C).
        w_qkv, b_qkv, lora_q, lora_k, lora_v, scale, num_heads: as in :func:`lora_qkv`.
        w_proj: (C, C). b_proj: (C,) or None. lora_proj: pair ``(A (r, C), B (C, r))`` or None.

    Returns:
        (B, T, C) in the promoted input dtype.
    """
    loras = (lora_q, lora_k, lora_v, lora_proj)
    lora_tensors = [t for pair in loras if pair is not None for t in pair]
    out = _out_dtype(x, w_qkv, b_qkv, w_proj, b_proj, *lora_tensors)
    acc = _acc_dtype(out)
    B, T, C = x.shape
    q, k, v = lora_qkv(
        _up(x, acc), _up(w_qkv, acc), _up(b_qkv, acc),
        *[None if pair is None else tuple(_up(t, acc) for t in pair) for pair in (lora_q, lora_k, lora_v)],
        scale, num_heads,
    )
    o = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, hd)
    o = o.transpose(1, 2).reshape(B, T, C)
    a_p, b_p = (None, None) if lora_proj is None else lora_proj
    y = lora_linear(o, _up(w_proj, acc), _up(b_proj, acc), _up(a_p, acc), _up(b_p, acc), scale)
    return y.to(out)


# ----------------------------------------------------------------------------------------------
# 3.4 Gini impurity and KL (discriminability loss, arXiv 2202.07073)
# ----------------------------------------------------------------------------------------------


def gini_impurity(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    r"""Gini impurity of distributions along ``dim``: :math:`1 - \sum p^2`. Output in ``p``'s dtype."""
    acc = _acc_dtype(p.dtype)
    pa = _up(p, acc)
    return (1.0 - (pa * pa).sum(dim)).to(p.dtype)


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

    The t_c = 0 terms use ``torch.xlogy`` so they are exactly 0 with a zero (not NaN) gradient.

    Args:
        activations: (B, F, H, W) or (B, F) floating.
        labels: int64 (B,) in [0, C).
        num_classes: C.
        target: "batch" | "uniform".
        delta: the stabiliser delta.

    Returns:
        ``(gini, kl)``: two scalars in the activations' dtype.
    """
    out = activations.dtype
    acc = _acc_dtype(out)
    a = _up(activations, acc)
    B, Fdim = a.shape[0], a.shape[1]
    m = a.abs() if a.dim() == 2 else a.abs().flatten(2).mean(-1)  # (B, F)

    C = num_classes
    counts = torch.zeros(C, dtype=acc, device=a.device).index_add(
        0, labels, torch.ones(B, dtype=acc, device=a.device)
    )  # n_c (C,)
    class_sum = torch.zeros(C, Fdim, dtype=acc, device=a.device).index_add(0, labels, m)  # (C, F)
    S = (class_sum / (counts + delta).unsqueeze(1)).t()  # (F, C)
    p = S / (S.sum(dim=1, keepdim=True) + delta)  # (F, C)

    gini = (1.0 - (p * p).sum(dim=1)).mean()

    q = (p.sum(dim=0) + delta) / p.sum()  # (C,)
    if target == "batch":
        t = counts / B
    elif target == "uniform":
        t = torch.full((C,), 1.0 / C, dtype=acc, device=a.device)
    else:
        raise ValueError(f"target must be 'batch' or 'uniform', got {target!r}")
    kl = (torch.xlogy(t, t) - torch.xlogy(t, q)).sum()
    return gini.to(out), kl.to(out)


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

    Absent classes get no gradient (no sample reads them). Returns a tensor like ``activations``.
    """
    out = activations.dtype
    epi = torch.float64
    a = _up(activations, epi)
    B, Fdim = a.shape[0], a.shape[1]
    m = a.abs() if a.dim() == 2 else a.abs().flatten(2).mean(-1)  # (B, F)
    C = num_classes
    counts = torch.zeros(C, dtype=epi, device=a.device).index_add(0, labels, torch.ones(B, dtype=epi, device=a.device))
    class_sum = torch.zeros(C, Fdim, dtype=epi, device=a.device).index_add(0, labels, m)
    S = (class_sum / (counts + delta).unsqueeze(1)).t()  # (F, C)
    Z = S.sum(dim=1, keepdim=True) + delta  # (F, 1)
    p = S / Z
    P = p.sum(dim=0)  # (C,)
    t = counts / B if target == "batch" else torch.full((C,), 1.0 / C, dtype=epi, device=a.device)
    g_gini, g_kl = _up(grad_gini, epi), _up(grad_kl, epi)

    h = -2.0 * g_gini * p / Fdim - g_kl * t / (P + delta)
    h = torch.where(counts > 0, h, torch.zeros_like(h))  # absent classes: p = 0 and nothing reads dS
    dS = (h - (h * p).sum(dim=1, keepdim=True)) / Z + g_kl * (t.sum() / P.sum()) * delta / (Z * Z)
    dm = (dS / (counts + delta)).t()[labels]  # (B, F)
    if a.dim() == 2:
        return (torch.sign(a) * dm).to(out)
    spatial = a[0, 0].numel()
    return (torch.sign(a) * (dm / spatial)[:, :, None, None]).to(out)


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
    a = _up(activations, torch.float64)
    m = a.abs() if a.dim() == 2 else a.abs().flatten(2).mean(-1)  # (B, F)
    counts = torch.bincount(labels, minlength=num_classes)
    class_sums = torch.zeros(num_classes, a.shape[1], dtype=torch.float64, device=a.device).index_add(0, labels, m)
    return class_sums, counts


def gini_kl_statistics_backward(
    grad_class_sums: torch.Tensor, activations: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    r"""``da[b, f, h, w] = sign(a[b, f, h, w]) grad_class_sums[y_b, f] / (H W)``, laid out like
    ``torch.empty_like(activations)``. Computed in float64, rounded once to the activations' dtype."""
    a = _up(activations, torch.float64)
    dm = grad_class_sums.to(torch.float64)[labels]  # (B, F)
    if a.dim() == 4:
        dm = (dm / a[0, 0].numel())[:, :, None, None]
    return torch.empty_like(activations).copy_(torch.sign(a) * dm)


def _gini_kl_table(class_sums: torch.Tensor, counts: torch.Tensor, target: str, delta: float):
    """p (F, C), Z (F, 1), P (C,) and t (C,) of :func:`gini_kl`, in float64. Classes with count 0 are absent:
    their rows of class_sums are taken as 0 (gini_kl_statistics leaves them 0)."""
    epi = torch.float64
    n = counts.to(epi)
    sums = torch.where((counts > 0).unsqueeze(1), class_sums.to(epi), torch.zeros((), dtype=epi, device=class_sums.device))
    S = (sums / (n + delta).unsqueeze(1)).t()  # (F, C)
    Z = S.sum(dim=1, keepdim=True) + delta
    p = S / Z
    C = class_sums.shape[0]
    t = n / n.sum() if target == "batch" else torch.full((C,), 1.0 / C, dtype=epi, device=class_sums.device)
    return p, Z, p.sum(dim=0), t


def gini_kl_from_statistics(
    class_sums: torch.Tensor, counts: torch.Tensor, target: str = "batch", delta: float = 1e-10
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``(gini, kl)`` of :func:`gini_kl` from its statistics, computed in float64, returned in class_sums' dtype.
    The batch size is ``counts.sum()``; classes with count 0 are absent (their rows are ignored)."""
    p, _, P, t = _gini_kl_table(class_sums, counts, target, delta)
    gini = (1.0 - (p * p).sum(dim=1)).mean()
    q = (P + delta) / P.sum()
    kl = (torch.xlogy(t, t) - torch.xlogy(t, q)).sum()
    return gini.to(class_sums.dtype), kl.to(class_sums.dtype)


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
    ``n_c = 0`` are 0 (no sample reads them). Float64 inside; returned in class_sums' dtype."""
    p, Z, P, t = _gini_kl_table(class_sums, counts, target, delta)
    g_gini, g_kl = grad_gini.to(torch.float64), grad_kl.to(torch.float64)
    present = counts > 0
    h = -2.0 * g_gini * p / p.shape[0] - g_kl * t / (P + delta)
    h = torch.where(present, h, torch.zeros_like(h))
    dS = (h - (h * p).sum(dim=1, keepdim=True)) / Z + g_kl * (t.sum() / P.sum()) * delta / (Z * Z)
    grad = torch.where(present, dS / (counts.to(torch.float64) + delta), torch.zeros_like(dS)).t()
    return grad.to(class_sums.dtype).contiguous()


__all__ += [
    "gini_kl_from_statistics",
    "gini_kl_from_statistics_backward",
    "gini_kl_statistics",
    "gini_kl_statistics_backward",
]
