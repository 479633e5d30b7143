"""Drop-in modules built on kdfast.ops."""

from kdfast.nn.gini_kl import GiniKLLoss
from kdfast.nn.lora import LoRAAttention, LoRALinear
from kdfast.nn.lora_adapters import LoRALinearAdapters
from kdfast.nn.slot_attention import SlotAttention
from kdfast.nn.slot_contrastive_loss import SlotContrastLoss
from kdfast.nn.slot_match import SlotMatchLoss

__all__ = ["GiniKLLoss", "LoRAAttention", "LoRALinear", "LoRALinearAdapters", "SlotAttention", "SlotContrastLoss", "SlotMatchLoss"]
