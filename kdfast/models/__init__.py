"""Models kdfast ships so its recipes run without timm: a compact, timm-compatible Vision Transformer (plain ViT,
DINOv2 with LayerScale and registers, DeiT-distilled, class-token-free / average-pooled) that loads timm's
state_dicts with strict=True."""

from kdfast.models.vit import (
    Attention,
    Block,
    LayerScale,
    Mlp,
    PatchEmbed,
    VisionTransformer,
    VisionTransformerDistilled,
    deit_tiny_distilled_patch16_224,
    resample_pos_embed,
    vit_base_patch14_dinov2,
    vit_base_patch14_reg4_dinov2,
    vit_base_patch16_224,
    vit_small_patch14_dinov2,
    vit_small_patch14_reg4_dinov2,
    vit_tiny,
)

__all__ = [
    "Attention", "Block", "LayerScale", "Mlp", "PatchEmbed", "VisionTransformer", "VisionTransformerDistilled",
    "deit_tiny_distilled_patch16_224", "resample_pos_embed", "vit_base_patch14_dinov2", "vit_base_patch14_reg4_dinov2",
    "vit_base_patch16_224", "vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2", "vit_tiny",
]
