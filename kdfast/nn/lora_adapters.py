"""``LoRALinearAdapters``: PEFT's ``lora.Linear`` with several named adapters, on kdfast's fused LoRA op.

The layout is PEFT's in memory: ``base_layer.*``, ``lora_A.<adapter>.weight`` (r, in), ``lora_B.<adapter>.weight``
(out, r), and the per-adapter dicts ``r``, ``lora_alpha``, ``scaling``, ``lora_dropout`` (modules, as PEFT's). So
a PEFT model's state_dict, and the adapter state_dicts PEFT saves and loads (``get_peft_model_state_dict`` /
``set_peft_model_state_dict``), keep their keys when its layers are swapped for these (``kdfast.patch``). The
switching methods are PEFT's layer methods: ``set_adapter``, ``enable_adapters`` / ``disable_adapters``,
``add_adapter``, ``delete_adapter``, ``merge(adapter_names=...)`` / ``unmerge``.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdfast import ops
from kdfast.nn.lora import _adapter_pair, _check_rank, _delta, _reset, _scaling


class LoRALinearAdapters(nn.Module):
    """``base_layer(x) + sum over active adapters of scaling[a] * lora_B[a](lora_A[a](lora_dropout[a](x)))``.

    Args:
        base_layer: the nn.Linear to adapt, used as is (not copied).
        adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights: the first adapter (as
            ``add_adapter``); it is the active one.
        backend: kdfast backend of ``kdfast.ops.lora_linear`` (None: ``KDFAST_BACKEND``, default ``auto``).

    The first active adapter runs fused with the base layer (``kdfast.ops.lora_linear``); further active adapters
    (PEFT allows several) are added in plain PyTorch. Shapes: x (..., in_features) -> (..., out_features).
    """

    #: PEFT's names of the per-adapter containers (PeftModel's adapter switching reads them).
    adapter_layer_names = ("lora_A", "lora_B")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout")

    def __init__(
        self, base_layer: nn.Linear, adapter_name: str = "default", r: int = 8, lora_alpha: float = 8,
        lora_dropout: float = 0.0, use_rslora: bool = False, init_lora_weights: bool = True,
        backend: str | None = None,
    ):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"base_layer must be a torch.nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.lora_A, self.lora_B, self.lora_dropout = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.backend = backend
        self.merged_adapters: list[str] = []
        self._active: list[str] = []
        self._disabled = False
        self.add_adapter(adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights)
        self.set_adapter(adapter_name)

    @classmethod
    def from_peft(cls, layer: nn.Module, backend: str | None = None) -> LoRALinearAdapters:
        """The same layer as a ``peft.tuners.lora.Linear``, sharing its modules (base layer, every adapter's A, B
        and dropout: nothing is copied, the state_dict keys are the same), its scalings and its active adapters.
        PEFT options kdfast does not compute (DoRA, LoRA bias, fan_in_fan_out, ...) are refused by ``kdfast.patch``,
        which calls this."""
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        base = layer.get_base_layer()
        module.base_layer = base
        module.in_features, module.out_features = base.in_features, base.out_features
        module.lora_A, module.lora_B, module.lora_dropout = layer.lora_A, layer.lora_B, layer.lora_dropout
        module.r, module.lora_alpha = dict(layer.r), dict(layer.lora_alpha)
        module.scaling, module.use_rslora = dict(layer.scaling), dict(layer.use_rslora)
        module.backend = backend
        module.merged_adapters = list(layer.merged_adapters)
        module._active = list(layer.active_adapters)
        module._disabled = bool(layer.disable_adapters)
        return module

    # ------------------------------------------------------------------------------------ PEFT's layer methods

    def add_adapter(
        self, adapter_name: str, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
        use_rslora: bool = False, init_lora_weights: bool = True,
    ) -> None:
        """A new adapter (not made active: ``set_adapter`` does that). Same options as LoRALinear."""
        if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
            raise ValueError(f"adapter_name must be a non-empty string without '.', got {adapter_name!r}")
        if adapter_name in self.lora_A:
            raise ValueError(f"adapter_name {adapter_name!r} already exists; delete_adapter it first")
        if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, (int, float)) or not 0 <= lora_dropout < 1:
            raise ValueError(f"lora_dropout must be a probability in [0, 1), got {lora_dropout!r}")
        r = _check_rank(r)
        self.scaling[adapter_name] = _scaling(r, lora_alpha, use_rslora)
        self.r[adapter_name], self.lora_alpha[adapter_name], self.use_rslora[adapter_name] = r, lora_alpha, use_rslora
        lora_a, lora_b = _adapter_pair(self.in_features, self.out_features, r, self.base_layer.weight)
        if init_lora_weights:
            _reset(lora_a, lora_b)
        self.lora_A[adapter_name], self.lora_B[adapter_name] = lora_a, lora_b
        self.lora_dropout[adapter_name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter (not a merged one: unmerge first); the active list drops it."""
        self._check_names([adapter_name])
        if adapter_name in self.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is merged: call unmerge() first")
        for container in (self.lora_A, self.lora_B, self.lora_dropout):
            del container[adapter_name]
        for table in (self.r, self.lora_alpha, self.scaling, self.use_rslora):
            del table[adapter_name]
        self._active = [name for name in self._active if name != adapter_name]

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        """Make these adapters the active ones; as in PEFT, only active adapters' A and B require grad (none with
        ``inference_mode``)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._check_names(names)
        for name in self.lora_A:
            self.lora_A[name].requires_grad_(name in names and not inference_mode)
            self.lora_B[name].requires_grad_(name in names and not inference_mode)
        self._active = names

    def get_base_layer(self) -> nn.Linear:
        return self.base_layer

    def _get_available_adapters(self) -> set[str]:
        return set(self.lora_A)

    def enable_adapters(self, enabled: bool) -> None:
        """``enable_adapters(False)``: the layer computes its base layer alone (merged adapters are unmerged first,
        as PEFT does), and no adapter requires grad; ``True`` turns the active adapters back on."""
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
        if enabled:
            self._disabled = False
            self.set_adapter(self._active)
            return
        if self.merged:
            self.unmerge()
        for name in self.lora_A:
            self.lora_A[name].requires_grad_(False)
            self.lora_B[name].requires_grad_(False)
        self._disabled = True

    @property
    def disable_adapters(self) -> bool:
        """True while ``enable_adapters(False)`` is in force (PEFT's property)."""
        return self._disabled

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def active_adapter(self) -> str | list[str]:
        return self._active[0] if len(self._active) == 1 else list(self._active)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def get_delta_weight(self, adapter_name: str) -> Tensor:
        """``scaling[a] * B[a] @ A[a]``, (out_features, in_features)."""
        self._check_names([adapter_name])
        return _delta(self.lora_A[adapter_name], self.lora_B[adapter_name], self.scaling[adapter_name])

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the updates of ``adapter_names`` (default: the active adapters not yet merged) to the base weight.
        ``safe_merge``: computed out of place, ValueError (weights untouched) if not finite."""
        names = [n for n in (self._active if adapter_names is None else adapter_names) if n not in self.merged_adapters]
        self._check_names(names)
        if not names:
            warnings.warn("All adapters are already merged, nothing to do.", stacklevel=2)
            return
        weight = self.base_layer.weight
        merged = weight.data.clone()
        for name in names:
            merged += self.get_delta_weight(name).to(weight.dtype)
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError(f"NaNs detected in the merged weights. The adapter {names} seems to be broken")
        weight.data = merged
        self.merged_adapters.extend(names)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract every merged adapter's update (last merged first)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        weight = self.base_layer.weight
        while self.merged_adapters:
            weight.data -= self.get_delta_weight(self.merged_adapters.pop()).to(weight.dtype)

    def _check_names(self, names: list[str]) -> None:
        unknown = [name for name in names if name not in self.lora_A]
        if unknown:
            raise ValueError(f"adapter names {unknown} are not adapters of this layer; it has {list(self.lora_A)}")

    # --------------------------------------------------------------------------------------------- forward

    def forward(self, x: Tensor) -> Tensor:
        active = [n for n in self._active if n in self.lora_A and n not in self.merged_adapters]
        if self._disabled or not active:
            return self.base_layer(x)
        first, *rest = active
        out = ops.lora_linear(
            x, self.base_layer.weight, self.base_layer.bias, self.lora_A[first].weight, self.lora_B[first].weight,
            self.scaling[first], getattr(self.lora_dropout[first], "p", 0.0), self.training, backend=self.backend,
        )
        for name in rest:
            h = self.lora_dropout[name](x.to(out.dtype))
            a, b = self.lora_A[name].weight.to(out.dtype), self.lora_B[name].weight.to(out.dtype)
            out = out + self.scaling[name] * F.linear(F.linear(h, a), b)
        return out

    def extra_repr(self) -> str:
        return f"adapters={list(self.lora_A)}, active={self._active}, r={self.r}, scaling={self.scaling}"


__all__ = ["LoRALinearAdapters"]
