"""SlotAttention: a drop-in for SlotContrast's / videosaur's slot attention grouper (design.md 3.1)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kdfast import ops


class _ResidualMLP(nn.Module):
    """``x + Linear(ReLU(Linear(LayerNorm(x))))`` with videosaur's parameter names (``layers.0/1/3``)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.layers = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.layers(x)


class SlotAttention(nn.Module):
    """Slot attention (Locatello et al.) as SlotContrast and videosaur run it, on kdfast's fused ops.

    Same constructor options, parameter names (``state_dict`` keys ``to_q``, ``to_k``, ``to_v``, ``gru``,
    ``mlp.layers.0/1/3``, ``norm_features``, ``norm_slots``) and forward as videosaur's
    ``SlotAttention``: a state_dict saved from one loads unchanged into the other and gives the same numbers.

    Per forward, ``k = to_k(LN(features))`` and ``v = to_v(LN(features))`` once, then ``n_iters`` iterations
    of ``slots = MLP(GRUCell(core(to_q(LN(slots)), k, v), LN(slots)))`` (:func:`kdfast.ops.slot_attention`).

    Args:
        inp_dim: feature width. slot_dim: slot width D.
        kvq_dim: width of queries, keys and values (default slot_dim).
        hidden_dim: hidden width of the residual MLP (default 4 * slot_dim).
        n_iters: iterations per forward (>= 1). eps: added to the attention before the weighted mean.
        use_gru: GRUCell update (else ``slots = LN(slots) + updates``; needs kvq_dim == slot_dim).
        use_mlp: residual MLP after the update.
        gru_hidden: hidden state of the GRU: ``"normed"`` (normalised slots, videosaur/SlotContrast) or
            ``"prev"`` (the incoming slots, Locatello et al.'s original).
        grad_last_only: gradients through the last iteration only (implicit differentiation).
        backend: as in kdfast.ops (None: ``KDFAST_BACKEND``, default ``auto``).
        fused: on the triton backend, all iterations in one persistent kernel each way (False: the loop of
            core kernels and torch layers); see :func:`kdfast.ops.slot_attention`.

    Shapes: slots (B, K, slot_dim), features (B, N, inp_dim) -> ``{"slots": (B, K, slot_dim),
    "masks": (B, K, N)}``, the masks being the attention of the last iteration (softmax over slots, before eps).
    """

    def __init__(
        self,
        inp_dim: int,
        slot_dim: int,
        kvq_dim: int | None = None,
        hidden_dim: int | None = None,
        n_iters: int = 3,
        eps: float = 1e-8,
        use_gru: bool = True,
        use_mlp: bool = True,
        *,
        gru_hidden: str = "normed",
        grad_last_only: bool = False,
        backend: str | None = None,
        fused: bool = True,
    ):
        super().__init__()
        if isinstance(n_iters, bool) or not isinstance(n_iters, int) or n_iters < 1:
            raise ValueError(f"n_iters must be an integer >= 1, got {n_iters!r}")
        kvq_dim = slot_dim if kvq_dim is None else kvq_dim
        hidden_dim = 4 * slot_dim if hidden_dim is None else hidden_dim
        if not use_gru and kvq_dim != slot_dim:
            raise ValueError(f"use_gru=False adds the updates to the slots: kvq_dim ({kvq_dim}) must equal slot_dim ({slot_dim})")
        if gru_hidden not in ("normed", "prev"):
            raise ValueError(f"gru_hidden must be 'normed' or 'prev', got {gru_hidden!r}")
        self.to_k = nn.Linear(inp_dim, kvq_dim, bias=False)
        self.to_v = nn.Linear(inp_dim, kvq_dim, bias=False)
        self.to_q = nn.Linear(slot_dim, kvq_dim, bias=False)
        self.gru = nn.GRUCell(kvq_dim, slot_dim) if use_gru else None
        self.mlp = _ResidualMLP(slot_dim, hidden_dim) if use_mlp else None
        self.norm_features = nn.LayerNorm(inp_dim)
        self.norm_slots = nn.LayerNorm(slot_dim)
        self.n_iters, self.eps, self.scale = n_iters, eps, kvq_dim**-0.5
        self.gru_hidden, self.grad_last_only, self.backend, self.fused = gru_hidden, grad_last_only, backend, fused

    def iteration_params(self) -> dict[str, Tensor]:
        """The parameters of one iteration, by state_dict key (the ``params`` of kdfast.ops.slot_attention)."""
        skip = ("to_k.", "to_v.", "norm_features.")
        return {name: p for name, p in self.named_parameters() if not name.startswith(skip)}

    def step(self, slots: Tensor, keys: Tensor, values: Tensor, masks: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """One iteration, as videosaur's ``step``: ``(slots (B, K, D), attention (B, K, N))`` from slots
        (B, K, D) and the projected keys and values (B, N, kvq_dim). ``masks`` (B, K) boolean, True for slots left
        out of the competition (their logits are -inf before the softmax over slots, so they attend to nothing
        but eps); kdfast.ops has no masked core, so a masked step runs in plain PyTorch."""
        if masks is None:
            return ops.slot_attention(
                slots, keys, values, self.iteration_params(), 1, scale=self.scale, eps=self.eps,
                gru_hidden=self.gru_hidden, backend=self.backend, fused=self.fused,
            )
        if not isinstance(masks, Tensor) or masks.dtype != torch.bool or masks.shape != slots.shape[:2]:
            raise ValueError(f"masks must be a boolean tensor (B, K) = {tuple(slots.shape[:2])}, got {masks!r:.80}")
        normed = self.norm_slots(slots)
        logits = torch.einsum("bkd,bnd->bkn", self.to_q(normed), keys) * self.scale
        attn = logits.masked_fill(masks.unsqueeze(-1), float("-inf")).softmax(dim=1)
        weights = (attn + self.eps) / (attn + self.eps).sum(-1, keepdim=True)
        updates = torch.einsum("bkn,bnd->bkd", weights, values)
        hidden = normed if self.gru_hidden == "normed" else slots
        if self.gru is not None:
            new = self.gru(updates.flatten(0, 1), hidden.flatten(0, 1)).unflatten(0, slots.shape[:2])
        else:
            new = hidden + updates
        return (new if self.mlp is None else self.mlp(new)), attn

    def forward(self, slots: Tensor, features: Tensor, n_iters: int | None = None) -> dict[str, Tensor]:
        features = self.norm_features(features)
        keys, values = self.to_k(features), self.to_v(features)
        n_iters = self.n_iters if n_iters is None else n_iters
        slots, masks = ops.slot_attention(
            slots, keys, values, self.iteration_params(), n_iters,
            scale=self.scale, eps=self.eps, gru_hidden=self.gru_hidden, grad_last_only=self.grad_last_only,
            backend=self.backend, fused=self.fused,
        )
        return {"slots": slots, "masks": masks}

    def extra_repr(self) -> str:
        return f"n_iters={self.n_iters}, eps={self.eps}, gru_hidden={self.gru_hidden!r}, grad_last_only={self.grad_last_only}"
