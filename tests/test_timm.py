"""kdfast against the real timm (random init, pretrained=False): LoRAAttention inside timm's Block and the WeCoLoRA
student of timm ViTs (plain, DINOv2 with LayerScale, DINOv2 with registers, DeiT-distilled, average-pooled),
checked in float64 against the teacher's own blocks run with the LoRA updates merged into their weights."""

from __future__ import annotations

import copy

import pytest
import torch
from harness import leaf, rand
from timm_import import timm
from torch import nn
from torch.func import functional_call

from kdfast.nn import LoRAAttention, LoRALinear
from kdfast.wecolora import build_student, feature_distillation_loss, kept_blocks, last_block_output

TIGHT = {"rtol": 1e-12, "atol": 1e-12}

#: Tiny timm ViTs of each family the student is built from: 28-pixel images, C=24, 3 heads, 4 blocks.
TEACHERS = {
    "vit": ("vit_tiny_patch16_224", {"patch_size": 7}),
    "dinov2": ("vit_small_patch14_dinov2", {}),
    "dinov2_reg": ("vit_small_patch14_reg4_dinov2", {}),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {"patch_size": 7}),
    "avg_pool": ("vit_tiny_patch16_224", {"patch_size": 7, "class_token": False, "global_pool": "avg"}),
}


def tiny_timm(family: str) -> nn.Module:
    name, extra = TEACHERS[family]
    model = timm.create_model(
        name, pretrained=False, img_size=28, embed_dim=24, depth=4, num_heads=3, num_classes=5, **extra
    )
    randomise_layer_scale(model)
    return model.double().eval()


def randomise_layer_scale(model: nn.Module) -> None:
    """LayerScale starts at a constant (1e-5): random gammas make a mix-up of ls1 and ls2 visible."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".gamma"):
                p.copy_(rand(*p.shape) + 0.5)


def randomise_adapters(model: nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(rand(*p.shape, dtype=p.dtype) * p.shape[-1] ** -0.5)


def _delta(lora_a: nn.Linear, lora_b: nn.Linear, scaling: float):
    return scaling * (lora_b.weight @ lora_a.weight)


def merged_parameters(student_block: nn.Module) -> dict[str, torch.Tensor]:
    """The student block's base weights plus its LoRA updates, under the teacher block's parameter names; a
    function of the adapters, so gradients reach them through the teacher's own forward."""
    attn, mlp = student_block.attn, student_block.mlp
    qkv = attn.qkv.weight + torch.cat([_delta(attn.lora_A[s], attn.lora_B[s], attn.scaling) for s in "qkv"])
    merged = {"attn.qkv.weight": qkv}
    for path, layer in (("attn.proj", attn.proj), ("mlp.fc1", mlp.fc1), ("mlp.fc2", mlp.fc2)):
        merged[f"{path}.weight"] = layer.base_layer.weight + _delta(layer.lora_A, layer.lora_B, layer.scaling)
    return merged


def assert_same_values_and_grads(got, expected, wrt_got, wrt_expected, what: str) -> None:
    torch.testing.assert_close(got, expected, **TIGHT, msg=lambda m: f"{what}: {m}")
    grad_out = rand(*got.shape, dtype=got.dtype)
    grads = torch.autograd.grad(got, wrt_got, grad_out)
    expected_grads = torch.autograd.grad(expected, wrt_expected, grad_out, allow_unused=True)
    for i, (g, e) in enumerate(zip(grads, expected_grads)):
        torch.testing.assert_close(g, e, **TIGHT, msg=lambda m: f"{what}, gradient {i}: {m}")


def test_lora_attention_inside_timm_block_takes_its_masks():
    """timm's Block.forward calls attn(x, attn_mask=..., is_causal=...): the wrapped block runs timm's own code."""
    block = timm.models.vision_transformer.Block(12, 3, qkv_bias=True, init_values=0.5).double()
    reference = copy.deepcopy(block)
    block.attn = LoRAAttention.from_timm(block.attn, 2, backend="reference")
    x = rand(2, 6, 12).double()
    keep = (torch.rand(2, 1, 6, 6) > 0.5) | torch.eye(6, dtype=torch.bool)
    for kwargs in ({}, {"attn_mask": keep}, {"is_causal": True}, {"attn_mask": rand(2, 3, 6, 6).double()}):
        torch.testing.assert_close(block(x, **kwargs), reference(x, **kwargs), **TIGHT, msg=lambda m: f"{kwargs}: {m}")
    assert not torch.allclose(reference(x, is_causal=True), reference(x))  # the masks matter here


@pytest.mark.parametrize("family", list(TEACHERS))
def test_student_blocks_are_the_teacher_blocks_plus_lora(family):
    teacher = tiny_timm(family)
    student = build_student(teacher, 2, 3, backend="reference")
    kept = kept_blocks(len(teacher.blocks), 2)
    assert len(student.blocks) == len(kept) == 2 and type(student) is type(teacher)
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    randomise_adapters(student)
    x = leaf(rand(2, 7, 24).double())
    keep = (torch.rand(2, 1, 7, 7) > 0.5) | torch.eye(7, dtype=torch.bool)
    for i, j in enumerate(kept):
        ours, theirs = student.blocks[i], teacher.blocks[j]
        for name, p in theirs.named_parameters():  # copies, frozen: LayerScale's gamma included
            if "attn.qkv" in name or "proj" in name or "fc" in name:
                continue
            copied = ours.get_parameter(name)
            assert torch.equal(copied, p) and copied is not p and not copied.requires_grad, name
        adapters = [p for n, p in ours.named_parameters() if "lora_" in n]
        for kwargs in ({}, {"attn_mask": keep}, {"is_causal": True}):
            got = ours(x, **kwargs)
            expected = functional_call(theirs, merged_parameters(ours), (x,), kwargs)
            assert_same_values_and_grads(got, expected, [x, *adapters], [x, *adapters], f"block {j} {kwargs}")


@pytest.mark.parametrize("family", list(TEACHERS))
def test_untrained_student_is_the_weight_copy_student(family):
    """B = 0: the student computes the teacher with only the kept blocks, features and head."""
    teacher = tiny_timm(family)
    student = build_student(teacher, 3, 2, backend="reference")
    weight_copy = copy.deepcopy(teacher)
    weight_copy.blocks = nn.Sequential(*(weight_copy.blocks[j] for j in kept_blocks(4, 3)))
    images = rand(2, 3, 28, 28).double()
    for method in ("forward_features", "forward"):
        got, expected = getattr(student, method)(images), getattr(weight_copy, method)(images)
        torch.testing.assert_close(got, expected, **TIGHT, msg=lambda m: f"{method}: {m}")
    torch.testing.assert_close(last_block_output(student, images), weight_copy.blocks(
        weight_copy.patch_drop(weight_copy._pos_embed(weight_copy.patch_embed(images)))), **TIGHT)


def test_student_trains_only_its_adapters_on_a_dinov2_teacher():
    teacher = tiny_timm("dinov2_reg")
    student = build_student(teacher, 2, 4, backend="reference")
    randomise_adapters(student)
    images = rand(2, 3, 28, 28).double()
    loss = feature_distillation_loss(last_block_output(student, images), last_block_output(teacher, images))
    loss.backward()
    for name, p in student.named_parameters():
        assert (p.grad is not None) == ("lora_" in name), name
    assert all(p.grad is None for p in teacher.parameters())
    lora_layers = [m for m in student.modules() if isinstance(m, (LoRAAttention, LoRALinear))]
    assert len(lora_layers) == 2 * 4  # per block: attention (with its proj), fc1, fc2
