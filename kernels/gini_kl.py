"""Triton kernels of the Gini impurity and KL reductions (design 3.4), in two stages.

Statistics (the only stage that touches the activations a (B, F, H, W), once each way):

    class_sums[c, f] = sum_{b: y_b = c} mean_{h,w} |a[b, f, h, w]|        counts[c] = #{b: y_b = c}
    grad_a[b, f, h, w] = sign(a[b, f, h, w]) * grad_class_sums[y_b, f] / (H * W)

The forward sorts the batch by label on the host side (argsort and searchsorted of B and C integers; no host
sync) so that the samples of a class are contiguous. Program (i, j) is the i-th sorted sample and the j-th block
of features: the first sample of each class sums its whole class, in batch order, and writes that class's row;
the other programs do nothing. No float atomics, so the result is the same bits on every run. The sums are
accumulated and stored in float64 for every input dtype (float32 inputs are exact in it). Rows of absent
classes are the zeros the table is allocated with. The backward is one program per block of samples and
features, and rounds each gradient element once to the activations' dtype. Activations are read through their
strides: channels-last, sliced and expanded maps need no copy.

Finish (p, gini, q, kl from the small (C, F) table): float64 throughout, for every input dtype. The KL
gradient's projection h - sum_c h p cancels when h is nearly constant over the classes present (uniform target,
few classes), so float32 anywhere from the class sums on costs up to ~1e-4 relative error in it (see
kdfast.reference.gini_kl_backward). Classes with count 0 are absent: their rows are
not read and get gradient 0. Forward: one program per block of features (Z_f, the block's sum of 1 - sum_c p^2,
its column sums of p), then one program that reduces the blocks in a fixed order (P_c, q, kl, gini); when F fits
in one block the first kernel does both. Backward: one program per block of features writes grad_class_sums,
from what the forward computed (or from a recomputation when only the statistics were saved).

delta and 1 / (H W) are annotated tl.float64 so that they arrive unrounded.
"""

# No `from __future__ import annotations`: it would turn the tl.float64 annotations into strings.
import torch
import triton
import triton.language as tl

from ._launch import POISON, block_size, device_guard, empty_output

# Tiles: (samples x features x positions) of the activations, at most 64 positions; (classes x features) of the
# float64 table. On the GPU small enough for many programs and no spills; under the interpreter (CPU tensors)
# larger, since its cost is per operation, not per element, yet small enough that the tests' odd sizes (F = 70,
# 9 x 9 maps, C = 1000) still span several blocks.
_ACTIVATION_TILE = {"gpu": 2048, "interpreter": 16384}
_ACTIVATION_BLOCK_F = {"gpu": 256, "interpreter": 64}
# samples per tile; on the GPU the feature block fills the tile first (one sample: the forward's classes mostly
# have one or two samples in a batch, and the backward gets more programs)
_ACTIVATION_BLOCK_J = {"gpu": 2, "interpreter": 32}
_TABLE_BLOCK_F = {"gpu": 32, "interpreter": 64}
_TABLE_BLOCK_C = {"gpu": 64, "interpreter": 256}

# Spill budgets on sm_90 (H100/H200), bytes of spill stores per thread, checked by tests/test_gpu_compile.py at the
# launches this module makes at the design presets and its size limits; measured with Triton 3.9's ptxas (see
# benchmarks/results/sm90-resources.md), the budget a quarter above the measurement for other Triton versions.
# Measured: 0 for every kernel.
SM90_SPILL_BUDGET = {"_class_sums_kernel": 0, "_class_sums_bwd_kernel": 0, "_table_rows_kernel": 0,
                     "_table_classes_kernel": 0, "_table_grad_kernel": 0}


# The kernels call no @triton.jit helpers inside their loops: the interpreter, which the CPU test suite runs,
# re-patches the language on every call of one (about a millisecond). tl.sum and tl.zeros are such wrappers, so
# the kernels call what is underneath: tl.reduce with Triton's own sum combiner (which the interpreter runs as
# numpy.sum; compiled, it is exactly tl.sum) and tl.full.
_sum_combine = tl.standard._sum_combine


@triton.jit
def _class_sums_kernel(
    a_ptr, order_ptr, sorted_labels_ptr, counts_ptr, starts_ptr, sums_ptr,
    C, F, HW, W,
    stride_ab, stride_af, stride_ah, stride_aw,
    stride_sc, stride_sf,
    inv_hw: tl.float64,
    SPLIT_HW: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    i = tl.program_id(0)
    pid_f = tl.program_id(1)
    c = tl.load(sorted_labels_ptr + i)
    # Only the first sorted sample of class c works: it owns row c of the table for these features, and walks
    # the class's samples BLOCK_J at a time, in batch order. A label outside [0, C) (which the eager entry points
    # reject; a compiled graph cannot check) is ignored, never read out of bounds.
    valid = (c >= 0) & (c < C)
    if tl.load(starts_ptr + c, mask=valid, other=-1) == i:
        n = tl.load(counts_ptr + c)
        offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
        mask_f = offs_f < F
        # float64 for every input dtype (exact for float32 and half inputs): the KL gradient is ill-conditioned
        # in these sums. The adds are cheap next to the loads.
        tile = tl.full([BLOCK_J, BLOCK_F, BLOCK_HW], 0.0, tl.float64)
        feature_offsets = offs_f[None, :] * stride_af
        arange_j = tl.arange(0, BLOCK_J)
        arange_hw = tl.arange(0, BLOCK_HW)
        for j0 in range(0, n, BLOCK_J):
            mask_j = j0 + arange_j < n
            b = tl.load(order_ptr + i + j0 + arange_j, mask=mask_j, other=0)
            rows = (a_ptr + b[:, None] * stride_ab + feature_offsets)[:, :, None]  # (BLOCK_J, BLOCK_F, 1)
            mask_rows = (mask_j[:, None] & mask_f[None, :])[:, :, None]
            for hw0 in range(0, HW, BLOCK_HW):
                offs_hw = hw0 + arange_hw
                # positions flatten into one stride (contiguous, channels-last), or h and w apart (sliced maps)
                if SPLIT_HW:
                    h = offs_hw // W
                    positions = h * stride_ah + (offs_hw - h * W) * stride_aw
                else:
                    positions = offs_hw * stride_aw
                x = tl.load(rows + positions[None, None, :], mask=mask_rows & (offs_hw < HW)[None, None, :], other=0.0)
                tile += tl.abs(x.to(tl.float64))
        # the class sum of the samples' spatial means (sum, then one scaling)
        sums = tl.reduce(tl.reduce(tile, 2, _sum_combine), 0, _sum_combine) * inv_hw
        tl.store(sums_ptr + c * stride_sc + offs_f * stride_sf, sums, mask=mask_f)


@triton.jit
def _class_sums_bwd_kernel(
    grad_sums_ptr, a_ptr, labels_ptr, grad_a_ptr,
    B, C, F, HW, W,
    stride_gc, stride_gf,
    stride_ab, stride_af, stride_ah, stride_aw,
    stride_db, stride_df, stride_dh, stride_dw,
    inv_hw: tl.float64,
    SPLIT_HW: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    # BLOCK_B samples x BLOCK_F features, all their positions. Offsets stay affine in the aranges, so the compiler
    # sees which dimension is contiguous (positions for NCHW, features for channels-last) and coalesces on it.
    offs_b = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask_b = offs_b < B
    mask_bf = mask_b[:, None] & (offs_f < F)[None, :]
    c = tl.load(labels_ptr + offs_b, mask=mask_b, other=0)
    # a label outside [0, C) gets gradient 0, as the forward ignored it
    valid = (c >= 0) & (c < C)
    g = tl.load(
        grad_sums_ptr + c[:, None] * stride_gc + offs_f[None, :] * stride_gf, mask=mask_bf & valid[:, None], other=0.0,
    )
    # g / (H W) in float64, rounded once to the gradient's dtype; sign(a) * g is then exact in it
    g = (g.to(tl.float64) * inv_hw).to(grad_a_ptr.dtype.element_ty)[:, :, None]
    a_rows = (a_ptr + offs_b[:, None] * stride_ab + offs_f[None, :] * stride_af)[:, :, None]
    grad_rows = (grad_a_ptr + offs_b[:, None] * stride_db + offs_f[None, :] * stride_df)[:, :, None]
    mask_rows = mask_bf[:, :, None]
    arange_hw = tl.arange(0, BLOCK_HW)
    for hw0 in range(0, HW, BLOCK_HW):
        offs_hw = hw0 + arange_hw
        if SPLIT_HW:
            h = offs_hw // W
            w = offs_hw - h * W
            positions = h * stride_ah + w * stride_aw
            grad_positions = h * stride_dh + w * stride_dw
        else:
            positions = offs_hw * stride_aw
            grad_positions = offs_hw * stride_dw
        mask = mask_rows & (offs_hw < HW)[None, None, :]
        x = tl.load(a_rows + positions[None, None, :], mask=mask, other=0.0)
        # torch.sign (and autograd of abs): 0 at 0 and at NaN
        sign = tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))
        tl.store(grad_rows + grad_positions[None, None, :], (sign * g).to(grad_a_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _table_rows_kernel(
    sums_ptr, counts_ptr, z_ptr, gini_part_ptr, colsum_part_ptr, colsum_ptr, scalars_ptr, gini_ptr, kl_ptr,
    C, F,
    stride_sc, stride_sf, stride_n,
    delta: tl.float64,
    FINISH: tl.constexpr, UNIFORM: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_F: tl.constexpr,
    BLOCK_C_FINISH: tl.constexpr,
):
    # For one block of features: Z_f = sum_c S[f, c] + delta with S = class_sums / (n_c + delta), the block's
    # sum of 1 - sum_c p^2 and its column sums sum_f p[f, c] (p = S / Z). FINISH: this is the only block (F fits
    # in one), and the program also does _table_classes_kernel's work, one launch fewer.
    pid = tl.program_id(0)
    offs_f = pid * BLOCK_F + tl.arange(0, BLOCK_F)
    mask_f = offs_f < F
    delta = tl.full([], delta, tl.float64)
    z = tl.full([BLOCK_F], 0.0, tl.float64)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        n = tl.load(counts_ptr + offs_c * stride_n, mask=mask_c, other=0).to(tl.float64)
        # absent classes (n_c = 0) are skipped: their rows are not even read
        s = tl.load(
            sums_ptr + offs_c[:, None] * stride_sc + offs_f[None, :] * stride_sf,
            mask=(mask_c & (n > 0))[:, None] & mask_f[None, :], other=0.0,
        ).to(tl.float64)
        z += tl.reduce(s / (n[:, None] + delta), 0, _sum_combine)
    z = z + delta
    tl.store(z_ptr + offs_f, z, mask=mask_f)
    sq = tl.full([BLOCK_F], 0.0, tl.float64)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        n = tl.load(counts_ptr + offs_c * stride_n, mask=mask_c, other=0).to(tl.float64)
        # absent classes (n_c = 0) are skipped: their rows are not even read
        s = tl.load(
            sums_ptr + offs_c[:, None] * stride_sc + offs_f[None, :] * stride_sf,
            mask=(mask_c & (n > 0))[:, None] & mask_f[None, :], other=0.0,
        ).to(tl.float64)
        p = s / (n[:, None] + delta) / z[None, :]
        sq += tl.reduce(p * p, 0, _sum_combine)
        tl.store(colsum_part_ptr + pid * C + offs_c, tl.reduce(p, 1, _sum_combine), mask=mask_c)
    tl.store(gini_part_ptr + pid, tl.reduce(tl.where(mask_f, 1.0 - sq, 0.0), 0, _sum_combine))
    if FINISH:
        # the partial sums just stored are read back by other threads of this program
        tl.debug_barrier()
        _table_classes(
            colsum_part_ptr, gini_part_ptr, counts_ptr, colsum_ptr, scalars_ptr, gini_ptr, kl_ptr,
            C, F, 1, stride_n, delta, UNIFORM, BLOCK_C_FINISH, 1,
        )


@triton.jit
def _table_classes_kernel(
    colsum_part_ptr, gini_part_ptr, counts_ptr, colsum_ptr, scalars_ptr, gini_ptr, kl_ptr,
    C, F, n_blocks,
    stride_n,
    delta: tl.float64,
    UNIFORM: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    _table_classes(
        colsum_part_ptr, gini_part_ptr, counts_ptr, colsum_ptr, scalars_ptr, gini_ptr, kl_ptr,
        C, F, n_blocks, stride_n, delta, UNIFORM, BLOCK_C, BLOCK_K,
    )


@triton.jit
def _table_classes(
    colsum_part_ptr, gini_part_ptr, counts_ptr, colsum_ptr, scalars_ptr, gini_ptr, kl_ptr,
    C, F, n_blocks, stride_n, delta,
    UNIFORM: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # One program: the feature blocks' partial sums reduced in a fixed order; P_c, q, kl and gini. Writes P
    # (colsum, (C,)) and [sum P, sum t, B] (scalars) for the backward.
    delta = tl.full([], delta, tl.float64)
    uniform_t = 1.0 / tl.full([], C, tl.float64)
    batch = tl.full([BLOCK_C], 0.0, tl.float64)
    ptot = tl.full([BLOCK_C], 0.0, tl.float64)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        batch += tl.load(counts_ptr + offs_c * stride_n, mask=mask_c, other=0).to(tl.float64)
        col = tl.full([BLOCK_C], 0.0, tl.float64)
        for k in range(n_blocks):
            col += tl.load(colsum_part_ptr + k * C + offs_c, mask=mask_c, other=0.0)
        tl.store(colsum_ptr + offs_c, col, mask=mask_c)  # P_c = sum_f p[f, c]
        ptot += col
    batch_size = tl.reduce(batch, 0, _sum_combine)
    total = tl.reduce(ptot, 0, _sum_combine)  # sum_{f,c} p[f, c]
    kl = tl.full([BLOCK_C], 0.0, tl.float64)
    t_sum = tl.full([BLOCK_C], 0.0, tl.float64)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        if UNIFORM:
            t = tl.where(mask_c, uniform_t, 0.0)
        else:
            t = tl.load(counts_ptr + offs_c * stride_n, mask=mask_c, other=0).to(tl.float64) / batch_size
        q = (tl.load(colsum_ptr + offs_c, mask=mask_c, other=0.0) + delta) / total
        # terms with t_c = 0 are 0 (xlogy); where, so that their log(0) never reaches the sum
        kl += tl.where(t > 0, t * (tl.log(tl.where(t > 0, t, 1.0)) - tl.log(q)), 0.0)
        t_sum += t
    gini = tl.full([BLOCK_K], 0.0, tl.float64)
    for k0 in range(0, n_blocks, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        gini += tl.load(gini_part_ptr + offs_k, mask=offs_k < n_blocks, other=0.0)
    tl.store(gini_ptr, (tl.reduce(gini, 0, _sum_combine) / F).to(gini_ptr.dtype.element_ty))
    tl.store(kl_ptr, tl.reduce(kl, 0, _sum_combine).to(kl_ptr.dtype.element_ty))
    tl.store(scalars_ptr, total)
    tl.store(scalars_ptr + 1, tl.reduce(t_sum, 0, _sum_combine))
    tl.store(scalars_ptr + 2, batch_size)


@triton.jit
def _table_grad_block(
    sums_ptr, counts_ptr, colsum_ptr, c0, C, offs_f, mask_f, z, batch_size, grad_kl, delta, uniform_t,
    stride_sc, stride_sf, stride_n,
    UNIFORM: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One block of classes of the (C, F) table for _table_grad_kernel's two passes: the class offsets and
    mask, the counts n, the KL term's beta = -g_kl t_c / (P_c + delta) and p (float64)."""
    offs_c = c0 + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    n = tl.load(counts_ptr + offs_c * stride_n, mask=mask_c, other=0).to(tl.float64)
    # absent classes (n_c = 0) are skipped: their rows are not even read
    s = tl.load(
        sums_ptr + offs_c[:, None] * stride_sc + offs_f[None, :] * stride_sf,
        mask=(mask_c & (n > 0))[:, None] & mask_f[None, :], other=0.0,
    ).to(tl.float64)
    if UNIFORM:
        t = tl.where(mask_c, uniform_t, 0.0)
    else:
        t = n / batch_size
    beta = -grad_kl * t / (tl.load(colsum_ptr + offs_c, mask=mask_c, other=0.0) + delta)
    p = s / (n[:, None] + delta) / z[None, :]
    return offs_c, mask_c, n, beta, p


@triton.jit
def _table_grad_kernel(
    sums_ptr, counts_ptr, z_ptr, colsum_ptr, scalars_ptr, grad_gini_ptr, grad_kl_ptr, grad_sums_ptr,
    C, F,
    stride_sc, stride_sf, stride_n, stride_gc, stride_gf,
    delta: tl.float64,
    UNIFORM: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_F: tl.constexpr,
):
    # The closed form of kdfast.reference.gini_kl_backward for one block of features:
    #   h[c, f] = -2 g_gini p / F - g_kl t_c / (P_c + delta) for present classes (0 for absent ones),
    #   grad[c, f] = ((h - sum_c h p) / Z_f + g_kl (sum t / sum P) delta / Z_f^2) / (n_c + delta).
    pid = tl.program_id(0)
    offs_f = pid * BLOCK_F + tl.arange(0, BLOCK_F)
    mask_f = offs_f < F
    delta = tl.full([], delta, tl.float64)
    uniform_t = 1.0 / tl.full([], C, tl.float64)
    z = tl.load(z_ptr + offs_f, mask=mask_f, other=1.0)
    total = tl.load(scalars_ptr)
    t_sum = tl.load(scalars_ptr + 1)
    batch_size = tl.load(scalars_ptr + 2)
    grad_gini = tl.load(grad_gini_ptr).to(tl.float64)
    grad_kl = tl.load(grad_kl_ptr).to(tl.float64)
    alpha = -2.0 * grad_gini / F
    dot = tl.full([BLOCK_F], 0.0, tl.float64)  # sum_c h[c, f] p[c, f]
    for c0 in range(0, C, BLOCK_C):
        offs_c, mask_c, n, beta, p = _table_grad_block(
            sums_ptr, counts_ptr, colsum_ptr, c0, C, offs_f, mask_f, z, batch_size, grad_kl, delta, uniform_t,
            stride_sc, stride_sf, stride_n, UNIFORM, BLOCK_C,
        )
        h = tl.where((n > 0)[:, None], alpha * p + beta[:, None], 0.0)
        dot += tl.reduce(h * p, 0, _sum_combine)
    # the KL normaliser's share, left over after the projection cancels
    normaliser = grad_kl * (t_sum / total) * delta / (z * z)
    for c0 in range(0, C, BLOCK_C):
        offs_c, mask_c, n, beta, p = _table_grad_block(
            sums_ptr, counts_ptr, colsum_ptr, c0, C, offs_f, mask_f, z, batch_size, grad_kl, delta, uniform_t,
            stride_sc, stride_sf, stride_n, UNIFORM, BLOCK_C,
        )
        grad_s = (alpha * p + beta[:, None] - dot[None, :]) / z[None, :] + normaliser[None, :]
        # absent classes: no sample reads their gradient; 0, as documented
        grad = tl.where((n > 0)[:, None], grad_s / (n[:, None] + delta), 0.0)
        tl.store(
            grad_sums_ptr + offs_c[:, None] * stride_gc + offs_f[None, :] * stride_gf,
            grad.to(grad_sums_ptr.dtype.element_ty), mask=mask_c[:, None] & mask_f[None, :],
        )


# ------------------------------------------------------------------------------------------------ launchers


def _flat_stride(t):
    """The stride of the flattened position h * W + w of a (B, F, H, W) tensor, or None when h and w do not
    flatten into one stride (a sliced or expanded map)."""
    _, _, H, W = t.shape
    if H == 1 or t.stride(2) == W * t.stride(3):
        return t.stride(3)
    if W == 1:
        return t.stride(2)
    return None


def _positions(*tensors):
    """(HW, W, split, per-tensor (stride_h, stride_w)): how the kernels walk the positions of every tensor."""
    if tensors[0].dim() == 2:
        return 1, 1, False, [(0, 0)] * len(tensors)
    H, W = tensors[0].shape[2:]
    flat = [_flat_stride(t) for t in tensors]
    if all(stride is not None for stride in flat):
        return H * W, W, False, [(0, stride) for stride in flat]
    return H * W, W, True, [(t.stride(2), t.stride(3)) for t in tensors]


def _where(t):
    return "interpreter" if t.device.type == "cpu" else "gpu"


def _activation_blocks(B, F, HW, where):
    """(samples, features, positions) of the activation tiles, forward and backward."""
    block_hw = block_size(HW, minimum=1, maximum=64)
    block_f = block_size(F, minimum=1, maximum=min(_ACTIVATION_BLOCK_F[where], _ACTIVATION_TILE[where] // block_hw))
    samples = max(1, min(_ACTIVATION_BLOCK_J[where], _ACTIVATION_TILE[where] // (block_f * block_hw)))
    block_j = block_size(B, minimum=1, maximum=samples)
    return block_j, block_f, block_hw


def _empty_like(t):
    """torch.empty_like (same layout as t where t is dense), NaN-filled when KDFAST_POISON=1."""
    out = torch.empty_like(t)
    return out.fill_(float("nan")) if POISON else out


def gini_kl_statistics_forward(activations, labels, num_classes: int):
    """Per-class sums of the spatially pooled |activations|, and the class counts.

    activations: (B, F, H, W) or (B, F), float16, bfloat16, float32 or float64, any strides; labels: (B,) int64
    in [0, num_classes) (not checked here). Returns (class_sums (C, F) float64, accumulated in float64 for every
    input dtype; counts (C,) int64). One kernel launch after a few small integer ops on the labels.
    """
    B, F = activations.shape[:2]
    C = num_classes
    HW, W, split, [(stride_h, stride_w)] = _positions(activations)
    order = torch.argsort(labels, stable=True)
    sorted_labels = labels[order]
    # where each class starts in the sorted batch, and its count: no host sync (bincount would need one on CUDA)
    bounds = torch.searchsorted(sorted_labels, torch.arange(C + 1, device=labels.device, dtype=labels.dtype))
    starts = bounds[:-1]
    counts = bounds[1:] - starts
    # Zeros, not poison: the rows of absent classes are never written and must read 0.
    sums = torch.zeros((C, F), dtype=torch.float64, device=activations.device)
    block_j, block_f, block_hw = _activation_blocks(B, F, HW, _where(activations))
    with device_guard(activations):
        _class_sums_kernel[(B, triton.cdiv(F, block_f))](
            activations, order, sorted_labels, counts, starts, sums,
            C, F, HW, W,
            activations.stride(0), activations.stride(1), stride_h, stride_w,
            sums.stride(0), sums.stride(1),
            1.0 / HW,
            SPLIT_HW=split, BLOCK_J=block_j, BLOCK_F=block_f, BLOCK_HW=block_hw,
        )
    return sums, counts


def gini_kl_statistics_backward(grad_class_sums, activations, labels):
    """grad_activations = sign(activations) * grad_class_sums[labels] / (H * W), broadcast over H and W.

    grad_class_sums: (C, F), any floating dtype and strides; activations and labels as in the forward. Returns a
    tensor in the activations' dtype, each element rounded once from float64, laid out like
    ``torch.empty_like(activations)`` (channels-last stays channels-last). One launch.
    """
    B, F = activations.shape[:2]
    grad = _empty_like(activations)
    HW, W, split, [(stride_h, stride_w), (grad_stride_h, grad_stride_w)] = _positions(activations, grad)
    block_b, block_f, block_hw = _activation_blocks(B, F, HW, _where(activations))
    with device_guard(activations):
        _class_sums_bwd_kernel[(triton.cdiv(B, block_b), triton.cdiv(F, block_f))](
            grad_class_sums, activations, labels, grad,
            B, grad_class_sums.shape[0], F, HW, W,
            grad_class_sums.stride(0), grad_class_sums.stride(1),
            activations.stride(0), activations.stride(1), stride_h, stride_w,
            grad.stride(0), grad.stride(1), grad_stride_h, grad_stride_w,
            1.0 / HW,
            SPLIT_HW=split, BLOCK_B=block_b, BLOCK_F=block_f, BLOCK_HW=block_hw,
        )
    return grad


def _table_blocks(C, F, where):
    block_c = block_size(C, minimum=1, maximum=_TABLE_BLOCK_C[where])
    return block_c, block_size(F, minimum=1, maximum=_TABLE_BLOCK_F[where])


def _table_statistics(class_sums, counts, uniform: bool, delta: float, gini, kl):
    """Runs the forward table kernels: writes gini and kl, returns what the backward kernel reads,
    (Z (F,), P (C,), [sum P, sum t, B]), in float64. One launch when F fits in one block, else two."""
    C, F = class_sums.shape
    device = class_sums.device
    block_c, block_f = _table_blocks(C, F, _where(class_sums))
    n_blocks = triton.cdiv(F, block_f)
    z = empty_output((F,), torch.float64, device)
    gini_part = empty_output((n_blocks,), torch.float64, device)
    colsum_part = empty_output((n_blocks, C), torch.float64, device)
    colsum = empty_output((C,), torch.float64, device)
    scalars = empty_output((3,), torch.float64, device)
    block_c_finish = block_size(C, minimum=1, maximum=1024)
    with device_guard(class_sums):
        _table_rows_kernel[(n_blocks,)](
            class_sums, counts, z, gini_part, colsum_part, colsum, scalars, gini, kl,
            C, F,
            class_sums.stride(0), class_sums.stride(1), counts.stride(0),
            float(delta),
            FINISH=n_blocks == 1, UNIFORM=uniform, BLOCK_C=block_c, BLOCK_F=block_f, BLOCK_C_FINISH=block_c_finish,
        )
        if n_blocks > 1:
            _table_classes_kernel[(1,)](
                colsum_part, gini_part, counts, colsum, scalars, gini, kl,
                C, F, n_blocks,
                counts.stride(0),
                float(delta),
                UNIFORM=uniform, BLOCK_C=block_c_finish, BLOCK_K=block_size(n_blocks, minimum=1, maximum=1024),
            )
    return z, colsum, scalars


def gini_kl_from_statistics_forward(class_sums, counts, uniform: bool, delta: float):
    """(gini, kl) from the class sums (C, F) and the int64 counts (C,) (see gini_kl_statistics_forward).

    class_sums: float32 or float64, any strides; counts: int64, summing to the batch size. uniform: the KL
    target is 1/C (else the batch label frequencies). Computed in float64. Returns (gini, kl, table): two
    scalars in class_sums.dtype, and the float64 tensors the backward can reuse instead of recomputing them
    (F + C + 3 values). One or two launches.
    """
    gini = empty_output((), class_sums.dtype, class_sums.device)
    kl = empty_output((), class_sums.dtype, class_sums.device)
    table = _table_statistics(class_sums, counts, uniform, delta, gini, kl)
    return gini, kl, table


def gini_kl_from_statistics_backward(grad_gini, grad_kl, class_sums, counts, uniform: bool, delta: float, table=None):
    """Gradient of grad_gini * gini + grad_kl * kl with respect to class_sums, in closed form and float64.

    grad_gini, grad_kl: 0-dim floating tensors (read on the device: no host sync). table: what the forward
    returned for these statistics, or None to recompute it (one or two launches more). Rows of classes with
    count 0 get 0: no sample reads them. Returns (C, F) in class_sums.dtype, contiguous. One launch.
    """
    C, F = class_sums.shape
    device = class_sums.device
    if table is None:
        scratch = empty_output((2,), class_sums.dtype, device)
        table = _table_statistics(class_sums, counts, uniform, delta, scratch[0], scratch[1])
    z, colsum, scalars = table
    grad = empty_output((C, F), class_sums.dtype, device)
    block_c, block_f = _table_blocks(C, F, _where(class_sums))
    with device_guard(class_sums):
        _table_grad_kernel[(triton.cdiv(F, block_f),)](
            class_sums, counts, z, colsum, scalars, grad_gini, grad_kl, grad,
            C, F,
            class_sums.stride(0), class_sums.stride(1), counts.stride(0), grad.stride(0), grad.stride(1),
            float(delta),
            UNIFORM=uniform, BLOCK_C=block_c, BLOCK_F=block_f,
        )
    return grad
