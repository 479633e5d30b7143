"""Multi-head slot attention and slot masks (OCLF's SlotAttention) on any single-head core, by an exact rewrite.

OCLF splits q (B, K, Dq), k (B, N, Dq) and v (B, N, Dv) into H heads of Dq / H and Dv / H features and takes ONE
softmax per token over all K x H (slot, head) pairs; a masked slot's logits are -inf in every head, so its
attention is exactly 0 and it takes no part in the competition (its update, the eps-weighted mean, is the plain mean
of the values, as in OCLF). The masks returned are the attention averaged over the heads.

Every (slot, head) pair is a virtual slot of the single-head core over K * H slots (row i * H + h):
  - its query is q_ih in head h's columns and zero elsewhere, so <q'_(i,h), k_n> = <q_ih, k_nh> exactly;
  - with a mask, the queries get one more column, 0 or -MASKED, against a column of ones in the keys: a masked
    slot's logits are -MASKED * scale below every other's, so exp gives exactly 0 (as -inf would), its logit
    gradient is exactly 0 (it is A * (...)), and 0 * -MASKED stays finite in the key gradient's extra column;
  - the updates of virtual slot (i, h) are head h's columns of its row.
So every backend's core (cpp, Triton, reference) runs the option unchanged, values and gradients exact. The price:
the core does H times the products of a native multi-head kernel (the zero columns), and a mask adds one key
column (on Triton a power-of-two Dq pads to twice the width). n_heads = 1 without a mask never comes here.
"""

from __future__ import annotations

import torch
from torch import Tensor


def check(n_heads, slot_mask, B: int, K: int, Dq: int, Dv: int, device: torch.device) -> None:
    """n_heads divides Dq and Dv; slot_mask is None or a (B, K) bool tensor on ``device`` leaving a slot per element."""
    if isinstance(n_heads, bool) or not isinstance(n_heads, int) or n_heads < 1:
        raise ValueError(f"n_heads must be an integer >= 1, got {n_heads!r}")
    if Dq % n_heads or Dv % n_heads:
        raise ValueError(f"n_heads={n_heads} must divide the query/key width Dq={Dq} and the value width Dv={Dv}")
    if slot_mask is None:
        return
    if not isinstance(slot_mask, Tensor) or slot_mask.dtype != torch.bool:
        raise TypeError(f"slot_mask must be a bool tensor (B, K) = ({B}, {K}), True for slots left out; got "
                        f"{slot_mask.dtype if isinstance(slot_mask, Tensor) else type(slot_mask).__name__}")
    if tuple(slot_mask.shape) != (B, K):
        raise ValueError(f"slot_mask must have shape (B, K) = ({B}, {K}), got {tuple(slot_mask.shape)}")
    if slot_mask.device != device:
        raise ValueError(f"slot_mask must be on {device} like the slots, got {slot_mask.device}")
    if not torch.compiler.is_compiling() and bool(slot_mask.all(dim=1).any()):  # one host sync for a clear error
        empty = slot_mask.all(dim=1).nonzero().flatten().tolist()
        raise ValueError(f"slot_mask leaves no slot for batch element(s) {empty[:8]}: every token would attend to "
                         "nothing (at least one slot per element must be False)")


def virtual_sizes(K: int, Dq: int, n_heads: int, masked: bool) -> tuple[int, int]:
    """(slots, query width) the single-head core sees: the sizes a backend's limits are checked against."""
    return K * n_heads, Dq + int(masked)


def keys(k: Tensor, masked: bool) -> Tensor:
    """k (B, N, Dq) with a column of ones where a mask is given (computed once per forward)."""
    return torch.cat([k, k.new_ones(*k.shape[:2], 1)], dim=-1) if masked else k


def queries(q: Tensor, n_heads: int, slot_mask: Tensor | None) -> Tensor:
    """q (B, K, Dq) -> (B, K * n_heads, Dq [+ 1]): each head's query in its own columns, then the mask column."""
    B, K, Dq = q.shape
    if n_heads > 1:
        blocks = torch.eye(n_heads, dtype=q.dtype, device=q.device).view(1, 1, n_heads, n_heads, 1)
        q = (q.view(B, K, 1, n_heads, Dq // n_heads) * blocks).reshape(B, K * n_heads, Dq)
    if slot_mask is None:
        return q
    # a quarter of the largest finite value: scale * (q.k - MASKED) stays far below every unmasked logit
    masked = slot_mask.repeat_interleave(n_heads, dim=1).unsqueeze(-1)
    column = masked.to(q.dtype) * (-torch.finfo(q.dtype).max / 4)
    return torch.cat([q, column], dim=-1)


def collapse(updates: Tensor, attn: Tensor | None, n_heads: int) -> tuple[Tensor, Tensor | None]:
    """The core's (B, K * H, Dv) updates and (B, K * H, N) attention -> OCLF's (B, K, Dv) and head-averaged (B, K, N)."""
    if n_heads == 1:
        return updates, attn
    B, KH, Dv = updates.shape
    K = KH // n_heads
    own = updates.view(B, K, n_heads, n_heads, Dv // n_heads).diagonal(dim1=2, dim2=3)  # (B, K, Dv / H, H)
    updates = own.movedim(-1, 2).reshape(B, K, Dv)
    if attn is not None:
        attn = attn.view(B, K, n_heads, attn.shape[-1]).mean(2)
    return updates, attn
