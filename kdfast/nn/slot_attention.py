"""SlotAttention: a drop-in for SlotContrast's / videosaur's slot attention grouper (design.md 3.1)."""

from __future__ import annotations

from torch import Tensor, nn

from kdfast import _backend, ops


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
        n_heads: heads of the attention (OCLF's ``n_heads``): kvq_dim / n_heads features each, one softmax per
            token over all (slot, head) pairs, the masks averaged over the heads; the scale becomes
            ``(kvq_dim / n_heads) ** -0.5``.
        bias: biases on to_q, to_k and to_v (OCLF's ``use_projection_bias``).

    Shapes: slots (B, K, slot_dim), features (B, N, inp_dim) -> ``{"slots": (B, K, slot_dim),
    "masks": (B, K, N)}``, the masks being the attention of the last iteration (softmax over slots, before eps).
    ``forward(..., slot_mask=)`` takes OCLF's (B, K) bool mask: slots marked True get no attention in any
    iteration (their update is the mean of the values, as in OCLF); each batch element keeps at least one slot.

    OCLF's ``SlotAttention(dim, feature_dim, kvq_dim, n_heads, iters, eps, ff_mlp, use_projection_bias,
    use_implicit_differentiation)`` is ``SlotAttention(feature_dim, dim, kvq_dim, n_iters=iters, n_heads=n_heads,
    bias=use_projection_bias, gru_hidden="prev")`` with its ``norm_input`` loaded as ``norm_features`` and a
    residual two-layer ``ff_mlp`` as ``mlp`` (``use_mlp=False`` without one); its implicit differentiation (iters
    steps, then one more on the detached slots) is ``n_iters=iters + 1, grad_last_only=True``.
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
        n_heads: int = 1,
        bias: bool = False,
    ):
        super().__init__()
        if isinstance(n_iters, bool) or not isinstance(n_iters, int) or n_iters < 1:
            raise ValueError(f"n_iters must be an integer >= 1, got {n_iters!r}")
        kvq_dim = slot_dim if kvq_dim is None else kvq_dim
        hidden_dim = 4 * slot_dim if hidden_dim is None else hidden_dim
        for name, value in (("inp_dim", inp_dim), ("slot_dim", slot_dim), ("kvq_dim", kvq_dim),
                            ("hidden_dim", hidden_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not use_gru and kvq_dim != slot_dim:
            raise ValueError(f"use_gru=False adds the updates to the slots: kvq_dim ({kvq_dim}) must equal slot_dim ({slot_dim})")
        if gru_hidden not in ("normed", "prev"):
            raise ValueError(f"gru_hidden must be 'normed' or 'prev', got {gru_hidden!r}")
        if isinstance(n_heads, bool) or not isinstance(n_heads, int) or n_heads < 1 or kvq_dim % n_heads:
            raise ValueError(f"n_heads must be a positive integer dividing kvq_dim={kvq_dim}, got {n_heads!r}")
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be a bool, got {type(bias).__name__}")
        self.to_k = nn.Linear(inp_dim, kvq_dim, bias=bias)
        self.to_v = nn.Linear(inp_dim, kvq_dim, bias=bias)
        self.to_q = nn.Linear(slot_dim, kvq_dim, bias=bias)
        self.gru = nn.GRUCell(kvq_dim, slot_dim) if use_gru else None
        self.mlp = _ResidualMLP(slot_dim, hidden_dim) if use_mlp else None
        self.norm_features = nn.LayerNorm(inp_dim)
        self.norm_slots = nn.LayerNorm(slot_dim)
        self.n_iters, self.eps, self.n_heads, self.scale = n_iters, eps, n_heads, (kvq_dim // n_heads) ** -0.5
        self.gru_hidden, self.grad_last_only, self.backend, self.fused = gru_hidden, grad_last_only, backend, fused

    def iteration_params(self) -> dict[str, Tensor]:
        """The parameters of one iteration, by state_dict key (the ``params`` of kdfast.ops.slot_attention)."""
        skip = ("to_k.", "to_v.", "norm_features.")
        return {name: p for name, p in self.named_parameters() if not name.startswith(skip)}

    def step(self, slots: Tensor, keys: Tensor, values: Tensor, masks: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """One iteration, as videosaur's ``step``: ``(slots (B, K, D), attention (B, K, N))`` from slots
        (B, K, D) and the projected keys and values (B, N, kvq_dim). ``masks``: the (B, K) bool slot mask of
        :meth:`forward` (True: the slot is left out)."""
        return self._iterations(slots, keys, values, 1, masks)

    def forward(self, slots: Tensor, features: Tensor, n_iters: int | None = None,
                slot_mask: Tensor | None = None) -> dict[str, Tensor]:
        features = self.norm_features(features)
        n_iters = self.n_iters if n_iters is None else n_iters
        if self._folds_projections(slots, features, n_iters):
            params = self.iteration_params()
            params["to_q.weight"] = self.to_k.weight.t() @ self.to_q.weight
            params["gru.weight_ih"] = self.gru.weight_ih @ self.to_v.weight
            slots, masks = self._iterations(slots, features, features, n_iters, slot_mask, params)
        else:
            slots, masks = self._iterations(slots, self.to_k(features), self.to_v(features), n_iters, slot_mask)
        return {"slots": slots, "masks": masks}

    def _folds_projections(self, slots: Tensor, features: Tensor, n_iters: int) -> bool:
        """Whether this forward runs on the normalised features themselves, never forming k and v.

        The logits q_i . (W_k f_n) are (W_k^T q_i) . f_n, and the updates, weighted means of W_v f_n, are W_v
        times the weighted means of f_n, which the GRU's input weight absorbs (W_ih W_v). So the core can take
        the features as keys and values, with to_q's weight W_k^T W_q and the GRU's W_ih W_v formed per forward
        (slot-sized products): the two (N, inp) x (inp, kvq_dim) projections go, and in the backward their four
        GEMMs, while each iteration's core works on inp instead of kvq_dim features. That pays while
        n_iters * K * (inp - kvq_dim) < inp * kvq_dim (always when inp <= kvq_dim). Measured on the CPU with the
        cpp backend only (benchmarks/bench_slot_attention.py); float32 results differ by rounding (~1e-7).
        Needs a GRU, one head and no projection biases (a key bias adds a per-slot logit term)."""
        if features.device.type != "cpu" or self.gru is None or self.n_heads != 1 or self.to_k.bias is not None:
            return False
        if self.to_q.bias is not None or slots.dim() != 3:  # a bad input gets kdfast.ops' error, unfolded
            return False
        inp, kvq = self.to_k.in_features, self.to_k.out_features
        if n_iters * slots.shape[1] * (inp - kvq) >= inp * kvq:
            return False
        return _backend.resolve("slot_attention_core", self.backend, "cpu", (slots.shape[1], kvq, kvq)) == "cpp"

    def _iterations(self, slots, keys, values, n_iters, slot_mask, params=None):
        return ops.slot_attention(
            slots, keys, values, self.iteration_params() if params is None else params, n_iters,
            scale=self.scale, eps=self.eps, gru_hidden=self.gru_hidden, grad_last_only=self.grad_last_only,
            backend=self.backend, fused=self.fused, n_heads=self.n_heads, slot_mask=slot_mask,
        )

    def extra_repr(self) -> str:
        return (f"n_iters={self.n_iters}, eps={self.eps}, n_heads={self.n_heads}, gru_hidden={self.gru_hidden!r}, "
                f"grad_last_only={self.grad_last_only}")
