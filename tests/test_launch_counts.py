"""Kernel launches and host synchronisations per public op on the Triton path, against design.md's targets.

The interpreter runs the same launchers a GPU does, so every ``kernel[grid](...)`` is counted here by wrapping
the kernels' ``run``. Host synchronisations are counted as the host reads of tensor values a CUDA tensor would
sync on (``item``, ``tolist``, ``bool``/``int``/``float`` of a tensor) made outside the kernels (the interpreter
itself reads its arguments). Targets (design.md 3.1, 3.2, 5): one kernel each way for slot_match_loss and
slot_contrastive_loss; one launch per frame each way for the fused slot attention iterations (the design's 1-3
per iteration); no host sync in slot_assignment; no (B, K, N) tensor saved for the backward of the core.
"""

from __future__ import annotations

import contextlib
import importlib

import pytest
import torch
from harness import rand

import kdfast.nn
import kdfast.ops
from kdfast import _backend

pytestmark = pytest.mark.skipif(not _backend.triton_interpreting() and not torch.cuda.is_available(),
                                reason="the Triton path needs a CUDA device or TRITON_INTERPRET=1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MODULES = ["slot_match", "slot_contrastive_loss", "lora", "gini_kl", "slot_attention", "slot_attention_iterations"]
# movi-c's slot shapes at batch 2, with N != K != D so that a (B, K, N) tensor is recognisable by its shape
B, T, K, N, D = 2, 3, 11, 37, 64


@contextlib.contextmanager
def counting():
    """Counts kernel launches (by kernel name) and host reads of tensor values outside the kernels."""
    counts = {"launches": [], "syncs": []}
    kernels = [k for m in MODULES for name, k in vars(importlib.import_module(f"kdfast.kernels.{m}")).items()
               if name.endswith("_kernel")]
    classes = {type(k) for k in kernels}
    originals = {cls: cls.run for cls in classes}
    inside = [False]

    def run(cls):
        def wrapped(self, *args, **kwargs):
            counts["launches"].append(self.fn.__name__)
            inside[0] = True
            try:
                return originals[cls](self, *args, **kwargs)
            finally:
                inside[0] = False
        return wrapped

    reads = {name: getattr(torch.Tensor, name) for name in ("item", "tolist", "__bool__", "__int__", "__float__")}

    def read(name):
        def wrapped(self, *args, **kwargs):
            if not inside[0]:
                counts["syncs"].append(name)
            return reads[name](self, *args, **kwargs)
        return wrapped

    try:
        for cls in classes:
            cls.run = run(cls)
        for name in reads:
            setattr(torch.Tensor, name, read(name))
        yield counts
    finally:
        for cls, original in originals.items():
            cls.run = original
        for name, original in reads.items():
            setattr(torch.Tensor, name, original)


def _forward_backward(fn, *inputs):
    leaves = [x.detach().requires_grad_() for x in inputs]
    with counting() as forward:
        out = fn(*leaves)
    outs = [o for o in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(o, torch.Tensor)]
    total = sum((o * rand(*o.shape, dtype=o.dtype, device=o.device)).sum() for o in outs if o.is_floating_point())
    with counting() as backward:
        total.backward()
    return forward, backward


@pytest.mark.parametrize(("name", "fn", "shapes", "forward", "backward"), [
    ("slot_match_loss", lambda s, t: kdfast.ops.slot_match_loss(s, t, backend="triton"), [(B, K, D)] * 2, 1, 1),
    ("slot_contrastive_loss", lambda s: kdfast.ops.slot_contrastive_loss(s, backend="triton"), [(B, T, K, D)], 1, 1),
    ("slot_cosine_similarity", lambda a, b: kdfast.ops.slot_cosine_similarity(a, b, backend="triton"),
     [(B, K, D)] * 2, 1, 1),
    # the core: one pass over N each way, then a deterministic reduction of the chunks' partial sums
    ("slot_attention_core", lambda q, k, v: kdfast.ops.slot_attention_core(q, k, v, backend="triton"),
     [(B, K, D), (B, N, D), (B, N, D)], 2, 2),
])
def test_launches_per_op(name, fn, shapes, forward, backward):
    fwd, bwd = _forward_backward(fn, *(rand(*shape, device=DEVICE) for shape in shapes))
    assert len(fwd["launches"]) == forward, f"{name} forward launches {fwd['launches']}"
    assert len(bwd["launches"]) == backward, f"{name} backward launches {bwd['launches']}"
    assert not fwd["syncs"] and not bwd["syncs"], f"{name} host syncs: {fwd['syncs']} {bwd['syncs']}"


def test_slot_assignment_one_launch_no_host_sync():
    similarity = rand(B, K, K + 3, device=DEVICE)
    with counting() as counts:
        kdfast.ops.slot_assignment(similarity, backend="triton")
    assert counts["launches"] == ["_slot_assignment_kernel"]
    assert not counts["syncs"], f"slot_assignment reads tensor values on the host: {counts['syncs']}"


@pytest.mark.parametrize("n_iters", [2, 3])
def test_fused_slot_attention_one_launch_per_frame_each_way(n_iters):
    module = kdfast.nn.SlotAttention(inp_dim=D, slot_dim=D, n_iters=n_iters, backend="triton").to(DEVICE)
    slots, features = rand(B, K, D, device=DEVICE), rand(B, N, D, device=DEVICE)
    fwd, bwd = _forward_backward(lambda s, f: module(s, f)["slots"], slots, features)
    # one persistent kernel for all iterations of the frame each way: 1 / n_iters launches per iteration
    assert fwd["launches"] == ["_slot_attention_fwd_kernel"], fwd["launches"]
    assert bwd["launches"] == ["_slot_attention_bwd_kernel"], bwd["launches"]
    assert not fwd["syncs"] and not bwd["syncs"], f"host syncs: {fwd['syncs']} {bwd['syncs']}"


@pytest.mark.parametrize("fused", [False, True])
def test_no_batch_slot_token_tensor_saved_for_backward(fused):
    """The backward recomputes the attention from q and k: nothing of B x K x N elements is saved."""
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    module = kdfast.nn.SlotAttention(inp_dim=D, slot_dim=D, n_iters=3, backend="triton", fused=fused).to(DEVICE)
    slots, features = rand(B, K, D, device=DEVICE), rand(B, N, D, device=DEVICE)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(slots, features)["slots"].sum()
        kdfast.ops.slot_attention_core(*(rand(*s, device=DEVICE) for s in [(B, K, D), (B, N, D), (B, N, D)]),
                                       backend="triton")
    assert saved, "nothing was saved: the hook saw no autograd graph"
    core_saved = [shape for shape in saved if len(shape) == 3 and shape[1:] == (K, N)]
    assert not core_saved, f"(B, K, N) tensors saved for the backward: {core_saved}"
