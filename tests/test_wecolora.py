"""kdfast.models.vit (timm-compatible ViT) and kdfast.wecolora (weight-copy student with LoRA, feature loss)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from harness import assert_close, leaf, rand
from torch import nn

from kdfast import wecolora
from kdfast.models import VisionTransformer, vit_base_patch16_224, vit_tiny
from kdfast.nn import LoRAAttention, LoRALinear


def small_vit(depth=6, **kwargs):
    return VisionTransformer(**{"img_size": 16, "patch_size": 4, "embed_dim": 24, "depth": depth, "num_heads": 3,
                                "num_classes": 5, **kwargs})


def randomise_lora(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(rand(*p.shape) * 0.2)


# ------------------------------------------------------------------------------------------------ the ViT


def timm_vit_keys(depth: int) -> list[str]:
    """The state_dict keys of timm's vit_* models (class token, no layer scale), in timm's order."""
    block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
             "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
    return (["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
            + [f"blocks.{i}.{k}" for i in range(depth) for k in block]
            + ["norm.weight", "norm.bias", "head.weight", "head.bias"])


def test_vit_state_dict_has_timm_names_and_shapes():
    with torch.device("meta"):  # shapes only: skip initialising 86M parameters
        model = vit_base_patch16_224()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert list(shapes) == timm_vit_keys(12)
    assert shapes["pos_embed"] == (1, 197, 768) and shapes["cls_token"] == (1, 1, 768)
    assert shapes["patch_embed.proj.weight"] == (768, 3, 16, 16)
    assert shapes["blocks.11.attn.qkv.weight"] == (2304, 768) and shapes["blocks.0.mlp.fc1.weight"] == (3072, 768)
    assert shapes["head.weight"] == (1000, 768)
    assert sum(v.numel() for v in model.state_dict().values()) == 86_567_656  # timm's vit_base_patch16_224


def eager_vit(model: VisionTransformer, images):
    """The ViT's forward written out from the equations (float64): patchify, embed, pre-norm blocks, norm."""
    B, C = images.shape[0], model.embed_dim
    p = model.patch_embed.patch_size[0]
    patches = images.unfold(2, p, p).unfold(3, p, p)  # (B, c, gh, gw, p, p)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(B, -1, images.shape[1] * p * p)
    x = patches @ model.patch_embed.proj.weight.reshape(C, -1).T + model.patch_embed.proj.bias
    x = torch.cat([model.cls_token.expand(B, 1, C), x], 1) + model.pos_embed
    for block in model.blocks:
        h = F.layer_norm(x, (C,), block.norm1.weight, block.norm1.bias, 1e-6)
        H = block.attn.num_heads
        q, k, v = (h @ block.attn.qkv.weight.T + block.attn.qkv.bias).reshape(B, -1, 3, H, C // H).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(C // H), -1) @ v
        x = x + a.transpose(1, 2).reshape(B, -1, C) @ block.attn.proj.weight.T + block.attn.proj.bias
        h = F.layer_norm(x, (C,), block.norm2.weight, block.norm2.bias, 1e-6)
        x = x + F.linear(F.gelu(F.linear(h, block.mlp.fc1.weight, block.mlp.fc1.bias)), block.mlp.fc2.weight, block.mlp.fc2.bias)
    return x


def test_vit_forward_matches_the_equations():
    model = small_vit(depth=3).double()
    images = rand(2, 3, 16, 16, dtype=torch.float64)
    blocks = eager_vit(model, images)
    torch.testing.assert_close(model.forward_blocks(images), blocks)
    features = F.layer_norm(blocks, (24,), model.norm.weight, model.norm.bias, 1e-6)
    torch.testing.assert_close(model.forward_features(images), features)
    torch.testing.assert_close(model(images), features[:, 0] @ model.head.weight.T + model.head.bias)
    assert model(images).shape == (2, 5) and blocks.shape == (2, 17, 24)
    with pytest.raises(ValueError, match=r"images must have shape \(B, 3, 16, 16\)"):
        model(rand(2, 3, 15, 16, dtype=torch.float64))


def test_vit_loads_a_timm_checkpoint():
    from timm_import import timm
    theirs = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=7).eval()
    ours = VisionTransformer(embed_dim=192, depth=12, num_heads=3, num_classes=7).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    images = rand(2, 3, 224, 224)
    torch.testing.assert_close(ours(images), theirs(images), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(wecolora.last_block_output(theirs, images), ours.forward_blocks(images), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- the student


@pytest.mark.parametrize(("depth", "k", "kept"), [(12, 2, [0, 2, 4, 6, 8, 10]), (12, 3, [0, 3, 6, 9]), (5, 1, [0, 1, 2, 3, 4]),
                                                  (6, 4, [0, 4]), (6, 9, [0])])
def test_kept_blocks(depth, k, kept):
    assert wecolora.kept_blocks(depth, k) == kept


@pytest.mark.parametrize("k", [2, 3])
def test_student_copies_the_right_blocks_and_trains_only_lora(k):
    teacher = small_vit(depth=7)
    teacher_state = copy.deepcopy(teacher.state_dict())
    trainable_before = [n for n, p in teacher.named_parameters() if p.requires_grad]
    student = wecolora.build_student(teacher, k, rank=4)
    kept = wecolora.kept_blocks(7, k)
    assert len(student.blocks) == len(kept)
    # The teacher is untouched.
    assert list(teacher.state_dict()) == list(teacher_state)
    assert all(torch.equal(v, teacher_state[n]) for n, v in teacher.state_dict().items())
    assert [n for n, p in teacher.named_parameters() if p.requires_grad] == trainable_before
    student_state = student.state_dict()
    for j, i in enumerate(kept):
        for name, value in teacher.blocks[i].state_dict().items():
            key = name.replace("attn.proj.", "attn.proj.base_layer.").replace("mlp.fc1.", "mlp.fc1.base_layer.")
            key = key.replace("mlp.fc2.", "mlp.fc2.base_layer.")
            assert torch.equal(student_state[f"blocks.{j}.{key}"], value), f"student block {j} {key} != teacher block {i}"
    for name in ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias",
                 "head.weight", "head.bias"):
        assert torch.equal(student_state[name], teacher_state[name]), name
    # Copies, not shared storage.
    teacher_ptrs = {p.data_ptr() for p in teacher.parameters()}
    assert not teacher_ptrs & {p.data_ptr() for p in student.parameters()}
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == len(kept) * 2 * (3 + 1 + 2)  # A and B on q, k, v, proj, fc1, fc2
    for block in student.blocks:
        assert isinstance(block.attn, LoRAAttention) and block.attn.scaling == 1.0 and block.attn.proj.scaling == 1.0
        for fc in (block.mlp.fc1, block.mlp.fc2):
            assert isinstance(fc, LoRALinear) and fc.scaling == 1.0 and fc.lora_dropout == 0.0
        assert all(p.shape[0] == 4 for p in block.attn.lora_A.parameters())


def test_untrained_student_is_the_weight_copy_student_and_gradients_reach_only_lora():
    teacher = small_vit(depth=6)
    student = wecolora.build_student(teacher, 2, rank=3)
    images = rand(3, 3, 16, 16)
    copy_only = teacher.embed(images)
    for i in (0, 2, 4):
        copy_only = teacher.blocks[i](copy_only)
    torch.testing.assert_close(wecolora.last_block_output(student, images), copy_only)
    randomise_lora(student)
    loss = wecolora.feature_distillation_loss(wecolora.last_block_output(student, images),
                                              wecolora.last_block_output(teacher, images))
    loss.backward()
    for name, p in student.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) == p.requires_grad, name
    assert all(p.grad is None for p in teacher.parameters())


def test_student_forward_and_gradients_match_float64_merged_student():
    """The LoRA student equals, in value, the plain ViT whose weights have every adapter merged in (float64)."""
    teacher = small_vit(depth=4)
    student = wecolora.build_student(teacher, 2, rank=5)
    randomise_lora(student)
    images = rand(2, 3, 16, 16)
    out = wecolora.last_block_output(student, images)
    merged = copy.deepcopy(student).double()
    for module in merged.modules():
        # Pre-order: an attention merges its proj before the loop reaches that LoRALinear.
        if isinstance(module, (LoRAAttention, LoRALinear)) and not module.merged:
            module.merge()
    plain = small_vit(depth=2).double()
    state = {k.replace(".base_layer", ""): v for k, v in merged.state_dict().items() if "lora_" not in k}
    plain.load_state_dict(state)
    assert_close(out, eager_vit(plain, images.double()), torch.float32, "student against the merged float64 ViT")


def test_student_learns_on_the_distillation_loss():
    torch.manual_seed(0)
    teacher = small_vit(depth=4).eval()
    student = wecolora.build_student(teacher, 2, rank=4)
    images = rand(4, 3, 16, 16)
    with torch.no_grad():
        target = wecolora.last_block_output(teacher, images)
    optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for _ in range(8):
        loss = wecolora.feature_distillation_loss(wecolora.last_block_output(student, images), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


class DuckBlock(nn.Module):
    """A block that is not kdfast's or timm's class but has timm's attribute names."""

    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj, self.attn.num_heads = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), heads
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        B, T, C = x.shape
        h = self.norm1(x)
        q, k, v = self.attn.qkv(h).reshape(B, T, 3, self.attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        x = x + self.attn.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, C))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class DuckViT(nn.Module):
    """Token inputs (no patch embedding), blocks in a ModuleList, no forward_blocks: the hook path."""

    def __init__(self, dim=12, depth=5, heads=2):
        super().__init__()
        self.cls_token = nn.Parameter(rand(1, 1, dim))
        self.blocks = nn.ModuleList(DuckBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward_features(self, tokens):
        x = torch.cat([self.cls_token.expand(tokens.shape[0], 1, -1), tokens], 1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def test_student_of_any_module_with_timm_names():
    teacher = DuckViT()
    student = wecolora.build_student(teacher, 2, rank=2)
    assert isinstance(student.blocks, nn.ModuleList) and len(student.blocks) == 3
    tokens = rand(2, 4, 12)
    expected = torch.cat([teacher.cls_token.expand(2, 1, -1), tokens], 1)
    for i in (0, 2, 4):
        expected = teacher.blocks[i](expected)
    got = wecolora.last_block_output(student, tokens)
    torch.testing.assert_close(got, expected)
    assert all(".lora_" in n for n, p in student.named_parameters() if p.requires_grad)


def test_build_student_bad_input():
    teacher = small_vit(depth=2)
    for k in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="reduction_factor must be a positive integer"):
            wecolora.build_student(teacher, k, 2)
    for r in (0, 2.0):
        with pytest.raises(ValueError, match="rank must be a positive integer"):
            wecolora.build_student(teacher, 2, r)
    with pytest.raises(TypeError, match="non-empty nn.Sequential or nn.ModuleList `blocks`"):
        wecolora.build_student(nn.Linear(3, 3), 2, 2)
    broken = small_vit(depth=2)
    del broken.blocks[1].mlp.fc2
    with pytest.raises(TypeError, match=r"teacher.blocks\[1\] has no mlp.fc2"):
        wecolora.build_student(broken, 1, 2)


def test_feature_distillation_loss():
    student, teacher = leaf(rand(2, 5, 7)), leaf(rand(2, 5, 7))
    loss = wecolora.feature_distillation_loss(student, teacher)
    torch.testing.assert_close(loss, (teacher - student).abs().mean())
    loss.backward()
    torch.testing.assert_close(student.grad, torch.sign(student - teacher).detach() / student.numel())
    assert teacher.grad is None
    with pytest.raises(ValueError, match="same shape"):
        wecolora.feature_distillation_loss(rand(2, 5, 7), rand(2, 6, 7))
    with pytest.raises(TypeError, match="student must be a torch.Tensor"):
        wecolora.feature_distillation_loss([1.0], rand(1))
    with pytest.raises(TypeError, match="teacher must be a floating-point tensor"):
        wecolora.feature_distillation_loss(rand(3), torch.ones(3, dtype=torch.long))


def test_vit_tiny_preset_builds_a_student():
    teacher = vit_tiny()
    student = wecolora.build_student(teacher, 2, rank=8)
    assert len(student.blocks) == 6
    assert wecolora.last_block_output(student, rand(1, 3, 32, 32)).shape == (1, 17, 192)
