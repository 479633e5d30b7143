"""Slot attention (SlotContrast / videosaur grouper; design.md 3.1).

    kdfast::slot_attention_core(q, k, v, scale, eps, return_attn, backend) -> (updates, attn, norm)
    kdfast::slot_attention_core_backward(grad_updates, grad_attn?, q, k, v, updates, norm, scale, eps, backend)
        -> (dq, dk, dv)

``norm`` is Z (B, K), the per-slot sum of ``A + eps`` in the accumulator dtype: with q, k, v and the updates
it is all the recomputing backward needs (never a (B, K, N) tensor). ``attn`` is (B, K, 0) when
``return_attn`` is False, so the kernels skip the mask store.

:func:`slot_attention` runs whole iterations (LayerNorm, q projection, the core, GRUCell, residual MLP)
with the core as above and the small dense layers in torch.

Backends: ``triton`` (kdfast.kernels.slot_attention; K <= 64, D, Dv <= 256, padded K x max(D, Dv) <= 8192), ``cpp``
(csrc/cpu/slot_attention.cpp), ``reference`` (kdfast.reference).

In eager mode the cpp backend calls ``kdfast::_slot_attention_core_cpp``, the same kernels behind a C++ autograd
node: no Python runs in its backward, and it keeps the forward's attention (B, K, N) so that the backward skips
recomputing it (on the CPU that tensor is smaller than the keys, which are saved anyway). Its backward is not
differentiable (double backward raises); torch.compile traces ``kdfast::slot_attention_core``.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping

import torch
from torch import Tensor

from kdfast import _backend, reference
from kdfast._backend import Implementation, extension_op, triton_launcher
from kdfast.ops import _autocast, _heads_and_mask, _validate
from kdfast.ops._autograd import eager_or_traced, wire_autograd
from kdfast.reference._common import accumulator_dtype
from kdfast.reference.slot_attention import iterations


def _kernels():
    return importlib.import_module("kdfast.kernels.slot_attention")


def _triton_core_limit(K: int, D: int, Dv: int, fp64: bool = False) -> str | None:
    """Triton holds at most ``MAX_SLOTS`` slots and ``MAX_DIM`` features per program, and a (K, D) tile of at
    most ``slot_tile_limit(fp64)`` elements (half as many in float64)."""
    kernels = _kernels()
    if kernels.within_limits(K, D, Dv, fp64):
        return None
    return (f"the triton backend handles K <= {kernels.MAX_SLOTS} slots and D, Dv <= {kernels.MAX_DIM} with "
            f"K x max(D, Dv) <= {kernels.slot_tile_limit(fp64)} in {'float64' if fp64 else 'float32'} (each padded "
            f"to a power of two), got K={K}, D={D}, Dv={Dv}")


def _no_attn(q: Tensor, k: Tensor) -> Tensor:
    return q.new_empty(q.shape[0], q.shape[1], 0)


def _reference_forward(q, k, v, scale, eps, return_attn):
    updates, attn = reference.slot_attention_core(q, k, v, scale, eps)
    acc = accumulator_dtype(q.dtype)
    logits = scale * torch.bmm(q.to(acc), k.to(acc).transpose(1, 2))
    norm = (torch.softmax(logits, dim=1) + eps).sum(-1)
    return updates, attn if return_attn else _no_attn(q, k), norm


def _reference_backward(grad_updates, grad_attn, q, k, v, updates, norm, scale, eps):
    return reference.slot_attention_core_backward(grad_updates, grad_attn, q, k, v, scale, eps)


def _kernel_forward(q, k, v, scale, eps, return_attn, backend):
    """(updates, attn or (B, K, 0), norm Z (B, K) in the accumulator dtype)."""
    return CORE[backend].forward(q, k, v, scale, eps, return_attn)


def _kernel_backward(grad_updates, grad_attn, q, k, v, updates, norm, scale, eps, backend):
    return CORE[backend].backward(grad_updates, grad_attn, q, k, v, updates, norm, scale, eps)


@torch.library.custom_op("kdfast::slot_attention_core", mutates_args=())
def _slot_attention_core(
    q: Tensor, k: Tensor, v: Tensor, scale: float, eps: float, return_attn: bool, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    outs = _kernel_forward(q, k, v, scale, eps, return_attn, backend)
    return tuple(out.contiguous() for out in outs)


@_slot_attention_core.register_fake
def _(q, k, v, scale, eps, return_attn, backend):
    B, K, _ = q.shape
    N = k.shape[1] if return_attn else 0
    return q.new_empty(B, K, v.shape[2]), q.new_empty(B, K, N), q.new_empty(B, K, dtype=accumulator_dtype(q.dtype))


@torch.library.custom_op("kdfast::slot_attention_core_backward", mutates_args=())
def _slot_attention_core_backward(
    grad_updates: Tensor,
    grad_attn: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    updates: Tensor,
    norm: Tensor,
    scale: float,
    eps: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    grads = _kernel_backward(grad_updates, grad_attn, q, k, v, updates, norm, scale, eps, backend)
    return tuple(grad.contiguous() for grad in grads)


@_slot_attention_core_backward.register_fake
def _(grad_updates, grad_attn, q, k, v, updates, norm, scale, eps, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _core_setup(ctx, inputs, output):
    q, k, v, ctx.scale, ctx.eps, ctx.return_attn, ctx.backend = inputs
    updates, _, norm = output
    ctx.mark_non_differentiable(norm)
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None, not a tensor of zeros
    ctx.save_for_backward(q, k, v, updates, norm)


def _core_grads(ctx, grad_updates, grad_attn, grad_norm, backward):
    """The gradients of (q, k, v, and the 4 non-tensor inputs) from ``backward`` (the custom op or the kernels)."""
    q, k, v, updates, norm = ctx.saved_tensors
    if grad_updates is None:
        grad_updates = torch.zeros(q.shape[0], q.shape[1], v.shape[2], dtype=q.dtype, device=q.device)
    if not ctx.return_attn:
        grad_attn = None
    grads = backward(grad_updates, grad_attn, q, k, v, updates, norm, ctx.scale, ctx.eps, ctx.backend)
    return *grads, None, None, None, None


def _reference_core(q, k, v, scale, eps, return_attn, backend):
    updates, attn = reference.slot_attention_core(q, k, v, scale, eps)
    return updates, attn if return_attn else _no_attn(q, k), None


# The eager path of the Triton backend: the kernels called directly, without the custom op's dispatch.
_SlotAttentionCore = wire_autograd(
    _slot_attention_core, _kernel_forward, _core_setup, _core_grads, _slot_attention_core_backward, _kernel_backward,
    once_differentiable=True,
)


def _cpp_core(q, k, v, scale, eps, return_attn, backend):
    """The cpp backend in eager mode: one op whose backward is a C++ autograd node (no Python per step)."""
    updates, attn, norm = torch.ops.kdfast._slot_attention_core_cpp(q, k, v, scale, eps)
    return updates, attn.to(q.dtype) if return_attn else _no_attn(q, k), norm


# forward(q, k, v, scale, eps, return_attn) -> (updates, attn or (B, K, 0), norm (B, K) in the accumulator dtype);
# backward(grad_updates, grad_attn or None, q, k, v, updates, norm, scale, eps) -> (grad_q, grad_k, grad_v);
# eager: the same call with the op's trailing backend argument; limit(K, D, Dv)
CORE = _backend.register("slot_attention_core", {
    "triton": Implementation(
        forward=triton_launcher("slot_attention", "slot_attention_core_forward"),
        backward=triton_launcher("slot_attention", "slot_attention_core_backward"),
        eager=_SlotAttentionCore,
        limit=_triton_core_limit,
    ),
    "cpp": Implementation(
        forward=extension_op("_slot_attention_core_forward"),
        backward=extension_op("_slot_attention_core_backward"),
        eager=_cpp_core,
        compiled="_slot_attention_core_forward",
    ),
    "reference": Implementation(forward=_reference_forward, backward=_reference_backward, eager=_reference_core),
})


def _core(q, k, v, scale, eps, return_attn, backend):
    return eager_or_traced(CORE[backend].eager, _slot_attention_core, q, k, v, scale, eps, return_attn, backend)


def _check_core_inputs(q: Tensor, k: Tensor, v: Tensor, eps: float) -> float:
    _validate.tensor("q", q, "(B, K, D)")
    _validate.tensor("k", k, "(B, N, D)")
    _validate.tensor("v", v, "(B, N, Dv)")
    _validate.same_device(q=q, k=k, v=v)
    for name, t, layout in (("q", q, "(B, K, D)"), ("k", k, "(B, N, D)"), ("v", v, "(B, N, Dv)")):
        _validate.nonempty(name, t, layout)
    _validate.same_size("batch size B", q=q.shape[0], k=k.shape[0], v=v.shape[0])
    _validate.same_size("query/key dimension D", q=q.shape[2], k=k.shape[2])
    _validate.same_size("number of inputs N", k=k.shape[1], v=v.shape[1])
    eps = _validate.finite("eps", eps)
    if eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    return eps


def slot_attention_core(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float | None = None,
    eps: float = 1e-8,
    return_attn: bool = True,
    backend: str | None = None,
    n_heads: int = 1,
    slot_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """One slot attention read-out: softmax over the slots, then a weighted mean of the values per slot.

    ``A = softmax_K(scale q k^T)``, ``U_i = sum_n (A[i,n] + eps) v_n / sum_n (A[i,n] + eps)``.

    ``n_heads`` > 1 and ``slot_mask`` are OCLF's options (see :func:`kdfast.reference.slot_attention_core`): H heads
    of D / H features with one softmax per token over all (slot, head) pairs, the masks averaged over the heads;
    slots marked True in ``slot_mask`` (B, K) get attention 0 (their update is the mean of the values) and no
    gradient through the logits. Every backend runs them through an exact rewrite into its single-head core
    (kdfast/ops/_heads_and_mask.py: H times the core's products, one more key column with a mask), the limits
    below applying to K * H slots and D + 1 with a mask.

    Args:
        q: (B, K, D) slot queries. float16, bfloat16, float32 or float64.
        k: (B, N, D) keys; v: (B, N, Dv) values; same device (mixed dtypes are promoted).
        scale: logit scale, default D ** -0.5; eps: added to the attention before the weighted mean.
        return_attn: also return the masks A (else None, and the kernels never write them).
        backend: ``auto``, ``triton`` (K <= 64, D, Dv <= 256, padded K x max(D, Dv) <= 8192), ``cpp`` or ``reference`` (None:
            ``KDFAST_BACKEND``, default ``auto``).
        n_heads: heads H, dividing D and Dv (scale then defaults to (D / H) ** -0.5).
        slot_mask: (B, K) bool, True for the slots left out, at least one False per batch element; or None.

    Returns:
        updates (B, K, Dv) and the attention masks A (B, K, N, before eps) or None, in the inputs' dtype
        (float32 inside torch.autocast: kdfast/ops/_autocast.py).
    """
    eps = _check_core_inputs(q, k, v, eps)
    (B, K, Dq), Dv = q.shape, v.shape[2]
    _heads_and_mask.check(n_heads, slot_mask, B, K, Dq, Dv, q.device)
    scale = (Dq // n_heads) ** -0.5 if scale is None else _validate.finite("scale", scale)
    if not isinstance(return_attn, bool):
        raise TypeError(f"return_attn must be a bool, got {type(return_attn).__name__}")
    dtype = _validate.compute_dtype(q, k, v)
    masked = slot_mask is not None
    sizes = (*_heads_and_mask.virtual_sizes(K, Dq, n_heads, masked), Dv, dtype == torch.float64)
    chosen = _backend.resolve("slot_attention_core", backend, q.device.type, sizes)
    q, k, v = _validate.cast(dtype, q, k, v)
    if n_heads == 1 and not masked:
        updates, attn, _ = _core(q, k, v, scale, eps, return_attn, chosen)
    else:
        q, k = _heads_and_mask.queries(q, n_heads, slot_mask), _heads_and_mask.keys(k, masked)
        updates, attn, _ = _core(q, k, v, scale, eps, return_attn, chosen)
        updates, attn = _heads_and_mask.collapse(updates, attn, n_heads)
    return updates, attn if return_attn else None


# ---------------------------------------------------------------------------------------------- iterations

_LN_EPS = reference.LAYER_NORM_EPS


def _check_params(params: Mapping, D: int, Dq: int, Dv: int, device: torch.device) -> dict[str, Tensor]:
    """The iteration's parameters by videosaur state_dict key, each checked for shape and device."""
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a mapping of state_dict keys to tensors, got {type(params).__name__}")
    required = {"norm_slots.weight": (D,), "norm_slots.bias": (D,), "to_q.weight": (Dq, D)}
    optional = {"to_q.bias": (Dq,)}
    if "gru.weight_ih" in params:
        required.update({"gru.weight_ih": (3 * D, Dv), "gru.weight_hh": (3 * D, D)})
        optional.update({"gru.bias_ih": (3 * D,), "gru.bias_hh": (3 * D,)})
    elif Dv != D:
        raise ValueError(f"without a GRU (no 'gru.weight_ih') the updates are added to the slots: v's width {Dv} must be D={D}")
    if any(key.startswith("mlp.") for key in params):
        Dh = params["mlp.layers.1.weight"].shape[0] if "mlp.layers.1.weight" in params else -1
        for key, shape in {"mlp.layers.0.weight": (D,), "mlp.layers.0.bias": (D,), "mlp.layers.1.weight": (Dh, D),
                           "mlp.layers.1.bias": (Dh,), "mlp.layers.3.weight": (D, Dh), "mlp.layers.3.bias": (D,)}.items():
            required[key] = shape
    checked = {}
    for key, shape in [*required.items(), *optional.items()]:
        value = params.get(key)
        if value is None:
            if key in required:
                raise ValueError(f"params is missing {key!r} (a tensor of shape {shape})")
            continue
        if not isinstance(value, Tensor) or not value.is_floating_point():
            raise TypeError(f"params[{key!r}] must be a floating-point tensor of shape {shape}, got {value!r:.80}")
        if tuple(value.shape) != shape:
            raise ValueError(f"params[{key!r}] must have shape {shape}, got {tuple(value.shape)}")
        if value.device != device:
            raise ValueError(f"params[{key!r}] must be on {device} like the slots, got {value.device}")
        checked[key] = value
    return checked


def _aten_gru_cell(U, hidden, w_ih, w_hh, b_ih, b_hh):
    """torch's fused GRUCell over the B * K slots (the reference's iteration writes out the equations)."""
    B, K, D = hidden.shape
    return torch.gru_cell(U.reshape(B * K, -1), hidden.reshape(B * K, D), w_ih, w_hh, b_ih, b_hh).view(B, K, D)


def _cpp_iterations(slots, k, v, p, n_iters, scale, eps, gru_hidden, grad_last_only):
    """The cpp backend in eager mode: every iteration in one call into C++ (the same ATen layers and fused core
    as the Python loop, reference.slot_attention's ``iterations`` with ``_aten_gru_cell``, without the Python
    between them: 2-7% faster fwd+bwd at two threads when it was written, kept while it pays; tested against the
    Python loop). Returns the slots and the last attention (accumulator dtype)."""
    return torch.ops.kdfast._slot_attention_iterations_cpp(
        slots, k, v, *(p.get(name) for name in reference.SLOT_ATTENTION_PARAMS),
        n_iters, scale, eps, _LN_EPS, gru_hidden == "normed", grad_last_only,
    )


def _fused_kernels():
    return importlib.import_module("kdfast.kernels.slot_attention_iterations")


# The fused op takes the iteration's parameters as separate optional arguments (a list argument's gradient
# structure trips the custom op's autograd under AOTDispatch), by state_dict key in the order of
# reference.SLOT_ATTENTION_PARAMS, which is the kernels' PARAMETERS order (norm_w = norm_slots.weight, ...):
# the one place where videosaur's keys meet the launchers' names.
@torch.library.custom_op("kdfast::_slot_attention_iterations_triton", mutates_args=())
def _slot_attention_iterations_triton(
    slots: Tensor, k: Tensor, v: Tensor,
    norm_w: Tensor, norm_b: Tensor, wq: Tensor, bq: Tensor | None, w_ih: Tensor | None, w_hh: Tensor | None,
    b_ih: Tensor | None, b_hh: Tensor | None, mlp_norm_w: Tensor | None, mlp_norm_b: Tensor | None,
    w1: Tensor | None, b1: Tensor | None, w3: Tensor | None, b3: Tensor | None,
    n_iters: int, scale: float, eps: float, hidden_normed: bool, act_iters: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """All iterations in one Triton launch: (slots, masks, act)."""
    return _fused_forward_kernels(slots, k, v, norm_w, norm_b, wq, bq, w_ih, w_hh, b_ih, b_hh, mlp_norm_w,
                                  mlp_norm_b, w1, b1, w3, b3, n_iters, scale, eps, hidden_normed, act_iters)


@_slot_attention_iterations_triton.register_fake
def _(slots, k, v, *args):
    params, act_iters = args[:-5], args[-1]
    B, K, D = slots.shape
    C = _fused_kernels().act_layout(k, v, params)["C"][0]
    return slots.new_empty(B, K, D), slots.new_empty(B, K, k.shape[1]), slots.new_empty(act_iters, B, K, C)


@torch.library.custom_op("kdfast::_slot_attention_iterations_triton_backward", mutates_args=())
def _slot_attention_iterations_triton_backward(
    grad_slots: Tensor, grad_attn: Tensor | None, k: Tensor, v: Tensor, act: Tensor,
    norm_w: Tensor, norm_b: Tensor, wq: Tensor, bq: Tensor | None, w_ih: Tensor | None, w_hh: Tensor | None,
    b_ih: Tensor | None, b_hh: Tensor | None, mlp_norm_w: Tensor | None, mlp_norm_b: Tensor | None,
    w1: Tensor | None, b1: Tensor | None, w3: Tensor | None, b3: Tensor | None,
    n_iters: int, scale: float, eps: float, hidden_normed: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dslots, dk, dv, dact) of the kept iterations; the parameter gradients follow from act and dact."""
    return _fused_backward_kernels(grad_slots, grad_attn, k, v, act, norm_w, norm_b, wq, bq, w_ih, w_hh, b_ih, b_hh,
                                   mlp_norm_w, mlp_norm_b, w1, b1, w3, b3, n_iters, scale, eps, hidden_normed)


@_slot_attention_iterations_triton_backward.register_fake
def _(grad_slots, grad_attn, k, v, act, *args):
    params = args[:-4]
    C2 = _fused_kernels().dact_layout(k, v, params)["C"][0]
    return grad_slots.new_empty(grad_slots.shape), k.new_empty(k.shape), v.new_empty(v.shape), act.new_empty(*act.shape[:3], C2)


def _parameter_grads(k: Tensor, v: Tensor, act: Tensor, dact: Tensor, params,
                     hidden_normed: bool) -> list[Tensor | None]:
    """The gradient of each parameter (None where absent), in the fused op's order: products of the kept
    activations ``act`` and the layer output gradients ``dact`` summed over the B * K rows of every kept
    iteration, as the kernels' act_layout and dact_layout lay them out."""
    kernels = _fused_kernels()
    named = dict(zip(kernels.PARAMETERS, params))
    gru, mlp = named["w_ih"] is not None, named["w1"] is not None
    rows, drows = act.reshape(-1, act.shape[-1]), dact.reshape(-1, dact.shape[-1])
    cols, dcols = kernels.act_layout(k, v, params), kernels.dact_layout(k, v, params)
    sums = drows.sum(0)  # every bias gradient is a column sum of dact: one reduction for all of them

    def a(name):
        start, width = cols[name]
        return rows[:, start:start + width]

    def d(name):
        start, width = dcols[name]
        return drows[:, start:start + width]

    def summed(name):
        start, width = dcols[name]
        return sums[start:start + width]

    grads = {"norm_w": (d("dx") * a("xhat")).sum(0), "norm_b": summed("dx"), "wq": d("dq").t() @ a("x"),
             "bq": summed("dq")}
    if gru:
        hidden = a("x") if hidden_normed else a("slots")
        grads.update({"w_ih": d("dgi").t() @ a("u"), "w_hh": d("dgh").t() @ hidden,
                      "b_ih": summed("dgi"), "b_hh": summed("dgh")})
    if mlp:
        grads.update({"mlp_norm_w": (d("dy") * a("yhat")).sum(0), "mlp_norm_b": summed("dy"),
                      "w1": d("da").t() @ a("y"), "b1": summed("da"), "w3": d("ds").t() @ a("a"), "b3": summed("ds")})
    return [None if t is None else grads[name] for name, t in zip(kernels.PARAMETERS, params)]


def _fused_forward_kernels(slots, k, v, *args):
    """The fused op's forward (the same arguments) called on the kernels directly."""
    *params, n_iters, scale, eps, hidden_normed, act_iters = args
    return _fused_kernels().slot_attention_forward(slots, k, v, params, n_iters, scale, eps, _LN_EPS,
                                                   hidden_normed, True, act_iters)


def _fused_backward_kernels(grad_slots, grad_attn, k, v, act, *args):
    """The fused backward op (the same arguments) called on the kernels directly."""
    *params, n_iters, scale, eps, hidden_normed = args
    return _fused_kernels().slot_attention_backward(grad_slots, grad_attn, k, v, params, act,
                                                    n_iters, scale, eps, hidden_normed)


def _fused_setup(ctx, inputs, output):
    _, k, v, *params, ctx.n_iters, ctx.scale, ctx.eps, ctx.hidden_normed, ctx.act_iters = inputs
    act = output[2]
    ctx.mark_non_differentiable(act)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(k, v, act, *params)


def _fused_grads(ctx, grad_slots, grad_attn, grad_act, backward):
    """The gradients of the fused op's inputs: the initial slots (or None), k, v, each parameter (or None), and
    None for the 5 non-tensor arguments, from ``backward`` (the backward op or the kernels)."""
    k, v, act, *params = ctx.saved_tensors
    if grad_slots is None:
        grad_slots = act.new_zeros(act.shape[1], act.shape[2], params[0].shape[0])
    dslots, dk, dv, dact = backward(grad_slots, grad_attn, k, v, act, *params, ctx.n_iters, ctx.scale, ctx.eps,
                                    ctx.hidden_normed)
    # Only gradients through every iteration reach the initial slots (grad_last_only keeps the last one).
    dslots = dslots if ctx.act_iters == ctx.n_iters else None
    return dslots, dk, dv, *_parameter_grads(k, v, act, dact, params, ctx.hidden_normed), None, None, None, None, None


# The fused Triton iterations in eager mode: the kernels called directly, without the custom op's dispatch.
_FusedIterations = wire_autograd(
    _slot_attention_iterations_triton, _fused_forward_kernels, _fused_setup, _fused_grads,
    _slot_attention_iterations_triton_backward, _fused_backward_kernels, once_differentiable=True,
)


@torch.compiler.assume_constant_result
def _fits_fused(K: int, D: int, Dq: int, Dv: int, fp64: bool) -> bool:
    """Within the fused kernels' limits: the core's, for the slot width D too."""
    return _kernels().within_limits(K, max(D, Dq), Dv, fp64)


def _fused_iterations(s, k, v, p, n_iters, scale, eps, gru_hidden, grad_last_only):
    """Every iteration in one Triton launch each way. Returns the slots and the last masks."""
    params = [p[name].contiguous() if name in p else None for name in reference.SLOT_ATTENTION_PARAMS]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (s, k, v, *p.values()))
    act_iters = n_iters if needs_grad and not grad_last_only else 1
    args = (n_iters, scale, eps, gru_hidden == "normed", act_iters)
    if torch.compiler.is_compiling():
        s, attn, _ = _slot_attention_iterations_triton(s, k, v, *params, *args)
    else:
        s, attn, _ = _FusedIterations.apply(s, k, v, *params, *args)
    return s, attn


# Backends that can run every iteration in one call instead of the Python loop over the core, each with when it
# applies: (fused, K, D, Dq, Dv, float64) -> bool. The call takes (slots, k, v, params, n_iters, scale, eps,
# gru_hidden, grad_last_only) and returns (slots, last masks).
WHOLE_LOOPS = {
    # one persistent kernel per batch element each way, where the core's Triton limits hold for the slot width too
    "triton": (lambda fused, K, D, Dq, Dv, fp64: fused and _fits_fused(K, D, Dq, Dv, fp64), _fused_iterations),
    # one call into C++ in eager mode; torch.compile traces the loop, which it can fuse
    "cpp": (lambda fused, K, D, Dq, Dv, fp64: not torch.compiler.is_compiling(), _cpp_iterations),
}


def slot_attention(
    slots: Tensor,
    k: Tensor,
    v: Tensor,
    params: Mapping[str, Tensor],
    n_iters: int = 3,
    *,
    scale: float | None = None,
    eps: float = 1e-8,
    gru_hidden: str = "normed",
    grad_last_only: bool = False,
    backend: str | None = None,
    fused: bool = True,
    n_heads: int = 1,
    slot_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``n_iters`` slot attention iterations (videosaur ``SlotAttention.forward`` after the k/v projection).

    Each iteration: ``x = LN(slots)``, ``q = to_q(x)``, ``U, A = core(q, k, v)``, ``h = GRUCell(U, hidden)``
    (hidden = x for ``gru_hidden="normed"``, the incoming slots for ``"prev"``; ``h = hidden + U`` without a
    GRU), ``slots = h + MLP(LN(h))`` (``slots = h`` without an MLP); see :func:`kdfast.reference.slot_attention`.
    The core runs on the chosen backend; LayerNorm, the projections and the GRU run in torch (for the cpp backend in
    eager mode, all iterations in one call into C++). Only the last iteration's masks are returned.

    Args:
        slots: (B, K, D) initial slots; k: (B, N, Dq) keys; v: (B, N, Dv) values (projected once per forward).
        params: videosaur state_dict keys -> tensors: ``norm_slots.weight/bias`` (D,), ``to_q.weight``
            (Dq, D) [``to_q.bias``]; optional GRU ``gru.weight_ih`` (3D, Dv), ``gru.weight_hh`` (3D, D)
            [``gru.bias_ih/hh`` (3D,)]; optional MLP ``mlp.layers.0.weight/bias`` (D,),
            ``mlp.layers.1.weight`` (Dh, D), ``mlp.layers.1.bias`` (Dh,), ``mlp.layers.3.weight`` (D, Dh),
            ``mlp.layers.3.bias`` (D,). Other keys are ignored.
        n_iters: iterations, >= 1. scale: logit scale (default Dq ** -0.5). eps: the core's eps.
        gru_hidden: ``"normed"`` or ``"prev"``.
        grad_last_only: gradients reach k, v and params through the last iteration only (the first
            ``n_iters - 1`` run without autograd; the slots entering the last are detached).
        backend: the core's backend, as in :func:`slot_attention_core`.
        fused: on the triton backend, run all iterations in one persistent kernel per batch element (and one
            for the backward) where the core's Triton limits hold for the slot width D too; False runs the loop
            (the core kernels between torch layers). Other backends ignore it.
        n_heads, slot_mask: OCLF's multi-head core and slot mask (B, K), as in :func:`slot_attention_core`, in
            every iteration (scale then defaults to (Dq / n_heads) ** -0.5). They run the Python loop over the
            chosen backend's core (the fused kernels and the C++ loop are single-head and unmasked).

    Returns:
        ``(slots, masks)``: (B, K, D) and the last iteration's attention (B, K, N), in the slots' dtype
        (float16/bfloat16 slots compute in float32, as the reference does; inside torch.autocast, float32).
    """
    _validate.tensor("slots", slots, "(B, K, D)")
    _validate.nonempty("slots", slots, "(B, K, D)")
    _validate.tensor("k", k, "(B, N, Dq)")
    _validate.tensor("v", v, "(B, N, Dv)")
    _validate.same_device(slots=slots, k=k, v=v)
    _validate.same_size("batch size B", slots=slots.shape[0], k=k.shape[0], v=v.shape[0])
    if isinstance(n_iters, bool) or not isinstance(n_iters, int) or n_iters < 1:
        raise ValueError(f"n_iters must be an integer >= 1, got {n_iters!r}")
    _validate.choice("gru_hidden", gru_hidden, ("normed", "prev"))
    if not isinstance(grad_last_only, bool):
        raise TypeError(f"grad_last_only must be a bool, got {type(grad_last_only).__name__}")
    if not isinstance(fused, bool):
        raise TypeError(f"fused must be a bool, got {type(fused).__name__}")
    B, K, D = slots.shape
    Dq, Dv = k.shape[2], v.shape[2]
    p = _check_params(params, D, Dq, Dv, slots.device)
    eps = _check_core_inputs(slots.new_empty(B, K, Dq), k, v, eps)
    _heads_and_mask.check(n_heads, slot_mask, B, K, Dq, Dv, slots.device)
    scale = (Dq // n_heads) ** -0.5 if scale is None else _validate.finite("scale", scale)
    slots, k, v = _autocast.cast_inputs("slot_attention", slots, k, v)  # float32 in an autocast region
    out = slots.dtype
    acc = accumulator_dtype(_validate.compute_dtype(slots, k, v, *p.values()))
    plain = n_heads == 1 and slot_mask is None
    sizes = (*_heads_and_mask.virtual_sizes(K, Dq, n_heads, slot_mask is not None), Dv, acc == torch.float64)
    chosen = _backend.resolve("slot_attention_core", backend, slots.device.type, sizes)
    s, k, v = _validate.cast(acc, slots, k, v)
    p = {key: value if value.dtype == acc else value.to(acc) for key, value in p.items()}
    applies, whole_loop = WHOLE_LOOPS.get(chosen, (None, None))
    with torch.autocast(slots.device.type, enabled=False):
        if plain and whole_loop is not None and applies(fused, K, D, Dq, Dv, acc == torch.float64):
            s, attn = whole_loop(s, k, v, p, n_iters, scale, eps, gru_hidden, grad_last_only)
            return s.to(out), attn.to(out)
        # the Python loop over the chosen core: the reference's, with torch's fused GRUCell
        core = _loop_core(k, scale, eps, chosen, n_heads, slot_mask)
        s, attn = iterations(s, k, v, p, n_iters, gru_hidden, grad_last_only, core, _aten_gru_cell)
    return s.to(out), attn.to(out)


def _loop_core(k, scale, eps, backend, n_heads, slot_mask):
    """The iteration loop's ``core(q, k, v, last) -> (U, A)`` on ``backend``; with heads or a mask, the keys are
    rewritten once here and each iteration's queries in the call (kdfast/ops/_heads_and_mask.py)."""
    if n_heads == 1 and slot_mask is None:
        return lambda q, k, v, last: _core(q, k, v, scale, eps, last, backend)[:2]
    keys = _heads_and_mask.keys(k, slot_mask is not None)

    def core(q, k, v, last):
        updates, attn, _ = _core(_heads_and_mask.queries(q, n_heads, slot_mask), keys, v, scale, eps, last, backend)
        return _heads_and_mask.collapse(updates, attn, n_heads)

    return core
