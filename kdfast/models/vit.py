"""A compact Vision Transformer with timm's module names, so timm ``vit_*`` checkpoints load unchanged.

The structure and parameter names follow timm's ``VisionTransformer`` with its defaults (class token, learned
position embedding that covers the class token, pre-norm blocks, LayerNorm eps 1e-6, exact GELU, no layer scale,
token pooling)::

    patch_embed.proj        Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
    cls_token, pos_embed    (1, 1, C), (1, 1 + N, C)
    blocks[i].norm1         LayerNorm
    blocks[i].attn.qkv      Linear(C, 3C)     blocks[i].attn.proj   Linear(C, C)
    blocks[i].norm2         LayerNorm
    blocks[i].mlp.fc1       Linear(C, 4C)     blocks[i].mlp.fc2     Linear(4C, C)
    norm                    LayerNorm         head                  Linear(C, num_classes)

Dropout, drop path, layer scale and the other timm options are left out: the distillation recipes do not use
them, and none of them has parameters in the default ``vit_*`` checkpoints.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: LayerNorm eps of timm's ViTs (``partial(nn.LayerNorm, eps=1e-6)``).
LAYER_NORM_EPS = 1e-6


class PatchEmbed(nn.Module):
    """Image (B, in_chans, H, W) -> patch tokens (B, N, embed_dim), N = (H / patch) * (W / patch)."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size ({img_size}) must be a multiple of patch_size ({patch_size})")
        self.img_size, self.patch_size = (img_size, img_size), (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or tuple(x.shape[2:]) != self.img_size or x.shape[1] != self.proj.in_channels:
            expected = (self.proj.in_channels, *self.img_size)
            raise ValueError(f"images must have shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """timm's multi-head self-attention: fused qkv Linear, SDPA, output projection. (B, T, C) -> (B, T, C)."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, proj_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, T, C))


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2."""

    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT classifier with timm's ``VisionTransformer`` parameter names (see the module docstring).

    Args:
        img_size, patch_size, in_chans: input images are (B, in_chans, img_size, img_size).
        num_classes: size of the head; 0 makes the head an identity (features only).
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: the transformer.

    ``forward(images)`` -> logits (B, num_classes) from the class token; ``forward_features`` -> tokens after the
    final norm (B, 1 + N, C); ``forward_blocks`` -> the last block's output before the final norm (B, 1 + N, C),
    the WeCoLoRA distillation target.
    """

    num_prefix_tokens = 1

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.embed_dim = self.num_features = embed_dim
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.patch_embed.num_patches, embed_dim))
        self.blocks = nn.Sequential(*(Block(embed_dim, num_heads, mlp_ratio, qkv_bias) for _ in range(depth)))
        self.norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """timm's default init: truncated normal (std 0.02) Linear weights and position embedding, zero biases."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def embed(self, images: Tensor) -> Tensor:
        """Patch tokens with the class token prepended and the position embedding added: (B, 1 + N, C)."""
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.pos_embed

    def forward_blocks(self, images: Tensor) -> Tensor:
        """The last block's output before the final norm, (B, 1 + N, C)."""
        return self.blocks(self.embed(images))

    def forward_features(self, images: Tensor) -> Tensor:
        """All tokens after the final norm, (B, 1 + N, C)."""
        return self.norm(self.forward_blocks(images))

    def forward_head(self, features: Tensor, pre_logits: bool = False) -> Tensor:
        """Class-token features (B, C) when ``pre_logits``, else logits (B, num_classes)."""
        x = features[:, 0]
        return x if pre_logits else self.head(x)

    def forward(self, images: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(images))


def vit_base_patch16_224(**kwargs) -> VisionTransformer:
    """ViT-B/16 at 224 (timm ``vit_base_patch16_224``): C=768, 12 blocks, 12 heads, 197 tokens."""
    return VisionTransformer(**{"patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12, **kwargs})


def vit_tiny(**kwargs) -> VisionTransformer:
    """A ViT small enough for CPU tests and synthetic recipes (timm ``vit_tiny_patch16_224`` widths at 32 pixels
    by default: C=192, 12 blocks, 3 heads, 4x4 patches of 8 pixels)."""
    defaults = {"img_size": 32, "patch_size": 8, "embed_dim": 192, "depth": 12, "num_heads": 3, "num_classes": 10}
    return VisionTransformer(**{**defaults, **kwargs})
