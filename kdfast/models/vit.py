"""A compact Vision Transformer with timm's module names, so timm ``vit_*`` checkpoints load unchanged.

The structure and parameter names follow timm's ``VisionTransformer`` (pre-norm blocks, LayerNorm eps 1e-6, exact
GELU)::

    patch_embed.proj        Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
    cls_token               (1, 1, C)            absent with class_token=False
    reg_token               (1, R, C)            DINOv2's register tokens (reg_tokens=R > 0)
    pos_embed               (1, P + N, C)        P = the prefix tokens it covers: all of them, or none with
                                                 no_embed_class=True (then it is added before they are prepended)
    blocks[i].norm1         LayerNorm
    blocks[i].attn.qkv      Linear(C, 3C)     blocks[i].attn.proj   Linear(C, C)
    blocks[i].ls1.gamma     (C,)                 LayerScale (init_values set; DINOv2), also ls2 after the MLP
    blocks[i].norm2         LayerNorm
    blocks[i].mlp.fc1       Linear(C, 4C)     blocks[i].mlp.fc2     Linear(4C, C)
    norm                    LayerNorm            an identity when pooling is "avg" (then fc_norm normalises)
    fc_norm                 LayerNorm            the pooled features' norm ("avg" pooling)
    head                    Linear(C, num_classes)

``VisionTransformerDistilled`` adds DeiT's ``dist_token`` and ``head_dist``. Position embeddings are resampled
as timm does (bicubic with antialiasing, in float32) for other image sizes: per forward with
``dynamic_img_size=True``, and when a state_dict of another grid is loaded. Dropout, drop path and timm's other
options are left out: the distillation recipes do not use them, and none has parameters.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: LayerNorm eps of timm's ViTs (``partial(nn.LayerNorm, eps=1e-6)``).
LAYER_NORM_EPS = 1e-6

#: Pooling of ``forward_head``: the class token, the mean of the patch tokens, or none (all tokens).
GLOBAL_POOLS = ("token", "avg", "")


def resample_pos_embed(
    pos_embed: Tensor, new_grid: tuple[int, int], old_grid: tuple[int, int] | None = None, num_prefix_tokens: int = 1
) -> Tensor:
    """timm's position-embedding resampling: the grid part bicubically interpolated (antialiased, computed in
    float32 as timm computes it) to ``new_grid``; the first ``num_prefix_tokens`` entries kept.

    Shapes: pos_embed (1, P + gh * gw, C) -> (1, P + new_grid[0] * new_grid[1], C). ``old_grid`` None: square.
    """
    num_grid = pos_embed.shape[1] - num_prefix_tokens
    if old_grid is None:
        side = math.isqrt(num_grid)
        if side * side != num_grid:
            raise ValueError(f"pos_embed has {num_grid} grid positions, not a square grid: pass old_grid")
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != num_grid:
        raise ValueError(f"pos_embed has {num_grid} grid positions, not old_grid {tuple(old_grid)}")
    if tuple(new_grid) == tuple(old_grid):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    C = pos_embed.shape[-1]
    grid = grid.float().reshape(1, *old_grid, C).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", antialias=True)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, C).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


class PatchEmbed(nn.Module):
    """Image (B, in_chans, H, W) -> patch tokens (B, gh, gw, embed_dim), gh = H / patch, gw = W / patch.

    ``strict_img_size``: H and W must be ``img_size`` (else any multiples of the patch size)."""

    def __init__(
        self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
        strict_img_size: bool = True,
    ):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size ({img_size}) must be a multiple of patch_size ({patch_size})")
        self.img_size, self.patch_size = (img_size, img_size), (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.strict_img_size = strict_img_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        channels, patch = self.proj.in_channels, self.patch_size[0]
        if self.strict_img_size:
            if x.dim() != 4 or tuple(x.shape[2:]) != self.img_size or x.shape[1] != channels:
                expected = (channels, *self.img_size)
                raise ValueError(f"images must have shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        elif x.dim() != 4 or x.shape[1] != channels or x.shape[2] % patch or x.shape[3] % patch:
            raise ValueError(
                f"images must have shape (B, {channels}, H, W) with H and W multiples of {patch}, got {tuple(x.shape)}"
            )
        return self.proj(x).permute(0, 2, 3, 1)


class Attention(nn.Module):
    """timm's multi-head self-attention: fused qkv Linear, SDPA, output projection. (B, T, C) -> (B, T, C).

    ``attn_mask`` (broadcastable to (B, H, T, T); boolean: True attends) and ``is_causal`` go to SDPA, as in timm."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, proj_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
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


class LayerScale(nn.Module):
    """``x * gamma``, a learned per-channel scale (CaiT, DINOv2). x (..., C) -> (..., C)."""

    def __init__(self, dim: int, init_values: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block: ``x + ls1(attn(norm1(x)))``, then ``x + ls2(mlp(norm2(x)))``; ls1 and ls2
    are LayerScale with ``init_values`` set, else identities (no parameters)."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, init_values: float | None = None
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.ls1 = LayerScale(dim, init_values) if init_values is not None else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values) if init_values is not None else nn.Identity()

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal))
        return x + self.ls2(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """ViT with timm's ``VisionTransformer`` parameter names and options (see the module docstring).

    Args:
        img_size, patch_size, in_chans: input images are (B, in_chans, img_size, img_size).
        num_classes: size of the head; 0 makes the head an identity (features only).
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: the transformer.
        init_values: LayerScale's initial gamma in every block (None: no LayerScale).
        class_token: prepend a class token. reg_tokens: number R of register tokens after it (DINOv2).
        no_embed_class: the position embedding covers the patch tokens only.
        global_pool: ``token`` (the class token), ``avg`` (mean of the patch tokens) or ``""`` (none).
        fc_norm: normalise the pooled features instead of the tokens (None: for ``avg`` pooling, as timm).
        dynamic_img_size: take images of any size that is a multiple of the patch (position embedding resampled).

    ``forward(images)`` -> logits (B, num_classes); ``forward_features`` -> tokens after the final norm
    (B, P + N, C), P = ``num_prefix_tokens``; ``forward_blocks`` -> the last block's output before the final norm
    (B, P + N, C), the WeCoLoRA distillation target.
    """

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
        init_values: float | None = None,
        class_token: bool = True,
        reg_tokens: int = 0,
        no_embed_class: bool = False,
        global_pool: str = "token",
        fc_norm: bool | None = None,
        dynamic_img_size: bool = False,
    ):
        super().__init__()
        if global_pool not in GLOBAL_POOLS:
            raise ValueError(f"global_pool must be one of {GLOBAL_POOLS}, got {global_pool!r}")
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool='token' reads the class token: class_token=False needs 'avg' or ''")
        if isinstance(reg_tokens, bool) or not isinstance(reg_tokens, int) or reg_tokens < 0:
            raise ValueError(f"reg_tokens must be an integer >= 0, got {reg_tokens!r}")
        self.num_classes, self.global_pool = num_classes, global_pool
        self.embed_dim = self.num_features = embed_dim
        self.num_reg_tokens, self.no_embed_class, self.dynamic_img_size = reg_tokens, no_embed_class, dynamic_img_size
        self.num_prefix_tokens = int(class_token) + reg_tokens
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, strict_img_size=not dynamic_img_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None
        covered = 0 if no_embed_class else self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, covered + self.patch_embed.num_patches, embed_dim))
        blocks = (Block(embed_dim, num_heads, mlp_ratio, qkv_bias, init_values) for _ in range(depth))
        self.blocks = nn.Sequential(*blocks)
        use_fc_norm = global_pool == "avg" if fc_norm is None else fc_norm
        self.norm = nn.Identity() if use_fc_norm else nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        self.fc_norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS) if use_fc_norm else nn.Identity()
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """timm's default init: truncated normal (std 0.02) Linear weights and position embedding, zero biases."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for token in (self.cls_token, self.reg_token):
            if token is not None:
                nn.init.normal_(token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def prefix_tokens(self, batch: int) -> list[Tensor]:
        """The tokens before the patches, each (B, n, C): class token, then registers."""
        return [t.expand(batch, -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]

    def embed(self, images: Tensor) -> Tensor:
        """Patch tokens with the prefix tokens prepended and the position embedding added: (B, P + N, C)."""
        x = self.patch_embed(images)
        B, gh, gw, C = x.shape
        x = x.reshape(B, gh * gw, C)
        covered = 0 if self.no_embed_class else self.num_prefix_tokens
        pos_embed = resample_pos_embed(self.pos_embed, (gh, gw), self.patch_embed.grid_size, covered)
        prefix = self.prefix_tokens(B)
        if self.no_embed_class:
            return torch.cat([*prefix, x + pos_embed], dim=1)
        return torch.cat([*prefix, x], dim=1) + pos_embed

    def forward_blocks(self, images: Tensor) -> Tensor:
        """The last block's output before the final norm, (B, P + N, C)."""
        return self.blocks(self.embed(images))

    def forward_features(self, images: Tensor) -> Tensor:
        """All tokens after the final norm, (B, P + N, C)."""
        return self.norm(self.forward_blocks(images))

    def pool(self, features: Tensor) -> Tensor:
        """(B, P + N, C) -> (B, C): the class token or the patch tokens' mean; unchanged with no pooling."""
        if self.global_pool == "token":
            return features[:, 0]
        if self.global_pool == "avg":
            return features[:, self.num_prefix_tokens:].mean(dim=1)
        return features

    def forward_head(self, features: Tensor, pre_logits: bool = False) -> Tensor:
        """Pooled, normalised features (B, C) when ``pre_logits``, else logits (B, num_classes)."""
        x = self.fc_norm(self.pool(features))
        return x if pre_logits else self.head(x)

    def forward(self, images: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(images))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint of another image size (DINOv2's 518 pixels into a 224 model): resample its position
        # embedding to this model's grid, as timm does when it loads pretrained weights.
        key = f"{prefix}pos_embed"
        theirs = state_dict.get(key)
        if isinstance(theirs, Tensor) and theirs.dim() == 3 and theirs.shape[1] != self.pos_embed.shape[1]:
            covered = 0 if self.no_embed_class else self.num_prefix_tokens
            state_dict[key] = resample_pos_embed(theirs, self.patch_embed.grid_size, None, covered)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class VisionTransformerDistilled(VisionTransformer):
    """DeiT's distilled ViT (timm ``deit_*_distilled_*``): a distillation token after the class token, covered by
    the position embedding, read by a second head; logits are the mean of the two heads' (timm's inference output).

    Args: as VisionTransformer, with a class token, ``global_pool='token'`` and no register tokens.
    Parameters add ``dist_token`` (1, 1, C) and ``head_dist`` Linear(C, num_classes).
    """

    def __init__(self, *args, **kwargs):
        for name, allowed in (("class_token", True), ("global_pool", "token"), ("reg_tokens", 0)):
            if kwargs.get(name, allowed) != allowed:
                raise ValueError(f"the distilled ViT reads the class and distillation tokens: {name} must be {allowed!r}")
        super().__init__(*args, **kwargs)
        self.num_prefix_tokens = 2
        self.dist_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        covered = 0 if self.no_embed_class else 2
        self.pos_embed = nn.Parameter(torch.zeros(1, covered + self.patch_embed.num_patches, self.embed_dim))
        self.head_dist = nn.Linear(self.embed_dim, self.num_classes) if self.num_classes > 0 else nn.Identity()
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        super().init_weights()
        if hasattr(self, "dist_token"):
            nn.init.trunc_normal_(self.dist_token, std=0.02)

    def prefix_tokens(self, batch: int) -> list[Tensor]:
        return [t.expand(batch, -1, -1) for t in (self.cls_token, self.dist_token)]

    def forward_head(self, features: Tensor, pre_logits: bool = False) -> Tensor:
        """``(head(class token) + head_dist(distillation token)) / 2`` (B, num_classes); with ``pre_logits`` the
        mean of the two tokens (B, C)."""
        x, x_dist = features[:, 0], features[:, 1]
        if pre_logits:
            return (x + x_dist) / 2
        return (self.head(x) + self.head_dist(x_dist)) / 2


def vit_base_patch16_224(**kwargs) -> VisionTransformer:
    """ViT-B/16 at 224 (timm ``vit_base_patch16_224``): C=768, 12 blocks, 12 heads, 197 tokens."""
    return VisionTransformer(**{"patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12, **kwargs})


def vit_small_patch14_dinov2(**kwargs) -> VisionTransformer:
    """DINOv2 ViT-S/14 (timm ``vit_small_patch14_dinov2``): 518 pixels, C=384, 12 blocks, 6 heads, LayerScale."""
    defaults = {"img_size": 518, "patch_size": 14, "embed_dim": 384, "depth": 12, "num_heads": 6, "init_values": 1e-5}
    return VisionTransformer(**{**defaults, **kwargs})


def vit_small_patch14_reg4_dinov2(**kwargs) -> VisionTransformer:
    """DINOv2 ViT-S/14 with 4 registers (timm ``vit_small_patch14_reg4_dinov2``), position embedding on the
    patches only."""
    return vit_small_patch14_dinov2(**{"reg_tokens": 4, "no_embed_class": True, **kwargs})


def vit_base_patch14_dinov2(**kwargs) -> VisionTransformer:
    """DINOv2 ViT-B/14 (timm ``vit_base_patch14_dinov2``, SlotContrast's encoder): C=768, 12 heads."""
    return vit_small_patch14_dinov2(**{"embed_dim": 768, "num_heads": 12, **kwargs})


def vit_base_patch14_reg4_dinov2(**kwargs) -> VisionTransformer:
    """DINOv2 ViT-B/14 with 4 registers (timm ``vit_base_patch14_reg4_dinov2``)."""
    return vit_base_patch14_dinov2(**{"reg_tokens": 4, "no_embed_class": True, **kwargs})


def deit_tiny_distilled_patch16_224(**kwargs) -> VisionTransformerDistilled:
    """DeiT-Ti distilled (timm ``deit_tiny_distilled_patch16_224``): C=192, 12 blocks, 3 heads, 198 tokens."""
    defaults = {"patch_size": 16, "embed_dim": 192, "depth": 12, "num_heads": 3}
    return VisionTransformerDistilled(**{**defaults, **kwargs})


def vit_tiny(**kwargs) -> VisionTransformer:
    """A ViT small enough for CPU tests and synthetic recipes (timm ``vit_tiny_patch16_224`` widths at 32 pixels
    by default: C=192, 12 blocks, 3 heads, 4x4 patches of 8 pixels)."""
    defaults = {"img_size": 32, "patch_size": 8, "embed_dim": 192, "depth": 12, "num_heads": 3, "num_classes": 10}
    return VisionTransformer(**{**defaults, **kwargs})
