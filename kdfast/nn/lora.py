"""LoRA modules: a PEFT-compatible ``LoRALinear`` and WeCoLoRA's ``LoRAAttention`` around a timm Attention.

``LoRALinear`` follows ``peft.tuners.lora.Linear`` (one adapter): ``scaling = lora_alpha / r`` (``/ sqrt(r)`` with
rsLoRA), dropout on the LoRA input only, A initialised ``kaiming_uniform_(a=sqrt(5))`` and B zeros, parameters
``base_layer.*``, ``lora_A.weight``, ``lora_B.weight`` (the keys of a saved PEFT adapter; PEFT's in-memory keys
``lora_A.<adapter>.weight`` load too), ``merge(safe_merge)`` / ``unmerge``.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdfast import ops
from kdfast.ops import _validate

_SLICES = ("q", "k", "v")


def _check_rank(r) -> int:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r (the LoRA rank) must be a positive integer, got {r!r}")
    return r


def _scaling(r: int, lora_alpha: float, use_rslora: bool) -> float:
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not math.isfinite(lora_alpha):
        raise ValueError(f"lora_alpha must be a finite number, got {lora_alpha!r}")
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def _adapter_pair(in_features: int, out_features: int, r: int, like: Tensor) -> tuple[nn.Linear, nn.Linear]:
    """PEFT's adapter layers A (r, in) and B (out, r), created in PEFT's order, so that after ``_reset`` one seed
    gives PEFT's A exactly."""
    factory = {"device": like.device, "dtype": like.dtype}
    lora_a = nn.Linear(in_features, r, bias=False, **factory)
    lora_b = nn.Linear(r, out_features, bias=False, **factory)
    return lora_a, lora_b


@torch.no_grad()
def _reset(lora_a: nn.Linear, lora_b: nn.Linear) -> None:
    nn.init.kaiming_uniform_(lora_a.weight, a=math.sqrt(5))
    nn.init.zeros_(lora_b.weight)


def _delta(lora_a: nn.Linear, lora_b: nn.Linear, scaling: float) -> Tensor:
    """``scaling * B @ A`` in the adapter's dtype (computed in float32 for half dtypes on CPU, as PEFT does)."""
    a, b = lora_a.weight, lora_b.weight
    if a.device.type == "cpu" and a.dtype in (torch.float16, torch.bfloat16):
        return ((b.float() @ a.float()) * scaling).to(a.dtype)
    return (b @ a) * scaling


def _rename_adapter_keys(state_dict: dict, prefix: str, names: tuple[str, ...]) -> None:
    """Map PEFT's in-memory keys ``<prefix><name>.<adapter>.weight`` to ``<prefix><name>.weight`` (one adapter)."""
    for name in names:
        start = f"{prefix}{name}."
        found = [k for k in state_dict if k.startswith(start) and k.endswith(".weight") and k.count(".", len(start)) == 1]
        if len(found) == 1 and f"{start}weight" not in state_dict:
            state_dict[f"{start}weight"] = state_dict.pop(found[0])


class LoRALinear(nn.Module):
    """``base_layer(x) + scaling * lora_B(lora_A(dropout(x)))``, PEFT's ``lora.Linear`` on kdfast's fused op.

    Args:
        base_layer: the nn.Linear to adapt; used as is (not copied). Freeze it yourself if it should not train.
        r: rank (1 and up). lora_alpha: scaling numerator, PEFT's default 8.
        lora_dropout: dropout probability on the LoRA input (active in training mode only).
        use_rslora: ``scaling = lora_alpha / sqrt(r)`` instead of ``lora_alpha / r``.
        init_lora_weights: True for PEFT's init (A Kaiming-uniform, B zeros: the layer starts as base_layer);
            False keeps nn.Linear's default init of both (a non-zero update, as PEFT's False does).
        backend: kdfast backend of ``kdfast.ops.lora_linear`` (None: ``KDFAST_BACKEND``, default ``auto``).

    Shapes: x (..., in_features) -> (..., out_features).
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: bool = True,
        backend: str | None = None,
    ):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"base_layer must be a torch.nn.Linear, got {type(base_layer).__name__}")
        if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, (int, float)) or not 0 <= lora_dropout < 1:
            raise ValueError(f"lora_dropout must be a probability in [0, 1), got {lora_dropout!r}")
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.lora_alpha, self.use_rslora = _check_rank(r), lora_alpha, use_rslora
        self.scaling = _scaling(r, lora_alpha, use_rslora)
        self.lora_dropout = float(lora_dropout)
        self.backend = backend
        self.lora_A, self.lora_B = _adapter_pair(self.in_features, self.out_features, r, base_layer.weight)
        if init_lora_weights:
            self.reset_lora_parameters()
        self.merged = False

    @classmethod
    def from_peft(cls, layer: nn.Module, adapter_name: str = "default", backend: str | None = None) -> LoRALinear:
        """The same layer from a ``peft.tuners.lora.Linear``: its base layer (shared, not copied) and a copy of the
        adapter's A and B. Unmerge the PEFT layer first."""
        if getattr(layer, "merged", False):
            raise ValueError("the PEFT layer has merged adapters: call its unmerge() first")
        dropout = layer.lora_dropout[adapter_name]
        module = cls(
            layer.get_base_layer(), layer.r[adapter_name], layer.lora_alpha[adapter_name],
            getattr(dropout, "p", 0.0), layer.use_rslora[adapter_name], init_lora_weights=False, backend=backend,
        )
        module.scaling = layer.scaling[adapter_name]  # PEFT's set_scale may have changed it
        with torch.no_grad():
            module.lora_A.weight.copy_(layer.lora_A[adapter_name].weight)
            module.lora_B.weight.copy_(layer.lora_B[adapter_name].weight)
        return module

    def reset_lora_parameters(self) -> None:
        """PEFT's init: A ``kaiming_uniform_(a=sqrt(5))`` (nn.Linear's own), B zeros."""
        _reset(self.lora_A, self.lora_B)

    def get_delta_weight(self) -> Tensor:
        """The merged update ``scaling * B @ A``, (out_features, in_features)."""
        return _delta(self.lora_A, self.lora_B, self.scaling)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False) -> None:
        """Add the update to ``base_layer.weight`` (forward is then the base layer alone). ``safe_merge`` computes
        the merged weight out of place and raises ValueError, leaving the weight untouched, if it is not finite."""
        if self.merged:
            warnings.warn("All adapters are already merged, nothing to do.", stacklevel=2)
            return
        weight = self.base_layer.weight
        delta = self.get_delta_weight().to(weight.dtype)
        if safe_merge:
            merged = weight.data.clone() + delta
            if not torch.isfinite(merged).all():
                raise ValueError("NaNs detected in the merged weights. The adapter seems to be broken")
            weight.data = merged
        else:
            weight.data += delta
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update merged by ``merge`` (the weights come back up to rounding)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        weight = self.base_layer.weight
        weight.data -= self.get_delta_weight().to(weight.dtype)
        self.merged = False

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base_layer(x)
        return ops.lora_linear(
            x, self.base_layer.weight, self.base_layer.bias, self.lora_A.weight, self.lora_B.weight, self.scaling,
            self.lora_dropout, self.training, backend=self.backend,
        )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        _rename_adapter_keys(state_dict, prefix, ("lora_A", "lora_B"))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, lora_dropout={self.lora_dropout}"


def _identity_or_absent(module: nn.Module, name: str) -> bool:
    sub = getattr(module, name, None)
    return sub is None or isinstance(sub, nn.Identity)


class LoRAAttention(nn.Module):
    """timm Attention with WeCoLoRA's adapters: a separate (A, B) pair on each of the q, k and v slices of the fused
    qkv Linear, and one on proj. Runs ``kdfast.ops.lora_attention`` (LoRA qkv, SDPA, LoRA proj).

    Args:
        qkv: nn.Linear(C, 3C), used as is. proj: nn.Linear(C, C), wrapped (not copied) in a LoRALinear.
        num_heads: H, dividing C.
        r: rank. lora_alpha: scaling numerator; None means ``r`` (scale 1, WeCoLoRA's setting).
        use_rslora, init_lora_weights, backend: as in LoRALinear. No LoRA dropout (WeCoLoRA uses none).

    Parameters: ``qkv.*`` (timm's names), ``lora_A.{q,k,v}.weight`` (r, C), ``lora_B.{q,k,v}.weight`` (C, r),
    ``proj.base_layer.*``, ``proj.lora_A.weight``, ``proj.lora_B.weight``.

    Shapes: x (B, T, C) -> (B, T, C).
    """

    def __init__(
        self,
        qkv: nn.Linear,
        proj: nn.Linear,
        num_heads: int,
        r: int = 8,
        lora_alpha: float | None = None,
        use_rslora: bool = False,
        init_lora_weights: bool = True,
        backend: str | None = None,
    ):
        super().__init__()
        for name, layer in (("qkv", qkv), ("proj", proj)):
            if not isinstance(layer, nn.Linear):
                raise TypeError(f"{name} must be a torch.nn.Linear, got {type(layer).__name__}")
        dim = proj.in_features
        if (qkv.in_features, qkv.out_features) != (dim, 3 * dim) or proj.out_features != dim:
            raise ValueError(
                f"qkv must be Linear(C, 3C) and proj Linear(C, C); got qkv ({qkv.in_features} -> {qkv.out_features}), "
                f"proj ({proj.in_features} -> {proj.out_features})"
            )
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1 or dim % num_heads:
            raise ValueError(f"num_heads must be a positive integer dividing C={dim}, got {num_heads!r}")
        r = _check_rank(r)
        lora_alpha = r if lora_alpha is None else lora_alpha
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.r, self.lora_alpha, self.scaling = r, lora_alpha, _scaling(r, lora_alpha, use_rslora)
        self.backend = backend
        self.qkv = qkv
        pairs = {s: _adapter_pair(dim, dim, r, qkv.weight) for s in _SLICES}
        self.lora_A = nn.ModuleDict({s: pair[0] for s, pair in pairs.items()})
        self.lora_B = nn.ModuleDict({s: pair[1] for s, pair in pairs.items()})
        self.proj = LoRALinear(proj, r, lora_alpha, 0.0, use_rslora, init_lora_weights, backend)
        if init_lora_weights:
            for s in _SLICES:
                _reset(self.lora_A[s], self.lora_B[s])
        self.merged = False

    @classmethod
    def from_timm(
        cls, attn: nn.Module, rank: int, lora_alpha: float | None = None, use_rslora: bool = False,
        init_lora_weights: bool = True, backend: str | None = None,
    ) -> LoRAAttention:
        """Wrap a timm-style Attention (``qkv``, ``proj``, ``num_heads``) without copying its weights: the new
        module holds the same qkv and proj Linear modules. Attention variants the fused op does not compute
        (q/k norm, a norm before proj, an output gate, attention or projection dropout) are a ValueError."""
        missing = [name for name in ("qkv", "proj", "num_heads") if not hasattr(attn, name)]
        if missing:
            raise TypeError(f"attn must be a timm-style Attention with qkv, proj and num_heads; it lacks {missing}")
        unsupported = [name for name in ("q_norm", "k_norm", "norm") if not _identity_or_absent(attn, name)]
        unsupported += [name for name in ("gate",) if getattr(attn, name, None) is not None]
        unsupported += [
            name for name in ("attn_drop", "proj_drop") if getattr(getattr(attn, name, None), "p", 0.0) > 0
        ]
        if unsupported:
            raise ValueError(f"LoRAAttention computes plain timm attention; this Attention also has {unsupported}")
        return cls(attn.qkv, attn.proj, attn.num_heads, rank, lora_alpha, use_rslora, init_lora_weights, backend)

    def get_delta_weight(self) -> Tensor:
        """The merged update of the qkv weight, (3C, C): the q, k and v slices' ``scaling * B @ A`` stacked."""
        return torch.cat([_delta(self.lora_A[s], self.lora_B[s], self.scaling) for s in _SLICES])

    @torch.no_grad()
    def merge(self, safe_merge: bool = False) -> None:
        """Merge the qkv and proj adapters into the base weights (see LoRALinear.merge)."""
        if self.merged:
            warnings.warn("All adapters are already merged, nothing to do.", stacklevel=2)
            return
        weight = self.qkv.weight
        merged = weight.data + self.get_delta_weight().to(weight.dtype)
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError("NaNs detected in the merged weights. The adapter seems to be broken")
        self.proj.merge(safe_merge)
        weight.data = merged
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        self.qkv.weight.data -= self.get_delta_weight().to(self.qkv.weight.dtype)
        self.proj.unmerge()
        self.merged = False

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        """x (B, T, C) -> (B, T, C). ``attn_mask`` and ``is_causal`` are timm's (``Block.forward`` passes them):
        they go to ``scaled_dot_product_attention`` as timm's fused path passes them (a boolean mask keeps the
        True positions, a float mask is added to the logits; broadcastable to (B, H, T, T))."""
        if attn_mask is not None and not isinstance(attn_mask, Tensor):
            raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
        if not isinstance(is_causal, bool):
            raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
        proj = self.proj.base_layer
        if self.merged:
            pairs, proj_pair = [None, None, None], None
        else:
            pairs = [(self.lora_A[s].weight, self.lora_B[s].weight) for s in _SLICES]
            proj_pair = (self.proj.lora_A.weight, self.proj.lora_B.weight)
        if attn_mask is None and not is_causal:
            return ops.lora_attention(
                x, self.qkv.weight, self.qkv.bias, *pairs, proj.weight, proj.bias, proj_pair, self.scaling,
                self.num_heads, backend=self.backend,
            )
        # Masked attention: kdfast.ops.lora_attention's core takes no mask, so its two LoRA projections run
        # around SDPA here.
        q, k, v = ops.lora_qkv(
            x, self.qkv.weight, self.qkv.bias, *pairs, self.scaling, self.num_heads, backend=self.backend
        )
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        out = out.transpose(1, 2).reshape(x.shape)
        if proj_pair is None:
            return F.linear(out, *_validate.cast(out.dtype, proj.weight, proj.bias))
        return ops.lora_linear(out, proj.weight, proj.bias, *proj_pair, self.scaling, backend=self.backend)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}"


__all__ = ["LoRAAttention", "LoRALinear"]
