"""Drop-in modules built on kdfast.ops."""

from kdfast.nn.slot_match import SlotMatchLoss

__all__ = ["SlotMatchLoss"]
