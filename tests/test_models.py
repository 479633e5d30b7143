"""kdfast.models against the real timm (pretrained=False): every family loads timm's state_dict with strict=True,
in timm's key order, and computes timm's features, logits and gradients in float64; position embeddings resample
as timm's do; the WeCoLoRA student of a kdfast DINOv2 keeps LayerScale frozen in its blocks."""

from __future__ import annotations

import copy

import pytest
import torch
from harness import leaf, rand
from timm_import import timm
from timm.layers import resample_abs_pos_embed
from torch import nn

from kdfast import models
from kdfast.wecolora import build_student, last_block_output

TIGHT = {"rtol": 1e-12, "atol": 1e-12}
SMALL = {"embed_dim": 24, "depth": 3, "num_heads": 3, "num_classes": 5}

#: kdfast factory, timm model name, shared options (tiny widths; 28- or 42-pixel images).
FAMILIES = {
    "vit": (models.vit_base_patch16_224, "vit_base_patch16_224", {"img_size": 28, "patch_size": 7}),
    "dinov2": (models.vit_small_patch14_dinov2, "vit_small_patch14_dinov2", {"img_size": 42}),
    "dinov2_reg4": (models.vit_small_patch14_reg4_dinov2, "vit_small_patch14_reg4_dinov2", {"img_size": 42}),
    "dinov2_base_reg4": (models.vit_base_patch14_reg4_dinov2, "vit_base_patch14_reg4_dinov2", {"img_size": 28}),
    "deit_distilled": (models.deit_tiny_distilled_patch16_224, "deit_tiny_distilled_patch16_224",
                       {"img_size": 28, "patch_size": 7}),
    "avg_pool_no_class_token": (models.vit_base_patch16_224, "vit_base_patch16_224",
                                {"img_size": 28, "patch_size": 7, "class_token": False, "global_pool": "avg"}),
    "no_pooling": (models.vit_base_patch16_224, "vit_base_patch16_224", {"img_size": 28, "patch_size": 7,
                                                                         "global_pool": ""}),
}


def randomise(model: nn.Module) -> nn.Module:
    """Every parameter random (timm's init leaves LayerScale constant, tokens near zero, biases zero)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(rand(*p.shape, dtype=p.dtype) * 0.5)
    return model


def pair(family: str, **options):
    """(kdfast model, timm model) in float64 eval mode, kdfast's loaded from timm's state_dict strictly."""
    ours_factory, name, extra = FAMILIES[family]
    kwargs = {**SMALL, **extra, **options}
    theirs = randomise(timm.create_model(name, pretrained=False, **kwargs)).double().eval()
    ours = ours_factory(**kwargs).double().eval()
    assert list(ours.state_dict()) == list(theirs.state_dict())  # same keys, same order
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


@pytest.mark.parametrize("family", list(FAMILIES))
def test_loads_timm_strictly_and_matches_its_features(family):
    ours, theirs = pair(family)
    side = FAMILIES[family][2]["img_size"]
    images = leaf(rand(2, 3, side, side).double())
    images_ref = leaf(images.detach().clone())
    for method in ("forward_features", "forward"):
        torch.testing.assert_close(getattr(ours, method)(images), getattr(theirs, method)(images), **TIGHT)
    got, expected = ours(images), theirs(images_ref)
    grad_out = rand(*got.shape).double()
    wrt, wrt_ref = [images, *ours.parameters()], [images_ref, *theirs.parameters()]
    for i, (g, e) in enumerate(zip(torch.autograd.grad(got, wrt, grad_out), torch.autograd.grad(expected, wrt_ref, grad_out))):
        torch.testing.assert_close(g, e, **TIGHT, msg=lambda m: f"gradient {i}: {m}")
    features = ours.forward_features(images)
    assert features.shape[1] == ours.num_prefix_tokens + ours.patch_embed.num_patches == theirs.num_prefix_tokens + (
        theirs.patch_embed.num_patches
    )


@pytest.mark.parametrize("family", ["dinov2", "dinov2_reg4", "deit_distilled"])
def test_dynamic_img_size_resamples_the_position_embedding_as_timm(family):
    ours, theirs = pair(family, dynamic_img_size=True)
    for shape in ((2, 3, 56, 70), (1, 3, 28, 14), tuple([2, 3] + [FAMILIES[family][2]["img_size"]] * 2)):
        images = rand(*shape).double()
        torch.testing.assert_close(ours.forward_features(images), theirs.forward_features(images), **TIGHT)
        torch.testing.assert_close(ours(images), theirs(images), **TIGHT)
    patch, side = ours.patch_embed.patch_size[0], ours.patch_embed.img_size[0]
    with pytest.raises(ValueError, match=rf"H and W multiples of {patch}, got \(1, 3, 30, 28\)"):
        ours(rand(1, 3, 30, 28).double())
    strict, _ = pair(family)
    with pytest.raises(ValueError, match=rf"images must have shape \(B, 3, {side}, {side}\), got \(1, 3, 56, 56\)"):
        strict(rand(1, 3, 56, 56).double())


@pytest.mark.parametrize("prefix", [0, 1, 5])
def test_resample_pos_embed_is_timms(prefix):
    pos_embed = rand(1, prefix + 3 * 4, 8).double()
    for new_grid in ((5, 2), (3, 4), (7, 7)):
        got = models.resample_pos_embed(pos_embed, new_grid, (3, 4), prefix)
        expected = resample_abs_pos_embed(pos_embed, list(new_grid), [3, 4], num_prefix_tokens=prefix)
        assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="not a square grid"):
        models.resample_pos_embed(pos_embed, (2, 2), None, prefix)


@pytest.mark.parametrize("family", ["dinov2", "dinov2_reg4"])
def test_checkpoint_of_another_image_size_loads_resampled(family):
    """A 42-pixel DINOv2 state_dict into a 70-pixel model: pos_embed resampled as timm's pretrained loading does
    (timm's checkpoint filter on the same state_dict gives the same tensor), every other key as is."""
    _, theirs = pair(family)
    ours = FAMILIES[family][0](**{**SMALL, "img_size": 70}).double()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    filtered = timm.models.vision_transformer.checkpoint_filter_fn(theirs.state_dict(), ours)
    assert torch.equal(ours.pos_embed, filtered["pos_embed"]) and ours.pos_embed.shape[1] != theirs.pos_embed.shape[1]
    big = timm.create_model(FAMILIES[family][1], pretrained=False, **{**SMALL, "img_size": 70}).double().eval()
    big.load_state_dict(filtered, strict=True)
    images = rand(2, 3, 70, 70).double()
    torch.testing.assert_close(ours.eval()(images), big(images), **TIGHT)


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="global_pool must be one of"):
        models.VisionTransformer(global_pool="max")
    with pytest.raises(ValueError, match="class_token=False needs 'avg'"):
        models.VisionTransformer(class_token=False)
    with pytest.raises(ValueError, match="reg_tokens must be an integer >= 0"):
        models.VisionTransformer(reg_tokens=-1)
    with pytest.raises(ValueError, match="reg_tokens must be 0"):
        models.VisionTransformerDistilled(reg_tokens=4)


def test_student_of_kdfast_dinov2_keeps_layer_scale_frozen():
    teacher, theirs = pair("dinov2_reg4")
    student = build_student(teacher, 2, 3, backend="reference")
    timm_student = build_student(theirs, 2, 3, backend="reference")
    timm_student.load_state_dict(student.state_dict(), strict=True)  # the same student, key for key
    for i, j in enumerate((0, 2)):
        for name in ("ls1.gamma", "ls2.gamma"):
            gamma = student.blocks[i].get_parameter(name)
            assert torch.equal(gamma, teacher.blocks[j].get_parameter(name)) and not gamma.requires_grad
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_" in name:
                p.copy_(rand(*p.shape).double())
    timm_student.load_state_dict(student.state_dict(), strict=True)
    images = rand(2, 3, 42, 42).double()
    torch.testing.assert_close(last_block_output(student, images), last_block_output(timm_student, images), **TIGHT)
    assert not torch.allclose(last_block_output(student, images), last_block_output(teacher, images))
    before = copy.deepcopy(teacher.state_dict())
    last_block_output(student, images).sum().backward()
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
