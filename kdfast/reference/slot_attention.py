r"""Slot attention (design.md 3.1; SlotContrast / videosaur grouper, Locatello et al.): the core (a softmax over
the slots, then a weighted mean over the inputs) with its explicit backward, one iteration of the videosaur
module (LayerNorm, q projection, core, GRU, residual MLP) and the loop over iterations.

Notation: B batch, K slots, N inputs (tokens), D slot dim, Dq key/query dim, Dv value dim, Dh MLP hidden dim.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from ._common import accumulator_dtype, promoted_dtype, upcast

#: eps of every LayerNorm in the slot-attention iteration (``nn.LayerNorm``'s default).
LAYER_NORM_EPS = 1e-5

# The ABI of kdfast's compiled iteration ops: the state_dict keys of one iteration's parameters (videosaur
# SlotAttention without to_k, to_v, norm_features), in the order those ops take them.
SLOT_ATTENTION_PARAMS = (
    "norm_slots.weight", "norm_slots.bias", "to_q.weight", "to_q.bias", "gru.weight_ih", "gru.weight_hh",
    "gru.bias_ih", "gru.bias_hh", "mlp.layers.0.weight", "mlp.layers.0.bias", "mlp.layers.1.weight",
    "mlp.layers.1.bias", "mlp.layers.3.weight", "mlp.layers.3.bias",
)


# ----------------------------------------------------------------------------------------------
# The core
# ----------------------------------------------------------------------------------------------


def _logit_scale(q: torch.Tensor, scale: float | None) -> float:
    """s: ``scale``, or ``D ** -0.5`` for q's feature dim D when it is None."""
    return q.shape[-1] ** -0.5 if scale is None else scale


def _core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: float, eps: float):
    """``(U, A, W, Z)`` of :func:`slot_attention_core`, all in q, k, v's (common) dtype."""
    L = s * torch.bmm(q, k.transpose(1, 2))  # (B, K, N)
    A = torch.softmax(L, dim=1)  # softmax over the slots
    W = A + eps
    Z = W.sum(dim=-1, keepdim=True)  # (B, K, 1)
    U = torch.bmm(W, v) / Z  # (B, K, Dv)
    return U, A, W, Z


def _heads_core(q, k, v, s, eps, n_heads, slot_mask):
    """``(U, A)`` of OCLF's multi-head, masked core: one softmax per token over all (slot, head) pairs, masked
    slots at -inf in every head; U (B, K, Dv) with the heads side by side, A (B, K, N) averaged over the heads."""
    (B, K, Dq), N, H = q.shape, k.shape[1], n_heads
    L = s * torch.einsum("bkhd,bnhd->bkhn", q.view(B, K, H, Dq // H), k.view(B, N, H, Dq // H))
    if slot_mask is not None:
        L = L.masked_fill(slot_mask.view(B, K, 1, 1), float("-inf"))
    A = torch.softmax(L.reshape(B, K * H, N), dim=1).view(B, K, H, N)  # over the slots and heads together
    W = A + eps
    U = torch.einsum("bkhn,bnhd->bkhd", W, v.view(B, N, H, -1)) / W.sum(-1, keepdim=True)
    return U.reshape(B, K, -1), A.mean(2)


def slot_attention_core(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    eps: float = 1e-8,
    n_heads: int = 1,
    slot_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Slot-attention core: softmax over the slots, then a weighted mean over the inputs.

    Per batch element, with s = ``scale`` (default :math:`D^{-1/2}`) and e = ``eps``:

    .. math::

        L[i, n] &= s \langle q_i, k_n \rangle                          && (K \times N) \\
        A[i, n] &= \mathrm{softmax}_i(L[:, n])[i]                       && \text{over the SLOTS} \\
        W[i, n] &= A[i, n] + e \\
        Z_i     &= \textstyle\sum_n W[i, n] \\
        U_i     &= \textstyle\sum_n W[i, n]\, v_n / Z_i                 && (K \times D_v)

    With ``n_heads`` = H > 1 (OCLF's SlotAttention), q, k and v split into H heads of D / H and Dv / H features,
    :math:`L[i, h, n] = s \langle q_{ih}, k_{nh} \rangle` and the softmax runs over all (slot, head) pairs of a
    token at once; U holds the heads side by side and A is averaged over the heads. ``slot_mask`` (B, K) bool
    sets the logits of the slots marked True to -inf in every head: their attention is 0 and their update is the
    plain mean of the values.

    Args:
        q: (B, K, D) queries.
        k: (B, N, D) keys.
        v: (B, N, Dv) values.
        scale: logit scale s; None means ``(D / n_heads) ** -0.5``.
        eps: e, added to the attention before the normalisation over the inputs.
        n_heads: H, dividing D and Dv.
        slot_mask: (B, K) bool, True for slots left out of the competition, or None.

    Returns:
        ``(U, A)``: updates (B, K, Dv) and the attention masks A (B, K, N) *before* eps, both in
        the promoted input dtype.
    """
    out = promoted_dtype(q, k, v)
    acc = accumulator_dtype(out)
    q, k, v = upcast(q, acc), upcast(k, acc), upcast(v, acc)
    if n_heads == 1 and slot_mask is None:
        U, A, _, _ = _core(q, k, v, _logit_scale(q, scale), eps)
    else:
        s = (q.shape[-1] // n_heads) ** -0.5 if scale is None else scale
        U, A = _heads_core(q, k, v, s, eps, n_heads, slot_mask)
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

    Recomputes A, W, Z, U from q, k, v (no autograd), as the kernels do: softmax over the slots is local to a
    token, so nothing of size (B, K, N) needs keeping from the forward. With G = dLoss/dU and GA = dLoss/dA
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
    acc = accumulator_dtype(promoted_dtype(q, k, v, grad_updates, grad_attn))
    qa, ka, va = upcast(q, acc), upcast(k, acc), upcast(v, acc)
    G = upcast(grad_updates, acc)
    s = _logit_scale(q, scale)
    U, A, W, Z = _core(qa, ka, va, s, eps)

    c = (G * U).sum(dim=-1, keepdim=True)  # (B, K, 1)
    dW = (torch.bmm(G, va.transpose(1, 2)) - c) / Z  # (B, K, N)
    dv = torch.bmm((W / Z).transpose(1, 2), G)  # (B, N, Dv)
    dA = dW if grad_attn is None else dW + upcast(grad_attn, acc)
    dL = A * (dA - (A * dA).sum(dim=1, keepdim=True))  # (B, K, N)
    dq = s * torch.bmm(dL, ka)  # (B, K, D)
    dk = s * torch.bmm(dL.transpose(1, 2), qa)  # (B, N, D)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# ----------------------------------------------------------------------------------------------
# The iteration and the loop
# ----------------------------------------------------------------------------------------------


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


def _reference_core(scale, eps, n_heads=1, slot_mask=None):
    """The reference core as the iteration calls it: ``core(q, k, v, last) -> (U, A)``."""
    if n_heads == 1 and slot_mask is None:
        return lambda q, k, v, last: _core(q, k, v, _logit_scale(q, scale), eps)[:2]
    return lambda q, k, v, last: _heads_core(q, k, v, (q.shape[-1] // n_heads) ** -0.5 if scale is None else scale,
                                             eps, n_heads, slot_mask)


def iteration(slots, k, v, params, gru_hidden, core, gru_cell=None, last=True):
    """One iteration (:func:`slot_attention_step`) with slots, k, v and params already in one dtype: the one
    written form of it, which every non-fused path runs (kdfast.ops passes its backend's core).

    ``core(q, k, v, last) -> (U (B, K, Dv), A (B, K, N))`` is the slot attention core; ``last`` says whether the
    caller keeps A (a backend may then skip writing it). ``gru_cell(U, hidden, w_ih, w_hh, b_ih, b_hh) -> h`` is
    the GRUCell, :func:`_gru_cell` (the equations) unless given.
    """
    acc = slots.dtype

    def p(name):
        t = params.get(name)
        return None if t is None else t.to(acc)

    D = slots.shape[-1]
    x = F.layer_norm(slots, (D,), p("norm_slots.weight"), p("norm_slots.bias"), LAYER_NORM_EPS)
    q = F.linear(x, p("to_q.weight"), p("to_q.bias"))
    U, A = core(q, k, v, last)

    if gru_hidden == "normed":
        hidden = x
    elif gru_hidden == "prev":
        hidden = slots
    else:
        raise ValueError(f"gru_hidden must be 'normed' or 'prev', got {gru_hidden!r}")

    if "gru.weight_ih" in params:
        h = (gru_cell or _gru_cell)(
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
    n_heads: int = 1,
    slot_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""One slot-attention iteration, ``SlotAttention.step`` of videosaur / SlotContrast (and of OCLF with
    ``n_heads`` and ``slot_mask``, see :func:`slot_attention_core`).

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

    ``params`` maps videosaur ``SlotAttention`` state_dict keys (:data:`SLOT_ATTENTION_PARAMS`) to tensors:

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
        gru_hidden: "normed" | "prev" (anything else raises ValueError).
        n_heads, slot_mask: as in :func:`slot_attention_core` (scale then defaults to ``(Dq / n_heads) ** -0.5``).

    Returns:
        ``(slots', A)``: (B, K, D) in ``slots``' dtype and the masks (B, K, N) of this iteration.
    """
    out = slots.dtype
    acc = accumulator_dtype(out)
    new, A = iteration(upcast(slots, acc), upcast(k, acc), upcast(v, acc), params, gru_hidden,
                       _reference_core(scale, eps, n_heads, slot_mask))
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
    n_heads: int = 1,
    slot_mask: torch.Tensor | None = None,
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

    The iterations run in the accumulation dtype; results are cast back once at the end, so a
    half-precision input is not rounded between iterations.

    Args:
        slots, k, v, params, scale, eps, gru_hidden, n_heads, slot_mask: as in :func:`slot_attention_step`.
        n_iters: number of iterations (>= 1).
        grad_last_only: see above.

    Returns:
        ``(slots, masks)``: (B, K, D) and the masks A of the last iteration (B, K, N).
    """
    out = slots.dtype
    acc = accumulator_dtype(out)
    s, A = iterations(upcast(slots, acc), upcast(k, acc), upcast(v, acc), params, n_iters, gru_hidden,
                      grad_last_only, _reference_core(scale, eps, n_heads, slot_mask))
    return s.to(out), A.to(out)


def iterations(slots, k, v, params, n_iters, gru_hidden, grad_last_only, core, gru_cell=None):
    """The iteration loop of :func:`slot_attention` in the inputs' dtype, with the ``core`` and ``gru_cell`` of
    :func:`iteration`: the one loop the reference and every non-fused backend path run. Returns the slots and the
    last iteration's masks."""
    s, A = slots, None
    for it in range(n_iters):
        last = it == n_iters - 1
        if grad_last_only and not last:
            with torch.no_grad():
                s, _ = iteration(s, k, v, params, gru_hidden, core, gru_cell, last=False)
            continue
        if grad_last_only and n_iters > 1:
            s = s.detach()
        s, A = iteration(s, k, v, params, gru_hidden, core, gru_cell, last=last)
    return s, A
