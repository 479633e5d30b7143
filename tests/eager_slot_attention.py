"""The eager slot attention module kdfast.nn.SlotAttention replaces: videosaur's / SlotContrast's grouper written
from its formula with nn modules (same options, parameter names, state_dict keys and outputs). One copy serves the
tests (imported as ``eager_slot_attention``) and the benchmarks (as ``tests.eager_slot_attention``), so it imports
nothing from the test harness."""

from __future__ import annotations

import torch
from torch import nn


class ResidualMLP(nn.Module):
    """videosaur's ``networks.MLP(d, d, [h], initial_layer_norm=True, residual=True)``: x + layers(x)."""

    residual = True  # what kdfast.patch reads to recognise the residual MLP

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.layers = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layers(x)


class EagerSlotAttention(nn.Module):
    """Slot attention over (B, N, inp_dim) features for (B, K, slot_dim) slots.

    ``step`` is one iteration on projected keys and values (B, N, kvq_dim); ``forward`` normalises and projects the
    features once and runs ``n_iters`` steps. ``gru_hidden`` is the GRU's hidden state (and the residual's base when
    there is no GRU): ``"normed"`` the layer-normalised slots (videosaur, SlotContrast), ``"prev"`` the slots as they
    came in. ``masks`` (B, K) bool in ``step`` marks slots to leave out (videosaur's masking: -inf logits). Returns
    the new slots and the attention (B, K, N), softmax over the slots, before the eps renormalisation."""

    def __init__(self, inp_dim, slot_dim, kvq_dim=None, hidden_dim=None, n_iters=3, eps=1e-8, use_gru=True,
                 use_mlp=True, gru_hidden="normed", use_ttt=False):
        super().__init__()
        kvq_dim = kvq_dim or slot_dim
        self.to_k = nn.Linear(inp_dim, kvq_dim, bias=False)
        self.to_v = nn.Linear(inp_dim, kvq_dim, bias=False)
        self.to_q = nn.Linear(slot_dim, kvq_dim, bias=False)
        self.gru = nn.GRUCell(kvq_dim, slot_dim) if use_gru else None
        self.mlp = ResidualMLP(slot_dim, hidden_dim or 4 * slot_dim) if use_mlp else None
        self.norm_features = nn.LayerNorm(inp_dim)
        self.norm_slots = nn.LayerNorm(slot_dim)
        self.n_iters, self.eps, self.scale = n_iters, eps, kvq_dim**-0.5
        self.gru_hidden, self.use_ttt = gru_hidden, use_ttt

    def step(self, slots, keys, values, masks=None):
        normed = self.norm_slots(slots)
        logits = self.scale * torch.einsum("bkd,bnd->bkn", self.to_q(normed), keys)
        if masks is not None:
            logits = logits.masked_fill(masks.unsqueeze(-1), float("-inf"))
        attn = torch.softmax(logits, dim=1)  # over the slots
        weights = (attn + self.eps) / (attn + self.eps).sum(-1, keepdim=True)  # weighted mean over the inputs
        updates = torch.einsum("bkn,bnd->bkd", weights, values)
        hidden = normed if self.gru_hidden == "normed" else slots
        if self.gru is not None:
            slots = self.gru(updates.flatten(0, 1), hidden.flatten(0, 1)).unflatten(0, slots.shape[:2])
        else:
            slots = hidden + updates
        return (slots if self.mlp is None else self.mlp(slots)), attn

    def forward(self, slots, features, n_iters=None):
        features = self.norm_features(features)
        keys, values = self.to_k(features), self.to_v(features)
        for _ in range(self.n_iters if n_iters is None else n_iters):
            slots, attn = self.step(slots, keys, values)
        return {"slots": slots, "masks": attn}


class OCLFSlotAttention(nn.Module):
    """OCLF's (amazon-science object-centric-learning-framework) SlotAttention, written from its semantics:
    ``n_heads`` heads of kvq_dim / n_heads features with ONE softmax per token over all (slot, head) pairs, the
    GRU's hidden state the incoming (un-normalised) slots, an optional ``ff_mlp`` after the GRU, biases on the
    projections with ``use_projection_bias``, and a (B, K) bool slot mask whose True slots get -inf logits in every
    head. ``forward`` returns the slots and the attention averaged over the heads (before the eps renormalisation).
    Its state_dict names the feature LayerNorm ``norm_input`` and the MLP ``ff_mlp``."""

    def __init__(self, dim, feature_dim, kvq_dim=None, n_heads=1, iters=3, eps=1e-8, ff_mlp=None,
                 use_projection_bias=False, use_implicit_differentiation=False):
        super().__init__()
        self.dim, self.n_heads, self.iters, self.eps = dim, n_heads, iters, eps
        self.kvq_dim = kvq_dim or dim
        self.dims_per_head = self.kvq_dim // n_heads
        self.scale = self.dims_per_head**-0.5
        self.use_implicit_differentiation = use_implicit_differentiation
        self.to_q = nn.Linear(dim, self.kvq_dim, bias=use_projection_bias)
        self.to_k = nn.Linear(feature_dim, self.kvq_dim, bias=use_projection_bias)
        self.to_v = nn.Linear(feature_dim, self.kvq_dim, bias=use_projection_bias)
        self.gru = nn.GRUCell(self.kvq_dim, dim)
        self.norm_input = nn.LayerNorm(feature_dim)
        self.norm_slots = nn.LayerNorm(dim)
        self.ff_mlp = ff_mlp

    def step(self, slots, k, v, masks=None):
        B, K, _ = slots.shape
        H, d = self.n_heads, self.dims_per_head
        q = self.to_q(self.norm_slots(slots)).view(B, K, H, d)
        logits = torch.einsum("bkhd,bnhd->bkhn", q, k) * self.scale
        if masks is not None:
            logits = logits.masked_fill(masks.view(B, K, 1, 1), float("-inf"))
        attn = logits.flatten(1, 2).softmax(dim=1).view(B, K, H, -1)  # over the slots and heads together
        weights = (attn + self.eps) / (attn + self.eps).sum(-1, keepdim=True)
        updates = torch.einsum("bnhd,bkhn->bkhd", v, weights)
        new = self.gru(updates.reshape(-1, self.kvq_dim), slots.reshape(-1, self.dim)).view(B, K, self.dim)
        return (new if self.ff_mlp is None else self.ff_mlp(new)), attn.mean(dim=2)

    def forward(self, inputs, conditioning, masks=None):
        B, N, _ = inputs.shape
        inputs = self.norm_input(inputs)
        k = self.to_k(inputs).view(B, N, self.n_heads, self.dims_per_head)
        v = self.to_v(inputs).view(B, N, self.n_heads, self.dims_per_head)
        slots = conditioning
        for _ in range(self.iters):
            slots, attn = self.step(slots, k, v, masks)
        if self.use_implicit_differentiation:
            slots, attn = self.step(slots.detach(), k, v, masks)
        return slots, attn
