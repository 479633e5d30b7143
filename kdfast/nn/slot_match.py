"""SlotMatch's distillation loss as a module."""

from __future__ import annotations

from torch import Tensor, nn

from kdfast.ops import slot_match_loss


class SlotMatchLoss(nn.Module):
    """``1 - cos`` between student slots and their matched teacher slots, averaged (SlotMatch).

    Args:
        matching: ``index`` (slot i with slot i) or ``hungarian`` (the pairing maximising total cosine).
        reduction: ``mean``, ``sum`` or ``none``.
        eps: norm clamp. backend: as in kdfast.ops (None: ``KDFAST_BACKEND``, default ``auto``).

    Shapes: student (B, K, D), teacher (B, M, D) -> scalar, or (B, K) with ``reduction="none"``. The teacher
    gets no gradient.
    """

    def __init__(self, matching: str = "index", reduction: str = "mean", eps: float = 1e-8, backend: str | None = None):
        super().__init__()
        self.matching, self.reduction, self.eps, self.backend = matching, reduction, eps, backend

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        return slot_match_loss(student, teacher, self.matching, self.reduction, self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        return f"matching={self.matching!r}, reduction={self.reduction!r}, eps={self.eps}"
