"""SlotContrast's slot-slot contrastive loss as a module."""

from __future__ import annotations

from torch import Tensor, nn

from kdfast.ops import slot_contrastive_loss


class SlotContrastLoss(nn.Module):
    """InfoNCE between the slots of consecutive frames (SlotContrast's temporal slot contrast).

    For each pair of frames (t, t+1) and each slot j at t+1, a softmax over the slots i at t of
    ``<normalize(s_t^i), normalize(s_{t+1}^j)> / temperature`` whose positive is slot j itself; the negatives
    are the other slots of the batch (``batch_contrast``, SlotContrast's default) or of the same clip.

    Args:
        temperature: finite and positive (SlotContrast: 0.1).
        batch_contrast: pool the slots of the whole batch as negatives.
        reduction: ``mean``, ``sum`` or ``none``.
        backend: as in kdfast.ops (None: ``KDFAST_BACKEND``, default ``auto``).

    Shapes: slots (B, T, K, D) -> scalar, or per term (T-1, B*K) with batch_contrast, else (T-1, B, K), with
    ``reduction="none"``. T == 1 gives 0 with a zero gradient.
    """

    def __init__(
        self, temperature: float = 0.1, batch_contrast: bool = True, reduction: str = "mean", backend: str | None = None
    ):
        super().__init__()
        self.temperature, self.batch_contrast, self.reduction, self.backend = temperature, batch_contrast, reduction, backend

    def forward(self, slots: Tensor) -> Tensor:
        return slot_contrastive_loss(slots, self.temperature, self.batch_contrast, self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, batch_contrast={self.batch_contrast}, reduction={self.reduction!r}"
