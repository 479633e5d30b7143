"""WeCoLoRA: a weight-copy student ViT with LoRA adapters, distilled on the teacher's features (design.md 3.3).

``build_student(teacher, k, rank)`` keeps the teacher's blocks 0, k, 2k, ... (copies), its patch and position
embeddings, class token, final norm and head (copies), freezes every copied weight, and adds LoRA with scale 1 on
the q, k and v slices of each kept block's qkv, on its proj, fc1 and fc2. The student is trained with
``feature_distillation_loss``: the mean absolute difference between the teacher's last block output and the
student's, before the final norm.

Any module with timm ViT attribute names works: ``blocks`` (a sequence of blocks, each with ``attn.qkv``,
``attn.proj``, ``attn.num_heads``, ``mlp.fc1``, ``mlp.fc2``), ``patch_embed``, ``pos_embed``, ``cls_token``,
``norm``, ``head`` (kdfast.models.VisionTransformer, timm's VisionTransformer).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdfast.nn.lora import LoRAAttention, LoRALinear


def kept_blocks(depth: int, reduction_factor: int) -> list[int]:
    """Indices of the teacher blocks the student keeps: 0, k, 2k, ... below ``depth``."""
    return list(range(0, depth, reduction_factor))


def build_student(
    teacher: nn.Module, reduction_factor: int, rank: int, *, backend: str | None = None
) -> nn.Module:
    """A WeCoLoRA student of ``teacher`` (left unchanged).

    Args:
        teacher: a ViT with timm attribute names (see the module docstring).
        reduction_factor: k >= 1; the student keeps blocks 0, k, 2k, ... (12 blocks, k=2: 0, 2, 4, 6, 8, 10).
        rank: LoRA rank r >= 1 of every adapter (lora_alpha = r, so the scale is 1).
        backend: kdfast backend of the LoRA ops (None: ``KDFAST_BACKEND``, default ``auto``).

    Returns:
        A copy of the teacher with ``len(kept_blocks(depth, k))`` blocks whose only trainable parameters are the
        LoRA adapters (B starts at zero: the untrained student is the pure weight-copy student).
    """
    if isinstance(reduction_factor, bool) or not isinstance(reduction_factor, int) or reduction_factor < 1:
        raise ValueError(f"reduction_factor must be a positive integer, got {reduction_factor!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    blocks = getattr(teacher, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or len(blocks) == 0:
        raise TypeError(
            "teacher must be a ViT with timm attribute names: a non-empty nn.Sequential or nn.ModuleList `blocks`, "
            f"got {type(blocks).__name__}"
        )
    for i, block in enumerate(blocks):
        for path in ("attn.qkv", "attn.proj", "attn.num_heads", "mlp.fc1", "mlp.fc2"):
            try:
                _get(block, path)
            except AttributeError:
                raise TypeError(f"teacher.blocks[{i}] has no {path} (timm ViT attribute names expected)") from None

    kept = [blocks[i] for i in kept_blocks(len(blocks), reduction_factor)]
    # Copy the teacher with only the kept blocks: the dropped ones are never copied.
    copies = copy.deepcopy(kept)
    memo = {id(blocks): nn.Sequential(*copies) if isinstance(blocks, nn.Sequential) else nn.ModuleList(copies)}
    student = copy.deepcopy(teacher, memo)
    student.requires_grad_(False)
    for block in student.blocks:
        block.attn = LoRAAttention.from_timm(block.attn, rank, lora_alpha=rank, backend=backend)
        block.mlp.fc1 = LoRALinear(block.mlp.fc1, rank, rank, backend=backend)
        block.mlp.fc2 = LoRALinear(block.mlp.fc2, rank, rank, backend=backend)
    return student


def _get(module, path: str):
    for name in path.split("."):
        module = getattr(module, name)
    return module


def last_block_output(model: nn.Module, images: Tensor) -> Tensor:
    """The last block's output before the final norm, (B, T, C): the WeCoLoRA distillation target.

    Uses ``model.forward_blocks`` when the model has it (kdfast.models.VisionTransformer); otherwise runs
    ``model.forward_features`` and captures the output of ``model.blocks[-1]`` with a forward hook (timm).
    """
    if hasattr(model, "forward_blocks"):
        return model.forward_blocks(images)
    captured = []
    handle = model.blocks[-1].register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        model.forward_features(images)
    finally:
        handle.remove()
    return captured[-1]


def feature_distillation_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """WeCoLoRA's loss: ``mean |teacher - student|`` over all tokens and channels; the teacher gets no gradient.

    Args:
        student: the student's last block output before the final norm, (B, T, C) (any shape).
        teacher: the teacher's, same shape.

    Returns:
        A scalar in the promoted dtype.
    """
    for name, t in (("student", student), ("teacher", teacher)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of block outputs (B, T, C), got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if student.shape != teacher.shape:
        raise ValueError(
            f"student and teacher features must have the same shape, got {tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    if student.device != teacher.device:
        raise ValueError(f"student and teacher features must be on one device, got {student.device} and {teacher.device}")
    dtype = torch.promote_types(student.dtype, teacher.dtype)
    return F.l1_loss(student.to(dtype), teacher.detach().to(dtype))


__all__ = ["build_student", "feature_distillation_loss", "kept_blocks", "last_block_output"]
