"""Models kdfast ships so its recipes run without timm: a compact, timm-compatible Vision Transformer."""

from kdfast.models.vit import Attention, Block, Mlp, PatchEmbed, VisionTransformer, vit_base_patch16_224, vit_tiny

__all__ = ["Attention", "Block", "Mlp", "PatchEmbed", "VisionTransformer", "vit_base_patch16_224", "vit_tiny"]
