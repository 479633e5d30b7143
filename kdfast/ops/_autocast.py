"""kdfast's autocast policy: one table of rules, applied to eager calls and registered with the dispatcher.

Inside ``torch.autocast(device_type, dtype)`` each op follows one of two rules, as torch's own autocast op lists do
(https://pytorch.org/docs/stable/amp.html#autocast-op-reference):

- ``FLOAT32``, torch's "ops that autocast to float32" (softmax, the losses, cosine_similarity): float16 and
  bfloat16 inputs are cast up to float32, the op computes in float32 and returns float32. The slot ops and the
  Gini/KL reductions are softmaxes, norms, logs and sums over slots and classes, whose torch counterparts are on
  that list: returned in bf16 a loss would keep under 3 significant digits, and their eps terms (1e-8, 1e-10)
  vanish beside 1 in bf16.
- ``LOWER``, torch's "ops that autocast to the lower precision" (linear, matmul): float32 inputs are cast to the
  autocast dtype (``torch.get_autocast_dtype``: bfloat16 or float16) and the op returns that dtype, as F.linear
  does. The LoRA GEMMs are most of a ViT's FLOPs; their kernels accumulate in float32 whatever the input dtype.

Under both rules float64 inputs stay float64 and tensors on another device type than the autocast region's are
left alone, as in torch. Outside autocast nothing changes: ops compute in their inputs' dtype, mixed inputs in the
widest (``_validate.compute_dtype``). The rule applies after that promotion, so a float32 teacher beside a bf16
student still computes in float32.

The table is applied in two places: ``eager_or_traced`` (kdfast/ops/_autograd.py) casts an op's arguments before
its call, in eager mode and under torch.compile alike (the same Python runs in both, so both give the same
dtypes), then switches autocast off for the call; :func:`register` installs the same rule as each custom op's
AutocastCPU / AutocastCUDA kernel, for code that calls ``torch.ops.kdfast.*`` directly. Backward ops have no rule:
they take the dtypes their forward saved.
"""

from __future__ import annotations

import torch

FLOAT32 = "float32"
LOWER = "lower"

# op name -> rule. Custom ops by their name in the kdfast namespace; the composites eager_or_traced sees
# (gini_kl's traced form, two custom ops) and slot_attention (the iterations' Python loop) by their public name.
RULES = {
    "slot_cosine_similarity": FLOAT32,
    "slot_assignment": FLOAT32,  # decided on float32 cosines, as slot_match_loss's hungarian matching does
    "slot_match_loss": FLOAT32,
    "slot_contrastive_loss": FLOAT32,
    "slot_attention_core": FLOAT32,
    "_slot_attention_iterations_triton": FLOAT32,
    "slot_attention": FLOAT32,
    "gini_kl_statistics": FLOAT32,  # class sums are float64 for every input dtype
    "gini_kl_from_statistics": FLOAT32,
    "gini_kl": FLOAT32,
    "lora_linear": LOWER,
    "lora_qkv": LOWER,
}

# Rules that name a public composite rather than a custom op: register() skips them.
COMPOSITES = ("slot_attention", "gini_kl")
AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}


def op_name(op) -> str:
    """The name ``op`` has in RULES: a custom op's name, or ``<name>`` for a composite function ``_<name>_traced``."""
    name = getattr(op, "_name", None) or op.__name__.strip("_").removesuffix("_traced")
    if name not in RULES:
        raise KeyError(f"kdfast op {name!r} has no autocast rule: add it to RULES in kdfast/ops/_autocast.py")
    return name


def target_dtype(name: str, device_type: str) -> torch.dtype:
    """The dtype op ``name``'s rule casts to in an autocast region on ``device_type``."""
    return torch.float32 if RULES[name] == FLOAT32 else torch.get_autocast_dtype(device_type)


def cast_args(name: str, device_type: str, args: tuple) -> tuple:
    """``args`` with the floating tensors on ``device_type`` cast as op ``name``'s rule says, if autocast is on
    there; other arguments unchanged."""
    if not torch.is_autocast_enabled(device_type):
        return args
    return _cast(args, device_type, target_dtype(name, device_type))


def cast_inputs(name: str, *tensors: torch.Tensor) -> tuple:
    """``tensors`` (on one device) cast as op ``name``'s rule says in an enclosing autocast region, else unchanged."""
    return cast_args(name, tensors[0].device.type, tensors)


def _cast(args: tuple, device_type: str, dtype: torch.dtype) -> tuple:
    return tuple(
        arg.to(dtype)
        if isinstance(arg, torch.Tensor) and arg.device.type == device_type and arg.is_floating_point()
        and arg.dtype not in (torch.float64, dtype)
        else arg
        for arg in args
    )


def _lower_kernel(op: torch._ops.OpOverload, device_type: str):
    def kernel(*args):
        args = _cast(args, device_type, torch.get_autocast_dtype(device_type))
        with torch.autocast(device_type, enabled=False):
            return op(*args)

    return kernel


def register() -> None:
    """Install each custom op's rule as its autocast kernel on every device type (the ops must be defined)."""
    for name, rule in RULES.items():
        if name in COMPOSITES:
            continue
        qualname = f"kdfast::{name}"
        for device_type, key in AUTOCAST_KEYS.items():
            if rule == FLOAT32:
                torch.library.register_autocast(qualname, device_type, torch.float32)
            else:
                # register_autocast casts to one fixed dtype: LOWER follows the region's dtype (bf16 or fp16).
                torch.library.impl(qualname, key, _lower_kernel(getattr(torch.ops.kdfast, name).default, device_type))
