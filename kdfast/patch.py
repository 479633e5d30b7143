"""``kdfast.patch(model)``: swap, in place, the modules of a user's model that kdfast accelerates; ``unpatch`` undoes it.

Recognised (by structure and parameter names, not by class, since videosaur, SlotContrast and WeCoLoRA are not
packages):

- slot attention as videosaur / SlotContrast write it: ``to_q``, ``to_k``, ``to_v`` (Linear without bias),
  ``gru`` (GRUCell or None), ``mlp`` (None, or a residual ``layers`` = LayerNorm, Linear, ReLU, Linear),
  ``norm_features``, ``norm_slots``, ``n_iters``, ``eps``, ``scale`` -> :class:`kdfast.nn.SlotAttention`;
- PEFT ``lora.Linear`` layers -> :class:`kdfast.nn.lora_adapters.LoRALinearAdapters` (every adapter, shared;
  PeftModel's ``set_adapter``, ``disable_adapter`` and ``merge_and_unload`` reach it);
- a timm ``Attention`` (or kdfast.models') whose qkv and proj carry WeCoLoRA's adapters, as WeCoLoRA's code writes
  them (LoRA-ViT's ``_LoRA_qkv``: ``qkv``, ``linear_a_{q,k,v}``, ``linear_b_{q,k,v}``; ``_LoRA_fc``: ``old_fc``,
  ``linear_a_fc``, ``linear_b_fc``; scale 1) -> :class:`kdfast.nn.LoRAAttention` (LoRA qkv, SDPA and LoRA proj in
  one op) holding those very Linear modules. Its state_dict keeps WeCoLoRA's keys (``qkv.qkv.weight``,
  ``qkv.linear_a_q.weight``, ``proj.old_fc.weight``, ...) through state_dict hooks, in the same order, and loads
  them; ``named_parameters()`` shows LoRAAttention's names (``qkv.weight``, ``lora_A.q.weight``, ...).
  A timm Attention under PEFT LoRA is not swapped for LoRAAttention, which would not be faithful: PEFT's qkv
  adapter is one (A, B) pair over the fused projection (A shared by q, k and v, B (3C, r)), with named adapters,
  dropout and per-layer scalings, while LoRAAttention holds one pair per slice under other keys. Its qkv and proj
  are patched layer by layer (LoRALinearAdapters) and the attention core stays timm's SDPA; the report says so;
- SlotContrast's slot-slot contrastive loss where it is a module (``Slot_Slot_Contrastive_Loss``: ``temperature``,
  ``batch_contrast``, a mean ``criterion = nn.CrossEntropyLoss()``, the loss base class's ``pred_path``, ...) ->
  :class:`PatchedSlotContrastLoss`, kdfast.nn.SlotContrastLoss behind the upstream interface: ``loss(slots, _)``,
  and every other attribute and method (``get_prediction``, ``get_target``, ``pred_path``, ...) read from the
  upstream module, which it keeps. Calls kdfast does not compute as upstream does (extra arguments such as a
  frame padding mask, fewer than 2 frames, where upstream's mean over no terms is NaN and kdfast's 0) run the
  upstream module's own forward.

The new modules hold the very same parameter tensors under the same state_dict keys, so optimisers, checkpoints
and PEFT's adapter save/load keep working. A module that looks like one of these but has an option kdfast does not
compute is left as it is, with the reason in the report; a model with nothing to swap is returned untouched with a
warning. Nothing is swapped unless every recognised module could be built (no half-patched model).
"""

from __future__ import annotations

import functools
import inspect
import math
import sys
import warnings
from dataclasses import dataclass, field

from torch import Tensor, nn

from kdfast.nn.lora import LoRAAttention
from kdfast.nn.lora_adapters import LoRALinearAdapters
from kdfast.nn.slot_attention import SlotAttention
from kdfast.nn.slot_contrastive_loss import SlotContrastLoss

_ORIGINAL = "_kdfast_unpatched"  # the module a patched one replaced; kept outside _modules (no state_dict keys)


@dataclass
class PatchReport:
    """What ``patch`` / ``unpatch`` did: ``swapped`` (path, new class), ``left`` (path, reason)."""

    swapped: list[tuple[str, str]] = field(default_factory=list)
    left: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"swapped {path or '<model>'} -> {what}" for path, what in self.swapped]
        lines += [f"left {path or '<model>'}: {why}" for path, why in self.left]
        return "\n".join(lines) or "nothing recognised"


def _is_linear(module, bias: bool | None = None) -> bool:
    return isinstance(module, nn.Linear) and (bias is None or (module.bias is not None) == bias)


def _residual_mlp_layers(mlp: nn.Module) -> nn.Sequential | None:
    """videosaur's ``MLP(initial_layer_norm=True, residual=True)`` with one hidden layer: its ``layers``."""
    layers = getattr(mlp, "layers", None)
    kinds = (nn.LayerNorm, nn.Linear, nn.ReLU, nn.Linear)
    if not isinstance(layers, nn.Sequential) or len(layers) != 4 or not getattr(mlp, "residual", False):
        return None
    if not all(isinstance(layer, kind) for layer, kind in zip(layers, kinds)):
        return None
    return layers


def _slot_attention(module: nn.Module, backend: str | None) -> SlotAttention | str | None:
    """A kdfast SlotAttention sharing ``module``'s parameters, a reason it cannot be one, or None (not one)."""
    names = ("to_q", "to_k", "to_v", "norm_features", "norm_slots")
    if isinstance(module, SlotAttention) or not all(hasattr(module, n) for n in (*names, "n_iters", "eps")):
        return None
    if not all(_is_linear(getattr(module, n), bias=False) for n in names[:3]):
        return "to_q, to_k and to_v must be nn.Linear without bias"
    for flag in ("use_ttt", "use_ent"):
        if getattr(module, flag, False):
            return f"option {flag}=True is not computed by kdfast"
    gru, mlp = getattr(module, "gru", None), getattr(module, "mlp", None)
    if gru is not None and not isinstance(gru, nn.GRUCell):
        return f"gru must be an nn.GRUCell or None, got {type(gru).__name__}"
    layers = None if mlp is None else _residual_mlp_layers(mlp)
    if mlp is not None and layers is None:
        return "mlp is not a residual LayerNorm-Linear-ReLU-Linear MLP"
    kvq_dim, slot_dim = module.to_q.out_features, module.to_q.in_features
    if abs(getattr(module, "scale", kvq_dim**-0.5) - kvq_dim**-0.5) > 1e-12:
        return f"scale {module.scale} is not kvq_dim ** -0.5"
    new = SlotAttention(
        module.to_k.in_features, slot_dim, kvq_dim, layers[1].out_features if layers is not None else None,
        module.n_iters, module.eps, use_gru=gru is not None, use_mlp=mlp is not None, backend=backend,
    )
    for name in (*names, "gru"):
        setattr(new, name, getattr(module, name))
    if layers is not None:
        new.mlp.layers = layers
    if sorted(new.state_dict()) != sorted(module.state_dict()):
        return "its state_dict has keys besides slot attention's"
    return new


def _peft_lora(module: nn.Module, backend: str | None) -> LoRALinearAdapters | str | None:
    lora = sys.modules.get("peft.tuners.lora")
    if lora is None or not isinstance(module, lora.Linear):
        return None
    if not isinstance(module.get_base_layer(), nn.Linear):
        return f"its base layer is {type(module.get_base_layer()).__name__}, not nn.Linear"
    unsupported = [name for name, on in (
        ("use_dora", any(getattr(module, "use_dora", {}).values())),
        ("lora_bias", any(getattr(module, "lora_bias", {}).values())),
        ("fan_in_fan_out", getattr(module, "fan_in_fan_out", False)),
        ("lora_variant", any(v is not None for v in getattr(module, "lora_variant", {}).values())),
    ) if on]
    if unsupported:
        return f"PEFT options {unsupported} are not computed by kdfast"
    dropouts = [d for d in module.lora_dropout.values() if not isinstance(d, (nn.Dropout, nn.Identity))]
    if dropouts:
        return f"lora_dropout {type(dropouts[0]).__name__} is not nn.Dropout"
    # PeftModel.set_adapter, disable_adapter and merge_and_unload find their layers by isinstance(LoraLayer):
    # the kdfast layer, which has those methods, is registered as a virtual subclass so that they reach it.
    lora.LoraLayer.register(LoRALinearAdapters)
    new = LoRALinearAdapters.from_peft(module, backend)
    if sorted(new.state_dict()) != sorted(module.state_dict()):
        return "its state_dict has keys besides LoRA's (base_layer, lora_A, lora_B)"
    return new


# ---------------------------------------------------------------------------------------- timm Attention with LoRA

_WECOLORA_QKV = ("qkv", "linear_a_q", "linear_b_q", "linear_a_k", "linear_b_k", "linear_a_v", "linear_b_v")
_WECOLORA_FC = ("old_fc", "linear_a_fc", "linear_b_fc")


def _plain_attention_classes() -> tuple[type, ...]:
    """Attention classes whose forward is plain multi-head attention: timm's (when timm is imported) and
    kdfast.models'. Subclasses count only if they keep that forward."""
    classes = []
    timm_vit = sys.modules.get("timm.models.vision_transformer")
    if timm_vit is not None and isinstance(getattr(timm_vit, "Attention", None), type):
        classes.append(timm_vit.Attention)
    kdfast_vit = sys.modules.get("kdfast.models.vit")
    if kdfast_vit is not None:
        classes.append(kdfast_vit.Attention)
    return tuple(classes)


def _children_are(module: nn.Module, names: tuple[str, ...]) -> bool:
    return set(module._modules) == set(names) and all(isinstance(module._modules[n], nn.Linear) for n in names)


def _attention_options(module: nn.Module) -> str | None:
    """Why ``module``'s forward is not what LoRAAttention computes (None: it is)."""
    plain = (nn.Identity, type(None))
    unsupported = [n for n in ("q_norm", "k_norm", "norm") if not isinstance(getattr(module, n, None), plain)]
    unsupported += [n for n in ("gate",) if getattr(module, n, None) is not None]
    unsupported += [n for n in ("attn_drop", "proj_drop") if getattr(getattr(module, n, None), "p", 0.0) > 0]
    if unsupported:
        return f"options {unsupported} are not computed by kdfast.nn.LoRAAttention"
    head_dim = getattr(module, "head_dim", None)
    if head_dim is not None and abs(getattr(module, "scale", head_dim**-0.5) - head_dim**-0.5) > 1e-12:
        return f"scale {module.scale} is not head_dim ** -0.5"
    return None


def _lora_attention(module: nn.Module, backend: str | None) -> LoRAAttention | str | None:
    """A timm Attention whose qkv and proj carry LoRA: WeCoLoRA's -> LoRAAttention; PEFT's -> a reason (see the
    module docstring); anything else -> None."""
    classes = _plain_attention_classes()
    if not classes or not isinstance(module, classes):
        return None
    if not any(type(module).forward is cls.forward for cls in classes):
        return None  # a subclass with its own forward: not plain attention
    qkv, proj = getattr(module, "qkv", None), getattr(module, "proj", None)
    lora = sys.modules.get("peft.tuners.lora")
    if lora is not None and (isinstance(qkv, lora.LoraLayer) or isinstance(proj, lora.LoraLayer)):
        return (
            "PEFT LoRA is kept layer by layer (qkv, proj -> LoRALinearAdapters; the core stays SDPA): PEFT's qkv "
            "adapter is one (A, B) pair over the fused qkv (A shared by q, k and v) with named adapters, dropout and "
            "its own scaling, while kdfast.nn.LoRAAttention holds one pair per slice under other keys"
        )
    upstream_qkv = isinstance(qkv, nn.Module) and type(qkv).__name__ in ("_LoRA_qkv", "_LoRA_qkv_timm")
    upstream_proj = isinstance(proj, nn.Module) and type(proj).__name__ == "_LoRA_fc"
    if not (upstream_qkv or upstream_proj):
        return None
    if not (upstream_qkv and _children_are(qkv, _WECOLORA_QKV)):
        return "WeCoLoRA's LoRA on q, k and v of qkv (_LoRA_qkv) is needed: kdfast.nn.LoRAAttention adapts all three"
    if not (upstream_proj and _children_are(proj, _WECOLORA_FC)):
        return "WeCoLoRA's LoRA on proj (_LoRA_fc) is needed: kdfast.nn.LoRAAttention adapts proj too"
    reason = _attention_options(module)
    if reason:
        return reason
    adapters = [getattr(qkv, f"linear_{ab}_{s}") for s in "qkv" for ab in "ab"] + [proj.linear_a_fc, proj.linear_b_fc]
    if any(layer.bias is not None for layer in adapters):
        return "WeCoLoRA's adapter Linear layers must have no bias"
    ranks = {layer.out_features for layer in adapters[0::2]} | {layer.in_features for layer in adapters[1::2]}
    if len(ranks) != 1:
        return f"the adapters have ranks {sorted(ranks)}: kdfast.nn.LoRAAttention has one rank"
    try:
        r = ranks.pop()
        new = LoRAAttention(qkv.qkv, proj.old_fc, module.num_heads, r, lora_alpha=r, init_lora_weights=False,
                            backend=backend)  # scale 1, as WeCoLoRA's adapters
    except (TypeError, ValueError) as error:
        return str(error)
    new.lora_A = nn.ModuleDict({s: getattr(qkv, f"linear_a_{s}") for s in "qkv"})
    new.lora_B = nn.ModuleDict({s: getattr(qkv, f"linear_b_{s}") for s in "qkv"})
    new.proj.lora_A, new.proj.lora_B = proj.linear_a_fc, proj.linear_b_fc
    return _keeping_keys(new, module)


def _keeping_keys(new: nn.Module, original: nn.Module) -> nn.Module | str:
    """``new`` with state_dict hooks that save and load ``original``'s keys, in its order (the tensors are the same
    ones, matched by identity)."""
    theirs = original.state_dict(keep_vars=True)
    by_tensor = {id(tensor): name for name, tensor in theirs.items()}
    ours = new.state_dict(keep_vars=True)
    to_theirs = {name: by_tensor.get(id(tensor)) for name, tensor in ours.items()}
    if None in to_theirs.values() or sorted(to_theirs.values()) != sorted(theirs):
        return "its state_dict holds tensors besides the attention's and its adapters'"
    new.register_state_dict_post_hook(functools.partial(_save_as, to_theirs, tuple(theirs)))
    new.register_load_state_dict_pre_hook(functools.partial(_load_from, {v: k for k, v in to_theirs.items()}))
    return new


def _save_as(to_theirs: dict, order: tuple, module, state_dict, prefix, local_metadata) -> None:
    values = {to_theirs[key[len(prefix):]]: state_dict.pop(key) for key in list(state_dict)
              if key.startswith(prefix) and key[len(prefix):] in to_theirs}
    for name in order:
        state_dict[prefix + name] = values[name]


def _load_from(to_ours: dict, module, state_dict, prefix, *args) -> None:
    for key in [k for k in state_dict if k.startswith(prefix) and k[len(prefix):] in to_ours]:
        state_dict[prefix + to_ours[key[len(prefix):]]] = state_dict.pop(key)


# ------------------------------------------------------------------------------- SlotContrast's contrastive loss

# The attributes of SlotContrast's ``Loss`` base class and of ``Slot_Slot_Contrastive_Loss``; a module with others is
# a variant whose forward may differ.
_SLOT_CONTRAST_ATTRIBUTES = {
    "pred_path", "target_path", "video_inputs", "patch_inputs", "keep_input_dim", "input_key", "n_expected_dims",
    "pred_dims", "remove_last_n_frames", "temperature", "batch_contrast",
}
_SLOT_CONTRAST_MODULES = {"criterion", "target_transform", "to_canonical_dims"}


class PatchedSlotContrastLoss(SlotContrastLoss):
    """kdfast.nn.SlotContrastLoss behind SlotContrast's ``Slot_Slot_Contrastive_Loss`` (kept as ``upstream``).

    ``forward(slots, _)`` is SlotContrast's loss (mean over the terms) on kdfast's op. ``temperature`` and
    ``batch_contrast`` are the upstream module's (read and written there); every other attribute and method
    (``get_prediction``, ``get_target``, ``pred_path``, ...) is the upstream module's. Calls kdfast does not
    compute as upstream does run upstream's forward: extra arguments (e.g. a frame padding mask), slots that are
    not (B, T, K, D), and T < 2 (upstream's mean over no terms is NaN, kdfast's 0).
    """

    def __init__(self, upstream: nn.Module, backend: str | None = None):
        nn.Module.__init__(self)
        object.__setattr__(self, _ORIGINAL, upstream)  # outside _modules: no state_dict keys, no parameters twice
        self.reduction, self.backend = "mean", backend

    @property
    def upstream(self) -> nn.Module:
        return self.__dict__[_ORIGINAL]

    @property
    def temperature(self) -> float:
        return self.upstream.temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self.upstream.temperature = value

    @property
    def batch_contrast(self) -> bool:
        return bool(self.upstream.batch_contrast)

    @batch_contrast.setter
    def batch_contrast(self, value: bool) -> None:
        self.upstream.batch_contrast = value

    def forward(self, slots: Tensor, target=None, *args, **kwargs) -> Tensor:
        extra = args or any(value is not None for value in kwargs.values())
        if extra or not isinstance(slots, Tensor) or slots.dim() != 4 or slots.shape[1] < 2:
            return self.upstream(slots, target, *args, **kwargs)
        return super().forward(slots)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            upstream = self.__dict__.get(_ORIGINAL)
            if upstream is None:
                raise
            return getattr(upstream, name)


def _slot_contrast_loss(module: nn.Module, backend: str | None) -> PatchedSlotContrastLoss | str | None:
    if type(module).__name__ != "Slot_Slot_Contrastive_Loss" or isinstance(module, PatchedSlotContrastLoss):
        return None
    criterion, temperature = module._modules.get("criterion"), getattr(module, "temperature", None)
    if not isinstance(criterion, nn.CrossEntropyLoss):
        return "its criterion is not nn.CrossEntropyLoss (a variant of SlotContrast's loss)"
    options = [name for name, default in (("reduction", "mean"), ("weight", None), ("label_smoothing", 0.0))
               if getattr(criterion, name, default) != default]
    if options:
        return f"criterion options {options} differ from SlotContrast's nn.CrossEntropyLoss()"
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature <= 0:
        return f"temperature {temperature!r} is not a finite positive number"
    if not isinstance(getattr(module, "batch_contrast", None), bool):
        return "batch_contrast is not a bool"
    known = _SLOT_CONTRAST_ATTRIBUTES | _SLOT_CONTRAST_MODULES | {"training"}
    extra = sorted(n for n in vars(module) if not n.startswith("_") and n not in known)
    extra += sorted(set(module._modules) - _SLOT_CONTRAST_MODULES)
    if extra:
        return f"attributes {extra} are not SlotContrast's (a variant of its loss)"
    parameters = list(inspect.signature(type(module).forward).parameters.values())[1:]
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < 2 or any(p.default is p.empty for p in parameters[2:] if p.kind != p.VAR_KEYWORD):
        return "its forward is not forward(slots, target, [optional arguments])"
    new = PatchedSlotContrastLoss(module, backend)
    if list(new.state_dict()) != list(module.state_dict()):
        return "its state_dict is not empty"
    return new


_RECOGNISERS = (_slot_attention, _lora_attention, _peft_lora, _slot_contrast_loss)


def patch(model: nn.Module, *, backend: str | None = None) -> PatchReport:
    """Swap, in place, every module of ``model`` that kdfast accelerates (see the module docstring).

    Args:
        model: any nn.Module (the model itself may be one of the recognised modules: it is then not swapped,
            since it cannot be replaced in place, and the report says so).
        backend: kdfast backend of the new modules (None: ``KDFAST_BACKEND``, default ``auto``).

    Returns:
        A PatchReport. ``model``'s state_dict keys and parameter tensors are unchanged.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    report, swaps = PatchReport(), []
    skip: tuple[str, ...] = ()
    for path, module in model.named_modules():
        if skip and path.startswith(skip):
            continue
        for recognise in _RECOGNISERS:
            result = recognise(module, backend)
            if result is None:
                continue
            if isinstance(result, str):
                report.left.append((path, result))
            elif not path:
                report.left.append((path, "the model itself cannot be swapped in place; patch a model holding it"))
            else:
                swaps.append((path, module, result))
                skip += (f"{path}.",)  # its children are now the new module's
            break
    for path, module, new in swaps:
        object.__setattr__(new, _ORIGINAL, module)
        _replace(model, path, new)
        report.swapped.append((path, type(new).__name__))
    if not report.swapped:
        warnings.warn(f"kdfast.patch: nothing in {type(model).__name__} was swapped ({report})", stacklevel=2)
    return report


def unpatch(model: nn.Module) -> PatchReport:
    """Put back every module ``patch`` swapped (the originals, which share the parameters)."""
    report = PatchReport()
    for path, module in list(model.named_modules()):
        original = module.__dict__.get(_ORIGINAL)
        if original is not None and path:
            _sync_back(module, original)
            _replace(model, path, original)
            report.swapped.append((path, type(original).__name__))
    return report


def _sync_back(new: nn.Module, original: nn.Module) -> None:
    """State a patched module changed that is not a shared tensor (PEFT's active / merged adapters)."""
    if isinstance(new, LoRALinearAdapters):
        original.merged_adapters[:] = new.merged_adapters
        original.set_adapter(new.active_adapters)
        original.enable_adapters(not new.disable_adapters)
    elif isinstance(new, LoRAAttention) and new.merged:  # WeCoLoRA's modules have no merged state
        new.unmerge()


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent_path), name, new)


__all__ = ["PatchReport", "PatchedSlotContrastLoss", "patch", "unpatch"]
