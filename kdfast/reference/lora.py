r"""LoRA-augmented linear layers and attention (design.md 3.3; WeCoLoRA, PEFT semantics): a Linear with a LoRA
adapter, the per-slice LoRA on timm's fused qkv Linear, and timm ``Attention`` with LoRA on qkv and proj.

Notation: I input features, O output features, r LoRA rank, B batch, T tokens, C channels, H heads.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ._common import accumulator_dtype, promoted_dtype, upcast


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
    out = promoted_dtype(x, weight, bias, lora_a, lora_b)
    acc = accumulator_dtype(out)
    xa = upcast(x, acc)
    y = F.linear(xa, upcast(weight, acc), upcast(bias, acc))
    if lora_a is not None and lora_b is not None:
        xd = xa if dropout_mask is None else xa * upcast(dropout_mask, acc)
        y = y + scale * F.linear(F.linear(xd, upcast(lora_a, acc)), upcast(lora_b, acc))
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
    out = promoted_dtype(x, w_qkv, b_qkv, *lora_tensors)
    acc = accumulator_dtype(out)
    xa = upcast(x, acc)
    B, T, C = x.shape
    qkv = F.linear(xa, upcast(w_qkv, acc), upcast(b_qkv, acc))  # (B, T, 3C)
    parts = list(qkv.split(C, dim=-1))
    for i, pair in enumerate(loras):
        if pair is not None:
            a, b = pair
            parts[i] = parts[i] + scale * F.linear(F.linear(xa, upcast(a, acc)), upcast(b, acc))
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
    out = promoted_dtype(x, w_qkv, b_qkv, w_proj, b_proj, *lora_tensors)
    acc = accumulator_dtype(out)
    B, T, C = x.shape
    # Everything upcast once here: lora_qkv and lora_linear then compute and return in acc, so the attention
    # output is not rounded to a half dtype between the two.
    q, k, v = lora_qkv(
        upcast(x, acc), upcast(w_qkv, acc), upcast(b_qkv, acc),
        *[None if pair is None else tuple(upcast(t, acc) for t in pair) for pair in (lora_q, lora_k, lora_v)],
        scale, num_heads,
    )
    o = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, hd)
    o = o.transpose(1, 2).reshape(B, T, C)
    a_p, b_p = (None, None) if lora_proj is None else lora_proj
    y = lora_linear(o, upcast(w_proj, acc), upcast(b_proj, acc), upcast(a_p, acc), upcast(b_p, acc), scale)
    return y.to(out)
