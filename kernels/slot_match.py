"""Triton kernels for batched slot cosine matching (design 3.2): pairwise slot cosine similarity and the
per-slot matching loss 1 - cos(student_i, teacher_pi(i)), forward and backward.

Cosines are eps-safe: each norm is clamped as n = where(n < eps, eps, n), which keeps a NaN norm NaN as torch's
clamp_min does (tl.maximum may return the other operand for NaN on GPU). Where a norm is clamped the
normalisation x / eps is linear, so its backward has no projection term; that is what torch autograd gives
for x / x.norm(dim=-1, keepdim=True).clamp_min(eps).

eps and grad_scale are annotated tl.float64 so that float64 inputs see them unrounded (an unannotated Python
float is passed as float32); the kernels convert them with tl.full([], x, acc_dtype), which also takes the plain
Python float the interpreter passes.
"""

# No `from __future__ import annotations` here: it would turn the kernels' tl.float64 annotations into strings
# that Triton does not recognise, and eps would silently be passed as float32.
import torch
import triton
import triton.language as tl

from ._launch import POISON, accumulator_dtype, block_size, device_guard, empty_output, is_fp64

MAX_SLOTS = 128  # largest K or M one program handles; the caller falls back above it

# Elements of one (rows x BLOCK_D) tile in the row-wise loss kernels: small tiles give more programs for
# the few hundred rows of a slot batch.
_ROW_TILE = 2048

# Spill budgets on sm_90 (H100/H200), bytes of spill stores per thread, checked by tests/test_gpu_compile.py at the
# launches this module makes at the design presets and its size limits; measured with Triton 3.9's ptxas (see
# benchmarks/results/sm90-resources.md), the budget a quarter above the measurement for other Triton versions.
# Measured: cosine fwd 12 B (64 x 64 slots), cosine bwd 288 B at movi-e and 27.8 KB / 31.6 KB at 64 / 128 slots
# (registers capped at 32 by ptxas there: the K x M tiles are held whole; to be timed on a GPU before a retiling),
# loss bwd 68 B, loss fwd and assignment 0.
SM90_SPILL_BUDGET = {
    "_slot_cosine_similarity_fwd_kernel": 64, "_slot_cosine_similarity_bwd_kernel": 40000,
    "_slot_match_loss_fwd_kernel": 0, "_slot_match_loss_bwd_kernel": 128, "_slot_assignment_kernel": 0,
}


@triton.jit
def _clamp_norm(sq_norm, eps):
    # where, not tl.maximum: a NaN norm must stay NaN
    norm = tl.sqrt(sq_norm)
    return norm, tl.where(norm < eps, eps, norm)


@triton.jit
def _slot_gram_and_sq_norms(
    a_ptr, b_ptr, K, M, D,
    stride_ak, stride_ad, stride_bm, stride_bd,
    IS_FP64: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # a_ptr, b_ptr point at one batch element. Returns <a_i, b_m> (BLOCK_K, BLOCK_M) and the squared norms;
    # padded rows and columns are loaded as 0, so they contribute nothing.
    offs_k = tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    mask_k = offs_k < K
    mask_m = offs_m < M
    if IS_FP64:
        dots = tl.zeros([BLOCK_K, BLOCK_M], dtype=tl.float64)
        sq_a = tl.zeros([BLOCK_K], dtype=tl.float64)
        sq_b = tl.zeros([BLOCK_M], dtype=tl.float64)
    else:
        dots = tl.zeros([BLOCK_K, BLOCK_M], dtype=tl.float32)
        sq_a = tl.zeros([BLOCK_K], dtype=tl.float32)
        sq_b = tl.zeros([BLOCK_M], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        a = tl.load(
            a_ptr + offs_k[:, None] * stride_ak + offs_d[None, :] * stride_ad,
            mask=mask_k[:, None] & mask_d[None, :], other=0.0,
        ).to(dots.dtype)
        # b is loaded transposed, (BLOCK_D, BLOCK_M), ready to be the right operand
        b_t = tl.load(
            b_ptr + offs_d[:, None] * stride_bd + offs_m[None, :] * stride_bm,
            mask=mask_d[:, None] & mask_m[None, :], other=0.0,
        ).to(dots.dtype)
        # ieee: tf32 would cost ~1e-3 relative error; fp16/bf16 inputs were widened to fp32 above. out_dtype is
        # the accumulator's: Triton < 3.7 defaults it to float32 and refuses a float64 accumulator with that default.
        dots = tl.dot(a, b_t, dots, input_precision="ieee", out_dtype=dots.dtype)
        sq_a += tl.sum(a * a, axis=1)
        sq_b += tl.sum(b_t * b_t, axis=0)
    return dots, sq_a, sq_b


@triton.jit
def _slot_cosine_similarity_fwd_kernel(
    a_ptr, b_ptr, out_ptr,
    K, M, D,
    stride_ab, stride_ak, stride_ad,
    stride_bb, stride_bm, stride_bd,
    stride_ob, stride_ok, stride_om,
    eps: tl.float64,
    IS_FP64: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    a_ptr += pid_b * stride_ab
    b_ptr += pid_b * stride_bb
    out_ptr += pid_b * stride_ob

    dots, sq_a, sq_b = _slot_gram_and_sq_norms(
        a_ptr, b_ptr, K, M, D, stride_ak, stride_ad, stride_bm, stride_bd,
        IS_FP64, BLOCK_K, BLOCK_M, BLOCK_D,
    )
    eps = tl.full([], eps, dots.dtype)
    _, clamped_a = _clamp_norm(sq_a, eps)
    _, clamped_b = _clamp_norm(sq_b, eps)
    cos = dots / (clamped_a[:, None] * clamped_b[None, :])

    offs_k = tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    tl.store(
        out_ptr + offs_k[:, None] * stride_ok + offs_m[None, :] * stride_om,
        cos.to(out_ptr.dtype.element_ty),
        mask=(offs_k < K)[:, None] & (offs_m < M)[None, :],
    )


@triton.jit
def _slot_cosine_similarity_bwd_kernel(
    grad_ptr, a_ptr, b_ptr, grad_a_ptr, grad_b_ptr,
    K, M, D,
    stride_gb, stride_gk, stride_gm,
    stride_ab, stride_ak, stride_ad,
    stride_bb, stride_bm, stride_bd,
    stride_gab, stride_gak, stride_gad,
    stride_gbb, stride_gbm, stride_gbd,
    eps: tl.float64,
    IS_FP64: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    grad_ptr += pid_b * stride_gb
    a_ptr += pid_b * stride_ab
    b_ptr += pid_b * stride_bb
    grad_a_ptr += pid_b * stride_gab
    grad_b_ptr += pid_b * stride_gbb

    # pass 1: recompute the cosines (never saved by the forward)
    dots, sq_a, sq_b = _slot_gram_and_sq_norms(
        a_ptr, b_ptr, K, M, D, stride_ak, stride_ad, stride_bm, stride_bd,
        IS_FP64, BLOCK_K, BLOCK_M, BLOCK_D,
    )
    eps = tl.full([], eps, dots.dtype)
    norm_a, clamped_a = _clamp_norm(sq_a, eps)
    norm_b, clamped_b = _clamp_norm(sq_b, eps)
    clamped_ab = clamped_a[:, None] * clamped_b[None, :]
    cos = dots / clamped_ab

    offs_k = tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    mask_k = offs_k < K
    mask_m = offs_m < M
    grad = tl.load(
        grad_ptr + offs_k[:, None] * stride_gk + offs_m[None, :] * stride_gm,
        mask=mask_k[:, None] & mask_m[None, :], other=0.0,
    ).to(dots.dtype)
    grad_cos = grad * cos
    # grad_a_i = (sum_m grad[i,m] b^_m - r_i a^_i) / |a_i| with r_i = sum_m grad[i,m] cos[i,m] and the unit vectors
    # a^ = a / |a|, b^ = b / |b| divided, not multiplied by a rounded reciprocal (symmetrically for b): for parallel
    # rows (always so at D = 1) the two terms then cancel exactly, the true gradient 0, instead of leaving rounding
    # noise / |a|. where, not a product with the indicator, so that a clamped norm drops the r term even when it is
    # NaN, as in torch.
    r_a = tl.where(norm_a >= eps, tl.sum(grad_cos, axis=1), 0.0)
    r_b = tl.where(norm_b >= eps, tl.sum(grad_cos, axis=0), 0.0)
    grad_t = tl.trans(grad)

    # pass 2: both gradients, one D chunk at a time
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        mask_kd = mask_k[:, None] & mask_d[None, :]
        mask_md = mask_m[:, None] & mask_d[None, :]
        a = tl.load(
            a_ptr + offs_k[:, None] * stride_ak + offs_d[None, :] * stride_ad, mask=mask_kd, other=0.0,
        ).to(dots.dtype)
        b = tl.load(
            b_ptr + offs_m[:, None] * stride_bm + offs_d[None, :] * stride_bd, mask=mask_md, other=0.0,
        ).to(dots.dtype)
        a_unit = a / clamped_a[:, None]
        b_unit = b / clamped_b[:, None]
        grad_a = (tl.dot(grad, b_unit, input_precision="ieee") - r_a[:, None] * a_unit) / clamped_a[:, None]
        grad_b = (tl.dot(grad_t, a_unit, input_precision="ieee") - r_b[:, None] * b_unit) / clamped_b[:, None]
        tl.store(
            grad_a_ptr + offs_k[:, None] * stride_gak + offs_d[None, :] * stride_gad,
            grad_a.to(grad_a_ptr.dtype.element_ty), mask=mask_kd,
        )
        tl.store(
            grad_b_ptr + offs_m[:, None] * stride_gbm + offs_d[None, :] * stride_gbd,
            grad_b.to(grad_b_ptr.dtype.element_ty), mask=mask_md,
        )


@triton.jit
def _slot_match_rows(
    student_ptr, teacher_ptr, assignment_ptr,
    pid, R, K, D,
    stride_sb, stride_sk, stride_sd,
    stride_tb, stride_tm, stride_td,
    stride_pb, stride_pk,
    HAS_ASSIGNMENT: tl.constexpr, IS_FP64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Row pointers of the BLOCK_R flattened (B*K) rows of program pid, and their dot products and squared
    # norms over all of D.
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    mask_r = rows < R
    batch = rows // K
    slot = rows % K
    if HAS_ASSIGNMENT:
        matched = tl.load(assignment_ptr + batch * stride_pb + slot * stride_pk, mask=mask_r, other=0)
    else:
        matched = slot
    s_rows = student_ptr + batch * stride_sb + slot * stride_sk
    t_rows = teacher_ptr + batch * stride_tb + matched * stride_tm

    # element-wise partial sums, reduced once after the loop
    if IS_FP64:
        dot = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float64)
        sq_s = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float64)
        sq_t = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float64)
    else:
        dot = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
        sq_s = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
        sq_t = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = mask_r[:, None] & (offs_d < D)[None, :]
        s = tl.load(s_rows[:, None] + offs_d[None, :] * stride_sd, mask=mask, other=0.0).to(dot.dtype)
        t = tl.load(t_rows[:, None] + offs_d[None, :] * stride_td, mask=mask, other=0.0).to(dot.dtype)
        dot += s * t
        sq_s += s * s
        sq_t += t * t
    return rows, mask_r, s_rows, t_rows, tl.sum(dot, axis=1), tl.sum(sq_s, axis=1), tl.sum(sq_t, axis=1)


@triton.jit
def _slot_match_loss_fwd_kernel(
    student_ptr, teacher_ptr, assignment_ptr, loss_ptr,
    R, K, D,
    stride_sb, stride_sk, stride_sd,
    stride_tb, stride_tm, stride_td,
    stride_pb, stride_pk,
    stride_lb, stride_lk,
    eps: tl.float64,
    HAS_ASSIGNMENT: tl.constexpr, IS_FP64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows, mask_r, _, _, dot, sq_s, sq_t = _slot_match_rows(
        student_ptr, teacher_ptr, assignment_ptr, pid, R, K, D,
        stride_sb, stride_sk, stride_sd, stride_tb, stride_tm, stride_td, stride_pb, stride_pk,
        HAS_ASSIGNMENT, IS_FP64, BLOCK_R, BLOCK_D,
    )
    eps = tl.full([], eps, dot.dtype)
    _, clamped_s = _clamp_norm(sq_s, eps)
    _, clamped_t = _clamp_norm(sq_t, eps)
    loss = 1.0 - dot / (clamped_s * clamped_t)
    tl.store(
        loss_ptr + (rows // K) * stride_lb + (rows % K) * stride_lk,
        loss.to(loss_ptr.dtype.element_ty), mask=mask_r,
    )


@triton.jit
def _slot_match_loss_bwd_kernel(
    grad_loss_ptr, student_ptr, teacher_ptr, assignment_ptr, grad_student_ptr,
    R, K, D,
    stride_glb, stride_glk,
    stride_sb, stride_sk, stride_sd,
    stride_tb, stride_tm, stride_td,
    stride_pb, stride_pk,
    stride_gsb, stride_gsk, stride_gsd,
    eps: tl.float64, grad_scale: tl.float64,
    HAS_ASSIGNMENT: tl.constexpr, IS_FP64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    # pass 1: the cosines again (the forward keeps nothing but the inputs)
    rows, mask_r, s_rows, t_rows, dot, sq_s, sq_t = _slot_match_rows(
        student_ptr, teacher_ptr, assignment_ptr, pid, R, K, D,
        stride_sb, stride_sk, stride_sd, stride_tb, stride_tm, stride_td, stride_pb, stride_pk,
        HAS_ASSIGNMENT, IS_FP64, BLOCK_R, BLOCK_D,
    )
    eps = tl.full([], eps, dot.dtype)
    norm_s, clamped_s = _clamp_norm(sq_s, eps)
    _, clamped_t = _clamp_norm(sq_t, eps)
    cos = dot / (clamped_s * clamped_t)
    batch = rows // K
    slot = rows % K
    # grad_losses may be an expanded scalar (stride 0): read through its strides
    g = tl.load(grad_loss_ptr + batch * stride_glb + slot * stride_glk, mask=mask_r, other=0.0)
    g = g.to(dot.dtype) * tl.full([], grad_scale, dot.dtype)
    # grad_s = -g (t^ - cos s^) / |s| with the unit vectors s^ = s / |s|, t^ = t / |t| divided, not multiplied by a
    # rounded reciprocal: for parallel rows (always so at D = 1) the difference is then exactly 0, the true
    # gradient, instead of rounding noise / |s|. where, not a product with the indicator, so that a clamped student
    # norm drops the projection term even when cos is NaN, as in torch
    outer = -g / clamped_s
    projection = tl.where(norm_s >= eps, cos, 0.0)

    # pass 2
    gs_rows = grad_student_ptr + batch * stride_gsb + slot * stride_gsk
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = mask_r[:, None] & (offs_d < D)[None, :]
        s = tl.load(s_rows[:, None] + offs_d[None, :] * stride_sd, mask=mask, other=0.0).to(dot.dtype)
        t = tl.load(t_rows[:, None] + offs_d[None, :] * stride_td, mask=mask, other=0.0).to(dot.dtype)
        grad_s = outer[:, None] * (t / clamped_t[:, None] - projection[:, None] * (s / clamped_s[:, None]))
        tl.store(
            gs_rows[:, None] + offs_d[None, :] * stride_gsd,
            grad_s.to(grad_student_ptr.dtype.element_ty), mask=mask,
        )


def _check_slots(K, M):
    if K > MAX_SLOTS or M > MAX_SLOTS:
        raise ValueError(
            f"kdfast.kernels.slot_match handles at most MAX_SLOTS={MAX_SLOTS} slots per side, got K={K}, M={M}; "
            "fall back to another backend above it"
        )


def _pair_blocks(K, M, D, dtype):
    block_k = block_size(K)
    block_m = block_size(M)
    # The a and b chunks are staged in shared memory as dot operands: keep them within 32 KiB. With the K x M
    # operand of the backward that is at most 96 KiB in fp32 (160 KiB in fp64 at 128 slots: A100 and later).
    elements = (32 * 1024 // (8 if dtype == torch.float64 else 4)) // (block_k + block_m)
    block_d = block_size(D, maximum=min(128, 1 << (elements.bit_length() - 1)))
    num_warps = 8 if block_k * block_m >= 64 * 128 else 4
    # launched with num_stages=1: a program loops over a few D chunks only, and software pipelining would
    # multiply the staged chunks
    return block_k, block_m, block_d, num_warps


def _row_blocks(R, D):
    block_d = block_size(D, maximum=256)
    block_r = min(block_size(R, minimum=1), max(1, _ROW_TILE // block_d))
    return block_r, block_d


def slot_cosine_similarity_forward(a, b, eps: float) -> torch.Tensor:
    """Cosine of every slot pair.

    a: (B, K, D), b: (B, M, D), same floating dtype (float16, bfloat16, float32, float64), same device; any
    strides (stride 0 included); K, M <= MAX_SLOTS. Returns (B, K, M) in a.dtype:
    out[b, i, m] = <a_i, b_m> / (max(||a_i||, eps) * max(||b_m||, eps)), accumulated in float32 (float64
    for float64 inputs). One program per batch element.
    """
    B, K, D = a.shape
    M = b.shape[1]
    _check_slots(K, M)
    out = empty_output((B, K, M), a.dtype, a.device)
    if out.numel() == 0:
        return out
    block_k, block_m, block_d, num_warps = _pair_blocks(K, M, D, a.dtype)
    with device_guard(a):
        _slot_cosine_similarity_fwd_kernel[(B,)](
            a, b, out,
            K, M, D,
            a.stride(0), a.stride(1), a.stride(2),
            b.stride(0), b.stride(1), b.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            float(eps),
            IS_FP64=is_fp64(a.dtype), BLOCK_K=block_k, BLOCK_M=block_m, BLOCK_D=block_d,
            num_warps=num_warps, num_stages=1,
        )
    return out


def slot_cosine_similarity_backward(grad, a, b, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of slot_cosine_similarity_forward.

    grad: (B, K, M) of any floating dtype and strides (an expanded grad included); a: (B, K, D),
    b: (B, M, D) as in the forward. Returns (grad_a (B, K, D) in a.dtype, grad_b (B, M, D) in b.dtype).
    The cosines are recomputed, not saved. One launch, one program per batch element.
    """
    B, K, D = a.shape
    M = b.shape[1]
    _check_slots(K, M)
    grad_a = empty_output((B, K, D), a.dtype, a.device)
    grad_b = empty_output((B, M, D), b.dtype, b.device)
    if grad_a.numel() == 0 and grad_b.numel() == 0:
        return grad_a, grad_b
    block_k, block_m, block_d, num_warps = _pair_blocks(K, M, D, a.dtype)
    with device_guard(a):
        _slot_cosine_similarity_bwd_kernel[(B,)](
            grad, a, b, grad_a, grad_b,
            K, M, D,
            grad.stride(0), grad.stride(1), grad.stride(2),
            a.stride(0), a.stride(1), a.stride(2),
            b.stride(0), b.stride(1), b.stride(2),
            grad_a.stride(0), grad_a.stride(1), grad_a.stride(2),
            grad_b.stride(0), grad_b.stride(1), grad_b.stride(2),
            float(eps),
            IS_FP64=is_fp64(a.dtype), BLOCK_K=block_k, BLOCK_M=block_m, BLOCK_D=block_d,
            num_warps=num_warps, num_stages=1,
        )
    return grad_a, grad_b


def slot_match_loss_forward(student, teacher, assignment, eps: float) -> torch.Tensor:
    """Per-slot matching loss 1 - cos(student_i, teacher_j).

    student: (B, K, D), teacher: (B, M, D), same floating dtype and device, any strides. assignment: None
    (slot i pairs with teacher slot i; then M == K) or an int64 (B, K) tensor of teacher rows in [0, M), any
    strides. Returns the (B, K) losses in the accumulator dtype (float32; float64 for float64 inputs),
    cosines eps-clamped as in slot_cosine_similarity_forward.
    """
    B, K, D = student.shape
    R = B * K
    losses = empty_output((B, K), accumulator_dtype(student.dtype), student.device)
    if R == 0:
        return losses
    has_assignment = assignment is not None
    if not has_assignment:
        assignment = losses  # never read: HAS_ASSIGNMENT=False compiles the load away
    block_r, block_d = _row_blocks(R, D)
    with device_guard(student):
        _slot_match_loss_fwd_kernel[(triton.cdiv(R, block_r),)](
            student, teacher, assignment, losses,
            R, K, D,
            student.stride(0), student.stride(1), student.stride(2),
            teacher.stride(0), teacher.stride(1), teacher.stride(2),
            assignment.stride(0), assignment.stride(1),
            losses.stride(0), losses.stride(1),
            float(eps),
            HAS_ASSIGNMENT=has_assignment, IS_FP64=is_fp64(student.dtype), BLOCK_R=block_r, BLOCK_D=block_d,
        )
    return losses


def slot_match_loss_backward(
    grad_losses, student, teacher, assignment, eps: float, grad_scale: float
) -> torch.Tensor:
    """Gradient of grad_scale * sum(grad_losses * slot_match_loss_forward(...)) with respect to the student.

    grad_losses: (B, K), any floating dtype and strides (an expanded scalar grad included); student, teacher,
    assignment as in slot_match_loss_forward; grad_scale: a Python float folded into the gradient (e.g.
    1 / (B * K) for a mean). Returns grad_student (B, K, D) in student.dtype; the teacher gets no gradient.
    One launch.
    """
    B, K, D = student.shape
    R = B * K
    grad_student = empty_output((B, K, D), student.dtype, student.device)
    if grad_student.numel() == 0:
        return grad_student
    has_assignment = assignment is not None
    if not has_assignment:
        assignment = grad_losses  # never read: HAS_ASSIGNMENT=False compiles the load away
    block_r, block_d = _row_blocks(R, D)
    with device_guard(student):
        _slot_match_loss_bwd_kernel[(triton.cdiv(R, block_r),)](
            grad_losses, student, teacher, assignment, grad_student,
            R, K, D,
            grad_losses.stride(0), grad_losses.stride(1),
            student.stride(0), student.stride(1), student.stride(2),
            teacher.stride(0), teacher.stride(1), teacher.stride(2),
            assignment.stride(0), assignment.stride(1),
            grad_student.stride(0), grad_student.stride(1), grad_student.stride(2),
            float(eps), float(grad_scale),
            HAS_ASSIGNMENT=has_assignment, IS_FP64=is_fp64(student.dtype), BLOCK_R=block_r, BLOCK_D=block_d,
        )
    return grad_student


# --------------------------------------------------------------------------------------------------------------
# Batched assignment (Hungarian matching for slot_match_loss(matching="hungarian") on the GPU)

MAX_ASSIGNMENT_SLOTS = 64  # largest K or M the assignment kernel handles; the caller falls back to scipy above it


@triton.jit
def _pick(values, offs, index):
    # values[index] of a register vector, as a scalar
    return tl.sum(tl.where(offs == index, values, 0), axis=0)


@triton.jit
def _slot_assignment_kernel(
    sim_ptr, out_ptr,
    K, M,
    stride_sb, stride_sk, stride_sm,
    stride_ob, stride_ok,
    BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # scipy.optimize.linear_sum_assignment(maximize=True) (scipy's rectangular_lsap.cpp: Crouse's shortest
    # augmenting path, from PM Larsen's implementation) step for step, on cost = -similarity in float64; one
    # program solves one batch element, K <= M. The scan over scipy's `remaining` columns is a vector
    # operation here; scipy's scan order (which decides between equal reduced costs) is kept as each
    # column's position `pos` in that list, updated as scipy's swap-with-last removal updates it.
    pid = tl.program_id(0).to(tl.int64)
    sim_ptr += pid * stride_sb
    out_ptr += pid * stride_ob
    offs_k = tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    mask_k = offs_k < K
    mask_m = offs_m < M
    inf = float("inf")

    # scipy rejects NaN and -inf costs (similarity NaN or +inf)
    invalid = tl.zeros([], tl.int32)
    for k in range(K):
        row = tl.load(sim_ptr + k * stride_sk + offs_m * stride_sm, mask=mask_m, other=0.0).to(tl.float64)
        invalid += tl.sum(((row != row) | (row == inf)).to(tl.int32), axis=0)  # noqa: PLR0124 (NaN)
    failed = (invalid > 0).to(tl.int32)

    u = tl.zeros([BLOCK_K], tl.float64)  # row duals
    v = tl.zeros([BLOCK_M], tl.float64)  # column duals
    col4row = tl.full([BLOCK_K], -1, tl.int32)
    row4col = tl.full([BLOCK_M], -1, tl.int32)
    for cur_row in range(K):
        if failed == 0:
            # augmenting_path(): Dijkstra over the columns from cur_row
            min_val = tl.zeros([], tl.float64)
            pos = M - 1 - offs_m  # scipy fills `remaining` in reverse: column j sits at M-1-j
            num_remaining = M
            in_sr = offs_k < 0  # rows reached
            in_sc = offs_m < 0  # columns done
            spc = tl.full([BLOCK_M], inf, tl.float64)  # shortestPathCosts
            path = tl.full([BLOCK_M], -1, tl.int32)
            reached_at = tl.zeros([BLOCK_K], tl.float64)  # spc of the column through which a row was reached
            i = cur_row
            sink = tl.full([], -1, tl.int32)
            while (sink < 0) & (failed == 0):
                in_sr = in_sr | (offs_k == i)
                u_i = _pick(u, offs_k, i)
                cost = -tl.load(sim_ptr + i * stride_sk + offs_m * stride_sm, mask=mask_m, other=0.0).to(tl.float64)
                remaining = mask_m & ~in_sc
                reduced = min_val + cost - u_i - v  # scipy's order of operations: ((minVal + c) - u_i) - v_j
                better = remaining & (reduced < spc)
                path = tl.where(better, i, path)
                spc = tl.where(better, reduced, spc)
                # scipy takes the first column of least cost in scan order, but a later free column of equal
                # cost replaces it: the last free one if any is free
                lowest = tl.min(tl.where(remaining, spc, inf), axis=0)
                least = remaining & (spc == lowest)
                free = least & (row4col < 0)
                last_free = tl.max(tl.where(free, pos, -1), axis=0)
                first = tl.min(tl.where(least, pos, BLOCK_M), axis=0)
                chosen = tl.where(last_free >= 0, last_free, first)
                j = tl.sum(tl.where(remaining & (pos == chosen), offs_m, 0), axis=0)
                min_val = lowest
                # infeasible (or overflowing) costs: no assignment; never loop forever
                failed = ((lowest == inf) | (lowest != lowest)).to(tl.int32)  # noqa: PLR0124 (NaN)
                row_j = _pick(row4col, offs_m, j)
                sink = tl.where(row_j < 0, j, -1)
                reached_at = tl.where(offs_k == row_j, lowest, reached_at)
                i = tl.where(row_j < 0, i, row_j)
                in_sc = in_sc | (offs_m == j)
                # remaining[index] = remaining[--num_remaining]
                num_remaining -= 1
                pos = tl.where(remaining & (offs_m != j) & (pos == num_remaining), chosen, pos)
            if failed == 0:
                # dual update, in scipy's order
                u = tl.where(offs_k == cur_row, u + min_val, u)
                u = tl.where(in_sr & (offs_k != cur_row), u + (min_val - reached_at), u)
                v = tl.where(in_sc, v - (min_val - spc), v)
                # augment along the path back to cur_row
                j = sink
                done = tl.zeros([], tl.int32)
                while done == 0:
                    i = _pick(path, offs_m, j)
                    row4col = tl.where(offs_m == j, i, row4col)
                    previous = _pick(col4row, offs_k, i)
                    col4row = tl.where(offs_k == i, j, col4row)
                    j = previous
                    done = (i == cur_row).to(tl.int32)
    # no assignment exists (NaN or +inf similarity, or infeasible): the identity, which keeps any gather in range
    result = tl.where(failed == 0, col4row, offs_k)
    tl.store(out_ptr + offs_k * stride_ok, result.to(tl.int64), mask=mask_k)


def slot_assignment(similarity) -> torch.Tensor:
    """For each batch element, the column assigned to each row maximising the total similarity.

    similarity: (B, K, M) floating, K <= M <= MAX_ASSIGNMENT_SLOTS, any strides. Returns (B, K) int64 on its
    device: exactly scipy.optimize.linear_sum_assignment(similarity[b], maximize=True)'s columns, ties
    included (the same shortest-augmenting-path steps in the same float64 arithmetic and scan order). A batch
    element with a NaN or +inf entry (scipy: "invalid numeric entries"), or with no finite assignment, gets the
    identity pairing i -> i. One program per batch element; no host synchronisation.
    """
    B, K, M = similarity.shape
    if K > M or M > MAX_ASSIGNMENT_SLOTS:
        raise ValueError(
            f"kdfast.kernels.slot_match.slot_assignment needs K <= M <= MAX_ASSIGNMENT_SLOTS={MAX_ASSIGNMENT_SLOTS}, "
            f"got K={K}, M={M}; use scipy (kdfast.reference.slot_assignment) above it"
        )
    # poisoned with -1 (an integer output cannot hold NaN): an unwritten entry fails the tests' comparisons
    out = torch.empty((B, K), dtype=torch.int64, device=similarity.device)
    if POISON:
        out.fill_(-1)
    if out.numel() == 0:
        return out
    with device_guard(similarity):
        _slot_assignment_kernel[(B,)](
            similarity, out,
            K, M,
            similarity.stride(0), similarity.stride(1), similarity.stride(2),
            out.stride(0), out.stride(1),
            BLOCK_K=block_size(K, minimum=2), BLOCK_M=block_size(M, minimum=2),
            num_warps=1, num_stages=1,
        )
    return out
