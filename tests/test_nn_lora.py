"""kdfast.nn.LoRALinear against PEFT's lora.Linear, and kdfast.nn.LoRAAttention around a timm-style Attention."""

from __future__ import annotations

import copy
import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from harness import assert_close, implemented_cases, leaf, rand
from torch import nn

from kdfast import reference
from kdfast.models.vit import Attention, Block
from kdfast.nn import LoRAAttention, LoRALinear

peft = pytest.importorskip("peft")

CASES = implemented_cases("lora_linear")
# (in_features, out_features, r, lora_alpha, use_rslora): ranks 1, 7 and 128, odd sizes, rsLoRA.
CONFIGS = [(13, 11, 1, 8, False), (33, 21, 7, 16, True), (130, 67, 128, 32, False)]


def peft_linear(base: nn.Linear, r: int, lora_alpha: float, lora_dropout: float = 0.0, use_rslora: bool = False):
    """PEFT's LoRA layer around ``base``, made the way users make it (get_peft_model on a model holding it)."""
    model = nn.Sequential(OrderedDict(fc=base))
    config = peft.LoraConfig(
        r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora, target_modules=["fc"]
    )
    return peft.get_peft_model(model, config).base_model.model.fc


def randomise_adapter(module):
    """Non-zero A and B (PEFT's init makes B zero, which would hide every LoRA term)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_" in name:
                p.copy_(rand(*p.shape) * p.shape[-1] ** -0.5)


def pair_of_layers(I, O, r, alpha, rslora, *, dropout=0.0, bias=True):
    base = nn.Linear(I, O, bias=bias)
    theirs = peft_linear(copy.deepcopy(base), r, alpha, dropout, rslora)
    randomise_adapter(theirs)
    ours = LoRALinear(copy.deepcopy(base), r, alpha, dropout, rslora)
    ours.load_state_dict(theirs.state_dict())  # PEFT's in-memory keys lora_A.default.weight load as lora_A.weight
    return ours, theirs


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_init_and_scaling_match_peft(config):
    I, O, r, alpha, rslora = config
    base = nn.Linear(I, O)
    torch.manual_seed(7)
    theirs = peft_linear(copy.deepcopy(base), r, alpha, use_rslora=rslora)
    torch.manual_seed(7)
    ours = LoRALinear(copy.deepcopy(base), r, alpha, use_rslora=rslora)
    assert ours.scaling == theirs.scaling["default"] == (alpha / math.sqrt(r) if rslora else alpha / r)
    # Same seed, same draws: A is PEFT's kaiming_uniform(a=sqrt(5)) draw exactly, B is zeros.
    assert torch.equal(ours.lora_A.weight, theirs.lora_A["default"].weight)
    assert torch.equal(ours.lora_B.weight, theirs.lora_B["default"].weight) and not ours.lora_B.weight.any()
    bound = 1 / math.sqrt(I)  # kaiming_uniform(a=sqrt(5)) on fan_in I: U(-1/sqrt(I), 1/sqrt(I))
    assert ours.lora_A.weight.abs().max() <= bound and ours.lora_A.weight.std() > bound / 3
    x = rand(3, I)
    torch.testing.assert_close(ours(x), base(x), rtol=0, atol=0)  # B = 0: the layer starts as its base


def test_state_dict_keys_match_peft():
    ours, theirs = pair_of_layers(9, 5, 3, 6, False)
    assert list(ours.state_dict()) == ["base_layer.weight", "base_layer.bias", "lora_A.weight", "lora_B.weight"]
    assert [k.replace(".default", "") for k in theirs.state_dict()] == list(ours.state_dict())
    model = nn.Sequential(OrderedDict(fc=copy.deepcopy(ours.base_layer)))
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=3, lora_alpha=6, target_modules=["fc"]))
    saved = peft.get_peft_model_state_dict(peft_model)  # what a PEFT adapter checkpoint holds
    assert sorted(k.removeprefix("base_model.model.fc.") for k in saved) == ["lora_A.weight", "lora_B.weight"]
    fresh = LoRALinear(copy.deepcopy(ours.base_layer), 3, 6)
    fresh.load_state_dict({k.removeprefix("base_model.model.fc."): v for k, v in saved.items()}, strict=False)
    assert torch.equal(fresh.lora_A.weight, peft_model.base_model.model.fc.lora_A["default"].weight)
    for key, value in ours.state_dict().items():
        assert torch.equal(value, theirs.state_dict()[key.replace("lora_A", "lora_A.default").replace("lora_B", "lora_B.default")])


@pytest.mark.parametrize("trainable_base", [False, True], ids=["frozen-base", "trainable-base"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize(("device", "backend"), CASES)
def test_forward_and_backward_match_peft(device, backend, config, bias, trainable_base):
    """Same weights, same input: our output and gradients equal PEFT's, PEFT run in float64."""
    I, O, r, alpha, rslora = config
    ours, theirs = pair_of_layers(I, O, r, alpha, rslora, bias=bias)
    ours.backend = backend
    ours.base_layer.requires_grad_(trainable_base)
    theirs = theirs.double()
    theirs.base_layer.requires_grad_(trainable_base)
    ours, theirs = ours.to(device), theirs.to(device)
    x = leaf(rand(2, 5, I, device=device))
    x64 = leaf(x.double())
    out, ref = ours(x), theirs(x64)
    assert_close(out, ref, torch.float32, "output against PEFT")
    grad_out = rand(2, 5, O, device=device)
    out.backward(grad_out)
    ref.backward(grad_out.double())
    assert_close(x.grad, x64.grad, torch.float32, "grad of x")
    for (name, p), (peft_name, p64) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert name == peft_name.replace(".default", "")
        if p.requires_grad:
            assert_close(p.grad, p64.grad, torch.float32, f"grad of {name}")
        else:
            assert p.grad is None and p64.grad is None, f"{name} is frozen"
    assert [n for n, p in ours.named_parameters() if p.grad is not None] == (
        [n for n, _ in ours.named_parameters()] if trainable_base else ["lora_A.weight", "lora_B.weight"]
    )


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_dropout_applies_to_the_lora_input_only(device, backend):
    """Zero base weight and bias, A = B = identity, scale 1: the output is dropout(x). Ours and PEFT's each drop
    entries of x with probability p and scale the rest by 1/(1-p); the base path never sees dropout."""
    p, I = 0.4, 16
    layers = []
    for make in (lambda base: LoRALinear(base, I, I, p, backend=backend), lambda base: peft_linear(base, I, I, p)):
        layer = make(nn.Linear(I, I))
        with torch.no_grad():
            for name, t in layer.named_parameters():
                t.copy_(torch.eye(I) if "lora_" in name else torch.zeros_like(t))
        layers.append(layer.to(device))
    x = rand(64, I, device=device)
    for layer in layers:
        out = layer.train()(x)
        kept = out != 0
        torch.testing.assert_close(out[kept], x[kept] / (1 - p))
        assert 0.25 < 1 - kept.double().mean().item() < 0.55
        torch.testing.assert_close(layer.eval()(x), x)  # eval: no dropout
    # With B = 0 the LoRA term is exactly 0: in training the output is the base layer's, whatever was dropped. The
    # kernels and torch's GEMM sum x W^T + b in different orders, so the promise is the base output up to float32
    # rounding: a sum of the I products and the bias, in any order (FMA or not), is within
    # gamma_{I+1} * (sum_i |x_i w_i| + |b|) of exact, gamma_n = n u / (1 - n u) (Higham, Accuracy and Stability of
    # Numerical Algorithms, section 3.1). Dropout reaching the base path would be off by O(1).
    ours, _ = layers
    with torch.no_grad():
        ours.lora_B.weight.zero_()
        ours.base_layer.weight.copy_(rand(I, I))
        ours.base_layer.bias.copy_(rand(I))
    ours.train()
    x64, w64, b64 = x.double(), ours.base_layer.weight.double(), ours.base_layer.bias.double()
    exact = x64 @ w64.T + b64
    unit = 2.0**-24
    bound = (I + 1) * unit / (1 - (I + 1) * unit) * (x64.abs() @ w64.abs().T + b64.abs())
    for what, out in (("kdfast in training", ours(x)), ("the base layer", ours.base_layer(x))):
        error = (out.double() - exact).abs()
        assert (error <= bound).all(), f"{what}: {(error - bound).max().item():.3g} above the float32 rounding bound"


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_merge_and_unmerge_match_peft(config):
    I, O, r, alpha, rslora = config
    ours, theirs = pair_of_layers(I, O, r, alpha, rslora)
    x = rand(4, I)
    before, weight_before = ours(x), ours.base_layer.weight.detach().clone()
    delta = ours.get_delta_weight()
    torch.testing.assert_close(delta, theirs.get_delta_weight("default"))
    ours.merge()
    theirs.merge()
    assert ours.merged and theirs.merged
    torch.testing.assert_close(ours.base_layer.weight, theirs.base_layer.weight)
    assert_close(ours(x), before, torch.float32, "merged forward")
    torch.testing.assert_close(ours(x), theirs(x))
    with pytest.warns(UserWarning, match="already merged"):
        ours.merge()
    ours.unmerge()
    assert not ours.merged
    # (W + d) - d: one rounding of the merged weight, at most half an ulp of |W + d| per element.
    bound = torch.finfo(torch.float32).eps * (weight_before.abs() + delta.abs()).max()
    assert (ours.base_layer.weight - weight_before).abs().max() <= bound
    with pytest.warns(UserWarning, match="Already unmerged"):
        ours.unmerge()
    assert_close(ours(x), before, torch.float32, "unmerged forward")


def test_safe_merge_refuses_a_broken_adapter_like_peft():
    ours, theirs = pair_of_layers(8, 6, 2, 4, False)
    for layer, a in ((ours, ours.lora_A.weight), (theirs, theirs.lora_A["default"].weight)):
        with torch.no_grad():
            a[0, 3] = float("nan")
        weight = layer.base_layer.weight.detach().clone()
        with pytest.raises(ValueError, match="NaNs detected in the merged weights"):
            layer.merge(safe_merge=True)
        assert torch.equal(layer.base_layer.weight, weight) and not layer.merged
    fine, _ = pair_of_layers(8, 6, 2, 4, False)
    expected = fine.base_layer.weight + fine.get_delta_weight()
    fine.merge(safe_merge=True)
    torch.testing.assert_close(fine.base_layer.weight, expected)


def test_from_peft_shares_the_base_and_copies_the_adapter():
    theirs = peft_linear(nn.Linear(10, 7), 3, 9, 0.1, True)
    randomise_adapter(theirs)
    ours = LoRALinear.from_peft(theirs)
    assert ours.base_layer is theirs.base_layer
    assert (ours.r, ours.lora_alpha, ours.lora_dropout, ours.scaling) == (3, 9, 0.1, theirs.scaling["default"])
    ours.eval(), theirs.eval()
    x = rand(5, 10)
    torch.testing.assert_close(ours(x), theirs(x))


def test_bad_module_arguments():
    with pytest.raises(TypeError, match="base_layer must be a torch.nn.Linear"):
        LoRALinear(nn.Conv1d(3, 4, 1))
    for r in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="r \\(the LoRA rank\\) must be a positive integer"):
            LoRALinear(nn.Linear(3, 4), r=r)
    for p in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="lora_dropout must be a probability"):
            LoRALinear(nn.Linear(3, 4), lora_dropout=p)
    with pytest.raises(ValueError, match="lora_alpha must be a finite number"):
        LoRALinear(nn.Linear(3, 4), lora_alpha=float("inf"))
    with pytest.raises(ValueError, match="in_features must match"):
        LoRALinear(nn.Linear(3, 4))(rand(2, 5))
    with pytest.raises(TypeError, match="qkv must be a torch.nn.Linear"):
        LoRAAttention(nn.Identity(), nn.Linear(4, 4), 2)
    with pytest.raises(ValueError, match="qkv must be Linear\\(C, 3C\\)"):
        LoRAAttention(nn.Linear(4, 8), nn.Linear(4, 4), 2)
    with pytest.raises(ValueError, match="num_heads must be a positive integer dividing C=6"):
        LoRAAttention(nn.Linear(6, 18), nn.Linear(6, 6), 4)
    with pytest.raises(TypeError, match="lacks \\['num_heads'\\]"):
        LoRAAttention.from_timm(_no_heads(), 2)
    attn = Attention(8, 2, qkv_bias=True)
    attn.q_norm = nn.LayerNorm(4)
    with pytest.raises(ValueError, match="q_norm"):
        LoRAAttention.from_timm(attn, 2)
    attn = Attention(8, 2, qkv_bias=True)
    attn.attn_drop = nn.Dropout(0.1)
    with pytest.raises(ValueError, match="attn_drop"):
        LoRAAttention.from_timm(attn, 2)
    attn = Attention(8, 2, qkv_bias=True)
    attn.gate = nn.Linear(8, 8)
    with pytest.raises(ValueError, match="gate"):
        LoRAAttention.from_timm(attn, 2)
    wrapped = LoRAAttention.from_timm(Attention(8, 2), 2)
    with pytest.raises(TypeError, match="attn_mask must be a torch.Tensor or None, got list"):
        wrapped(rand(1, 3, 8), attn_mask=[[True]])
    with pytest.raises(TypeError, match="is_causal must be a bool, got Tensor"):
        wrapped(rand(1, 3, 8), is_causal=torch.tensor(True))
    with pytest.raises(TypeError, match="unexpected keyword argument 'rope'"):
        wrapped(rand(1, 3, 8), rope=None)


def _no_heads():
    module = nn.Module()
    module.qkv, module.proj = nn.Linear(4, 12), nn.Linear(4, 4)
    return module


# ------------------------------------------------------------------------------------------ LoRAAttention


def eager_lora_attention(attn: Attention, wrapped: LoRAAttention, x, attn_mask=None, is_causal=False):
    """timm's Attention written out, with WeCoLoRA's per-slice LoRA on qkv and LoRA on proj (plain PyTorch);
    the mask as timm's non-fused path applies it (a boolean mask keeps True, a float one is added)."""
    B, T, C = x.shape
    s = wrapped.scaling
    delta = [s * F.linear(F.linear(x, wrapped.lora_A[n].weight), wrapped.lora_B[n].weight) for n in "qkv"]
    qkv = (attn.qkv(x) + torch.cat(delta, -1)).reshape(B, T, 3, attn.num_heads, C // attn.num_heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    logits = q @ k.transpose(-1, -2) / math.sqrt(C // attn.num_heads)
    if is_causal:
        logits = logits.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    elif attn_mask is not None and attn_mask.dtype == torch.bool:
        logits = logits.masked_fill(~attn_mask, float("-inf"))
    elif attn_mask is not None:
        logits = logits + attn_mask
    weights = torch.softmax(logits, dim=-1)
    o = (weights @ v).transpose(1, 2).reshape(B, T, C)
    return attn.proj(o) + s * F.linear(F.linear(o, wrapped.proj.lora_A.weight), wrapped.proj.lora_B.weight)


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_attention_from_timm_wraps_without_copying(device, backend):
    attn = Attention(24, 3, qkv_bias=True).to(device)
    x = leaf(rand(2, 7, 24, device=device))
    wrapped = LoRAAttention.from_timm(attn, 5, backend=backend)
    assert wrapped.qkv is attn.qkv and wrapped.proj.base_layer is attn.proj and wrapped.num_heads == 3
    assert wrapped.qkv.weight.data_ptr() == attn.qkv.weight.data_ptr()
    assert wrapped.scaling == 1.0  # lora_alpha defaults to r: WeCoLoRA's scale 1
    assert_close(wrapped(x), attn(x).double(), torch.float32, "B = 0: the wrapper computes the wrapped attention")
    assert sorted(n for n, _ in wrapped.named_parameters() if "lora_" in n) == sorted(
        [f"lora_{m}.{s}.weight" for m in "AB" for s in "qkv"] + ["proj.lora_A.weight", "proj.lora_B.weight"]
    )
    randomise_adapter(wrapped)
    attn64 = copy.deepcopy(attn).double()
    wrapped64 = LoRAAttention.from_timm(attn64, 5, backend="reference")
    wrapped64.load_state_dict({k: v.double() for k, v in wrapped.state_dict().items()})
    x64 = leaf(x.double())
    out, ref = wrapped(x), eager_lora_attention(attn64, wrapped64, x64)
    assert_close(out, ref, torch.float32, "output against eager timm attention with LoRA")
    grad_out = rand(2, 7, 24, device=device)
    out.backward(grad_out)
    ref.backward(grad_out.double())
    assert_close(x.grad, x64.grad, torch.float32, "grad of x")
    for (name, p), p64 in zip(wrapped.named_parameters(), wrapped64.parameters()):
        assert_close(p.grad, p64.grad, torch.float32, f"grad of {name}")


def _masks(B, H, T):
    """The masks timm's Block passes: boolean (B, 1, T, T) keeping every query's own token, float (B, H, T, T)."""
    keep = torch.rand(B, 1, T, T) > 0.4
    keep |= torch.eye(T, dtype=torch.bool)
    return {"bool": (keep, False), "float": (rand(B, H, T, T).double(), False), "causal": (None, True)}


@pytest.mark.parametrize("kind", ["bool", "float", "causal"])
@pytest.mark.parametrize("merged", [False, True], ids=["lora", "merged"])
def test_attention_takes_timm_masks(kind, merged):
    """attn_mask and is_causal (what timm's Block.forward passes) against the eager attention, float64."""
    attn = Attention(12, 3, qkv_bias=True).double()
    wrapped = LoRAAttention.from_timm(attn, 4, lora_alpha=6, backend="reference")
    randomise_adapter(wrapped)
    attn_mask, is_causal = _masks(2, 3, 5)[kind]
    x = leaf(rand(2, 5, 12).double())
    x_ref = leaf(x.detach().clone())
    ref = eager_lora_attention(copy.deepcopy(attn), wrapped, x_ref, attn_mask, is_causal)
    if merged:
        wrapped.merge()
    out = wrapped(x, attn_mask=attn_mask, is_causal=is_causal)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    unmasked = eager_lora_attention(copy.deepcopy(attn), wrapped, x_ref) if not merged else None
    if unmasked is not None:
        assert (unmasked - ref).abs().max() > 1e-3  # the mask changes the output: the test sees it
    grad_out = rand(2, 5, 12).double()
    trainable = [] if merged else [p for n, p in wrapped.named_parameters() if "lora_" in n]
    grads = torch.autograd.grad(out, [x, *trainable], grad_out)
    ref_grads = torch.autograd.grad(ref, [x_ref, *trainable], grad_out)
    for name, g, r in zip(["x"] + [f"lora {i}" for i in range(len(trainable))], grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12, msg=lambda m: f"grad of {name}: {m}")


def test_attention_merge_unmerge():
    attn = Attention(12, 3, qkv_bias=True)
    wrapped = LoRAAttention.from_timm(attn, 4, lora_alpha=8)
    randomise_adapter(wrapped)
    x = rand(2, 5, 12)
    before, qkv_before = wrapped(x), attn.qkv.weight.detach().clone()
    wrapped.merge(safe_merge=True)
    assert wrapped.merged and wrapped.proj.merged
    assert_close(attn(x), before.double(), torch.float32, "the merged timm Attention alone")
    assert_close(wrapped(x), before.double(), torch.float32, "merged forward")
    wrapped.unmerge()
    bound = torch.finfo(torch.float32).eps * (qkv_before.abs() + wrapped.get_delta_weight().abs()).max()
    assert (attn.qkv.weight - qkv_before).abs().max() <= bound
    assert_close(wrapped(x), before.double(), torch.float32, "unmerged forward")
    with torch.no_grad():
        wrapped.lora_B["k"].weight[1, 0] = float("inf")
    unmerged = attn.qkv.weight.detach().clone()
    with pytest.raises(ValueError, match="NaNs detected"):
        wrapped.merge(safe_merge=True)
    # A refused merge leaves every weight as it was, bit for bit.
    assert not wrapped.merged and not wrapped.proj.merged and torch.equal(attn.qkv.weight, unmerged)


def test_compile_fullgraph_lora_vit_block_matches_eager():
    """A ViT block with LoRA on qkv slices, proj, fc1 and fc2 (the WeCoLoRA student block) under torch.compile."""
    block = Block(16, 4, mlp_ratio=2.0)
    block.requires_grad_(False)
    block.attn = LoRAAttention.from_timm(block.attn, 3)
    block.mlp.fc1, block.mlp.fc2 = LoRALinear(block.mlp.fc1, 3, 3), LoRALinear(block.mlp.fc2, 3, 3)
    randomise_adapter(block)
    x = leaf(rand(2, 5, 16))
    compiled = torch.compile(block, fullgraph=True)
    got, eager = compiled(x), block(x)
    torch.testing.assert_close(got, eager)
    grad_out = rand(2, 5, 16)
    trainable = [p for p in block.parameters() if p.requires_grad]
    assert len(trainable) == 2 * (3 + 1 + 2)
    wrt = (x, *trainable)
    for g, e in zip(torch.autograd.grad(got, wrt, grad_out), torch.autograd.grad(eager, wrt, grad_out)):
        torch.testing.assert_close(g, e)


def test_reference_lora_linear_is_what_the_module_computes():
    """The module's functional form is kdfast.reference.lora_linear with PEFT's scaling."""
    ours, _ = pair_of_layers(9, 4, 3, 5, True)
    x = rand(2, 9)
    expected = reference.lora_linear(x, ours.base_layer.weight, ours.base_layer.bias, ours.lora_A.weight,
                                     ours.lora_B.weight, 5 / math.sqrt(3))
    torch.testing.assert_close(ours(x), expected)
