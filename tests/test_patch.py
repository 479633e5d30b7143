"""kdfast.patch / kdfast.unpatch on the models users have: a videosaur-style slot attention model (eager, written from
videosaur's code), a PEFT model with two adapters, a timm ViT under PEFT LoRA. Each is compared with its unpatched
self in float64: state_dict keys, outputs and gradients; then unpatched. Also SlotAttention.step and
LoRALinearAdapters (several named adapters) against PEFT."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from harness import leaf, rand
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from timm_import import timm
from torch import nn

import kdfast
from kdfast.nn import SlotAttention
from kdfast.nn.lora_adapters import LoRALinearAdapters

TIGHT = {"rtol": 1e-12, "atol": 1e-12}


# ------------------------------------------------------------------------- videosaur-style slot attention


class VideosaurMLP(nn.Module):
    """videosaur's ``networks.MLP(d, d, [h], initial_layer_norm=True, residual=True)``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.residual = True
        self.layers = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))

    def forward(self, x):
        return x + self.layers(x)


class VideosaurSlotAttention(nn.Module):
    """videosaur's / SlotContrast's grouper, eager: step() is one iteration, forward() the loop."""

    def __init__(self, inp_dim, slot_dim, kvq_dim=None, hidden_dim=None, n_iters=3, eps=1e-8, use_gru=True,
                 use_mlp=True, use_ttt=False):
        super().__init__()
        kvq_dim = kvq_dim or slot_dim
        self.to_k = nn.Linear(inp_dim, kvq_dim, bias=False)
        self.to_v = nn.Linear(inp_dim, kvq_dim, bias=False)
        self.to_q = nn.Linear(slot_dim, kvq_dim, bias=False)
        self.gru = nn.GRUCell(kvq_dim, slot_dim) if use_gru else None
        self.mlp = VideosaurMLP(slot_dim, hidden_dim or 4 * slot_dim) if use_mlp else None
        self.norm_features, self.norm_slots = nn.LayerNorm(inp_dim), nn.LayerNorm(slot_dim)
        self.n_iters, self.eps, self.scale, self.use_ttt = n_iters, eps, kvq_dim**-0.5, use_ttt

    def step(self, slots, keys, values, masks=None):
        slots = self.norm_slots(slots)
        logits = torch.einsum("bsd,bfd->bsf", self.to_q(slots), keys) * self.scale
        if masks is not None:
            logits = logits.masked_fill(masks.unsqueeze(-1), float("-inf"))
        attn = torch.softmax(logits, dim=1)
        weights = (attn + self.eps) / (attn + self.eps).sum(-1, keepdim=True)
        updates = torch.einsum("bsf,bfd->bsd", weights, values)
        if self.gru is not None:
            slots = self.gru(updates.flatten(0, 1), slots.flatten(0, 1)).unflatten(0, slots.shape[:2])
        else:
            slots = slots + updates
        return (slots if self.mlp is None else self.mlp(slots)), attn

    def forward(self, slots, features, n_iters=None):
        features = self.norm_features(features)
        keys, values = self.to_k(features), self.to_v(features)
        for _ in range(self.n_iters if n_iters is None else n_iters):
            slots, attn = self.step(slots, keys, values)
        return {"slots": slots, "masks": attn}


class SlotModel(nn.Module):
    """An encoder, a slot initialiser and the grouper, as a SlotContrast-style model holds them."""

    def __init__(self, **grouper):
        super().__init__()
        self.encoder = nn.Linear(10, 12)
        self.slots_init = nn.Parameter(torch.randn(1, 4, 8))
        self.grouper = VideosaurSlotAttention(12, 8, **grouper)

    def forward(self, x):
        return self.grouper(self.slots_init.expand(x.shape[0], -1, -1), self.encoder(x))


def randomise(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(rand(*p.shape, dtype=p.dtype) * 0.5)
    return model


def outputs_and_grads(model: nn.Module, x: torch.Tensor, grad_out: torch.Tensor):
    out = model(x)
    out = out["slots"] if isinstance(out, dict) else out
    params = [p for p in model.parameters() if p.requires_grad]
    return out, torch.autograd.grad(out, [x, *params], grad_out)


def assert_patch_keeps_the_model(model: nn.Module, x: torch.Tensor, expected_swaps: list[str], backend="reference"):
    """Patch a copy: same keys and tensors, same outputs and gradients (float64); unpatch gives the model back."""
    reference = copy.deepcopy(model)
    keys = list(model.state_dict())
    x = leaf(x)
    out = reference(x)
    grad_out = rand(*(out["slots"] if isinstance(out, dict) else out).shape).double()
    expected, expected_grads = outputs_and_grads(reference, x, grad_out)
    originals = {path: model.get_submodule(path) for path in expected_swaps}
    report = kdfast.patch(model, backend=backend)
    assert [path for path, _ in report.swapped] == expected_swaps, str(report)
    assert sorted(model.state_dict()) == sorted(keys)
    for path, original in originals.items():
        new = model.get_submodule(path)
        assert new is not original
        assert all(a is b for a, b in zip(new.parameters(), original.parameters()))
    got, got_grads = outputs_and_grads(model, x, grad_out)
    torch.testing.assert_close(got, expected, **TIGHT)
    for i, (g, e) in enumerate(zip(got_grads, expected_grads)):
        torch.testing.assert_close(g, e, **TIGHT, msg=lambda m: f"gradient {i}: {m}")
    back = kdfast.unpatch(model)
    assert [path for path, _ in back.swapped] == expected_swaps
    assert all(model.get_submodule(path) is original for path, original in originals.items())
    return report


@pytest.mark.parametrize("options", [{}, {"use_gru": False}, {"use_mlp": False, "kvq_dim": 6}], ids=str)
def test_patch_videosaur_style_slot_attention(options):
    model = randomise(SlotModel(**options)).double()
    report = assert_patch_keeps_the_model(model, rand(2, 9, 10).double(), ["grouper"])
    assert report.swapped == [("grouper", "SlotAttention")]


def test_slot_attention_with_an_unsupported_option_is_left_with_the_reason():
    model = SlotModel(use_ttt=True)
    with pytest.warns(UserWarning, match="nothing in SlotModel was swapped"):
        report = kdfast.patch(model)
    assert report.left == [("grouper", "option use_ttt=True is not computed by kdfast")]
    assert isinstance(model.grouper, VideosaurSlotAttention)


def test_unrecognised_model_is_untouched_with_a_warning():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="nothing in Sequential was swapped"):
        report = kdfast.patch(model)
    assert not report.swapped and not report.left and str(report) == "nothing recognised"
    assert isinstance(model[0], nn.Linear) and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        kdfast.patch("model")


@pytest.mark.parametrize("masked", [False, True])
def test_step_is_videosaurs_step(masked):
    theirs = randomise(VideosaurSlotAttention(12, 8, kvq_dim=6)).double()
    ours = SlotAttention(12, 8, kvq_dim=6, backend="reference").double()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    slots, keys, values = (leaf(rand(*shape).double()) for shape in ((2, 4, 8), (2, 9, 6), (2, 9, 6)))
    masks = torch.tensor([[False, True, False, False], [True, True, False, False]]) if masked else None
    got, expected = ours.step(slots, keys, values, masks), theirs.step(slots, keys, values, masks)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **TIGHT)
    grad_out = rand(2, 4, 8).double()
    wrt = [slots, keys, values, *ours.parameters()]
    wrt_theirs = [slots, keys, values, *theirs.parameters()]
    grads = torch.autograd.grad(got[0], wrt, grad_out, allow_unused=True)
    expected_grads = torch.autograd.grad(expected[0], wrt_theirs, grad_out, allow_unused=True)
    assert sum(g is not None for g in grads) == len(wrt) - 4  # to_k, to_v, norm_features (2): not in a step
    for g, e in zip(grads, expected_grads):
        assert (g is None) == (e is None)
        if g is not None:
            torch.testing.assert_close(g, e, **TIGHT)
    with pytest.raises(ValueError, match=r"masks must be a boolean tensor \(B, K\) = \(2, 4\)"):
        ours.step(slots, keys, values, torch.zeros(2, 4))


# -------------------------------------------------------------------------------------------------- PEFT


def peft_mlp(**config):
    model = nn.Sequential(nn.Linear(7, 9), nn.GELU(), nn.Linear(9, 5)).double()
    peft_model = get_peft_model(model, LoraConfig(r=3, lora_alpha=6, target_modules=["0", "2"], **config))
    peft_model.add_adapter("other", LoraConfig(r=2, lora_alpha=5, use_rslora=True, target_modules=["0", "2"]))
    randomise(peft_model)
    return peft_model


def test_patch_peft_model_with_two_adapters_and_switch_between_them():
    model = peft_mlp()
    x = rand(4, 7).double()
    report = assert_patch_keeps_the_model(model, x, ["base_model.model.0", "base_model.model.2"])
    assert {what for _, what in report.swapped} == {"LoRALinearAdapters"}
    reference = copy.deepcopy(model)
    kdfast.patch(model, backend="reference")
    for name in ("other", "default"):  # PeftModel.set_adapter reaches the kdfast layers
        model.set_adapter(name)
        reference.set_adapter(name)
        torch.testing.assert_close(model(x), reference(x), **TIGHT)
        active = {n for n, p in model.named_parameters() if p.requires_grad}
        assert active == {n for n, p in reference.named_parameters() if p.requires_grad} and active
    with model.disable_adapter(), reference.disable_adapter():
        torch.testing.assert_close(model(x), reference(x), **TIGHT)
        assert model.base_model.model[0].disable_adapters
    assert not model.base_model.model[0].disable_adapters
    saved = get_peft_model_state_dict(model, adapter_name="other")
    assert saved.keys() == get_peft_model_state_dict(reference, adapter_name="other").keys()
    fresh = peft_mlp()
    kdfast.patch(fresh, backend="reference")
    set_peft_model_state_dict(fresh, saved, adapter_name="other")
    fresh.set_adapter("other")
    model.set_adapter("other")
    torch.testing.assert_close(fresh.base_model.model[0].lora_A["other"].weight, model.base_model.model[0].lora_A["other"].weight)


def test_patch_timm_vit_under_peft():
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=7, embed_dim=24, depth=2,
                            num_heads=3, num_classes=5)
    model = get_peft_model(vit.double(), LoraConfig(r=4, lora_alpha=8, target_modules=["qkv", "proj", "fc1", "fc2"]))
    randomise(model)
    paths = [f"base_model.model.blocks.{i}.{m}" for i in range(2) for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    assert_patch_keeps_the_model(model.eval(), rand(2, 3, 28, 28).double(), paths)


def test_peft_options_kdfast_does_not_compute_are_left():
    model = get_peft_model(nn.Sequential(nn.Linear(7, 9)), LoraConfig(r=2, target_modules=["0"], use_dora=True))
    with pytest.warns(UserWarning, match="nothing"):
        report = kdfast.patch(model)
    (path, reason), = report.left
    assert path == "base_model.model.0" and reason.startswith("PEFT options ['use_dora'")
    assert isinstance(model.base_model.model[0], peft.tuners.lora.Linear)


def test_adapters_layer_matches_peft_and_checks_names():
    base = nn.Linear(7, 5).double()
    ours = LoRALinearAdapters(copy.deepcopy(base), "a", r=3, lora_alpha=4, backend="reference")
    ours.add_adapter("b", r=2, lora_alpha=2, use_rslora=True)
    theirs = get_peft_model(nn.Sequential(copy.deepcopy(base)), LoraConfig(r=3, lora_alpha=4, target_modules=["0"]),
                            adapter_name="a")
    theirs.add_adapter("b", LoraConfig(r=2, lora_alpha=2, use_rslora=True, target_modules=["0"]))
    layer = theirs.base_model.model[0]
    randomise(ours)
    layer.load_state_dict(ours.state_dict(), strict=True)  # the same keys as PEFT's layer
    x = rand(3, 7).double()
    for names in ("a", "b", ["a", "b"]):
        ours.set_adapter(names)
        layer.set_adapter(names)
        torch.testing.assert_close(ours(x), layer(x), **TIGHT)
    ours.merge(safe_merge=True)
    torch.testing.assert_close(ours(x), layer(x), **TIGHT)
    ours.unmerge()
    assert not ours.merged
    with pytest.raises(ValueError, match=r"adapter names \['c'\] are not adapters of this layer"):
        ours.set_adapter("c")
    with pytest.raises(ValueError, match="adapter_name 'a' already exists"):
        ours.add_adapter("a")
    ours.delete_adapter("b")
    assert list(ours.lora_A) == ["a"] and ours.active_adapters == ["a"]
