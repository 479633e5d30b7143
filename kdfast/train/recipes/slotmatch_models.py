"""The slotmatch recipe's models: a CNN (or linear) encoder, slot attention frame by frame, an alpha-mask decoder.

Translation-invariant slots (Biza et al., "Invariant Slot Attention", 2023; the default): each slot carries, beside
its vector, a position and a scale (the mean and standard deviation of the token positions under its attention),
carried from frame to frame like the vector. Keys and values see the token grid only relative to the slot,
``k_ij = k_j + W_k phi((p_j - mu_i) / sigma_i)`` (``v_ij`` alike) with ``phi(r) = (r_y, r_x, r_y^2, r_x^2, r_y r_x)``,
and the decoder paints each slot's mask in the slot's own frame; the encoder has no absolute position. Because
``phi`` is quadratic in ``p_j``, ``q_i . k_ij`` is ``q'_i . k'_j`` for keys extended by the monomials
``(1, y, x, y^2, x^2, xy)`` of the token position and queries extended by their slot-dependent coefficients, and
the attention-weighted mean of ``v_ij`` follows from the weighted mean of the values extended by the same
monomials: every iteration is one call of :func:`kdfast.ops.slot_attention_core` on the extended tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdfast import ops
from kdfast.nn import SlotAttention

# The first frame's slots start at random positions, this wide (frame coordinates span [-1, 1]). Invariant Slot
# Attention starts them at 0.1; 0.3 scored 0.670 against 0.637 (attention FG-ARI, one teacher seed each).
INITIAL_SCALE = 0.3


def positions(h: int, w: int) -> Tensor:
    """(h * w, 2) float32 token-centre positions (y, x) in [-1, 1], row-major."""
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h * 2 - 1
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w * 2 - 1
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([y, x], -1).view(-1, 2)


def token_shape(num_tokens: int) -> tuple[int, int]:
    """The token grid (h, w): square when ``num_tokens`` is a square, else one row."""
    side = round(num_tokens**0.5)
    return (side, side) if side * side == num_tokens else (1, num_tokens)


def relative(points: Tensor, pos: Tensor, scale: Tensor) -> Tensor:
    """phi of the points (P, 2) in each slot's frame (B, K, 2 each) -> (B, K, P, 5)."""
    r = (points[None, None] - pos[:, :, None]) / scale[:, :, None]
    ry, rx = r.unbind(-1)
    return torch.stack([ry, rx, ry * ry, rx * rx, ry * rx], -1)


def _products() -> Tensor:
    """(81, 30) 0/1: the outer product of three affine forms in (y, x) (index (i, j, u, v): form i's coefficient u
    times form j's coefficient v, u and v over (1, y, x)) -> the rows (1 r_y, 1 r_x, r_y^2, r_x^2, r_y r_x) of phi
    on the monomials (1, y, x, y^2, x^2, xy)."""
    rows = {(0, 1): 0, (0, 2): 1, (1, 1): 2, (2, 2): 3, (1, 2): 4}
    monomial = {(0, 0): 0, (0, 1): 1, (1, 0): 1, (0, 2): 2, (2, 0): 2, (1, 1): 3, (2, 2): 4, (1, 2): 5, (2, 1): 5}
    products = torch.zeros(3, 3, 3, 3, 5, 6)
    for (i, j), row in rows.items():
        for (u, v), m in monomial.items():
            products[i, j, u, v, row, m] = 1.0
    return products.view(81, 30)


class Encoder(nn.Module):
    """Frames (B, T, 3, H, W) -> tokens (B, T, N, C): 3x3 convolutions (the first strided by ``patch``) and an MLP,
    plus a learned embedding of the absolute position unless ``absolute_position`` is False. Precomputed features
    (B, T, N, C_in) -> a linear map instead of the convolutions."""

    def __init__(self, channels: int, patch: int, num_tokens: int, feature_dim: int | None = None,
                 absolute_position: bool = True):
        super().__init__()
        if feature_dim is None:
            self.conv = nn.Sequential(nn.Conv2d(3, channels, 3, patch, 1), nn.ReLU(),
                                      nn.Conv2d(channels, channels, 3, 1, 1), nn.ReLU(),
                                      nn.Conv2d(channels, channels, 3, 1, 1), nn.ReLU())
        else:
            self.conv = nn.Linear(feature_dim, channels)
        self.register_buffer("grid", positions(*token_shape(num_tokens)), persistent=False)
        self.pos = nn.Linear(2, channels) if absolute_position else None
        self.mlp = nn.Sequential(nn.LayerNorm(channels), nn.Linear(channels, channels), nn.ReLU(),
                                 nn.Linear(channels, channels))
        self.channels = channels

    def forward(self, inputs: Tensor) -> Tensor:
        b, t = inputs.shape[:2]
        if isinstance(self.conv, nn.Linear):
            tokens = self.conv(inputs)
        else:
            tokens = self.conv(inputs.flatten(0, 1)).flatten(2).transpose(1, 2).reshape(b, t, -1, self.channels)
        return self.mlp(tokens if self.pos is None else tokens + self.pos(self.grid))


class InvariantGrouper(nn.Module):
    """Slot attention with translation-invariant slots on :func:`kdfast.ops.slot_attention_core`.

    The iteration's layers are a :class:`kdfast.nn.SlotAttention`'s (``to_q/k/v``, ``gru``, ``mlp``, the norms),
    plus ``rel_k``/``rel_v`` (5 -> slot_dim, the relative-position terms). ``grad_last_only``: the first
    ``n_iters - 1`` iterations run without autograd (implicit differentiation).

    forward: slots (B, K, D), positions and scales (B, K, 2), features (B, N, C) -> ``{"slots", "positions",
    "scales"}`` and ``"masks"`` (B, K, N), the last iteration's attention (softmax over slots).
    """

    def __init__(self, inp_dim: int, slot_dim: int, hidden: int, num_tokens: int, grad_last_only: bool = True,
                 min_scale: float | None = None):
        super().__init__()
        self.layers = SlotAttention(inp_dim, slot_dim, hidden_dim=hidden)
        self.rel_k = nn.Linear(5, slot_dim, bias=False)
        self.rel_v = nn.Linear(5, slot_dim, bias=False)
        h, w = token_shape(num_tokens)
        grid = positions(h, w)
        y, x = grid.unbind(-1)
        self.register_buffer("monomials", torch.stack([torch.ones_like(y), y, x, y * y, x * x, y * x], -1),
                             persistent=False)  # (N, 6)
        unit_form = torch.zeros(3, 3)
        unit_form[0, 0] = 1.0
        self.register_buffer("unit_form", unit_form, persistent=False)
        self.register_buffer("products", _products(), persistent=False)
        # A slot narrower than one token is not resolvable; the floor also bounds the 1 / scale^2 of the keys.
        self.min_scale = 1.0 / max(h, w) if min_scale is None else min_scale
        self.grad_last_only = grad_last_only

    def frame_maps(self, pos: Tensor, scale: Tensor) -> Tensor:
        """(B, K, 5, 6): each slot's phi((p - mu) / sigma) as a matrix on the monomials (1, y, x, y^2, x^2, xy) of p.

        r_y and r_x are affine forms in (1, y, x); with the constant form 1 they make three forms, and the rows of
        phi are products of two of them (1 r_y, 1 r_x, r_y r_y, r_x r_x, r_y r_x): one outer product of the forms
        and one fixed 0/1 matrix (``products``) that sorts its terms into rows and monomials. A dozen small ops per
        iteration instead of the sixty that the same algebra took written out term by term (this loop is bound
        by its op count on a CPU)."""
        inv = scale.reciprocal()
        forms = torch.cat([(-pos * inv)[..., None], torch.diag_embed(inv)], -1)  # (B, K, 2, 3): r_y, r_x
        forms = F.pad(forms, (0, 0, 1, 0)) + self.unit_form  # (B, K, 3, 3): 1, r_y, r_x
        outer = forms[..., :, None, :, None] * forms[..., None, :, None, :]  # (B, K, 3, 3, 3, 3): (i, j, u, v)
        return (outer.flatten(-4) @ self.products).unflatten(-1, (5, 6))

    def step(self, slots, pos, scale, keys, values):
        layers = self.layers
        normed = layers.norm_slots(slots)
        q = layers.to_q(normed) * layers.scale
        maps = self.frame_maps(pos, scale)  # (B, K, 5, 6)
        # q . W_k phi(r_ij) = (W_k^T q)^T maps_i mono_j: the query's coefficients on the keys' monomials.
        coefficients = ((q @ self.rel_k.weight)[..., None, :] @ maps).squeeze(-2)
        updates, attn = ops.slot_attention_core(torch.cat([q, coefficients], -1), keys, values, scale=1.0,
                                                eps=layers.eps)
        d = q.shape[-1]
        moments = updates[..., d:]  # attention-weighted means of (y, x, y^2, x^2, xy)
        mean_phi = (maps[..., 1:] @ moments[..., None]).squeeze(-1) + maps[..., 0]  # the weighted mean of phi
        update = updates[..., :d] + self.rel_v(mean_phi)
        new = layers.gru(update.flatten(0, 1), normed.flatten(0, 1)).unflatten(0, slots.shape[:2])
        new = layers.mlp(new)
        new_pos = moments[..., :2]
        variance = moments[..., 2:4] - new_pos.square()
        new_scale = variance.clamp_min(self.min_scale**2).sqrt()
        return new, new_pos, new_scale, attn

    def forward(self, slots: Tensor, pos: Tensor, scale: Tensor, features: Tensor, n_iters: int) -> dict[str, Tensor]:
        layers = self.layers
        features = layers.norm_features(features)
        b = features.shape[0]
        mono = self.monomials.to(features.dtype).expand(b, -1, -1)
        keys = torch.cat([layers.to_k(features), mono], -1)
        values = torch.cat([layers.to_v(features), mono[..., 1:]], -1)
        for i in range(n_iters):
            last = i == n_iters - 1
            if self.grad_last_only and not last:
                with torch.no_grad():
                    slots, pos, scale, attn = self.step(slots, pos, scale, keys, values)
                continue
            if self.grad_last_only:
                slots, pos, scale = slots.detach(), pos.detach(), scale.detach()
            slots, pos, scale, attn = self.step(slots, pos, scale, keys, values)
        return {"slots": slots, "positions": pos, "scales": scale, "masks": attn}


class Decoder(nn.Module):
    """Slots (B, K, D) -> alpha masks (B, K, G, G) (a broadcast MLP, softmax over slots) and one target vector
    per slot (B, K, C): the colour (or feature) each slot paints. With positions and scales (B, K, 2) the grid is
    seen in each slot's frame (phi of the relative position), else absolutely."""

    def __init__(self, slot_dim: int, hidden: int, grid: tuple[int, int], out_dim: int, invariant: bool):
        super().__init__()
        self.grid_shape = grid
        self.register_buffer("grid", positions(*grid), persistent=False)
        self.pos = nn.Linear(5 if invariant else 2, slot_dim)
        self.alpha = nn.Sequential(nn.Linear(slot_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                   nn.Linear(hidden, 1))
        self.paint = nn.Sequential(nn.Linear(slot_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))

    def forward(self, slots: Tensor, pos: Tensor | None = None, scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
        where = self.grid if pos is None else relative(self.grid, pos, scale)
        logits = self.alpha(slots[:, :, None] + self.pos(where)).squeeze(-1)  # (B, K, G*G)
        return logits.softmax(1).unflatten(2, self.grid_shape), self.paint(slots)


def paint(masks: Tensor, colours: Tensor, size: tuple[int, int]) -> Tensor:
    """Soft masks (B, K, h, w) upsampled bilinearly to ``size``, each painted with its slot's vector (B, K, C)
    -> (B, C, H, W)."""
    up = F.interpolate(masks, size=size, mode="bilinear", align_corners=False)
    return torch.einsum("bkhw,bkc->bchw", up, colours)


class SlotVideoModel(nn.Module):
    """Frames (B, T, 3, H, W) or features (B, T, N, C) -> ``slots`` (B, T, K, D), the grouper's ``attention``
    masks (B, T, K, h, w), the decoder's ``masks`` (B, T, K, G, G), each slot's ``colours`` (B, T, K, out_dim) and,
    with invariant slots, ``positions`` and ``scales`` (B, T, K, 2)."""

    def __init__(self, num_tokens: int, out_dim: int, num_slots: int, channels: int, slot_dim: int, hidden: int,
                 decoder_grid: int, iters: tuple[int, int], patch: int = 2, feature_dim: int | None = None,
                 predictor: bool = False, invariant: bool = True):
        super().__init__()
        self.num_slots, self.iters, self.invariant = num_slots, iters, invariant
        self.token_shape = token_shape(num_tokens)
        self.encoder = Encoder(channels, patch, num_tokens, feature_dim, absolute_position=not invariant)
        self.slots_mu = nn.Parameter(torch.randn(1, 1, slot_dim) * slot_dim**-0.5)
        self.slots_log_sigma = nn.Parameter(torch.full((1, 1, slot_dim), -1.0))
        if invariant:
            self.grouper = InvariantGrouper(channels, slot_dim, hidden, num_tokens)
        else:
            self.grouper = SlotAttention(channels, slot_dim, hidden_dim=hidden, n_iters=iters[0], grad_last_only=True)
        self.predictor = (nn.TransformerEncoderLayer(slot_dim, 2 if slot_dim % 2 == 0 else 1, 2 * slot_dim,
                                                     dropout=0.0, batch_first=True, norm_first=True)
                          if predictor else None)
        grid = (decoder_grid, decoder_grid) if feature_dim is None else self.token_shape
        self.decoder = Decoder(slot_dim, hidden, grid, out_dim, invariant)

    def forward(self, inputs: Tensor, iters: tuple[int, int] | None = None, decode: bool = True) -> dict[str, Tensor]:
        """``decode=False`` skips the decoder (no ``masks``, ``colours``): a teacher's slots and attention for a
        student cost a fifth of the whole forward (the broadcast decoder is most of it)."""
        first, later = iters or self.iters
        tokens = self.encoder(inputs)
        b, t = tokens.shape[:2]
        noise = torch.randn(b, self.num_slots, self.slots_mu.shape[-1], device=tokens.device, dtype=tokens.dtype)
        slots = self.slots_mu + self.slots_log_sigma.exp() * noise
        pos = torch.rand(b, self.num_slots, 2, device=tokens.device, dtype=tokens.dtype) * 2 - 1
        scale = torch.full_like(pos, INITIAL_SCALE)
        keys = ("slots", "masks", "positions", "scales") if self.invariant else ("slots", "masks")
        frames: dict[str, list[Tensor]] = {k: [] for k in keys}
        for frame in range(t):
            n_iters = first if frame == 0 else later
            if self.invariant:
                grouped = self.grouper(slots, pos, scale, tokens[:, frame], n_iters)
                pos, scale = grouped["positions"], grouped["scales"]
            else:
                grouped = self.grouper(slots, tokens[:, frame], n_iters=n_iters)
            for k in keys:
                frames[k].append(grouped[k])
            slots = grouped["slots"] if self.predictor is None else self.predictor(grouped["slots"])
        out = {k: torch.stack(v, 1) for k, v in frames.items()}
        out["attention"] = out.pop("masks").unflatten(-1, self.token_shape)
        if decode:
            flat = [out[k].flatten(0, 1) for k in ("slots", "positions", "scales") if k in out]
            masks, colours = self.decoder(*flat)
            out["masks"], out["colours"] = masks.unflatten(0, (b, t)), colours.unflatten(0, (b, t))
        return out
