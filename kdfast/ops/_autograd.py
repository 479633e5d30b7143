"""Autograd plumbing shared by the ops: the reference backend's backward, and the eager fast path.

The reference backend's backward is the vector-Jacobian product of kdfast.reference, run inside a custom op.

Ops without a hand-written backward for a backend compute it by autograd through the reference. A custom op's
implementation runs with the autograd dispatch keys excluded, so autograd records nothing there; ``_recording``
lifts that exclusion for the reference's own graph and restores it after.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch

from kdfast.ops import _autocast

_AUTOGRAD_KEYS = (
    torch._C.DispatchKey.AutogradFunctionality,
    torch._C.DispatchKey.AutogradOther,
    torch._C.DispatchKey.AutogradNestedTensor,
)


@contextlib.contextmanager
def _recording():
    excluded = [torch._C._dispatch_tls_is_dispatch_key_excluded(key) for key in _AUTOGRAD_KEYS]
    for key in _AUTOGRAD_KEYS:
        torch._C._dispatch_tls_set_dispatch_key_excluded(key, False)
    try:
        # The recomputed forward must match the one autograd differentiates: never in an autocast dtype.
        with torch.enable_grad(), contextlib.ExitStack() as stack:
            for device_type in ("cpu", "cuda"):
                if torch.is_autocast_enabled(device_type):
                    stack.enter_context(torch.autocast(device_type, enabled=False))
            yield
    finally:
        for key, was_excluded in zip(_AUTOGRAD_KEYS, excluded):
            torch._C._dispatch_tls_set_dispatch_key_excluded(key, was_excluded)


def reference_vjp(
    fn: Callable[..., torch.Tensor | Sequence[torch.Tensor]],
    inputs: Sequence[torch.Tensor | None],
    grad_outputs: Sequence[torch.Tensor | None],
    *args,
    needs: Sequence[bool] | None = None,
) -> list[torch.Tensor]:
    """Gradients of ``fn(*inputs, *args)`` with respect to each tensor of ``inputs``.

    Outputs whose gradient is None are ignored. Inputs that are None, or whose entry of ``needs`` is False,
    get an empty tensor (a custom op cannot return None); an input the outputs do not depend on gets zeros.
    Gradients are contiguous.
    """
    needs = [True] * len(inputs) if needs is None else needs
    with _recording():
        leaves = [
            None if x is None else x.detach().requires_grad_(need and x.is_floating_point())
            for x, need in zip(inputs, needs)
        ]
        outputs = fn(*leaves, *args)
        outputs = (outputs,) if isinstance(outputs, torch.Tensor) else tuple(outputs)
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if g is not None and o.requires_grad]
        wanted = [x for x in leaves if x is not None and x.requires_grad]
        grads = iter(
            torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
            if pairs and wanted
            else [None] * len(wanted)
        )
    result = []
    for x in leaves:
        if x is None or not x.requires_grad:
            result.append(torch.empty(0))
        else:
            grad = next(grads)
            # Contiguous, as the fake implementations promise, whatever layout autograd produced.
            result.append(torch.zeros_like(x) if grad is None else grad.contiguous())
    return result


def eager_or_traced(eager, op, *args):
    """Call ``op`` (a custom op) when torch.compile traces, else ``eager``: an autograd.Function (called through
    ``apply``) or a plain differentiable function computing the same thing.

    A custom op's Python autograd costs tens of microseconds per call in eager mode (two boxed dispatcher
    calls into Python); the slot ops' kernels take about as long, so eager calls skip that layer.

    Autocast: in an enclosing autocast region the tensors are cast as ``op``'s rule in kdfast/ops/_autocast.py
    says (float32 for the reductions, the autocast dtype for the LoRA GEMMs), here in Python so that eager and
    compiled calls cast alike, and the region is switched off for the call: the kernels see one dtype.
    """
    device_type = next(arg.device.type for arg in args if isinstance(arg, torch.Tensor))
    if torch.is_autocast_enabled(device_type):
        args = _autocast.cast_args(_autocast.op_name(op), device_type, args)
        with torch.autocast(device_type, enabled=False):
            return _call(eager, op, args)
    return _call(eager, op, args)


def _call(eager, op, args):
    if torch.compiler.is_compiling():
        return op(*args)
    if isinstance(eager, type) and issubclass(eager, torch.autograd.Function):
        return eager.apply(*args)
    return eager(*args)


def wire_autograd(op, forward, setup, grads, backward_op, backward, *, once_differentiable=False):
    """Registers the autograd of the custom op ``op`` and returns its eager twin, both built from one set of pieces.

    ``forward(*inputs)`` is what the op runs; ``setup(ctx, inputs, output)`` saves what the backward reads;
    ``grads(ctx, *grad_outputs, backward=b)`` gives the inputs' gradients (None for non-tensors) through ``b``:
    the backward custom op ``backward_op`` in the registered formula, which torch.compile traces, and its
    implementation ``backward`` in the returned autograd.Function, which eager calls take (through
    :func:`eager_or_traced`) to skip the dispatcher's round trips. ``once_differentiable``: the eager backward
    refuses a double backward, as the kernels have none.
    """

    def traced_backward(ctx, *grad_outputs):
        return grads(ctx, *grad_outputs, backward=backward_op)

    op.register_autograd(traced_backward, setup_context=setup)

    def eager_forward(ctx, *inputs):
        output = forward(*inputs)
        setup(ctx, inputs, output)
        return output

    def eager_backward(ctx, *grad_outputs):
        return grads(ctx, *grad_outputs, backward=backward)

    if once_differentiable:
        eager_backward = torch.autograd.function.once_differentiable(eager_backward)
    name = getattr(op, "_name", "op")  # the op's name without its namespace
    return type("".join(part.title() for part in name.split("_")), (torch.autograd.Function,), {
        "__doc__": f"The eager path of kdfast::{name}: its autograd without the dispatcher's round trips.",
        "forward": staticmethod(eager_forward), "backward": staticmethod(eager_backward),
    })
