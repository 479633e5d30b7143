"""kdfast.patch / kdfast.unpatch on the models users have: a videosaur-style slot attention model (eager, written from
videosaur's code), a PEFT model with two adapters, a timm ViT under PEFT LoRA. Each is compared with its unpatched
self in float64: state_dict keys, outputs and gradients; then unpatched. Also SlotAttention.step and
LoRALinearAdapters (several named adapters) against PEFT."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from eager_slot_attention import EagerSlotAttention
from harness import leaf, rand
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from timm_import import timm
from torch import nn

import kdfast
from kdfast.nn import SlotAttention
from kdfast.nn.lora_adapters import LoRALinearAdapters

TIGHT = {"rtol": 1e-12, "atol": 1e-12}


# ------------------------------------------------------------------------- videosaur-style slot attention


class SlotModel(nn.Module):
    """An encoder, a slot initialiser and the grouper, as a SlotContrast-style model holds them."""

    def __init__(self, **grouper):
        super().__init__()
        self.encoder = nn.Linear(10, 12)
        self.slots_init = nn.Parameter(torch.randn(1, 4, 8))
        self.grouper = EagerSlotAttention(12, 8, **grouper)

    def forward(self, x):
        return self.grouper(self.slots_init.expand(x.shape[0], -1, -1), self.encoder(x))


def randomise(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(rand(*p.shape, dtype=p.dtype) * 0.5)
    return model


def outputs_and_grads(model: nn.Module, x: torch.Tensor, grad_out: torch.Tensor, params=None):
    """The output and the gradients of x and of ``params`` (default: the model's trainable parameters, in order)."""
    out = model(x)
    out = out["slots"] if isinstance(out, dict) else out
    params = [p for p in model.parameters() if p.requires_grad] if params is None else params
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
    params = [p for p in model.parameters() if p.requires_grad]  # the unpatched order (the patched model shares them)
    report = kdfast.patch(model, backend=backend)
    assert [path for path, _ in report.swapped] == expected_swaps, str(report)
    assert sorted(model.state_dict()) == sorted(keys)
    for path, original in originals.items():
        new = model.get_submodule(path)
        assert new is not original
        assert {id(p) for p in new.parameters()} == {id(p) for p in original.parameters()}
    got, got_grads = outputs_and_grads(model, x, grad_out, params)
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
    assert isinstance(model.grouper, EagerSlotAttention)


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
    theirs = randomise(EagerSlotAttention(12, 8, kvq_dim=6)).double()
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
    # step's masks are the slot_mask of kdfast.ops.slot_attention, which checks them
    with pytest.raises(TypeError, match=r"slot_mask must be a bool tensor \(B, K\) = \(2, 4\)"):
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
    report = assert_patch_keeps_the_model(model.eval(), rand(2, 3, 28, 28).double(), paths)
    # not swapped for LoRAAttention (not faithful: PEFT's qkv adapter is one pair over the fused projection)
    assert [path for path, _ in report.left] == [f"base_model.model.blocks.{i}.attn" for i in range(2)]
    assert all(reason.startswith("PEFT LoRA is kept layer by layer") for _, reason in report.left)


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


# ------------------------------------------------------------------------------- WeCoLoRA's student attention


class _LoRA_qkv(nn.Module):  # noqa: N801 - WeCoLoRA's (LoRA-ViT's) class name, which patch recognises
    """WeCoLoRA's qkv with LoRA on the q, k and v slices (scale 1), eager, written from its code."""

    def __init__(self, qkv, a_q, b_q, a_v, b_v, a_k, b_k):
        super().__init__()
        self.qkv = qkv
        self.linear_a_q, self.linear_b_q = a_q, b_q
        self.linear_a_v, self.linear_b_v = a_v, b_v
        self.linear_a_k, self.linear_b_k = a_k, b_k
        self.dim = qkv.in_features

    def forward(self, x):
        qkv = self.qkv(x)
        new_q = self.linear_b_q(self.linear_a_q(x))
        new_v = self.linear_b_v(self.linear_a_v(x))
        new_k = self.linear_b_k(self.linear_a_k(x))
        qkv[:, :, : self.dim] += new_q
        qkv[:, :, self.dim : -self.dim] += new_k
        qkv[:, :, -self.dim :] += new_v
        return qkv


class _LoRA_qkv_timm(_LoRA_qkv):  # noqa: N801 - LoRA-ViT's q and v only variant
    def __init__(self, qkv, a_q, b_q, a_v, b_v):
        nn.Module.__init__(self)
        self.qkv, self.linear_a_q, self.linear_b_q, self.linear_a_v, self.linear_b_v = qkv, a_q, b_q, a_v, b_v
        self.dim = qkv.in_features

    def forward(self, x):
        qkv = self.qkv(x)
        qkv[:, :, : self.dim] += self.linear_b_q(self.linear_a_q(x))
        qkv[:, :, -self.dim :] += self.linear_b_v(self.linear_a_v(x))
        return qkv


class _LoRA_fc(nn.Module):  # noqa: N801
    def __init__(self, old_fc, linear_a_fc, linear_b_fc):
        super().__init__()
        self.old_fc, self.linear_a_fc, self.linear_b_fc = old_fc, linear_a_fc, linear_b_fc

    def forward(self, x):
        return self.old_fc(x) + self.linear_b_fc(self.linear_a_fc(x))


def wecolora_student(r: int = 3, qv_only: bool = False, **vit_options) -> nn.Module:
    """A timm ViT after WeCoLoRA's surgery (every block kept here): frozen weights, LoRA on qkv (q, v, k in
    WeCoLoRA's order), proj, fc1 and fc2; the adapters randomised (B non-zero)."""
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=7, embed_dim=24,
                            depth=2, num_heads=3, num_classes=5, **vit_options).double()
    vit.requires_grad_(False)

    def pair(n_in, n_out):
        return nn.Linear(n_in, r, bias=False).double(), nn.Linear(r, n_out, bias=False).double()

    for block in vit.blocks:
        dim = block.attn.qkv.in_features
        q, v, k = pair(dim, dim), pair(dim, dim), pair(dim, dim)
        block.attn.qkv = _LoRA_qkv_timm(block.attn.qkv, *q, *v) if qv_only else _LoRA_qkv(block.attn.qkv, *q, *v, *k)
        block.attn.proj = _LoRA_fc(block.attn.proj, *pair(dim, dim))
        block.mlp.fc1 = _LoRA_fc(block.mlp.fc1, *pair(dim, block.mlp.fc1.out_features))
        block.mlp.fc2 = _LoRA_fc(block.mlp.fc2, *pair(block.mlp.fc2.in_features, dim))
    with torch.no_grad():
        for name, p in vit.named_parameters():
            if "linear_" in name:
                p.copy_(rand(*p.shape, dtype=p.dtype) * 0.3)
    return vit.eval()


def test_patch_wecolora_student_attention_for_lora_attention():
    model = wecolora_student()
    keys = list(model.state_dict())
    report = assert_patch_keeps_the_model(model, rand(2, 3, 28, 28).double(), ["blocks.0.attn", "blocks.1.attn"])
    assert report.swapped == [("blocks.0.attn", "LoRAAttention"), ("blocks.1.attn", "LoRAAttention")]
    original = model.blocks[0].attn
    kdfast.patch(model, backend="reference")
    attn = model.blocks[0].attn
    assert type(attn) is kdfast.nn.LoRAAttention and attn.scaling == 1.0 and attn.r == 3
    # the very adapters (the modules themselves), and WeCoLoRA's state_dict keys in WeCoLoRA's order
    assert attn.lora_A["k"] is original.qkv.linear_a_k and attn.proj.lora_B is original.proj.linear_b_fc
    assert list(model.state_dict()) == keys
    assert list(attn.state_dict()) == list(original.state_dict())
    # a WeCoLoRA checkpoint loads strictly into the patched model, into the shared tensors
    state = {k: v + 1 for k, v in model.state_dict().items()}
    model.load_state_dict(state, strict=True)
    assert torch.equal(original.qkv.linear_a_k.weight, state["blocks.0.attn.qkv.linear_a_k.weight"])
    assert torch.equal(attn.qkv.weight, state["blocks.0.attn.qkv.qkv.weight"])
    # timm Block's masked call: the same as WeCoLoRA's attention
    x, mask = leaf(rand(2, 17, 24).double()), torch.rand(2, 1, 17, 17) > 0.3
    mask[..., 0] = True
    for kwargs in ({"attn_mask": mask}, {"is_causal": True}):
        got, want = attn(x, **kwargs), original(x, **kwargs)
        torch.testing.assert_close(got, want, **TIGHT)
        params = [original.qkv.linear_a_q.weight, original.proj.linear_b_fc.weight]
        for g, w in zip(torch.autograd.grad(got.square().sum(), [x, *params]),
                        torch.autograd.grad(want.square().sum(), [x, *params])):
            torch.testing.assert_close(g, w, **TIGHT)
    attn.merge()  # unpatch gives WeCoLoRA's modules back unmerged
    kdfast.unpatch(model)
    assert model.blocks[0].attn is original and not attn.merged
    torch.testing.assert_close(original.qkv.qkv.weight, state["blocks.0.attn.qkv.qkv.weight"], **TIGHT)


def test_wecolora_attention_kdfast_does_not_compute_is_left_with_the_reason():
    model = wecolora_student(qv_only=True)
    with pytest.warns(UserWarning, match="nothing in VisionTransformer was swapped"):
        report = kdfast.patch(model)
    assert [path for path, _ in report.left] == ["blocks.0.attn", "blocks.1.attn"]
    assert report.left[0][1].startswith("WeCoLoRA's LoRA on q, k and v of qkv (_LoRA_qkv) is needed")
    with pytest.warns(UserWarning, match="nothing"):
        report = kdfast.patch(wecolora_student(qk_norm=True))
    assert report.left[1] == ("blocks.1.attn",
                              "options ['q_norm', 'k_norm'] are not computed by kdfast.nn.LoRAAttention")
    model = wecolora_student(qkv_bias=True, proj_drop_rate=0.1)
    with pytest.warns(UserWarning, match="nothing"):
        report = kdfast.patch(model)
    assert report.left[0] == ("blocks.0.attn", "options ['proj_drop'] are not computed by kdfast.nn.LoRAAttention")
    assert isinstance(model.blocks[0].attn.qkv, _LoRA_qkv)


# ---------------------------------------------------------------------------- SlotContrast's contrastive loss


def read_path(outputs, path):
    for name in path:
        outputs = outputs[name]
    return outputs


class SlotContrastLossBase(nn.Module):
    """SlotContrast's ``losses.Loss`` (the parts its contrastive loss uses), eager."""

    def __init__(self, pred_key, target_key, video_inputs=False, patch_inputs=True, keep_input_dim=False,
                 pred_dims=None, remove_last_n_frames=0, target_transform=None, input_key=None):
        super().__init__()
        self.pred_path, self.target_path = pred_key.split("."), target_key.split(".")
        self.video_inputs, self.patch_inputs, self.keep_input_dim = video_inputs, patch_inputs, keep_input_dim
        self.input_key = input_key
        self.n_expected_dims = 2 + (1 if patch_inputs or keep_input_dim else 2) + (1 if video_inputs else 0)
        self.pred_dims = None if pred_dims is None else slice(*pred_dims)
        self.remove_last_n_frames = remove_last_n_frames
        self.target_transform = target_transform
        self.to_canonical_dims = nn.Identity()

    def get_prediction(self, outputs):
        prediction = read_path(outputs, self.pred_path)
        if prediction.ndim != self.n_expected_dims:
            raise ValueError(f"Prediction has {prediction.ndim} dimensions")
        return self.to_canonical_dims(prediction)


class Slot_Slot_Contrastive_Loss(SlotContrastLossBase):  # noqa: N801 - SlotContrast's class name
    """SlotContrast's slot-slot contrastive loss, eager, written from its code."""

    def __init__(self, pred_key, target_key, temperature=0.1, batch_contrast=True, **kwargs):
        super().__init__(pred_key, target_key, video_inputs=True, patch_inputs=False, keep_input_dim=True, **kwargs)
        self.criterion = nn.CrossEntropyLoss()
        self.temperature = temperature
        self.batch_contrast = batch_contrast

    def forward(self, slots, _):
        slots = nn.functional.normalize(slots, p=2.0, dim=-1)
        if self.batch_contrast:
            slots = torch.cat(slots.split(1), dim=-2)  # 1 x T x B*K x D
        s1, s2 = slots[:, :-1], slots[:, 1:]
        ss = torch.matmul(s1, s2.transpose(-2, -1)) / self.temperature
        B, T, S, _ = ss.shape
        ss = ss.reshape(B * T, S, S)
        target = torch.eye(S).expand(B * T, S, S).to(ss.device)
        return self.criterion(ss, target)


class SlotContrastStyleModel(nn.Module):
    def __init__(self, batch_contrast=True):
        super().__init__()
        self.grouper = EagerSlotAttention(12, 8)
        self.loss_fns = nn.ModuleDict({"contrast": Slot_Slot_Contrastive_Loss("processor.state", "processor.state",
                                                                               0.1, batch_contrast)})


@pytest.mark.parametrize("batch_contrast", [True, False])
def test_patch_slotcontrast_loss_module(batch_contrast):
    model = randomise(SlotContrastStyleModel(batch_contrast)).double()
    upstream = model.loss_fns["contrast"]
    slots = leaf(rand(3, 4, 5, 7).double())  # B, T, K, D
    outputs = {"processor": {"state": slots}}

    def loss_and_grad(loss_fn):
        loss = loss_fn(loss_fn.get_prediction(outputs), None)  # SlotContrast passes a target it does not read
        return loss, torch.autograd.grad(loss * 1.3, slots)[0]

    want, want_grad = loss_and_grad(upstream)
    report = kdfast.patch(model, backend="reference")
    assert report.swapped == [("grouper", "SlotAttention"), ("loss_fns.contrast", "PatchedSlotContrastLoss")]
    patched = model.loss_fns["contrast"]
    assert isinstance(patched, kdfast.nn.SlotContrastLoss) and patched.upstream is upstream
    assert patched.pred_path == ["processor", "state"] and patched.batch_contrast is batch_contrast
    got, got_grad = loss_and_grad(patched)
    torch.testing.assert_close(got, want, **TIGHT)
    torch.testing.assert_close(got_grad, want_grad, **TIGHT)
    # the temperature is the upstream module's, both ways
    patched.temperature = 0.37
    assert upstream.temperature == 0.37
    torch.testing.assert_close(patched(slots, None), upstream(slots, None), **TIGHT)
    # one frame: upstream's mean over no terms (NaN), through upstream's own forward
    assert patched(slots[:, :1], None).isnan() and upstream(slots[:, :1], None).isnan()
    assert list(model.state_dict()) == list(SlotContrastStyleModel(batch_contrast).double().state_dict())
    back = kdfast.unpatch(model)
    assert [path for path, _ in back.swapped] == ["grouper", "loss_fns.contrast"]
    assert model.loss_fns["contrast"] is upstream


def test_slotcontrast_loss_variants_are_left_with_the_reason():
    variant = Slot_Slot_Contrastive_Loss("a", "b")
    variant.mask_key = "existence_mask"
    unmeaned = Slot_Slot_Contrastive_Loss("a", "b")
    unmeaned.criterion = nn.CrossEntropyLoss(reduction="none")
    model = nn.ModuleDict({"variant": variant, "unmeaned": unmeaned})
    with pytest.warns(UserWarning, match="nothing"):
        report = kdfast.patch(model)
    assert report.left == [
        ("variant", "attributes ['mask_key'] are not SlotContrast's (a variant of its loss)"),
        ("unmeaned", "criterion options ['reduction'] differ from SlotContrast's nn.CrossEntropyLoss()"),
    ]
