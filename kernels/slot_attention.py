"""Triton kernels of the slot attention core (design 3.1): one pass over the N tokens each way.

Per batch element b, with s = scale and e = eps:

    L[i, n] = s <q_i, k_n>,  A[:, n] = softmax over the K slots of L[:, n],  W = A + e
    Z_i = sum_n W[i, n],     U_i = sum_n W[i, n] v_n / Z_i

Forward: program (chunk, b) owns a chunk of tokens, walks it in tiles of BLOCK_N and keeps q_b, the partial
numerator sum_n W v (K, Dv) and the partial Z in registers; the masks are stored only when asked for. A
second kernel adds the chunks' partial sums in chunk order (deterministic: no atomics) and divides.

Backward (recomputing; only q, k, v, U and Z are read): with G = dU, c_i = <G_i, U_i>,

    dA = (G v^T - c) / Z + GA,  dv_n = sum_i W[i, n] G_i / Z_i,  dL = A (dA - sum_j A_j dA_j),
    dq = s dL k,  dk = s dL^T q

program (chunk, b) recomputes A tile by tile, writes its tokens' dk and dv rows whole and a partial dq, which
a second kernel adds up in chunk order.

Slots are padded to a power of two BLOCK_K >= 16 (tl.dot's minimum) and masked; D and Dv to powers of two
(48 -> 64). Everything accumulates in float32 (float64 for float64) with IEEE dots; scale and eps are
annotated tl.float64 so that float64 inputs see them unrounded.
"""

# No `from __future__ import annotations` here: it would turn the kernels' tl.float64 annotations into strings
# that Triton does not recognise.
import torch
import triton
import triton.language as tl

from ._launch import accumulator_dtype, block_size, device_guard, empty_output, is_fp64

MAX_SLOTS = 64  # largest K one program holds; the caller falls back above it (see also MAX_SLOT_TILE)
MAX_DIM = 256  # largest D and Dv

# Spill stores per thread allowed on sm_90 (tests/test_gpu_compile.py; benchmarks/results/sm90-resources.md): the core
# forward and both reductions spill nothing; the core backward nothing at the design presets and, at the size limits
# (255 registers), 8-24 B at K=64, D=128 and 68 B at K=32, D=256 with Triton 3.9's ptxas, 268 B at K=64, D=128
# (with the attention's gradient) and 32 B at K=32, D=256 with Triton 3.6's (the GPU image's). The budget is a
# quarter above the largest; 16 warps at the limits were tried and spill more (164-332 B at 128 registers).
SM90_SPILL_BUDGET = {"_slot_attention_core_fwd_kernel": 0, "_slot_attention_core_fwd_reduce_kernel": 0,
                     "_slot_attention_core_bwd_kernel": 336, "_slot_attention_core_bwd_reduce_kernel": 0}


@triton.jit
def _softmax_over_slots(q, k, valid_k, scale):
    """softmax over the slots (rows) of scale q k^T: (BLOCK_K, BLOCK_N), padded slots 0."""
    logits = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    logits = tl.where(valid_k[:, None], logits, float("-inf"))
    e = tl.exp(logits - tl.max(logits, axis=0)[None, :])
    return e / tl.sum(e, axis=0)[None, :]


@triton.jit
def _slot_attention_core_fwd_kernel(
    q_ptr, k_ptr, v_ptr, attn_ptr, part_num_ptr, part_z_ptr,
    K, N, D, DV, CHUNK, TILES,
    stride_qb, stride_qk, stride_qd,
    stride_kb, stride_kn, stride_kd,
    stride_vb, stride_vn, stride_vd,
    stride_ab, stride_ak, stride_an,
    scale: tl.float64, eps: tl.float64,
    STORE_ATTN: tl.constexpr, IS_FP64: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    chunk = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    chunks = tl.num_programs(0).to(tl.int64)
    acc = tl.float64 if IS_FP64 else tl.float32
    scale = tl.full([], scale, acc)
    eps = tl.full([], eps, acc)
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    valid_k = offs_k < K
    q = tl.load(q_ptr + b * stride_qb + offs_k[:, None] * stride_qk + offs_d[None, :] * stride_qd,
                mask=valid_k[:, None] & (offs_d[None, :] < D), other=0.0).to(acc)
    num = tl.zeros([BLOCK_K, BLOCK_DV], acc)
    z = tl.zeros([BLOCK_K], acc)
    for tile in range(TILES):
        offs_n = chunk * CHUNK + tile * BLOCK_N + tl.arange(0, BLOCK_N)
        valid_n = (offs_n < N) & (offs_n < (chunk + 1) * CHUNK)
        k = tl.load(k_ptr + b * stride_kb + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=valid_n[:, None] & (offs_d[None, :] < D), other=0.0).to(acc)
        a = _softmax_over_slots(q, k, valid_k, scale)  # (BLOCK_K, BLOCK_N)
        inside = valid_k[:, None] & valid_n[None, :]
        if STORE_ATTN:
            tl.store(attn_ptr + b * stride_ab + offs_k[:, None] * stride_ak + offs_n[None, :] * stride_an,
                     a.to(attn_ptr.dtype.element_ty), mask=inside)
        w = tl.where(inside, a + eps, 0.0)
        z += tl.sum(w, axis=1)
        v = tl.load(v_ptr + b * stride_vb + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                    mask=valid_n[:, None] & (offs_dv[None, :] < DV), other=0.0).to(acc)
        num += tl.dot(w, v, input_precision="ieee")
    part = (b * chunks + chunk) * BLOCK_K
    tl.store(part_num_ptr + (part + offs_k[:, None]) * BLOCK_DV + offs_dv[None, :], num)
    tl.store(part_z_ptr + part + offs_k, z)


@triton.jit
def _slot_attention_core_fwd_reduce_kernel(
    part_num_ptr, part_z_ptr, updates_ptr, norm_ptr,
    K, DV, CHUNKS,
    stride_ub, stride_uk, stride_ud,
    IS_FP64: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    acc = tl.float64 if IS_FP64 else tl.float32
    offs_k = tl.arange(0, BLOCK_K)
    offs_dv = tl.arange(0, BLOCK_DV)
    num = tl.zeros([BLOCK_K, BLOCK_DV], acc)
    z = tl.zeros([BLOCK_K], acc)
    for chunk in range(CHUNKS):  # in order: the same sums on every run
        part = (b * CHUNKS + chunk) * BLOCK_K
        num += tl.load(part_num_ptr + (part + offs_k[:, None]) * BLOCK_DV + offs_dv[None, :])
        z += tl.load(part_z_ptr + part + offs_k)
    valid_k = offs_k < K
    z_safe = tl.where(valid_k, z, 1.0)
    tl.store(updates_ptr + b * stride_ub + offs_k[:, None] * stride_uk + offs_dv[None, :] * stride_ud,
             (num / z_safe[:, None]).to(updates_ptr.dtype.element_ty),
             mask=valid_k[:, None] & (offs_dv[None, :] < DV))
    tl.store(norm_ptr + b * K + offs_k, z, mask=valid_k)


@triton.jit
def _slot_attention_core_bwd_kernel(
    grad_u_ptr, grad_a_ptr, q_ptr, k_ptr, v_ptr, u_ptr, norm_ptr, dk_ptr, dv_ptr, part_dq_ptr,
    K, N, D, DV, CHUNK, TILES,
    stride_gb, stride_gk, stride_gd,
    stride_gab, stride_gak, stride_gan,
    stride_qb, stride_qk, stride_qd,
    stride_kb, stride_kn, stride_kd,
    stride_vb, stride_vn, stride_vd,
    stride_ub, stride_uk, stride_ud,
    stride_dkb, stride_dkn, stride_dkd,
    stride_dvb, stride_dvn, stride_dvd,
    scale: tl.float64, eps: tl.float64,
    HAS_GRAD_ATTN: tl.constexpr, IS_FP64: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    chunk = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    chunks = tl.num_programs(0).to(tl.int64)
    acc = tl.float64 if IS_FP64 else tl.float32
    scale = tl.full([], scale, acc)
    eps = tl.full([], eps, acc)
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    valid_k = offs_k < K
    mask_kd = valid_k[:, None] & (offs_d[None, :] < D)
    mask_kdv = valid_k[:, None] & (offs_dv[None, :] < DV)
    q = tl.load(q_ptr + b * stride_qb + offs_k[:, None] * stride_qk + offs_d[None, :] * stride_qd,
                mask=mask_kd, other=0.0).to(acc)
    g = tl.load(grad_u_ptr + b * stride_gb + offs_k[:, None] * stride_gk + offs_dv[None, :] * stride_gd,
                mask=mask_kdv, other=0.0).to(acc)
    u = tl.load(u_ptr + b * stride_ub + offs_k[:, None] * stride_uk + offs_dv[None, :] * stride_ud,
                mask=mask_kdv, other=0.0).to(acc)
    c = tl.sum(g * u, axis=1)
    inv_z = 1.0 / tl.load(norm_ptr + b * K + offs_k, mask=valid_k, other=1.0).to(acc)
    g_over_z = g * inv_z[:, None]
    dq = tl.zeros([BLOCK_K, BLOCK_D], acc)
    for tile in range(TILES):
        offs_n = chunk * CHUNK + tile * BLOCK_N + tl.arange(0, BLOCK_N)
        valid_n = (offs_n < N) & (offs_n < (chunk + 1) * CHUNK)
        mask_nd = valid_n[:, None] & (offs_d[None, :] < D)
        mask_ndv = valid_n[:, None] & (offs_dv[None, :] < DV)
        k = tl.load(k_ptr + b * stride_kb + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=mask_nd, other=0.0).to(acc)
        v = tl.load(v_ptr + b * stride_vb + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                    mask=mask_ndv, other=0.0).to(acc)
        inside = valid_k[:, None] & valid_n[None, :]
        a = tl.where(inside, _softmax_over_slots(q, k, valid_k, scale), 0.0)
        w = tl.where(inside, a + eps, 0.0)
        dv = tl.dot(tl.trans(w), g_over_z, input_precision="ieee")  # (BLOCK_N, BLOCK_DV)
        tl.store(dv_ptr + b * stride_dvb + offs_n[:, None] * stride_dvn + offs_dv[None, :] * stride_dvd,
                 dv.to(dv_ptr.dtype.element_ty), mask=mask_ndv)
        da = (tl.dot(g, tl.trans(v), input_precision="ieee") - c[:, None]) * inv_z[:, None]
        if HAS_GRAD_ATTN:
            da += tl.load(grad_a_ptr + b * stride_gab + offs_k[:, None] * stride_gak + offs_n[None, :] * stride_gan,
                          mask=inside, other=0.0).to(acc)
        dl = a * (da - tl.sum(a * da, axis=0)[None, :]) * scale  # 0 outside: a is
        dk = tl.dot(tl.trans(dl), q, input_precision="ieee")  # (BLOCK_N, BLOCK_D)
        tl.store(dk_ptr + b * stride_dkb + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
                 dk.to(dk_ptr.dtype.element_ty), mask=mask_nd)
        dq += tl.dot(dl, k, input_precision="ieee")
    part = (b * chunks + chunk) * BLOCK_K
    tl.store(part_dq_ptr + (part + offs_k[:, None]) * BLOCK_D + offs_d[None, :], dq)


@triton.jit
def _slot_attention_core_bwd_reduce_kernel(
    part_dq_ptr, dq_ptr,
    K, D, CHUNKS,
    stride_dqb, stride_dqk, stride_dqd,
    IS_FP64: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    acc = tl.float64 if IS_FP64 else tl.float32
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    dq = tl.zeros([BLOCK_K, BLOCK_D], acc)
    for chunk in range(CHUNKS):  # in order: the same sums on every run
        dq += tl.load(part_dq_ptr + ((b * CHUNKS + chunk) * BLOCK_K + offs_k[:, None]) * BLOCK_D + offs_d[None, :])
    tl.store(dq_ptr + b * stride_dqb + offs_k[:, None] * stride_dqk + offs_d[None, :] * stride_dqd,
             dq.to(dq_ptr.dtype.element_ty), mask=(offs_k[:, None] < K) & (offs_d[None, :] < D))


# Largest padded K x max(D, Dv) tile: the kernels hold several of them (q, the gradients, dq) whole; above it
# the backward asks for more shared memory than an H100/H200 block has (compiled for sm_90: 64 x 256 needs
# 276 KB at 16-token tiles, 32 x 256 needs 174 KB). float64 tiles take twice the bytes: half as many elements
# (float64 at 64 x 128 and 32 x 256 asked for 295 KB and 369 KB; tests/test_gpu_compile.py).
MAX_SLOT_TILE = 8192


def slot_tile_limit(fp64: bool = False) -> int:
    return MAX_SLOT_TILE // 2 if fp64 else MAX_SLOT_TILE


def within_limits(K: int, D: int, Dv: int, fp64: bool = False) -> bool:
    return (K <= MAX_SLOTS and max(D, Dv) <= MAX_DIM
            and block_size(K) * block_size(max(D, Dv)) <= slot_tile_limit(fp64))


def check_limits(K: int, D: int, Dv: int, fp64: bool = False) -> None:
    if not within_limits(K, D, Dv, fp64):
        raise ValueError(
            f"kdfast.kernels.slot_attention handles K <= {MAX_SLOTS} slots and D, Dv <= {MAX_DIM} with K x max(D, Dv) "
            f"<= {slot_tile_limit(fp64)} in {'float64' if fp64 else 'float32'} (each padded to a power of two), got "
            f"K={K}, D={D}, Dv={Dv}; fall back to another backend above them"
        )


# Programs to aim for on a GPU (a few waves of ~132 multiprocessors) when splitting N into chunks.
_TARGET_PROGRAMS = 512


def _geometry(B, K, N, D, Dv, dtype, device, block_n=None, chunk=None):
    """(BLOCK_K, BLOCK_N, BLOCK_D, BLOCK_DV, CHUNK, chunks, tiles per chunk, num_warps).

    On a GPU: 8 warps and 32-token tiles, 16 for tiles above 16 x 64 (the float32 dots are IEEE FMA dots whose
    operands each thread holds whole; compiled for sm_90 these spill nothing or under 100 bytes at the
    SlotContrast presets, where 64-token tiles at 4 warps spilled 9 KB in the backward). Still to be timed.
    The interpreter takes the widest tile within a register-like budget: fewer, larger numpy steps.
    """
    block_k, block_d, block_dv = block_size(K), block_size(D), block_size(Dv)
    if block_n is None:
        if device.type == "cuda":
            block_n = 32 if block_k * max(block_d, block_dv) <= 1024 else 16
        else:
            budget = 4096 if dtype == torch.float64 else 8192
            block_n = max(16, min(128, budget // max(block_d, block_dv, block_k)))
        block_n = min(block_n, block_size(N))
    if chunk is None:
        tiles = triton.cdiv(N, block_n)
        # the interpreter runs programs one after another: one chunk per batch element there
        chunks = 1 if device.type == "cpu" else max(1, min(tiles, triton.cdiv(_TARGET_PROGRAMS, B)))
        chunk = triton.cdiv(tiles, chunks) * block_n
    chunks = triton.cdiv(N, chunk)
    return block_k, block_n, block_d, block_dv, chunk, chunks, triton.cdiv(chunk, block_n), 8


def slot_attention_core_forward(q, k, v, scale: float, eps: float, return_attn: bool, block_n=None, chunk=None):
    """(updates (B, K, Dv) in q.dtype, attn (B, K, N) or (B, K, 0), norm Z (B, K) in the accumulator dtype).

    q (B, K, D), k (B, N, D), v (B, N, Dv): one floating dtype, any strides; K <= MAX_SLOTS, D and Dv <=
    MAX_DIM. ``block_n`` (tokens per tile) and ``chunk`` (tokens per program, a multiple of block_n) are
    chosen here unless given (tests force small ones).
    """
    B, K, D = q.shape
    N, Dv = k.shape[1], v.shape[2]
    check_limits(K, D, Dv, is_fp64(q.dtype))
    acc = accumulator_dtype(q.dtype)
    block_k, block_n, block_d, block_dv, chunk, chunks, tiles, num_warps = _geometry(
        B, K, N, D, Dv, q.dtype, q.device, block_n, chunk)
    updates = empty_output((B, K, Dv), q.dtype, q.device)
    attn = empty_output((B, K, N if return_attn else 0), q.dtype, q.device)
    norm = empty_output((B, K), acc, q.device)
    part_num = torch.empty((B, chunks, block_k, block_dv), dtype=acc, device=q.device)
    part_z = torch.empty((B, chunks, block_k), dtype=acc, device=q.device)
    fp64 = is_fp64(q.dtype)
    with device_guard(q):
        _slot_attention_core_fwd_kernel[(chunks, B)](
            q, k, v, attn, part_num, part_z,
            K, N, D, Dv, chunk, tiles,
            *q.stride(), *k.stride(), *v.stride(), *attn.stride(),
            float(scale), float(eps),
            STORE_ATTN=return_attn, IS_FP64=fp64,
            BLOCK_K=block_k, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv, num_warps=num_warps,
        )
        _slot_attention_core_fwd_reduce_kernel[(B,)](
            part_num, part_z, updates, norm,
            K, Dv, chunks,
            *updates.stride(),
            IS_FP64=fp64, BLOCK_K=block_k, BLOCK_DV=block_dv,
        )
    return updates, attn, norm


def slot_attention_core_backward(grad_updates, grad_attn, q, k, v, updates, norm, scale: float, eps: float,
                                 block_n=None, chunk=None):
    """(dq, dk, dv) in the dtypes of q, k, v. grad_attn (B, K, N) or None; updates and norm from the forward."""
    B, K, D = q.shape
    N, Dv = k.shape[1], v.shape[2]
    check_limits(K, D, Dv, is_fp64(q.dtype))
    acc = accumulator_dtype(q.dtype)
    block_k, block_n, block_d, block_dv, chunk, chunks, tiles, num_warps = _geometry(
        B, K, N, D, Dv, q.dtype, q.device, block_n, chunk)
    dq = empty_output((B, K, D), q.dtype, q.device)
    dk = empty_output((B, N, D), k.dtype, q.device)
    dv = empty_output((B, N, Dv), v.dtype, q.device)
    part_dq = torch.empty((B, chunks, block_k, block_d), dtype=acc, device=q.device)
    has_grad_attn = grad_attn is not None
    grad_attn_strides = grad_attn.stride() if has_grad_attn else (0, 0, 0)
    fp64 = is_fp64(q.dtype)
    with device_guard(q):
        _slot_attention_core_bwd_kernel[(chunks, B)](
            grad_updates, grad_attn if has_grad_attn else grad_updates, q, k, v, updates, norm, dk, dv, part_dq,
            K, N, D, Dv, chunk, tiles,
            *grad_updates.stride(), *grad_attn_strides, *q.stride(), *k.stride(), *v.stride(), *updates.stride(),
            *dk.stride(), *dv.stride(),
            float(scale), float(eps),
            HAS_GRAD_ATTN=has_grad_attn, IS_FP64=fp64,
            BLOCK_K=block_k, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv, num_warps=num_warps,
        )
        _slot_attention_core_bwd_reduce_kernel[(B,)](
            part_dq, dq,
            K, D, chunks,
            *dq.stride(),
            IS_FP64=fp64, BLOCK_K=block_k, BLOCK_D=block_d,
        )
    return dq, dk, dv
