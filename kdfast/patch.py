"""``kdfast.patch(model)``: swap, in place, the modules of a user's model that kdfast accelerates; ``unpatch`` undoes it.

Recognised (by structure and parameter names, not by class, since videosaur and SlotContrast are not packages):

- slot attention as videosaur / SlotContrast write it: ``to_q``, ``to_k``, ``to_v`` (Linear without bias),
  ``gru`` (GRUCell or None), ``mlp`` (None, or a residual ``layers`` = LayerNorm, Linear, ReLU, Linear),
  ``norm_features``, ``norm_slots``, ``n_iters``, ``eps``, ``scale`` -> :class:`kdfast.nn.SlotAttention`;
- PEFT ``lora.Linear`` layers -> :class:`kdfast.nn.lora_adapters.LoRALinearAdapters` (every adapter, shared;
  PeftModel's ``set_adapter``, ``disable_adapter`` and ``merge_and_unload`` reach it). A timm ViT under PEFT
  LoRA is patched layer by layer (qkv, proj, fc1, fc2); its attention core is timm's SDPA already.

The new modules hold the very same parameter tensors under the same state_dict keys, so optimisers, checkpoints
and PEFT's adapter save/load keep working. A module that looks like one of these but has an option kdfast does not
compute is left as it is, with the reason in the report; a model with nothing to swap is returned untouched with a
warning. Nothing is swapped unless every recognised module could be built (no half-patched model).
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field

from torch import nn

from kdfast.nn.lora_adapters import LoRALinearAdapters
from kdfast.nn.slot_attention import SlotAttention

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


_RECOGNISERS = (_slot_attention, _peft_lora)


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


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent_path), name, new)


__all__ = ["PatchReport", "patch", "unpatch"]
