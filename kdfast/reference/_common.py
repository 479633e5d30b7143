"""What more than one op family of the reference uses: the accumulator-dtype rule, the eps-safe normalisation
and the loss reduction.

The dtype rule (design.md section 3): every reduction accumulates in float32, float64 for float64 inputs. A
reference function upcasts its inputs to :func:`accumulator_dtype` of their :func:`promoted_dtype`, computes
there, and casts its results back to the promoted dtype once, at the end.
"""

from __future__ import annotations

import torch


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype reductions accumulate in: float64 for float64 inputs, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def promoted_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """Promoted dtype of the given (non-None) tensors: the dtype results are cast back to."""
    dtype = None
    for t in tensors:
        if t is None:
            continue
        dtype = t.dtype if dtype is None else torch.promote_types(dtype, t.dtype)
    return dtype


def upcast(x: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``x`` in ``dtype`` (the tensor itself when it already is; None stays None)."""
    return None if x is None else x.to(dtype)


def normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / max(||x||_2, eps)`` over the last axis (a zero vector maps to zero, NaN propagates)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def reduce_terms(x: torch.Tensor, reduction: str) -> torch.Tensor:
    """A loss's per-term tensor reduced: "mean" | "sum" over all terms, or "none" (``x`` itself).

    Raises ValueError for any other ``reduction``.
    """
    if reduction == "mean":
        # an empty set of terms has mean 0 (still connected to the graph: zero gradient)
        return x.sum() / max(x.numel(), 1)
    if reduction == "sum":
        return x.sum()
    if reduction == "none":
        return x
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
