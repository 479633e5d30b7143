"""Triton kernels of LoRA-augmented linear layers (design 3.3): ``y = x W^T + b + (scale * dropout(x) A^T) B^T``.

One GEMM kernel with a low-rank epilogue does every product, forward and backward:

    out[m, n] = alpha * sum_k L[m, k] R[k, n]  +  sum_j L2[m, j] R2[j, n] (optionally times the dropout mask)  + bias[n]

Forward, two launches: ``t = scale * dropout(x) A^T`` (M x r, the "down" product, dropout applied to x as it is
loaded), then the base GEMM ``x W^T`` whose epilogue adds ``t B^T`` and the bias before the one store of y: the
low-rank update never makes a pass over y of its own, and x is read by the two GEMMs only.

Backward, with ``g = scale * dy B`` (M x r):
    dx = dy W + mask * (g A)          one launch: base GEMM, low-rank epilogue masked by the regenerated dropout
    dA = g^T dropout(x)                dropout applied to x as it is loaded
    dB = dy^T t                        t recomputed (one M x I x r GEMM) rather than saved by the op
    dW = dy^T x, db = sum_m dy         only when the base layer requires grad

Dropout draws ``keep = tl.rand(seed, m * I + k) >= p`` per element of x viewed as (M, I), so the backward
regenerates the forward's mask from the seed; no mask is stored. x must have fewer than 2**31 elements.

``lora_qkv`` (WeCoLoRA's per-slice LoRA on a fused qkv Linear) runs the down product once for the three slices
(their A stacked), then one kernel whose programs each own a tile of one slice: base GEMM, that slice's low-rank
epilogue and bias, stored straight into q, k or v in the (B, H, T, head_dim) layout of
scaled_dot_product_attention. The backward gathers dq, dk, dv into one (M, 3C) gradient and reuses the GEMM kernel.

fp32 dots are IEEE (no TF32), matching torch's default matmul precision; all products accumulate in float32
(float64 for float64 inputs).
"""

import torch
import triton
import triton.language as tl

from ._launch import device_guard, empty_output, is_fp64

# (BLOCK_M, BLOCK_N, BLOCK_K) of the GEMMs. The interpreter's cost is per operation, so it gets larger tiles.
_TILES = {"gpu": (64, 64, 32), "interpreter": (64, 64, 64)}
_BLOCK_R = {"gpu": 32, "interpreter": 64}

NO_DROPOUT, DROP_L, DROP_R, DROP_LOW_RANK = 0, 1, 2, 3

#: x of lora_linear may have at most this many elements on the Triton backend (int32 dropout counters).
MAX_NUMEL = 2**31 - 1

# Spill budgets on sm_90 (H100/H200), bytes of spill stores per thread, checked by tests/test_gpu_compile.py at the
# launches this module makes at the design presets and its size limits; measured with Triton 3.9's ptxas (see
# benchmarks/results/sm90-resources.md), the budget a quarter above the measurement for other Triton versions.
# Measured: the GEMM 0 without dropout, 880 B with dropout applied to the right operand (dA's x tile), qkv 0.
SM90_SPILL_BUDGET = {"_gemm_kernel": 1100, "_qkv_forward_kernel": 0}


def _mode(device):
    # CPU tensors run in the interpreter; any other device (CUDA, or "meta" when the tests capture the launches a
    # GPU would make) gets the GPU tiles, as in the other kernel modules.
    return "interpreter" if device.type == "cpu" else "gpu"


@triton.jit
def _keep(seed, rows, cols, mask_cols, p):
    # the dropout decision for x[rows, cols], x viewed as (M, mask_cols)
    return tl.rand(seed, rows * mask_cols + cols) >= p


@triton.jit
def _gemm_kernel(
    l_ptr, r_ptr, l2_ptr, r2_ptr, bias_ptr, out_ptr,
    M, N, K, K2,
    stride_lm, stride_lk, stride_rk, stride_rn,
    stride_l2m, stride_l2k, stride_r2k, stride_r2n,
    stride_om, stride_on, stride_bias,
    alpha: tl.float64, seed, p: tl.float64, inv_keep: tl.float64, mask_cols,
    DROP: tl.constexpr, HAS_LOW_RANK: tl.constexpr, HAS_BIAS: tl.constexpr, IS_FP64: tl.constexpr,
    UPCAST_DOTS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc_dtype = tl.float64 if IS_FP64 else tl.float32
    # scalars arrive as float64 (unrounded for float64 inputs); the arithmetic is in the accumulator dtype
    inv_keep = tl.full([], inv_keep, acc_dtype)
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, acc_dtype)
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        mask_k = ks < K
        a = tl.load(
            l_ptr + offs_m[:, None].to(tl.int64) * stride_lm + ks[None, :] * stride_lk,
            mask=mask_m[:, None] & mask_k[None, :], other=0.0,
        )
        b = tl.load(
            r_ptr + ks[:, None] * stride_rk + offs_n[None, :].to(tl.int64) * stride_rn,
            mask=mask_k[:, None] & mask_n[None, :], other=0.0,
        )
        if DROP == 1:
            keep = _keep(seed, offs_m[:, None], ks[None, :], mask_cols, p)
            a = tl.where(keep, a.to(acc_dtype) * inv_keep, 0.0).to(b.dtype)
        if DROP == 2:
            keep = _keep(seed, ks[:, None], offs_n[None, :], mask_cols, p)
            b = tl.where(keep, b.to(acc_dtype) * inv_keep, 0.0).to(a.dtype)
        if UPCAST_DOTS:
            a = a.to(acc_dtype)
            b = b.to(acc_dtype)
        acc += tl.dot(a, b, input_precision="ieee", out_dtype=acc_dtype)
    acc = acc * tl.full([], alpha, acc_dtype)
    if HAS_LOW_RANK:
        low = tl.full([BLOCK_M, BLOCK_N], 0.0, acc_dtype)
        offs_r = tl.arange(0, BLOCK_R)
        for j0 in range(0, K2, BLOCK_R):
            js = j0 + offs_r
            mask_j = js < K2
            a2 = tl.load(
                l2_ptr + offs_m[:, None].to(tl.int64) * stride_l2m + js[None, :] * stride_l2k,
                mask=mask_m[:, None] & mask_j[None, :], other=0.0,
            )
            b2 = tl.load(
                r2_ptr + js[:, None] * stride_r2k + offs_n[None, :] * stride_r2n,
                mask=mask_j[:, None] & mask_n[None, :], other=0.0,
            )
            if UPCAST_DOTS:
                a2 = a2.to(acc_dtype)
            low += tl.dot(a2, b2.to(a2.dtype), input_precision="ieee", out_dtype=acc_dtype)
        if DROP == 3:
            keep = _keep(seed, offs_m[:, None], offs_n[None, :], mask_cols, p)
            low = tl.where(keep, low * inv_keep, 0.0)
        acc += low
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n * stride_bias, mask=mask_n, other=0.0).to(acc_dtype)[None, :]
    out = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _upcasts_dots(device):
    """The interpreter (CPU tensors) computes a dot with numpy, which has no bfloat16: there the tiles go to the
    accumulator dtype first (on a GPU, half-precision tiles feed the tensor cores as they are)."""
    return device.type == "cpu"


def _gemm(left, right, out, *, alpha=1.0, low_rank=None, bias=None, dropout=None):
    """``out = alpha * left @ right + low_left @ low_right (+ bias)``, 2-D operands read through their strides.

    dropout: None or (where, seed, p, mask_cols) with where one of DROP_L, DROP_R, DROP_LOW_RANK.
    """
    M, K = left.shape
    N = right.shape[1]
    low_left, low_right = low_rank if low_rank is not None else (left, right)
    where, seed, p, mask_cols = dropout if dropout is not None else (NO_DROPOUT, 0, 0.0, 1)
    mode = _mode(left.device)
    block_m, block_n, block_k = _TILES[mode]
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    with device_guard(left):
        _gemm_kernel[grid](
            left, right, low_left, low_right, bias if bias is not None else out, out,
            M, N, K, low_left.shape[1] if low_rank is not None else 0,
            left.stride(0), left.stride(1), right.stride(0), right.stride(1),
            low_left.stride(0), low_left.stride(1), low_right.stride(0), low_right.stride(1),
            out.stride(0), out.stride(1), bias.stride(0) if bias is not None else 0,
            float(alpha), seed, float(p), 1.0 / (1.0 - p), mask_cols,
            DROP=where, HAS_LOW_RANK=low_rank is not None, HAS_BIAS=bias is not None, IS_FP64=is_fp64(out.dtype),
            UPCAST_DOTS=_upcasts_dots(left.device), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=_BLOCK_R[mode],
        )
    return out


def _seed_value(seed):
    # A 31-bit Philox key from the op's int64 seed tensor (a CPU scalar: no device sync).
    return int(seed) & 0x7FFFFFFF


def _dropout(where, seed, p, mask_cols):
    return None if seed is None or p == 0.0 else (where, _seed_value(seed), p, mask_cols)


def _down(x2d, lora_a, scale, p, seed):
    """``t = scale * dropout(x) A^T``, (M, r) in x's dtype."""
    t = empty_output((x2d.shape[0], lora_a.shape[0]), x2d.dtype, x2d.device)
    return _gemm(x2d, lora_a.t(), t, alpha=scale, dropout=_dropout(DROP_L, seed, p, x2d.shape[1]))


def lora_linear_forward(x2d, weight, bias, lora_a, lora_b, scale, dropout_p, seed):
    """y (M, O) for x (M, I), weight (O, I), bias (O,) or None, lora_a (r, I), lora_b (O, r); one dtype."""
    t = _down(x2d, lora_a, scale, dropout_p, seed)
    y = empty_output((x2d.shape[0], weight.shape[0]), x2d.dtype, x2d.device)
    return _gemm(x2d, weight.t(), y, low_rank=(t, lora_b.t()), bias=bias)


def lora_linear_backward(grad2d, x2d, weight, bias, lora_a, lora_b, scale, dropout_p, seed, needs):
    """(dx, dW, db, dA, dB), None where ``needs`` (x, weight, bias, lora_a, lora_b) is False or bias is None."""
    M, I = x2d.shape
    O, r = lora_b.shape
    need_x, need_w, need_b, need_a, need_bb = needs
    dtype, device = x2d.dtype, x2d.device
    dx = dw = db = da = dbb = None
    g = None
    if need_x or need_a:
        g = _gemm(grad2d, lora_b, empty_output((M, r), dtype, device), alpha=scale)
    if need_x:
        dx = _gemm(
            grad2d, weight, empty_output((M, I), dtype, device), low_rank=(g, lora_a),
            dropout=_dropout(DROP_LOW_RANK, seed, dropout_p, I),
        )
    if need_a:
        da = _gemm(g.t(), x2d, empty_output((r, I), dtype, device), dropout=_dropout(DROP_R, seed, dropout_p, I))
    if need_bb:
        t = _down(x2d, lora_a, scale, dropout_p, seed)
        dbb = _gemm(grad2d.t(), t, empty_output((O, r), dtype, device))
    if need_w:
        dw = _gemm(grad2d.t(), x2d, empty_output((O, I), dtype, device))
    if need_b and bias is not None:
        db = grad2d.sum(0, dtype=torch.float64 if dtype == torch.float64 else torch.float32).to(dtype)
    return dx, dw, db, da, dbb


# ------------------------------------------------------------------------------------------------- lora_qkv


@triton.jit
def _qkv_forward_kernel(
    x_ptr, w_ptr, bias_ptr, t_ptr, bq_ptr, bk_ptr, bv_ptr, q_ptr, k_ptr, v_ptr,
    M, C, T, HEAD_DIM, rank_q, rank_k, rank_v,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_tm, stride_tr, stride_bias,
    HAS_BIAS: tl.constexpr, IS_FP64: tl.constexpr, UPCAST_DOTS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    tiles = tl.cdiv(C, BLOCK_N)
    s = pid_n // tiles  # 0, 1, 2: the q, k or v slice this program's columns belong to
    offs_c = (pid_n - s * tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    mask_c = offs_c < C
    rows_w = s * C + offs_c  # rows of w_qkv
    acc_dtype = tl.float64 if IS_FP64 else tl.float32
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, acc_dtype)
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, C, BLOCK_K):
        ks = k0 + offs_k
        mask_k = ks < C
        a = tl.load(
            x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + ks[None, :] * stride_xk,
            mask=mask_m[:, None] & mask_k[None, :], other=0.0,
        )
        b = tl.load(
            w_ptr + ks[:, None] * stride_wk + rows_w[None, :].to(tl.int64) * stride_wn,
            mask=mask_k[:, None] & mask_c[None, :], other=0.0,
        )
        if UPCAST_DOTS:
            a = a.to(acc_dtype)
            b = b.to(acc_dtype)
        acc += tl.dot(a, b, input_precision="ieee", out_dtype=acc_dtype)
    # This slice's low-rank update: its columns of t (the three slices' t side by side) times its B^T.
    rank = tl.where(s == 0, rank_q, tl.where(s == 1, rank_k, rank_v))
    first = tl.where(s == 0, 0, tl.where(s == 1, rank_q, rank_q + rank_k))
    b_slice = tl.where(s == 0, bq_ptr, tl.where(s == 1, bk_ptr, bv_ptr))  # contiguous (C, rank)
    offs_r = tl.arange(0, BLOCK_R)
    for j0 in range(0, rank, BLOCK_R):
        js = j0 + offs_r
        mask_j = js < rank
        a2 = tl.load(
            t_ptr + offs_m[:, None].to(tl.int64) * stride_tm + (first + js)[None, :] * stride_tr,
            mask=mask_m[:, None] & mask_j[None, :], other=0.0,
        )
        b2 = tl.load(b_slice + offs_c[None, :] * rank + js[:, None], mask=mask_j[:, None] & mask_c[None, :], other=0.0)
        if UPCAST_DOTS:
            a2 = a2.to(acc_dtype)
        acc += tl.dot(a2, b2.to(a2.dtype), input_precision="ieee", out_dtype=acc_dtype)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows_w * stride_bias, mask=mask_c, other=0.0).to(acc_dtype)[None, :]
    # (B, T) rows and (H, head_dim) columns scatter to (B, H, T, head_dim).
    batch = offs_m // T
    heads = offs_c // HEAD_DIM
    offsets = (batch[:, None].to(tl.int64) * C * T + (offs_m - batch * T)[:, None] * HEAD_DIM
               + heads[None, :] * T * HEAD_DIM + (offs_c - heads * HEAD_DIM)[None, :])
    out = tl.where(s == 0, q_ptr, tl.where(s == 1, k_ptr, v_ptr))
    tl.store(out + offsets, acc.to(q_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_c[None, :])


def _stacked(pairs, C, dtype, device):
    """A of the slices with LoRA stacked (R, C), each slice's B contiguous (a dummy for slices without), ranks."""
    ranks = [0 if pair is None else pair[0].shape[0] for pair in pairs]
    a_all = [pair[0] for pair in pairs if pair is not None]
    a_all = torch.cat(a_all) if a_all else torch.zeros(1, C, dtype=dtype, device=device)
    dummy = a_all.new_zeros(1)
    b_all = [dummy if pair is None else pair[1].contiguous() for pair in pairs]
    return a_all, b_all, ranks


def lora_qkv_forward(x, w_qkv, b_qkv, pairs, scale, num_heads):
    """(q, k, v), each (B, H, T, C // H), for x (B, T, C); pairs: three (A (r, C), B (C, r)) or None."""
    B, T, C = x.shape
    x2d = x.reshape(B * T, C)
    a_all, b_all, ranks = _stacked(pairs, C, x.dtype, x.device)
    t = _down(x2d, a_all, scale, 0.0, None)
    outs = [empty_output((B, num_heads, T, C // num_heads), x.dtype, x.device) for _ in range(3)]
    mode = _mode(x.device)
    block_m, block_n, block_k = _TILES[mode]
    grid = (triton.cdiv(B * T, block_m), 3 * triton.cdiv(C, block_n))
    with device_guard(x):
        _qkv_forward_kernel[grid](
            x2d, w_qkv, b_qkv if b_qkv is not None else x2d, t, *b_all, *outs,
            B * T, C, T, C // num_heads, *ranks,
            x2d.stride(0), x2d.stride(1), w_qkv.stride(0), w_qkv.stride(1), t.stride(0), t.stride(1),
            b_qkv.stride(0) if b_qkv is not None else 0,
            HAS_BIAS=b_qkv is not None, IS_FP64=is_fp64(x.dtype), UPCAST_DOTS=_upcasts_dots(x.device),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=_BLOCK_R[mode],
        )
    return tuple(outs)


def lora_qkv_backward(grads, x, w_qkv, b_qkv, pairs, scale, num_heads, needs):
    """Gradients of (x, w_qkv, b_qkv, a_q, b_q, a_k, b_k, a_v, b_v); None where not needed or absent."""
    B, T, C = x.shape
    M = B * T
    dtype, device = x.dtype, x.device
    # (B, H, T, hd) x 3 -> (M, 3C): the layout of the qkv Linear's output.
    grad2d = torch.stack(grads, 2).permute(0, 3, 2, 1, 4).reshape(M, 3 * C)
    x2d = x.reshape(M, C)
    need_x, need_w, need_bias = needs[:3]
    a_all, _, ranks = _stacked(pairs, C, dtype, device)
    R = sum(ranks)
    on = [i for i, pair in enumerate(pairs) if pair is not None]
    g_all = t_all = None
    if need_x or any(needs[3 + 2 * i] for i in on):
        g_all = empty_output((M, max(R, 1)), dtype, device)
        first = 0
        for i in on:
            r = ranks[i]
            _gemm(grad2d[:, i * C:(i + 1) * C], pairs[i][1], g_all[:, first:first + r], alpha=scale)
            first += r
    if any(needs[4 + 2 * i] for i in on):
        t_all = _down(x2d, a_all, scale, 0.0, None)
    dx = dw = db = None
    if need_x:
        dx = empty_output((M, C), dtype, device)
        _gemm(grad2d, w_qkv, dx, low_rank=(g_all[:, :R], a_all) if R else None)
        dx = dx.reshape(B, T, C)
    if need_w:
        dw = _gemm(grad2d.t(), x2d, empty_output((3 * C, C), dtype, device))
    if need_bias and b_qkv is not None:
        db = grad2d.sum(0, dtype=torch.float64 if dtype == torch.float64 else torch.float32).to(dtype)
    result = [dx, dw, db]
    first = 0
    for i, pair in enumerate(pairs):
        da = dbb = None
        if pair is not None:
            r = ranks[i]
            if needs[3 + 2 * i]:
                da = _gemm(g_all[:, first:first + r].t(), x2d, empty_output((r, C), dtype, device))
            if needs[4 + 2 * i]:
                dbb = _gemm(grad2d[:, i * C:(i + 1) * C].t(), t_all[:, first:first + r], empty_output((C, r), dtype, device))
            first += r
        result += [da, dbb]
    return result
