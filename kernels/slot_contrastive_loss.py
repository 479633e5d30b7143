"""Triton kernels for SlotContrast's slot-slot contrastive loss (design 3.2), flash-attention style.

For a pair of consecutive frames (t, t+1) and a group of S slots (the B*K slots of the batch with batch
contrast, the K slots of one batch element without), on unit slots z = s / max(||s||, eps):

    l[i, j]   = <z_t^i, z_{t+1}^j> / temperature              i, j < S
    r[j]      = logsumexp_{i != j} (l[i, j] - l[j, j])         (-inf when S == 1)
    loss[j]   = softplus(r[j]) = logsumexp_i l[i, j] - l[j, j]  (softmax over the slots i at t, per slot j at t+1)

The loss is not formed as the difference of the log-sum-exp and the diagonal: when the positive dominates
(identical slots at a low temperature) both are ~1/temperature and the loss ~exp(-1/temperature), and the
difference would cancel every digit. Likewise the gradient of the positive, p[j, j] - 1, is -sigmoid(r[j]).

Forward: one program per (tile of columns j, pair t, group); it keeps its unit z_{t+1}^j tile, takes l[j, j]
as a per-column dot with z_t^j, and streams tiles of i with an online log-sum-exp of the shifted logits
l[i, j] - l[j, j] (the diagonal masked out), so the S x S logits never reach memory. It writes the per-column
losses, r and the negatives' log-sum-exp n[j] = l[j, j] + r[j]: r and n are all the backward needs besides
the slots (the norms are recomputed on load).

Backward: with G[i, j] = g_j sigmoid(r[j]) (exp(l[i, j] - n[j]) [i != j] - [i == j]) / temperature (the
softmax p[i, j] off the diagonal, p[j, j] - 1 on it),

    dz_t^i     += sum_j G[i, j] z_{t+1}^j        (slot i of frame t as a row of pair t)
    dz_{t+1}^j += sum_i G[i, j] z_t^i            (slot j of frame t+1 as a column of pair t)

so a slot of a middle frame gets both. One program per (tile of slots r, frame t, group) computes both sums
for its own rows, the first against frame t+1 (pair t), the second against frame t-1 (pair t-1), recomputing
the logits tile by tile: every output row is written by one program after a fixed-order loop, without
atomics, so results are deterministic. Then the normalisation's backward: ds = (dz - <dz, z> z) / ||s|| where
||s|| >= eps, dz / eps where the clamp is active (torch's where(), as autograd of F.normalize gives).

eps, 1/temperature and grad_scale are annotated tl.float64 so that float64 inputs see them unrounded.
"""

# No `from __future__ import annotations` here: it would turn the kernels' tl.float64 annotations into strings
# that Triton does not recognise, and eps would silently be passed as float32.
import torch
import triton
import triton.language as tl

from ._launch import accumulator_dtype, block_size, device_guard, empty_output, is_fp64

MAX_DIM = 512  # largest slot dimension D one tile holds; the caller falls back above it

@triton.jit
def _log1p_unit(x):
    """log(1 + x) for 0 <= x <= 1, to a few ulps: 2 atanh(s) with s = x / (2 + x) <= 1/3, by its series in
    s^2 to s^32 (the first term left out is below (1/9)^17 / 35 < 1e-17). No log of a value near 1, which a
    GPU's fast log would get right only in absolute terms."""
    s = x / (2.0 + x)
    s2 = s * s
    one = tl.full([], 1.0, x.dtype)
    series = one / 33
    for k in tl.static_range(16):
        series = series * s2 + one / (31 - 2 * k)
    return 2.0 * s * series


@triton.jit
def _softplus(r):
    """log(1 + exp(r)), exact for tiny results (r -> -inf: 0) and large r alike; NaN stays NaN."""
    return tl.where(r > 0, r, 0.0) + _log1p_unit(tl.exp(-tl.abs(r)))


@triton.jit
def _sigmoid(r):
    """1 / (1 + exp(-r)) without overflow either way (r = -inf: 0); NaN stays NaN."""
    e = tl.exp(-tl.abs(r))
    return tl.where(r >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


# Elements of one (slots x BLOCK_D) tile: the forward holds two of them and a logits tile in registers.
_TILE = {torch.float64: 4096}
_TILE_DEFAULT = 8192

# Spill budgets on sm_90 (H100/H200), bytes of spill stores per thread, checked by tests/test_gpu_compile.py at the
# launches this module makes at the design presets and its size limits; measured with Triton 3.9's ptxas (see
# benchmarks/results/sm90-resources.md), the budget a quarter above the measurement for other Triton versions.
# Measured: fwd 0; bwd 15.6 KB at movi-c / movi-e in float32 (ptxas keeps 32 registers), ~1 KB in bfloat16,
# 4.6 KB at D = 512: a finding to time on a GPU before the backward's tiles are changed.
SM90_SPILL_BUDGET = {"_slot_contrastive_loss_fwd_kernel": 0, "_slot_contrastive_loss_bwd_kernel": 20000}


@triton.jit
def _slot_contrastive_loss_fwd_kernel(
    slots_ptr, loss_ptr, log_odds_ptr, negatives_lse_ptr,
    S, K, D,
    stride_b, stride_t, stride_k, stride_d,
    stride_lt, stride_ln,
    eps: tl.float64, inv_temperature: tl.float64,
    IS_FP64: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_j = tl.program_id(0)
    t = tl.program_id(1).to(tl.int64)  # pair (t, t+1)
    group = tl.program_id(2).to(tl.int64)
    if IS_FP64:
        eps = tl.full([], eps, tl.float64)
        inv_temperature = tl.full([], inv_temperature, tl.float64)
    else:
        eps = tl.full([], eps, tl.float32)
        inv_temperature = tl.full([], inv_temperature, tl.float32)

    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    mask_j = offs_j < S
    # Unit rows (z = s / max(||s||, eps)) of every tile are recomputed from the slots on load: padded rows and
    # columns load as 0 and stay 0; where, not tl.maximum, so that a NaN norm stays NaN.
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    rows_j = group * S + offs_j
    x_j = tl.load(
        slots_ptr + ((rows_j // K) * stride_b + (t + 1) * stride_t + (rows_j % K) * stride_k)[:, None]
        + offs_d[None, :] * stride_d,
        mask=mask_j[:, None] & mask_d[None, :], other=0.0,
    ).to(eps.dtype)
    norm_j = tl.sqrt(tl.sum(x_j * x_j, axis=1))
    z_j = x_j / tl.where(norm_j < eps, eps, norm_j)[:, None]
    z_j_t = tl.trans(z_j)  # (BLOCK_D, BLOCK_J): the right operand of every tile's dot
    # the positives z_t^j: l[j, j] first, so that every tile's logits are shifted by it
    x_p = tl.load(
        slots_ptr + ((rows_j // K) * stride_b + t * stride_t + (rows_j % K) * stride_k)[:, None]
        + offs_d[None, :] * stride_d,
        mask=mask_j[:, None] & mask_d[None, :], other=0.0,
    ).to(eps.dtype)
    norm_p = tl.sqrt(tl.sum(x_p * x_p, axis=1))
    z_p = x_p / tl.where(norm_p < eps, eps, norm_p)[:, None]
    diagonal = tl.sum(z_p * z_j, axis=1) * inv_temperature

    m = tl.full([BLOCK_J], float("-inf"), z_j.dtype)  # running max over the negatives i != j
    total = tl.zeros([BLOCK_J], z_j.dtype)  # running sum of exp(l - l[j, j] - m)
    for i0 in range(0, S, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I)
        mask_i = offs_i < S
        rows_i = group * S + offs_i
        x_i = tl.load(
            slots_ptr + ((rows_i // K) * stride_b + t * stride_t + (rows_i % K) * stride_k)[:, None]
            + offs_d[None, :] * stride_d,
            mask=mask_i[:, None] & mask_d[None, :], other=0.0,
        ).to(eps.dtype)
        norm_i = tl.sqrt(tl.sum(x_i * x_i, axis=1))
        z_i = x_i / tl.where(norm_i < eps, eps, norm_i)[:, None]
        # ieee: tf32 would cost ~1e-3 relative error in logits of magnitude 1/temperature
        logits = tl.dot(z_i, z_j_t, input_precision="ieee") * inv_temperature  # (BLOCK_I, BLOCK_J)
        negative = mask_i[:, None] & (offs_i[:, None] != offs_j[None, :])
        shifted = tl.where(negative, logits - diagonal[None, :], float("-inf"))
        m_new = tl.maximum(m, tl.max(shifted, axis=0))
        # a column with no negative yet (S == 1) shifts by 0, so that exp(-inf) gives 0 rather than NaN
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        total = total * tl.exp(m - m_safe) + tl.sum(tl.exp(shifted - m_safe[None, :]), axis=0)
        m = m_new
    # without negatives total = 0 and m = -inf: r = -inf (log of 1, not of 0); a NaN total stays NaN
    log_odds = m + tl.log(tl.where(total == 0.0, 1.0, total))

    out = group * S + offs_j
    tl.store(loss_ptr + t * stride_lt + out * stride_ln, _softplus(log_odds).to(loss_ptr.dtype.element_ty), mask=mask_j)
    tl.store(log_odds_ptr + t * stride_lt + out * stride_ln, log_odds.to(log_odds_ptr.dtype.element_ty), mask=mask_j)
    negatives_lse = diagonal + log_odds
    tl.store(
        negatives_lse_ptr + t * stride_lt + out * stride_ln, negatives_lse.to(negatives_lse_ptr.dtype.element_ty),
        mask=mask_j,
    )


@triton.jit
def _slot_contrastive_loss_bwd_kernel(
    slots_ptr, log_odds_ptr, negatives_lse_ptr, grad_ptr, grad_slots_ptr,
    S, K, D, T,
    stride_b, stride_t, stride_k, stride_d,
    stride_lt, stride_ln,
    stride_nt, stride_nn,
    stride_gt, stride_gb, stride_gk,
    stride_ob, stride_ot, stride_ok, stride_od,
    eps: tl.float64, inv_temperature: tl.float64, grad_scale: tl.float64,
    IS_FP64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_r = tl.program_id(0)
    t = tl.program_id(1).to(tl.int64)  # frame of this program's rows
    group = tl.program_id(2).to(tl.int64)
    if IS_FP64:
        eps = tl.full([], eps, tl.float64)
        inv_temperature = tl.full([], inv_temperature, tl.float64)
        grad_scale = tl.full([], grad_scale, tl.float64)
    else:
        eps = tl.full([], eps, tl.float32)
        inv_temperature = tl.full([], inv_temperature, tl.float32)
        grad_scale = tl.full([], grad_scale, tl.float32)

    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < S
    rows = group * S + offs_r
    # Unit rows (z = s / max(||s||, eps)) of every tile are recomputed from the slots on load: padded rows and
    # columns load as 0 and stay 0; where, not tl.maximum, so that a NaN norm stays NaN.
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    x_r = tl.load(
        slots_ptr + ((rows // K) * stride_b + t * stride_t + (rows % K) * stride_k)[:, None]
        + offs_d[None, :] * stride_d,
        mask=mask_r[:, None] & mask_d[None, :], other=0.0,
    ).to(eps.dtype)
    norm_r = tl.sqrt(tl.sum(x_r * x_r, axis=1))
    clamped_r = tl.where(norm_r < eps, eps, norm_r)
    z_r = x_r / clamped_r[:, None]
    dz = tl.zeros([BLOCK_R, BLOCK_D], z_r.dtype)

    if t < T - 1:
        # rows as the slots i of pair t: G[r, c] = w_t[c] (exp(l[r, c] - n_t[c]) [r != c] - [r == c]) with
        # w = g sigmoid(r), c at frame t+1
        for c0 in range(0, S, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < S
            cols = group * S + offs_c
            x_c = tl.load(
                slots_ptr + ((cols // K) * stride_b + (t + 1) * stride_t + (cols % K) * stride_k)[:, None]
                + offs_d[None, :] * stride_d,
                mask=mask_c[:, None] & mask_d[None, :], other=0.0,
            ).to(eps.dtype)
            norm_c = tl.sqrt(tl.sum(x_c * x_c, axis=1))
            z_c = x_c / tl.where(norm_c < eps, eps, norm_c)[:, None]
            logits = tl.dot(z_r, tl.trans(z_c), input_precision="ieee") * inv_temperature
            log_odds_c = tl.load(log_odds_ptr + t * stride_lt + cols * stride_ln, mask=mask_c, other=0.0)
            shift_c = tl.load(negatives_lse_ptr + t * stride_nt + cols * stride_nn, mask=mask_c, other=0.0)
            g_c = tl.load(grad_ptr + t * stride_gt + (cols // K) * stride_gb + (cols % K) * stride_gk, mask=mask_c, other=0.0)
            w_c = g_c.to(z_r.dtype) * grad_scale * _sigmoid(log_odds_c.to(z_r.dtype))
            # the diagonal and the padding masked before exp: l[c, c] - n[c] = -r[c] may overflow
            negative = mask_r[:, None] & mask_c[None, :] & (offs_r[:, None] != offs_c[None, :])
            p = tl.exp(tl.where(negative, logits - shift_c.to(z_r.dtype)[None, :], float("-inf")))
            coef = w_c[None, :] * (p - tl.where(offs_r[:, None] == offs_c[None, :], 1.0, 0.0))
            dz += tl.dot(coef.to(z_c.dtype), z_c, input_precision="ieee")
    if t > 0:
        # rows as the slots j of pair t-1: G[c, r] = w_{t-1}[r] (exp(l[c, r] - n_{t-1}[r]) [c != r] - [c == r]),
        # c at frame t-1; the tile is computed transposed, (rows, c), like the one above
        log_odds_r = tl.load(log_odds_ptr + (t - 1) * stride_lt + rows * stride_ln, mask=mask_r, other=0.0)
        shift_r = tl.load(negatives_lse_ptr + (t - 1) * stride_nt + rows * stride_nn, mask=mask_r, other=0.0)
        shift_r = shift_r.to(z_r.dtype)
        g_r = tl.load(grad_ptr + (t - 1) * stride_gt + (rows // K) * stride_gb + (rows % K) * stride_gk, mask=mask_r, other=0.0)
        w_r = g_r.to(z_r.dtype) * grad_scale * _sigmoid(log_odds_r.to(z_r.dtype))
        for c0 in range(0, S, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < S
            cols = group * S + offs_c
            x_c = tl.load(
                slots_ptr + ((cols // K) * stride_b + (t - 1) * stride_t + (cols % K) * stride_k)[:, None]
                + offs_d[None, :] * stride_d,
                mask=mask_c[:, None] & mask_d[None, :], other=0.0,
            ).to(eps.dtype)
            norm_c = tl.sqrt(tl.sum(x_c * x_c, axis=1))
            z_c = x_c / tl.where(norm_c < eps, eps, norm_c)[:, None]
            logits = tl.dot(z_r, tl.trans(z_c), input_precision="ieee") * inv_temperature
            negative = mask_r[:, None] & mask_c[None, :] & (offs_r[:, None] != offs_c[None, :])
            p = tl.exp(tl.where(negative, logits - shift_r[:, None], float("-inf")))
            coef = w_r[:, None] * (p - tl.where(offs_r[:, None] == offs_c[None, :], 1.0, 0.0))
            dz += tl.dot(coef.to(z_c.dtype), z_c, input_precision="ieee")
    dz = dz * inv_temperature

    # backward of z = s / max(||s||, eps); where, not a product with the indicator, so that a clamped norm
    # drops the projection even when <dz, z> is NaN, as in torch
    projection = tl.where(norm_r >= eps, tl.sum(dz * z_r, axis=1), 0.0)
    grad = (dz - projection[:, None] * z_r) / clamped_r[:, None]
    out = grad_slots_ptr + (rows // K) * stride_ob + t * stride_ot + (rows % K) * stride_ok
    tl.store(
        out[:, None] + offs_d[None, :] * stride_od, grad.to(grad_slots_ptr.dtype.element_ty),
        mask=mask_r[:, None] & mask_d[None, :],
    )


def _check_dim(D):
    if D > MAX_DIM:
        raise ValueError(
            f"kdfast.kernels.slot_contrastive_loss handles slot dimensions up to MAX_DIM={MAX_DIM}, got D={D}; "
            "fall back to another backend above it"
        )


def _blocks(S, D, programs_per_tile, dtype, device):
    """(BLOCK_OWN, BLOCK_LOOP, BLOCK_D, num_warps, num_stages): the rows a program owns, the rows it streams.

    A tile of slots holds all of D (at most MAX_DIM). On a GPU the owned tile shrinks when too few programs
    would run (each program's work is a loop over S / BLOCK_LOOP tiles; a GPU has ~100 multiprocessors).
    CPU tensors run in Triton's interpreter, which executes programs one after another at a fixed cost per
    operation: there the tiles are as large as the budget allows (tests force small tiles to cover the loops).
    """
    block_d = block_size(D)
    tile = _TILE.get(dtype, _TILE_DEFAULT)
    largest = max(16, min(64, tile // block_d))
    block_loop = min(largest, block_size(S))
    if device.type == "cpu":
        return block_loop, block_loop, block_d, 4, 1
    block_own = min(32, block_loop)
    if block_own > 16 and programs_per_tile * triton.cdiv(S, block_own) < 128:
        block_own = 16
    elements = block_d * (block_own + block_loop) + block_own * block_loop
    num_warps = 8 if elements > 8192 else 4
    return block_own, block_loop, block_d, num_warps, 2 if block_d <= 128 else 1


def _geometry(slots, batch_contrast):
    B, _, K, _ = slots.shape
    # Each group of S slots is a contiguous range of the flattened b*K + k slot index.
    return (B * K, 1) if batch_contrast else (K, B)


def slot_contrastive_loss_forward(slots, temperature: float, batch_contrast: bool, eps: float):
    """Per-term losses, and the per-column statistics the backward needs.

    slots: (B, T, K, D) float16, bfloat16, float32 or float64, any strides; D <= MAX_DIM; eps: the norm
    clamp (F.normalize's 1e-12 for SlotContrast). Returns (losses, log_odds, negatives_lse), each (T-1, B*K)
    in the accumulator dtype (float32; float64 for float64 slots): log_odds r[j] = logsumexp_{i != j}
    (l[i, j] - l[j, j]) (losses = softplus(r)) and negatives_lse n[j] = logsumexp_{i != j} l[i, j]; column
    b*K + k is slot k of batch element b at frame t+1, whatever ``batch_contrast``. T == 1 gives empty
    tensors and launches nothing.
    """
    B, T, K, D = slots.shape
    _check_dim(D)
    acc = accumulator_dtype(slots.dtype)
    losses = empty_output((T - 1, B * K), acc, slots.device)
    log_odds = empty_output((T - 1, B * K), acc, slots.device)
    negatives_lse = empty_output((T - 1, B * K), acc, slots.device)
    if losses.numel() == 0:
        return losses, log_odds, negatives_lse
    S, groups = _geometry(slots, batch_contrast)
    block_j, block_i, block_d, num_warps, num_stages = _blocks(S, D, (T - 1) * groups, slots.dtype, slots.device)
    with device_guard(slots):
        _slot_contrastive_loss_fwd_kernel[(triton.cdiv(S, block_j), T - 1, groups)](
            slots, losses, log_odds, negatives_lse,
            S, K, D,
            slots.stride(0), slots.stride(1), slots.stride(2), slots.stride(3),
            losses.stride(0), losses.stride(1),
            float(eps), 1.0 / float(temperature),
            IS_FP64=is_fp64(slots.dtype), BLOCK_I=block_i, BLOCK_J=block_j, BLOCK_D=block_d,
            num_warps=num_warps, num_stages=num_stages,
        )
    return losses, log_odds, negatives_lse


def slot_contrastive_loss_backward(
    grad_losses, slots, log_odds, negatives_lse, temperature: float, batch_contrast: bool, eps: float,
    grad_scale: float,
):
    """Gradient of grad_scale * sum(grad_losses * losses) with respect to the slots.

    grad_losses: (T-1, B, K), any floating dtype and strides (an expanded scalar included); slots and eps as
    in the forward; log_odds, negatives_lse: the forward's (T-1, B*K) statistics. Returns grad_slots
    (B, T, K, D) in slots.dtype; zero for T == 1. One launch; no atomics.
    """
    B, T, K, D = slots.shape
    _check_dim(D)
    grad_slots = empty_output((B, T, K, D), slots.dtype, slots.device)
    S, groups = _geometry(slots, batch_contrast)
    block_r, block_c, block_d, num_warps, num_stages = _blocks(S, D, T * groups, slots.dtype, slots.device)
    with device_guard(slots):
        _slot_contrastive_loss_bwd_kernel[(triton.cdiv(S, block_r), T, groups)](
            slots, log_odds, negatives_lse, grad_losses, grad_slots,
            S, K, D, T,
            slots.stride(0), slots.stride(1), slots.stride(2), slots.stride(3),
            log_odds.stride(0), log_odds.stride(1),
            negatives_lse.stride(0), negatives_lse.stride(1),
            grad_losses.stride(0), grad_losses.stride(1), grad_losses.stride(2),
            grad_slots.stride(0), grad_slots.stride(1), grad_slots.stride(2), grad_slots.stride(3),
            float(eps), 1.0 / float(temperature), float(grad_scale),
            IS_FP64=is_fp64(slots.dtype), BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_D=block_d,
            num_warps=num_warps, num_stages=num_stages,
        )
    return grad_slots
