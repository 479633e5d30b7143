"""Benchmarks of LoRA-augmented linear layers and the WeCoLoRA ViT block (design.md 3.3), forward and forward+backward.

ViT-B/16 shapes: tokens M = B * 197, C = 768, ranks 4, 16 and 128, the base weights frozen (WeCoLoRA): the
backward computes the gradients of x and of the LoRA parameters only. Cases:

- ``lora_linear`` at the block's three Linear shapes: qkv (768 -> 2304), fc1 (768 -> 3072), fc2 (3072 -> 768);
- ``lora_qkv``: WeCoLoRA's per-slice LoRA on qkv (a separate (A, B) on q, k and v), output in the SDPA layout;
- ``block``: a whole pre-norm ViT block with LoRA on the q, k, v slices, proj, fc1 and fc2.

Implementations: ``eager`` (PEFT-style: ``base(x) + lora_B(lora_A(dropout(x))) * scaling`` in plain PyTorch),
``compile`` (torch.compile of that), ``kdfast-<backend>``, and two floors: ``base`` (the frozen base layers
alone, no LoRA: what the LoRA work is added to) and ``merged`` (the base layers with the LoRA update merged into
their weights: the inference floor; forward only, its backward is the base's).

Sizes: B = 128 on CUDA; on the CPU machines B = 4 (M = 788 tokens), to keep a run within minutes on 2 cores.
Run through ``python benchmarks/report.py --ops lora`` (KDFAST_BENCH_DTYPE=bfloat16 for bf16 on CUDA), or
directly: ``python -m pytest benchmarks/bench_lora.py -p no:cacheprovider``.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdfast.models.vit import Block
from kdfast.nn import LoRAAttention, LoRALinear

from .conftest import DEVICE, DTYPE, FWD_BWD, bench_cases, kdfast_backends, run_case
from .presets import LORA_RANKS, VIT_B16, VIT_B16_CPU_BATCH

lora_ops = importlib.import_module("kdfast.ops.lora")

TOKENS = VIT_B16.tokens
BATCH = VIT_B16.batch if DEVICE.type == "cuda" else VIT_B16_CPU_BATCH
C, HEADS, HIDDEN = VIT_B16.dim, VIT_B16.heads, VIT_B16.hidden
LINEARS = {"qkv": (C, 3 * C), "fc1": (C, HIDDEN), "fc2": (HIDDEN, C)}
SCALE = 2.0  # PEFT's lora_alpha / r with lora_alpha = 2r; any non-1 value, so the scaling multiply is paid


def implementations(op: str, pass_name: str) -> list[str]:
    names = ["eager", "compile"] + [f"kdfast-{b}" for b in kdfast_backends("lora_linear")]
    return names + ["base"] + (["merged"] if pass_name == "fwd" else [])


def _tensor(*shape, std=1.0, grad=False):
    return (torch.randn(*shape, device=DEVICE, dtype=DTYPE) * std).requires_grad_(grad)


def _compiled(fn):
    torch._dynamo.reset()  # a fresh dynamo state per case (see conftest.make_implementation)
    return torch.compile(fn, dynamic=False)


# ---------------------------------------------------------------------------------------------- functional


def peft_linear(x, weight, bias, lora_a, lora_b, scale):
    """PEFT's lora.Linear forward (no dropout): ``base_layer(x) + lora_B(lora_A(x)) * scaling``."""
    return F.linear(x, weight, bias) + F.linear(F.linear(x, lora_a), lora_b) * scale


def peft_qkv(x, w_qkv, b_qkv, a_q, b_q, a_k, b_k, a_v, b_v, scale):
    """WeCoLoRA's per-slice LoRA on timm's fused qkv, PEFT-style, then timm's split into heads."""
    B, T, _ = x.shape
    delta = [F.linear(F.linear(x, a), b) * scale for a, b in ((a_q, b_q), (a_k, b_k), (a_v, b_v))]
    qkv = F.linear(x, w_qkv, b_qkv) + torch.cat(delta, -1)
    return qkv.reshape(B, T, 3, HEADS, C // HEADS).permute(2, 0, 3, 1, 4).unbind(0)


def base_qkv(x, w_qkv, b_qkv):
    B, T, _ = x.shape
    return F.linear(x, w_qkv, b_qkv).reshape(B, T, 3, HEADS, C // HEADS).permute(2, 0, 3, 1, 4).unbind(0)


def _functional_case(op, rank, impl, backward):
    """(step inputs, the callable) of one lora_linear / lora_qkv case."""
    x = _tensor(BATCH, TOKENS, C if op == "lora_qkv" else LINEARS[op.split(":")[1]][0], grad=backward)
    if op == "lora_qkv":
        weight, bias = _tensor(3 * C, C, std=C**-0.5), _tensor(3 * C)
        pairs = [(_tensor(rank, C, std=C**-0.5, grad=True), _tensor(C, rank, std=0.1, grad=True)) for _ in range(3)]
        lora = [t for pair in pairs for t in pair]
        eager = lambda: peft_qkv(x, weight, bias, *lora, SCALE)
        floors = {
            "base": lambda: base_qkv(x, weight, bias),
            "merged": lambda: base_qkv(x, merged_weight, bias),
        }
        kdfast_fn = lambda backend: lambda: lora_ops.lora_qkv(x, weight, bias, *pairs, SCALE, HEADS, backend=backend)
        compiled = _compiled(peft_qkv)
        compile_fn = lambda: compiled(x, weight, bias, *lora, SCALE)
        delta = torch.cat([SCALE * b @ a for a, b in pairs]).detach()
    else:
        I, O = LINEARS[op.split(":")[1]]
        weight, bias = _tensor(O, I, std=I**-0.5), _tensor(O)
        lora = [_tensor(rank, I, std=I**-0.5, grad=True), _tensor(O, rank, std=0.1, grad=True)]
        eager = lambda: peft_linear(x, weight, bias, *lora, SCALE)
        floors = {"base": lambda: F.linear(x, weight, bias), "merged": lambda: F.linear(x, merged_weight, bias)}
        kdfast_fn = lambda backend: lambda: lora_ops.lora_linear(x, weight, bias, *lora, SCALE, backend=backend)
        compiled = _compiled(peft_linear)
        compile_fn = lambda: compiled(x, weight, bias, *lora, SCALE)
        delta = (SCALE * lora[1] @ lora[0]).detach()
    merged_weight = weight + delta
    if impl == "eager":
        fn = eager
    elif impl == "compile":
        fn = compile_fn
    elif impl in floors:
        fn = floors[impl]
    else:
        fn = kdfast_fn(impl.removeprefix("kdfast-"))
    wrt = [x] + ([] if impl in floors else lora)
    return fn, wrt


# ------------------------------------------------------------------------------------------------- block


def peft_block(rank: int) -> Block:
    """A ViT block whose qkv, proj, fc1 and fc2 compute PEFT-style eager LoRA (qkv per slice), base frozen."""
    block = Block(C, HEADS).to(DEVICE, DTYPE).requires_grad_(False)
    pairs = nn.ParameterList(
        [nn.Parameter(_tensor(rank, c_in, std=c_in**-0.5)) if i % 2 == 0 else nn.Parameter(_tensor(c_out, rank, std=0.1))
         for c_in, c_out in [(C, C)] * 4 + [(C, HIDDEN), (HIDDEN, C)] for i in range(2)]
    )
    block.lora = pairs
    attn, mlp = block.attn, block.mlp

    def attention(x, attn_mask=None, is_causal=False):  # Block.forward passes timm's mask arguments
        q, k, v = peft_qkv(x, attn.qkv.weight, attn.qkv.bias, *pairs[:6], SCALE)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal).transpose(1, 2).reshape(x.shape)
        return peft_linear(o, attn.proj.weight, attn.proj.bias, pairs[6], pairs[7], SCALE)

    def mlp_forward(x):
        h = F.gelu(peft_linear(x, mlp.fc1.weight, mlp.fc1.bias, pairs[8], pairs[9], SCALE))
        return peft_linear(h, mlp.fc2.weight, mlp.fc2.bias, pairs[10], pairs[11], SCALE)

    block.attn.forward = attention
    block.mlp.forward = mlp_forward
    return block


def kdfast_block(eager: Block, rank: int, backend: str) -> Block:
    """The same block (same weights) on kdfast.nn.LoRAAttention and LoRALinear."""
    block = Block(C, HEADS).to(DEVICE, DTYPE)
    state = {k: v for k, v in eager.state_dict().items() if not k.startswith("lora.")}
    block.load_state_dict(state)
    block.requires_grad_(False)
    block.attn = LoRAAttention.from_timm(block.attn, rank, lora_alpha=SCALE * rank, backend=backend)
    block.mlp.fc1 = LoRALinear(block.mlp.fc1, rank, SCALE * rank, backend=backend)
    block.mlp.fc2 = LoRALinear(block.mlp.fc2, rank, SCALE * rank, backend=backend)
    with torch.no_grad():
        p = eager.lora
        for i, s in enumerate("qkv"):
            block.attn.lora_A[s].weight.copy_(p[2 * i])
            block.attn.lora_B[s].weight.copy_(p[2 * i + 1])
        for j, layer in enumerate((block.attn.proj, block.mlp.fc1, block.mlp.fc2)):
            layer.lora_A.weight.copy_(p[6 + 2 * j])
            layer.lora_B.weight.copy_(p[7 + 2 * j])
    return block


def _block_case(rank, impl, backward):
    x = _tensor(BATCH, TOKENS, C, grad=backward)
    eager = peft_block(rank)
    if impl in ("base", "merged"):
        block = Block(C, HEADS).to(DEVICE, DTYPE).requires_grad_(False)
        state = {k: v for k, v in eager.state_dict().items() if not k.startswith("lora.")}
        if impl == "merged":
            merged = kdfast_block(eager, rank, "reference")
            for module in merged.modules():
                if isinstance(module, (LoRAAttention, LoRALinear)) and not module.merged:
                    module.merge()
            state = {k.replace(".base_layer", ""): v for k, v in merged.state_dict().items() if "lora_" not in k}
        block.load_state_dict(state)
        return (lambda: block(x)), [x]
    if impl == "eager":
        return (lambda: eager(x)), [x, *eager.lora]
    if impl == "compile":
        torch._dynamo.reset()
        compiled = torch.compile(eager, dynamic=False)
        return (lambda: compiled(x)), [x, *eager.lora]
    block = kdfast_block(eager, rank, impl.removeprefix("kdfast-"))
    return (lambda: block(x)), [x, *(p for p in block.parameters() if p.requires_grad)]


# --------------------------------------------------------------------------------------------------- cases

OPS = [f"lora_linear:{name}" for name in LINEARS] + ["lora_qkv", "block"]
CASES = bench_cases(OPS, LORA_RANKS, implementations)


def _layers(op: str) -> list[tuple[int, int, int]]:
    """(in, out, adapters) of each base Linear of a case; a qkv with per-slice LoRA has 3 adapters of C -> C."""
    if op == "block":
        return [(C, 3 * C, 3), (C, C, 1), (C, HIDDEN, 1), (HIDDEN, C, 1)]
    if op == "lora_qkv":
        return [(C, 3 * C, 3)]
    return [(*LINEARS[op.split(":")[1]], 1)]


def _cost(op: str, rank: int, backward: bool) -> tuple[int, int]:
    """(bytes, flops): activations read and written once per pass plus the weights; the GEMMs' flops (and SDPA's
    for the block). Backward with a frozen base: dx through the base, and the LoRA gradients (about twice the
    LoRA forward)."""
    M, size = BATCH * TOKENS, DTYPE.itemsize
    base = sum(2 * M * I * O for I, O, _ in _layers(op))
    low_rank = sum(2 * M * rank * (I + O // n) * n for I, O, n in _layers(op))
    attention = 4 * M * TOKENS * C if op == "block" else 0
    flops = base + low_rank + attention + (base + 2 * low_rank + 2 * attention if backward else 0)
    activations = sum(M * (I + O) for I, O, _ in _layers(op))
    weights = sum(I * O for I, O, _ in _layers(op))
    return size * (activations * (3 if backward else 1) + weights * (2 if backward else 1)), flops


def _ones_like_outputs(out) -> list[torch.Tensor]:
    """The incoming gradients of the backward: ones for each output (lora_qkv has three)."""
    return [torch.ones_like(o) for o in ((out,) if isinstance(out, torch.Tensor) else out)]


@pytest.mark.parametrize("op, pass_name, preset, impl", CASES)
def test_lora(benchmark, op, pass_name, preset, impl):
    rank = LORA_RANKS[preset]
    backward = pass_name == FWD_BWD
    torch.manual_seed(0)
    if op == "block":
        fn, wrt = _block_case(rank, impl, backward)
    else:
        fn, wrt = _functional_case(op, rank, impl, backward)
    run_case(
        benchmark, op=op, pass_name=pass_name, preset=preset, impl=impl,
        forward=fn,
        wrt=wrt,
        grad_outputs=_ones_like_outputs,
        group=f"{op} {pass_name} r={rank}",
        shape=f"B={BATCH} T={TOKENS} C={C} r={rank}",
        cost=_cost(op, rank, backward),
    )
