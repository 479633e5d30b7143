"""LoRA-augmented linear layers and attention (WeCoLoRA, PEFT semantics; design.md 3.3).

    kdfast::lora_linear(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed, backend) -> y
    kdfast::lora_qkv(x, w_qkv, b_qkv, a_q, b_q, a_k, b_k, a_v, b_v, scale, num_heads, backend) -> (q, k, v)

``lora_attention`` composes them with scaled_dot_product_attention. Backends: ``triton`` (kernels/lora.py: the
low-rank update folded into the base GEMM's epilogue; lora_qkv stores q, k, v in the (B, H, T, head_dim) layout)
and ``reference``. CPU runs the reference: the op is GEMMs, which torch's CPU BLAS already does as well as a
compiled kernel could (the benchmark compares it with PEFT-style eager and torch.compile), so there is no
``cpp`` backend.

Dropout on the LoRA input draws its mask from a seed (a 0-d int64 tensor drawn from torch's default generator,
so ``torch.manual_seed`` makes it reproducible); the backward regenerates the mask from the same seed instead of
saving it.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import Tensor

from kdfast import _backend, reference
from kdfast._backend import Implementation
from kdfast.ops import _validate
from kdfast.ops._autograd import eager_or_traced, reference_vjp


def _kernels():
    return importlib.import_module("kdfast.kernels.lora")


def _dropout_mask(x: Tensor, dropout_p: float, seed: Tensor | None) -> Tensor | None:
    """Keep-mask scaled by 1/(1-p), regenerated identically from ``seed`` in forward and backward."""
    if seed is None or dropout_p == 0.0:
        return None
    generator = torch.Generator(device=x.device)
    generator.manual_seed(int(seed))
    keep = torch.rand(x.shape, generator=generator, device=x.device) >= dropout_p
    return keep.to(x.dtype) / (1.0 - dropout_p)


def _reference_lora_linear(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed, backend="reference"):
    # backend: the custom op's last argument, which eager_or_traced passes to the eager call too
    return reference.lora_linear(x, weight, bias, lora_a, lora_b, scale, _dropout_mask(x, dropout_p, seed))


def _reference_lora_linear_backward(grad, x, weight, bias, lora_a, lora_b, scale, dropout_p, seed, needs):
    inputs = (x, weight, bias, lora_a, lora_b)
    return tuple(reference_vjp(_reference_lora_linear, inputs, (grad,), scale, dropout_p, seed, needs=needs))


def _triton_lora_linear(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed):
    x2d = x.reshape(-1, x.shape[-1])
    y = _kernels().lora_linear_forward(x2d, weight, bias, lora_a, lora_b, scale, dropout_p, seed)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def _triton_lora_linear_backward(grad, x, weight, bias, lora_a, lora_b, scale, dropout_p, seed, needs):
    x2d, grad2d = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
    grads = _kernels().lora_linear_backward(grad2d, x2d, weight, bias, lora_a, lora_b, scale, dropout_p, seed, needs)
    grads = [x.new_empty(0) if g is None else g for g in grads]
    if grads[0].numel():
        grads[0] = grads[0].reshape(x.shape)
    return tuple(grads)


def _triton_dropout_limit(numel: int) -> str | None:
    """The kernels' dropout counters are 32-bit (sizes: x's element count when dropout is active, else none)."""
    limit = _kernels().MAX_NUMEL
    return None if numel <= limit else f"the triton backend's dropout handles x with at most {limit} elements, got {numel}"


# forward(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed) -> y; backward(grad, ...same, needs) -> the
# five gradients (empty where not needed); eager: where not the custom op; limit(numel of x under dropout)
LORA_LINEAR = _backend.register("lora_linear", {
    "triton": Implementation(
        forward=_triton_lora_linear, backward=_triton_lora_linear_backward, limit=_triton_dropout_limit,
    ),
    "reference": Implementation(
        forward=_reference_lora_linear, backward=_reference_lora_linear_backward,
        # only the reference is cheaper through plain autograd: a kernel's cost dwarfs the custom op's dispatch
        eager=_reference_lora_linear,
    ),
})


@torch.library.custom_op("kdfast::lora_linear", mutates_args=())
def _lora_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
    scale: float, dropout_p: float, seed: Tensor | None, backend: str,
) -> Tensor:
    return LORA_LINEAR[backend].forward(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed)


@_lora_linear.register_fake
def _(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed, backend):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("kdfast::lora_linear_backward", mutates_args=())
def _lora_linear_backward(
    grad: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
    scale: float, dropout_p: float, seed: Tensor | None, needs: list[bool], backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of x, weight, bias, lora_a, lora_b; an empty tensor where ``needs`` is False or bias is None."""
    return LORA_LINEAR[backend].backward(grad, x, weight, bias, lora_a, lora_b, scale, dropout_p, seed, needs)


@_lora_linear_backward.register_fake
def _(grad, x, weight, bias, lora_a, lora_b, scale, dropout_p, seed, needs, backend):
    inputs = (x, weight, bias, lora_a, lora_b)
    return tuple(t.new_empty(t.shape) if t is not None and need else x.new_empty(0) for t, need in zip(inputs, needs))


def _lora_linear_setup(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, ctx.scale, ctx.dropout_p, seed, ctx.backend = inputs
    ctx.save_for_backward(x, weight, bias, lora_a, lora_b, seed)


def _lora_linear_grad(ctx, grad):
    x, weight, bias, lora_a, lora_b, seed = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:5])
    grads = _lora_linear_backward(
        grad, x, weight, bias, lora_a, lora_b, ctx.scale, ctx.dropout_p, seed, needs, ctx.backend
    )
    return *(g if need else None for g, need in zip(grads, needs)), None, None, None, None


_lora_linear.register_autograd(_lora_linear_grad, setup_context=_lora_linear_setup)


def lora_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
    scale: float = 1.0, dropout_p: float = 0.0, training: bool = True, *, backend: str | None = None,
) -> Tensor:
    """A frozen (or trainable) Linear plus a low-rank update: ``x W^T + b + scale * (dropout(x) A^T) B^T``.

    Args:
        x: (..., I) float16, bfloat16, float32 or float64.
        weight: (O, I); bias: (O,) or None; lora_a: (r, I); lora_b: (O, r); same device.
        scale: LoRA scaling (PEFT: alpha / r). dropout_p: dropout on the LoRA input only, active when training.
        backend: ``auto``, ``triton`` or ``reference`` (None: ``KDFAST_BACKEND``, default ``auto``: triton on
            CUDA, reference on CPU). The triton backend's dropout takes x of at most 2**31 - 1 elements.

    Returns:
        (..., O) in the inputs' dtype (mixed dtypes are promoted, at least float32); inside torch.autocast, the
        region's dtype (kdfast/ops/_autocast.py).
    """
    _check_linear(x, weight, bias, lora_a, lora_b)
    scale = _validate.finite("scale", scale)
    dropout_p = _validate.finite("dropout_p", dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    tensors = [t for t in (x, weight, bias, lora_a, lora_b) if t is not None]
    dtype = _validate.compute_dtype(*tensors)
    seed = torch.randint(0, 2**62, ()) if training and dropout_p > 0 else None
    chosen = _backend.resolve("lora_linear", backend, x.device.type, () if seed is None else (x.numel(),))
    x, weight, bias, lora_a, lora_b = _validate.cast(dtype, x, weight, bias, lora_a, lora_b)
    args = (x, weight, bias, lora_a, lora_b, scale, dropout_p, seed, chosen)
    return eager_or_traced(LORA_LINEAR[chosen].eager or _lora_linear, _lora_linear, *args)


def _check_linear(x, weight, bias, lora_a, lora_b, prefix: str = "") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{prefix}x must be a torch.Tensor of shape (..., in_features), got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError(f"{prefix}x must be a tensor of shape (..., in_features), got shape {tuple(x.shape)}")
    if x.dtype not in _validate.FLOAT_DTYPES:
        raise TypeError(f"{prefix}x must be a float16, bfloat16, float32 or float64 tensor, got {x.dtype}")
    _validate.tensor(f"{prefix}weight", weight, "(out_features, in_features)")
    named = {"x": x, "weight": weight}
    if lora_a is not None or lora_b is not None:
        _validate.tensor(f"{prefix}lora_a", lora_a, "(r, in_features)")
        _validate.tensor(f"{prefix}lora_b", lora_b, "(out_features, r)")
        named.update(lora_a=lora_a, lora_b=lora_b)
    if bias is not None:
        _validate.tensor(f"{prefix}bias", bias, "(out_features,)")
        named["bias"] = bias
    _validate.same_device(**{prefix + name: t for name, t in named.items()})
    layouts = {"x": "(..., in_features)", "weight": "(out_features, in_features)", "lora_a": "(r, in_features)",
               "lora_b": "(out_features, r)", "bias": "(out_features,)"}
    for name, t in named.items():
        _validate.nonempty(prefix + name, t, layouts[name])
    in_sizes = {"x": x.shape[-1], "weight": weight.shape[1]}
    out_sizes = {"weight": weight.shape[0]} | ({} if bias is None else {"bias": bias.shape[0]})
    if lora_a is not None:
        in_sizes["lora_a"] = lora_a.shape[1]
        out_sizes["lora_b"] = lora_b.shape[0]
        _validate.same_size(f"{prefix}rank r", lora_a=lora_a.shape[0], lora_b=lora_b.shape[1])
    _validate.same_size(f"{prefix}in_features", **in_sizes)
    _validate.same_size(f"{prefix}out_features", **out_sizes)


# --------------------------------------------------------------------------------------------------------------
# kdfast::lora_qkv


def _pairs(a_q, b_q, a_k, b_k, a_v, b_v):
    return [None if a is None else (a, b) for a, b in ((a_q, b_q), (a_k, b_k), (a_v, b_v))]


def _reference_lora_qkv(x, w_qkv, b_qkv, a_q, b_q, a_k, b_k, a_v, b_v, scale, num_heads, backend="reference"):
    # backend: the custom op's last argument, which eager_or_traced passes to the eager call too
    return reference.lora_qkv(x, w_qkv, b_qkv, *_pairs(a_q, b_q, a_k, b_k, a_v, b_v), scale, num_heads)


def _reference_lora_qkv_unaliased(*args):
    # Three views of one qkv tensor: a custom op's outputs may not alias each other.
    return tuple(t.clone(memory_format=torch.contiguous_format) for t in _reference_lora_qkv(*args))


def _reference_lora_qkv_backward(grad_q, grad_k, grad_v, x, w_qkv, b_qkv, a_q, b_q, a_k, b_k, a_v, b_v, scale,
                                 num_heads, needs):
    inputs = (x, w_qkv, b_qkv, a_q, b_q, a_k, b_k, a_v, b_v)
    return reference_vjp(_reference_lora_qkv, inputs, (grad_q, grad_k, grad_v), scale, num_heads, needs=needs)


def _triton_lora_qkv(x, w_qkv, b_qkv, a_q, b_q, a_k, b_k, a_v, b_v, scale, num_heads):
    pairs = _pairs(a_q, b_q, a_k, b_k, a_v, b_v)
    return _kernels().lora_qkv_forward(x, w_qkv, b_qkv, pairs, scale, num_heads)


def _triton_lora_qkv_backward(grad_q, grad_k, grad_v, x, w_qkv, b_qkv, a_q, b_q, a_k, b_k, a_v, b_v, scale,
                              num_heads, needs):
    pairs = _pairs(a_q, b_q, a_k, b_k, a_v, b_v)
    grads = _kernels().lora_qkv_backward((grad_q, grad_k, grad_v), x, w_qkv, b_qkv, pairs, scale, num_heads, needs)
    return [x.new_empty(0) if g is None else g for g in grads]


# forward(x, w_qkv, b_qkv, a_q, b_q, a_k, b_k, a_v, b_v, scale, num_heads) -> (q, k, v); backward(grad_q, grad_k,
# grad_v, ...same, needs) -> the 9 gradients (empty where not needed); eager: where not the custom op
LORA_QKV = _backend.register("lora_qkv", {
    "triton": Implementation(forward=_triton_lora_qkv, backward=_triton_lora_qkv_backward),
    "reference": Implementation(
        forward=_reference_lora_qkv_unaliased, backward=_reference_lora_qkv_backward, eager=_reference_lora_qkv,
    ),
})


@torch.library.custom_op("kdfast::lora_qkv", mutates_args=())
def _lora_qkv(
    x: Tensor, w_qkv: Tensor, b_qkv: Tensor | None, a_q: Tensor | None, b_q: Tensor | None,
    a_k: Tensor | None, b_k: Tensor | None, a_v: Tensor | None, b_v: Tensor | None,
    scale: float, num_heads: int, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return LORA_QKV[backend].forward(x, w_qkv, b_qkv, a_q, b_q, a_k, b_k, a_v, b_v, scale, num_heads)


@_lora_qkv.register_fake
def _(x, w_qkv, b_qkv, a_q, b_q, a_k, b_k, a_v, b_v, scale, num_heads, backend):
    B, T, C = x.shape
    return tuple(x.new_empty(B, num_heads, T, C // num_heads) for _ in range(3))


@torch.library.custom_op("kdfast::lora_qkv_backward", mutates_args=())
def _lora_qkv_backward(
    grad_q: Tensor, grad_k: Tensor, grad_v: Tensor, x: Tensor, w_qkv: Tensor, b_qkv: Tensor | None,
    a_q: Tensor | None, b_q: Tensor | None, a_k: Tensor | None, b_k: Tensor | None,
    a_v: Tensor | None, b_v: Tensor | None, scale: float, num_heads: int, needs: list[bool], backend: str,
) -> list[Tensor]:
    """Gradients of the 9 tensor inputs in order; an empty tensor where ``needs`` is False or the input is None."""
    inputs = (x, w_qkv, b_qkv, a_q, b_q, a_k, b_k, a_v, b_v)
    return LORA_QKV[backend].backward(grad_q, grad_k, grad_v, *inputs, scale, num_heads, needs)


@_lora_qkv_backward.register_fake
def _(grad_q, grad_k, grad_v, x, w_qkv, b_qkv, a_q, b_q, a_k, b_k, a_v, b_v, scale, num_heads, needs, backend):
    inputs = (x, w_qkv, b_qkv, a_q, b_q, a_k, b_k, a_v, b_v)
    return [t.new_empty(t.shape) if t is not None and need else x.new_empty(0) for t, need in zip(inputs, needs)]


def _lora_qkv_setup(ctx, inputs, output):
    *tensors, ctx.scale, ctx.num_heads, ctx.backend = inputs
    ctx.save_for_backward(*tensors)


def _lora_qkv_grad(ctx, grad_q, grad_k, grad_v):
    needs = list(ctx.needs_input_grad[:9])
    grads = (grad_q, grad_k, grad_v)
    grads = [torch.zeros_like(grad_q) if g is None else g for g in grads]  # an unused output
    result = _lora_qkv_backward(*grads, *ctx.saved_tensors, ctx.scale, ctx.num_heads, needs, ctx.backend)
    return *(g if need else None for g, need in zip(result, needs)), None, None, None


_lora_qkv.register_autograd(_lora_qkv_grad, setup_context=_lora_qkv_setup)


def lora_qkv(
    x: Tensor, w_qkv: Tensor, b_qkv: Tensor | None,
    lora_q: tuple[Tensor, Tensor] | None, lora_k: tuple[Tensor, Tensor] | None, lora_v: tuple[Tensor, Tensor] | None,
    scale: float = 1.0, num_heads: int = 1, *, backend: str | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """WeCoLoRA's fused qkv projection with a separate LoRA pair on each of the q, k and v slices.

    Args:
        x: (B, T, C) float16, bfloat16, float32 or float64.
        w_qkv: (3C, C); b_qkv: (3C,) or None.
        lora_q, lora_k, lora_v: each (A (r, C), B (C, r)) or None for no LoRA on that slice.
        scale: LoRA scaling; num_heads: H, dividing C.
        backend: ``auto``, ``triton`` or ``reference``, as in ``lora_linear``.

    Returns:
        q, k, v, each (B, H, T, C // H): the layout scaled_dot_product_attention takes (the triton backend
        writes them there directly).
    """
    _validate.tensor("x", x, "(B, T, C)")
    _validate.nonempty("x", x, "(B, T, C)")
    C = x.shape[2]
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1 or C % num_heads:
        raise ValueError(f"num_heads must be a positive integer dividing C={C}, got {num_heads!r}")
    _validate.tensor("w_qkv", w_qkv, "(3C, C)")
    if tuple(w_qkv.shape) != (3 * C, C):
        raise ValueError(f"w_qkv must have shape (3C, C) = {(3 * C, C)}, got {tuple(w_qkv.shape)}")
    named = {"x": x, "w_qkv": w_qkv}
    if b_qkv is not None:
        _validate.tensor("b_qkv", b_qkv, "(3C,)")
        _validate.same_size("b_qkv length 3C", b_qkv=b_qkv.shape[0], expected=3 * C)
        named["b_qkv"] = b_qkv
    flat = []
    for slice_name, pair in (("lora_q", lora_q), ("lora_k", lora_k), ("lora_v", lora_v)):
        if pair is None:
            flat += [None, None]
            continue
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(f"{slice_name} must be a pair (A (r, C), B (C, r)) or None, got {type(pair).__name__}")
        a, b = pair
        _validate.tensor(f"{slice_name}[0] (A)", a, "(r, C)")
        _validate.tensor(f"{slice_name}[1] (B)", b, "(C, r)")
        _validate.same_size(f"{slice_name} in_features C", x=C, A=a.shape[1])
        _validate.same_size(f"{slice_name} out_features C", x=C, B=b.shape[0])
        _validate.same_size(f"{slice_name} rank r", A=a.shape[0], B=b.shape[1])
        _validate.nonempty(f"{slice_name}[0] (A)", a, "(r, C)")
        named[f"{slice_name}_A"], named[f"{slice_name}_B"] = a, b
        flat += [a, b]
    _validate.same_device(**named)
    scale = _validate.finite("scale", scale)
    dtype = _validate.compute_dtype(*named.values())
    flat = _validate.cast(dtype, *flat)
    (b_qkv,) = _validate.cast(dtype, b_qkv)
    chosen = _backend.resolve("lora_qkv", backend, x.device.type)
    x, w_qkv = _validate.cast(dtype, x, w_qkv)
    eager = LORA_QKV[chosen].eager or _lora_qkv
    return eager_or_traced(eager, _lora_qkv, x, w_qkv, b_qkv, *flat, scale, num_heads, chosen)


def lora_attention(
    x: Tensor, w_qkv: Tensor, b_qkv: Tensor | None,
    lora_q: tuple[Tensor, Tensor] | None, lora_k: tuple[Tensor, Tensor] | None, lora_v: tuple[Tensor, Tensor] | None,
    w_proj: Tensor, b_proj: Tensor | None, lora_proj: tuple[Tensor, Tensor] | None,
    scale: float = 1.0, num_heads: int = 1, *, backend: str | None = None,
) -> Tensor:
    """timm Attention with LoRA on the q, k, v slices of qkv and on proj; the core is SDPA.

    Args: as ``lora_qkv``, plus w_proj (C, C), b_proj (C,) or None, lora_proj (A (r, C), B (C, r)) or None.
    Returns: (B, T, C).
    """
    if lora_proj is not None and (not isinstance(lora_proj, (tuple, list)) or len(lora_proj) != 2):
        raise TypeError(f"lora_proj must be a pair (A (r, C), B (C, r)) or None, got {type(lora_proj).__name__}")
    a_proj, b_proj_lora = (None, None) if lora_proj is None else lora_proj
    # x first under its own name: the proj checks below take it as a stand-in for the attention's output
    _validate.tensor("x", x, "(B, T, C)")
    _validate.nonempty("x", x, "(B, T, C)")
    _check_linear(x, w_proj, b_proj, a_proj, b_proj_lora, prefix="proj ")
    q, k, v = lora_qkv(x, w_qkv, b_qkv, lora_q, lora_k, lora_v, scale, num_heads, backend=backend)
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(x.shape)
    if lora_proj is None:
        w_proj, b_proj = _validate.cast(out.dtype, w_proj, b_proj)
        return F.linear(out, w_proj, b_proj)
    return lora_linear(out, w_proj, b_proj, a_proj, b_proj_lora, scale, backend=backend)
