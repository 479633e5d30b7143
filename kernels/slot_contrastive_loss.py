"""Triton kernels for SlotContrast's slot-slot contrastive loss (design 3.2), flash-attention style.

For a pair of consecutive frames (t, t+1) and a group of S slots (the B*K slots of the batch with batch
contrast, the K slots of one batch element without), on unit slots z = s / max(||s||, eps):

    l[i, j]   = <z_t^i, z_{t+1}^j> / temperature          i, j < S
    lse[j]    = logsumexp_i l[i, j]                        (softmax over the slots i at t, per slot j at t+1)
    loss[j]   = lse[j] - l[j, j]

Forward: one program per (tile of columns j, pair t, group); it keeps its unit z_{t+1}^j tile and streams
tiles of i with an online log-sum-exp, so the S x S logits never reach memory. It writes the per-column
losses and LSE; the LSE is all the backward needs besides the slots (the norms are recomputed on load).

Backward: with G[i, j] = g_j (exp(l[i, j] - lse[j]) - [i == j]) / temperature,

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

# Elements of one (slots x BLOCK_D) tile: the forward holds two of them and a logits tile in registers.
_TILE = {torch.float64: 4096}
_TILE_DEFAULT = 8192


@triton.jit
def _slot_contrastive_loss_fwd_kernel(
    slots_ptr, loss_ptr, lse_ptr,
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

    m = tl.full([BLOCK_J], float("-inf"), z_j.dtype)  # running max over i
    total = tl.zeros([BLOCK_J], z_j.dtype)  # running sum of exp(l - m)
    diagonal = tl.zeros([BLOCK_J], z_j.dtype)  # l[j, j], taken from the tile that holds it
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
        diagonal += tl.sum(tl.where(offs_i[:, None] == offs_j[None, :], logits, 0.0), axis=0)
        logits = tl.where(mask_i[:, None], logits, float("-inf"))
        m_new = tl.maximum(m, tl.max(logits, axis=0))
        total = total * tl.exp(m - m_new) + tl.sum(tl.exp(logits - m_new[None, :]), axis=0)
        m = m_new
    lse = m + tl.log(total)

    out = group * S + offs_j
    tl.store(loss_ptr + t * stride_lt + out * stride_ln, (lse - diagonal).to(loss_ptr.dtype.element_ty), mask=mask_j)
    tl.store(lse_ptr + t * stride_lt + out * stride_ln, lse.to(lse_ptr.dtype.element_ty), mask=mask_j)


@triton.jit
def _slot_contrastive_loss_bwd_kernel(
    slots_ptr, lse_ptr, grad_ptr, grad_slots_ptr,
    S, K, D, T,
    stride_b, stride_t, stride_k, stride_d,
    stride_lt, stride_ln,
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
        # rows as the slots i of pair t: G[r, c] = g_t[c] (exp(l[r, c] - lse_t[c]) - [r == c]), c at frame t+1
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
            lse_c = tl.load(lse_ptr + t * stride_lt + cols * stride_ln, mask=mask_c, other=0.0)
            g_c = tl.load(grad_ptr + t * stride_gt + (cols // K) * stride_gb + (cols % K) * stride_gk, mask=mask_c, other=0.0)
            g_c = g_c.to(z_r.dtype) * grad_scale
            p = tl.exp(logits - lse_c.to(z_r.dtype)[None, :])
            coef = g_c[None, :] * (p - tl.where(offs_r[:, None] == offs_c[None, :], 1.0, 0.0))
            coef = tl.where(mask_c[None, :], coef, 0.0)
            dz += tl.dot(coef.to(z_c.dtype), z_c, input_precision="ieee")
    if t > 0:
        # rows as the slots j of pair t-1: G[c, r] = g_{t-1}[r] (exp(l[c, r] - lse_{t-1}[r]) - [c == r]),
        # c at frame t-1; the tile is computed transposed, (rows, c), like the one above
        lse_r = tl.load(lse_ptr + (t - 1) * stride_lt + rows * stride_ln, mask=mask_r, other=0.0).to(z_r.dtype)
        g_r = tl.load(grad_ptr + (t - 1) * stride_gt + (rows // K) * stride_gb + (rows % K) * stride_gk, mask=mask_r, other=0.0)
        g_r = g_r.to(z_r.dtype) * grad_scale
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
            p = tl.exp(logits - lse_r[:, None])
            coef = g_r[:, None] * (p - tl.where(offs_r[:, None] == offs_c[None, :], 1.0, 0.0))
            coef = tl.where(mask_c[None, :], coef, 0.0)
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
    """Per-term losses and per-column log-sum-exp.

    slots: (B, T, K, D) float16, bfloat16, float32 or float64, any strides; D <= MAX_DIM; eps: the norm
    clamp (F.normalize's 1e-12 for SlotContrast). Returns
    (losses, lse), both (T-1, B*K) in the accumulator dtype (float32; float64 for float64 slots): column
    b*K + k is slot k of batch element b at frame t+1, whatever ``batch_contrast``. T == 1 gives empty
    tensors and launches nothing.
    """
    B, T, K, D = slots.shape
    _check_dim(D)
    acc = accumulator_dtype(slots.dtype)
    losses = empty_output((T - 1, B * K), acc, slots.device)
    lse = empty_output((T - 1, B * K), acc, slots.device)
    if losses.numel() == 0:
        return losses, lse
    S, groups = _geometry(slots, batch_contrast)
    block_j, block_i, block_d, num_warps, num_stages = _blocks(S, D, (T - 1) * groups, slots.dtype, slots.device)
    with device_guard(slots):
        _slot_contrastive_loss_fwd_kernel[(triton.cdiv(S, block_j), T - 1, groups)](
            slots, losses, lse,
            S, K, D,
            slots.stride(0), slots.stride(1), slots.stride(2), slots.stride(3),
            losses.stride(0), losses.stride(1),
            float(eps), 1.0 / float(temperature),
            IS_FP64=is_fp64(slots.dtype), BLOCK_I=block_i, BLOCK_J=block_j, BLOCK_D=block_d,
            num_warps=num_warps, num_stages=num_stages,
        )
    return losses, lse


def slot_contrastive_loss_backward(
    grad_losses, slots, lse, temperature: float, batch_contrast: bool, eps: float, grad_scale: float
):
    """Gradient of grad_scale * sum(grad_losses * losses) with respect to the slots.

    grad_losses: (T-1, B, K), any floating dtype and strides (an expanded scalar included); slots and eps as
    in the forward; lse: the forward's (T-1, B*K) log-sum-exp. Returns grad_slots (B, T, K, D) in
    slots.dtype; zero for T == 1. One launch; no atomics.
    """
    B, T, K, D = slots.shape
    _check_dim(D)
    grad_slots = empty_output((B, T, K, D), slots.dtype, slots.device)
    S, groups = _geometry(slots, batch_contrast)
    block_r, block_c, block_d, num_warps, num_stages = _blocks(S, D, T * groups, slots.dtype, slots.device)
    with device_guard(slots):
        _slot_contrastive_loss_bwd_kernel[(triton.cdiv(S, block_r), T, groups)](
            slots, lse, grad_losses, grad_slots,
            S, K, D, T,
            slots.stride(0), slots.stride(1), slots.stride(2), slots.stride(3),
            lse.stride(0), lse.stride(1),
            grad_losses.stride(0), grad_losses.stride(1), grad_losses.stride(2),
            grad_slots.stride(0), grad_slots.stride(1), grad_slots.stride(2), grad_slots.stride(3),
            float(eps), 1.0 / float(temperature), float(grad_scale),
            IS_FP64=is_fp64(slots.dtype), BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_D=block_d,
            num_warps=num_warps, num_stages=num_stages,
        )
    return grad_slots
