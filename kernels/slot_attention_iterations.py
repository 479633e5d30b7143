"""Triton kernels of whole slot attention iterations (design 3.1): one launch per frame each way.

Program b owns batch element b for all ``n_iters`` iterations of a frame (a persistent kernel, grid (B,)):

    x = LN(slots); q = to_q(x); U, A = core(q, k, v); h = GRUCell(U, hidden); slots = h + MLP(LN(h))

Every dense layer reads its input rows from a per-program scratch row block (``act``, global memory that
stays in L1/L2) in chunks of BLOCK_C columns and writes its output in chunks of BLOCK_O columns, so that no
register tile grows with D, Dh or 3D; a barrier separates a block's writes from the reads of other threads.
The core walks all N tokens of its batch element in tiles of BLOCK_N, as the core kernel does.

The forward keeps in ``act`` (iterations, B, K, C) what the backward needs: the incoming slots, the
normalised slots and their rstd, x, q, U, Z, the GRU gates, h, the MLP's normalised input and hidden
activations (``act_layout``). The backward kernel walks the iterations in reverse from it, recomputes the
attention tile by tile (never a (B, K, N) tensor) and writes the gradients of every layer's output into
``dact``; dk and dv accumulate over iterations in place (each program owns its rows: deterministic). The
parameter gradients, reductions over B * K rows of every iteration, are then a few GEMMs in torch
(in kdfast.ops.slot_attention): the right tool for a reduction over programs, and deterministic.

Slots are padded to BLOCK_K >= 16 (tl.dot's minimum) and masked. Everything runs in the dtype of the
inputs, float32 or float64 (the op upcasts half precision first), with IEEE dots.
"""

# No `from __future__ import annotations`: it would turn the tl.float64 annotations into strings.
import triton
import triton.language as tl

from ._launch import block_size, device_guard, empty_output, is_fp64
from .slot_attention import MAX_DIM, MAX_SLOTS, _softmax_over_slots, slot_tile_limit, within_limits

# Spill stores per thread allowed on sm_90 (as in slot_attention.py), measured with Triton 3.9: forward 152 B at
# movi-e, 1.8 KB at K=32, D=256; backward 36 B at movi-c, 328 B at movi-e, 12.6 KB at K=64, D=128, 1.9 KB at K=32,
# D=256. Budgets a quarter above, so that the test catches regressions; the large ones await GPU timing.
SM90_SPILL_BUDGET = {"_slot_attention_fwd_kernel": 2300, "_slot_attention_bwd_kernel": 16000}

# One iteration's parameters, in the order the launchers take them (None for an absent layer or bias): the slot
# LayerNorm, the q projection, the GRUCell, and the residual MLP's LayerNorm and two layers.
PARAMETERS = ("norm_w", "norm_b", "wq", "bq", "w_ih", "w_hh", "b_ih", "b_hh",
              "mlp_norm_w", "mlp_norm_b", "w1", "b1", "w3", "b3")

# ------------------------------------------------------------------------------------------- layouts


# Names of the columns of one row of ``act`` (one iteration's activations kept for the backward) and of ``dact``
# (the gradients of each layer's output), in the order _act_columns and _dact_columns return their first columns.
# Those two jitted functions are the layout: act_layout and dact_layout run their Python bodies on the host.
ACT_COLUMNS = ("slots", "xhat", "x", "q", "u", "r", "z", "n", "hn", "h", "yhat", "y", "a", "rstd_x", "norm", "rstd_y")
DACT_COLUMNS = ("ds", "dh", "dx", "dq", "dgi", "dgh", "da", "dy", "du", "dhid")


def act_layout(k, v, params):
    """Columns of one row of ``act`` for k (B, N, Dq), v (B, N, Dv) and ``params`` (PARAMETERS order): name ->
    (first column, width), the total width under "C". An absent layer has no columns (every column is written)."""
    return _named_columns(ACT_COLUMNS, _act_columns.fn(*_widths(k, v, params)))


def dact_layout(k, v, params):
    """Columns of one row of ``dact``, as act_layout gives those of ``act``."""
    return _named_columns(DACT_COLUMNS, _dact_columns.fn(*_widths(k, v, params)))


def _named_columns(names, starts):
    *starts, end = starts
    layout = {name: (start, stop - start) for name, start, stop in zip(names, starts, (*starts[1:], end), strict=True)}
    layout["C"] = (end, 0)
    return layout


@triton.jit
def _act_columns(D, DQ, DV, DH, HAS_GRU: tl.constexpr, HAS_MLP: tl.constexpr):
    G = D if HAS_GRU else 0
    M = D if HAS_MLP else 0
    c_s = 0
    c_xh = c_s + D
    c_x = c_xh + D
    c_q = c_x + D
    c_u = c_q + DQ
    c_r = c_u + DV
    c_z = c_r + G
    c_n = c_z + G
    c_hn = c_n + G
    c_h = c_hn + G
    c_yh = c_h + D
    c_y = c_yh + M
    c_a = c_y + M
    c_rsx = c_a + (DH if HAS_MLP else 0)
    c_norm = c_rsx + 1
    c_rsy = c_norm + 1
    c_end = c_rsy + (1 if HAS_MLP else 0)
    return c_s, c_xh, c_x, c_q, c_u, c_r, c_z, c_n, c_hn, c_h, c_yh, c_y, c_a, c_rsx, c_norm, c_rsy, c_end


@triton.jit
def _dact_columns(D, DQ, DV, DH, HAS_GRU: tl.constexpr, HAS_MLP: tl.constexpr):
    G = 3 * D if HAS_GRU else 0
    c_ds = 0
    c_dh = c_ds + D
    c_dx = c_dh + D
    c_dq = c_dx + D
    c_dgi = c_dq + DQ
    c_dgh = c_dgi + G
    c_da = c_dgh + G
    c_dy = c_da + (DH if HAS_MLP else 0)
    c_du = c_dy + (D if HAS_MLP else 0)
    c_dhid = c_du + (DV if HAS_GRU else 0)
    c_end = c_dhid + (D if HAS_GRU else 0)
    return c_ds, c_dh, c_dx, c_dq, c_dgi, c_dgh, c_da, c_dy, c_du, c_dhid, c_end


# ------------------------------------------------------------------------------------- tile helpers


@triton.jit
def _load_rows(ptr, stride_row, stride_col, rows, c0, cols, BLOCK_K: tl.constexpr, BLOCK_O: tl.constexpr):
    """(BLOCK_K, BLOCK_O): rows [0, rows) and columns [c0, cols) of a row block, zero outside."""
    offs_k = tl.arange(0, BLOCK_K)
    offs_c = c0 + tl.arange(0, BLOCK_O)
    return tl.load(ptr + offs_k[:, None] * stride_row + offs_c[None, :] * stride_col,
                   mask=(offs_k[:, None] < rows) & (offs_c[None, :] < cols), other=0.0)


@triton.jit
def _store_rows(ptr, stride_row, rows, c0, cols, value, BLOCK_K: tl.constexpr, BLOCK_O: tl.constexpr):
    offs_k = tl.arange(0, BLOCK_K)
    offs_c = c0 + tl.arange(0, BLOCK_O)
    tl.store(ptr + offs_k[:, None] * stride_row + offs_c[None, :], value,
             mask=(offs_k[:, None] < rows) & (offs_c[None, :] < cols))


@triton.jit
def _load_vector(ptr, c0, cols, BLOCK_O: tl.constexpr):
    offs = c0 + tl.arange(0, BLOCK_O)
    return tl.load(ptr + offs, mask=offs < cols, other=0.0)


@triton.jit
def _load_column(ptr, stride_row, rows, BLOCK_K: tl.constexpr):
    offs_k = tl.arange(0, BLOCK_K)
    return tl.load(ptr + offs_k * stride_row, mask=offs_k < rows, other=0.0)


@triton.jit
def _matmul_rows(a_ptr, stride_a, rows, n_in, w_ptr, stride_wo, stride_wi, o0, n_out,
                 BLOCK_K: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr):
    """(BLOCK_K, BLOCK_O) = A[:rows, :n_in] @ W[o0:o0 + BLOCK_O, :n_in]^T, zero outside.

    A is a row block in memory (row stride ``stride_a``, unit column stride), read BLOCK_C columns at a time;
    W[o, i] lies at ``w_ptr + o * stride_wo + i * stride_wi`` (a transposed weight swaps the strides).
    """
    offs_k = tl.arange(0, BLOCK_K)
    offs_o = o0 + tl.arange(0, BLOCK_O)
    out = tl.zeros([BLOCK_K, BLOCK_O], a_ptr.dtype.element_ty)
    for c0 in range(0, n_in, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        a = tl.load(a_ptr + offs_k[:, None] * stride_a + offs_c[None, :],
                    mask=(offs_k[:, None] < rows) & (offs_c[None, :] < n_in), other=0.0)
        w = tl.load(w_ptr + offs_o[:, None] * stride_wo + offs_c[None, :] * stride_wi,
                    mask=(offs_o[:, None] < n_out) & (offs_c[None, :] < n_in), other=0.0)
        out += tl.dot(a, tl.trans(w), input_precision="ieee")
    return out


@triton.jit
def _normalise(x, cols, eps, BLOCK_O: tl.constexpr):
    """(xhat, rstd) of LayerNorm over the first ``cols`` columns of x (BLOCK_K, BLOCK_O); padding stays 0."""
    valid = (tl.arange(0, BLOCK_O) < cols)[None, :]
    mean = tl.sum(x, axis=1) / cols
    centred = tl.where(valid, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / cols + eps)
    return centred * rstd[:, None], rstd


@triton.jit
def _normalise_backward(dxhat, xhat, rstd, cols):
    """Gradient of the LayerNorm input from that of its normalised output xhat (padding is 0 in both)."""
    mean_d = tl.sum(dxhat, axis=1) / cols
    mean_dx = tl.sum(dxhat * xhat, axis=1) / cols
    return rstd[:, None] * (dxhat - mean_d[:, None] - xhat * mean_dx[:, None])


@triton.jit
def _tanh(x):
    # exp of a non-positive number only: no overflow for large |x|
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


# ------------------------------------------------------------------------------------------ forward


@triton.jit
def _slot_attention_fwd_kernel(
    slots_ptr, k_ptr, v_ptr,
    norm_w_ptr, norm_b_ptr, wq_ptr, bq_ptr, w_ih_ptr, w_hh_ptr, b_ih_ptr, b_hh_ptr,
    mlp_norm_w_ptr, mlp_norm_b_ptr, w1_ptr, b1_ptr, w3_ptr, b3_ptr,
    out_ptr, attn_ptr, act_ptr,
    B, K, N, D, DQ, DV, DH, C, n_iters, act_iters,
    stride_sb, stride_sk, stride_sd,
    stride_kb, stride_kn, stride_kd,
    stride_vb, stride_vn, stride_vd,
    scale: tl.float64, eps: tl.float64, ln_eps: tl.float64,
    HAS_Q_BIAS: tl.constexpr, HAS_GRU: tl.constexpr, HAS_GRU_BIAS: tl.constexpr, HAS_MLP: tl.constexpr,
    HIDDEN_NORMED: tl.constexpr, STORE_ATTN: tl.constexpr, IS_FP64: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DQ: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    acc = tl.float64 if IS_FP64 else tl.float32
    scale = tl.full([], scale, acc)
    eps = tl.full([], eps, acc)
    ln_eps = tl.full([], ln_eps, acc)
    c_s, c_xh, c_x, c_q, c_u, c_r, c_z, c_n, c_hn, c_h, c_yh, c_y, c_a, c_rsx, c_norm, c_rsy, _ = _act_columns(
        D, DQ, DV, DH, HAS_GRU, HAS_MLP)
    offs_k = tl.arange(0, BLOCK_K)
    offs_dq = tl.arange(0, BLOCK_DQ)
    offs_dv = tl.arange(0, BLOCK_DV)
    valid_k = offs_k < K
    out_b = out_ptr + b * K * D  # (K, D) contiguous: each iteration's result, the next one's input
    for it in range(n_iters):
        # the last act_iters iterations keep their activations (earlier ones share the first row block)
        row = act_ptr + (tl.maximum(it - (n_iters - act_iters), 0) * B + b) * K * C
        # x = LN(slots)
        if it == 0:
            s = _load_rows(slots_ptr + b * stride_sb, stride_sk, stride_sd, K, 0, D, BLOCK_K, BLOCK_D)
        else:
            s = _load_rows(out_b, D, 1, K, 0, D, BLOCK_K, BLOCK_D)
        xhat, rstd = _normalise(s.to(acc), D, ln_eps, BLOCK_D)
        x = xhat * _load_vector(norm_w_ptr, 0, D, BLOCK_D)[None, :] + _load_vector(norm_b_ptr, 0, D, BLOCK_D)[None, :]
        _store_rows(row + c_s, C, K, 0, D, s, BLOCK_K, BLOCK_D)
        _store_rows(row + c_xh, C, K, 0, D, xhat, BLOCK_K, BLOCK_D)
        _store_rows(row + c_x, C, K, 0, D, x, BLOCK_K, BLOCK_D)
        tl.store(row + c_rsx + offs_k * C, rstd, mask=valid_k)
        tl.debug_barrier()
        # q = to_q(x)
        for o0 in range(0, DQ, BLOCK_O):
            q = _matmul_rows(row + c_x, C, K, D, wq_ptr, D, 1, o0, DQ, BLOCK_K, BLOCK_O, BLOCK_C)
            if HAS_Q_BIAS:
                q += _load_vector(bq_ptr, o0, DQ, BLOCK_O)[None, :]
            _store_rows(row + c_q, C, K, o0, DQ, q, BLOCK_K, BLOCK_O)
        tl.debug_barrier()
        # U, A = core(q, k, v), one pass over the tokens
        q = _load_rows(row + c_q, C, 1, K, 0, DQ, BLOCK_K, BLOCK_DQ)
        num = tl.zeros([BLOCK_K, BLOCK_DV], acc)
        z = tl.zeros([BLOCK_K], acc)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            valid_n = offs_n < N
            k = tl.load(k_ptr + b * stride_kb + offs_n[:, None] * stride_kn + offs_dq[None, :] * stride_kd,
                        mask=valid_n[:, None] & (offs_dq[None, :] < DQ), other=0.0)
            a = _softmax_over_slots(q, k, valid_k, scale)
            inside = valid_k[:, None] & valid_n[None, :]
            if STORE_ATTN:  # noqa: SIM102 (a compile-time branch around a runtime one)
                if it == n_iters - 1:
                    tl.store(attn_ptr + (b * K + offs_k[:, None]) * N + offs_n[None, :], a, mask=inside)
            w = tl.where(inside, a + eps, 0.0)
            z += tl.sum(w, axis=1)
            v = tl.load(v_ptr + b * stride_vb + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                        mask=valid_n[:, None] & (offs_dv[None, :] < DV), other=0.0)
            num += tl.dot(w, v, input_precision="ieee")
        u = num / tl.where(valid_k, z, 1.0)[:, None]
        _store_rows(row + c_u, C, K, 0, DV, u, BLOCK_K, BLOCK_DV)
        tl.store(row + c_norm + offs_k * C, z, mask=valid_k)
        tl.debug_barrier()
        # h = GRUCell(U, hidden) (or hidden + U)
        c_hid = c_x if HIDDEN_NORMED else c_s
        if HAS_GRU:
            for o0 in range(0, D, BLOCK_O):
                i_r = _matmul_rows(row + c_u, C, K, DV, w_ih_ptr, DV, 1, o0, D, BLOCK_K, BLOCK_O, BLOCK_C)
                i_z = _matmul_rows(row + c_u, C, K, DV, w_ih_ptr + D * DV, DV, 1, o0, D, BLOCK_K, BLOCK_O, BLOCK_C)
                i_n = _matmul_rows(row + c_u, C, K, DV, w_ih_ptr + 2 * D * DV, DV, 1, o0, D, BLOCK_K, BLOCK_O, BLOCK_C)
                h_r = _matmul_rows(row + c_hid, C, K, D, w_hh_ptr, D, 1, o0, D, BLOCK_K, BLOCK_O, BLOCK_C)
                h_z = _matmul_rows(row + c_hid, C, K, D, w_hh_ptr + D * D, D, 1, o0, D, BLOCK_K, BLOCK_O, BLOCK_C)
                h_n = _matmul_rows(row + c_hid, C, K, D, w_hh_ptr + 2 * D * D, D, 1, o0, D, BLOCK_K, BLOCK_O, BLOCK_C)
                if HAS_GRU_BIAS:
                    i_r += _load_vector(b_ih_ptr, o0, D, BLOCK_O)[None, :]
                    i_z += _load_vector(b_ih_ptr + D, o0, D, BLOCK_O)[None, :]
                    i_n += _load_vector(b_ih_ptr + 2 * D, o0, D, BLOCK_O)[None, :]
                    h_r += _load_vector(b_hh_ptr, o0, D, BLOCK_O)[None, :]
                    h_z += _load_vector(b_hh_ptr + D, o0, D, BLOCK_O)[None, :]
                    h_n += _load_vector(b_hh_ptr + 2 * D, o0, D, BLOCK_O)[None, :]
                r = tl.sigmoid(i_r + h_r)
                zg = tl.sigmoid(i_z + h_z)
                n = _tanh(i_n + r * h_n)
                hid = _load_rows(row + c_hid, C, 1, K, o0, D, BLOCK_K, BLOCK_O)
                _store_rows(row + c_r, C, K, o0, D, r, BLOCK_K, BLOCK_O)
                _store_rows(row + c_z, C, K, o0, D, zg, BLOCK_K, BLOCK_O)
                _store_rows(row + c_n, C, K, o0, D, n, BLOCK_K, BLOCK_O)
                _store_rows(row + c_hn, C, K, o0, D, h_n, BLOCK_K, BLOCK_O)
                _store_rows(row + c_h, C, K, o0, D, (1.0 - zg) * n + zg * hid, BLOCK_K, BLOCK_O)
        else:  # D == DV
            h = _load_rows(row + c_hid, C, 1, K, 0, D, BLOCK_K, BLOCK_D) + _load_rows(row + c_u, C, 1, K, 0, D, BLOCK_K, BLOCK_D)
            _store_rows(row + c_h, C, K, 0, D, h, BLOCK_K, BLOCK_D)
        tl.debug_barrier()
        # slots = h + MLP(LN(h)) (or h)
        if HAS_MLP:
            h = _load_rows(row + c_h, C, 1, K, 0, D, BLOCK_K, BLOCK_D)
            yhat, rstd_y = _normalise(h, D, ln_eps, BLOCK_D)
            y = yhat * _load_vector(mlp_norm_w_ptr, 0, D, BLOCK_D)[None, :] + _load_vector(mlp_norm_b_ptr, 0, D, BLOCK_D)[None, :]
            _store_rows(row + c_yh, C, K, 0, D, yhat, BLOCK_K, BLOCK_D)
            _store_rows(row + c_y, C, K, 0, D, y, BLOCK_K, BLOCK_D)
            tl.store(row + c_rsy + offs_k * C, rstd_y, mask=valid_k)
            tl.debug_barrier()
            for o0 in range(0, DH, BLOCK_O):
                a = _matmul_rows(row + c_y, C, K, D, w1_ptr, D, 1, o0, DH, BLOCK_K, BLOCK_O, BLOCK_C)
                a = tl.maximum(a + _load_vector(b1_ptr, o0, DH, BLOCK_O)[None, :], 0.0)
                _store_rows(row + c_a, C, K, o0, DH, a, BLOCK_K, BLOCK_O)
            tl.debug_barrier()
            for o0 in range(0, D, BLOCK_O):
                o = _matmul_rows(row + c_a, C, K, DH, w3_ptr, DH, 1, o0, D, BLOCK_K, BLOCK_O, BLOCK_C)
                o += _load_vector(b3_ptr, o0, D, BLOCK_O)[None, :] + _load_rows(row + c_h, C, 1, K, o0, D, BLOCK_K, BLOCK_O)
                _store_rows(out_b, D, K, o0, D, o, BLOCK_K, BLOCK_O)
        else:
            _store_rows(out_b, D, K, 0, D, _load_rows(row + c_h, C, 1, K, 0, D, BLOCK_K, BLOCK_D), BLOCK_K, BLOCK_D)
        tl.debug_barrier()


# ----------------------------------------------------------------------------------------- backward


@triton.jit
def _slot_attention_bwd_kernel(
    grad_slots_ptr, grad_attn_ptr, k_ptr, v_ptr,
    norm_w_ptr, wq_ptr, w_ih_ptr, w_hh_ptr, mlp_norm_w_ptr, w1_ptr, w3_ptr,
    act_ptr, dact_ptr, dslots_ptr, dk_ptr, dv_ptr,
    B, K, N, D, DQ, DV, DH, C, C2, n_iters, act_iters,
    stride_gb, stride_gk, stride_gd,
    stride_gab, stride_gak, stride_gan,
    stride_kb, stride_kn, stride_kd,
    stride_vb, stride_vn, stride_vd,
    scale: tl.float64, eps: tl.float64,
    HAS_GRU: tl.constexpr, HAS_MLP: tl.constexpr, HIDDEN_NORMED: tl.constexpr, HAS_GRAD_ATTN: tl.constexpr,
    IS_FP64: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DQ: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    acc = tl.float64 if IS_FP64 else tl.float32
    scale = tl.full([], scale, acc)
    eps = tl.full([], eps, acc)
    c_s, c_xh, c_x, c_q, c_u, c_r, c_z, c_n, c_hn, _, c_yh, _, c_a, c_rsx, c_norm, c_rsy, _ = _act_columns(
        D, DQ, DV, DH, HAS_GRU, HAS_MLP)
    c_ds, c_dh, c_dx, c_dq, c_dgi, c_dgh, c_da, c_dy, c_du, c_dhid, _ = _dact_columns(D, DQ, DV, DH, HAS_GRU, HAS_MLP)
    if not HAS_GRU:  # h = hidden + U: both gradients are dh's
        c_du = c_dh
        c_dhid = c_dh
    offs_k = tl.arange(0, BLOCK_K)
    offs_dq = tl.arange(0, BLOCK_DQ)
    offs_dv = tl.arange(0, BLOCK_DV)
    valid_k = offs_k < K
    c_hid = c_x if HIDDEN_NORMED else c_s
    # the iterations that kept their activations, last first
    for t in range(act_iters):
        j = act_iters - 1 - t
        row = act_ptr + (j * B + b) * K * C
        drow = dact_ptr + (j * B + b) * K * C2
        if t == 0:
            ds = _load_rows(grad_slots_ptr + b * stride_gb, stride_gk, stride_gd, K, 0, D, BLOCK_K, BLOCK_D)
            _store_rows(drow + c_ds, C2, K, 0, D, ds, BLOCK_K, BLOCK_D)
            tl.debug_barrier()
        # through slots = h + MLP(LN(h)); every product writes its output in chunks, read back whole after a
        # barrier: a whole-width product would hold (output columns per thread) x BLOCK_C weights in registers
        ds = _load_rows(drow + c_ds, C2, 1, K, 0, D, BLOCK_K, BLOCK_D)
        if HAS_MLP:
            for o0 in range(0, DH, BLOCK_O):
                da = _matmul_rows(drow + c_ds, C2, K, D, w3_ptr, 1, DH, o0, DH, BLOCK_K, BLOCK_O, BLOCK_C)
                a = _load_rows(row + c_a, C, 1, K, o0, DH, BLOCK_K, BLOCK_O)
                _store_rows(drow + c_da, C2, K, o0, DH, tl.where(a > 0, da, 0.0), BLOCK_K, BLOCK_O)
            tl.debug_barrier()
            for o0 in range(0, D, BLOCK_O):
                dy = _matmul_rows(drow + c_da, C2, K, DH, w1_ptr, 1, D, o0, D, BLOCK_K, BLOCK_O, BLOCK_C)
                _store_rows(drow + c_dy, C2, K, o0, D, dy, BLOCK_K, BLOCK_O)
            tl.debug_barrier()
            dy = _load_rows(drow + c_dy, C2, 1, K, 0, D, BLOCK_K, BLOCK_D)
            yhat = _load_rows(row + c_yh, C, 1, K, 0, D, BLOCK_K, BLOCK_D)
            rstd_y = _load_column(row + c_rsy, C, K, BLOCK_K)
            ds += _normalise_backward(dy * _load_vector(mlp_norm_w_ptr, 0, D, BLOCK_D)[None, :], yhat, rstd_y, D)
        _store_rows(drow + c_dh, C2, K, 0, D, ds, BLOCK_K, BLOCK_D)
        tl.debug_barrier()
        # through h = GRUCell(U, hidden): gradients of the gates' pre-activations, then of U and hidden
        if HAS_GRU:
            for o0 in range(0, D, BLOCK_O):
                dh = _load_rows(drow + c_dh, C2, 1, K, o0, D, BLOCK_K, BLOCK_O)
                r = _load_rows(row + c_r, C, 1, K, o0, D, BLOCK_K, BLOCK_O)
                zg = _load_rows(row + c_z, C, 1, K, o0, D, BLOCK_K, BLOCK_O)
                n = _load_rows(row + c_n, C, 1, K, o0, D, BLOCK_K, BLOCK_O)
                h_n = _load_rows(row + c_hn, C, 1, K, o0, D, BLOCK_K, BLOCK_O)
                hid = _load_rows(row + c_hid, C, 1, K, o0, D, BLOCK_K, BLOCK_O)
                dn = dh * (1.0 - zg) * (1.0 - n * n)
                dz = dh * (hid - n) * zg * (1.0 - zg)
                dr = dn * h_n * r * (1.0 - r)
                _store_rows(drow + c_dgi, C2, K, o0, D, dr, BLOCK_K, BLOCK_O)
                _store_rows(drow + c_dgi + D, C2, K, o0, D, dz, BLOCK_K, BLOCK_O)
                _store_rows(drow + c_dgi + 2 * D, C2, K, o0, D, dn, BLOCK_K, BLOCK_O)
                _store_rows(drow + c_dgh, C2, K, o0, D, dr, BLOCK_K, BLOCK_O)
                _store_rows(drow + c_dgh + D, C2, K, o0, D, dz, BLOCK_K, BLOCK_O)
                _store_rows(drow + c_dgh + 2 * D, C2, K, o0, D, dn * r, BLOCK_K, BLOCK_O)
            tl.debug_barrier()
            for o0 in range(0, DV, BLOCK_O):
                du = _matmul_rows(drow + c_dgi, C2, K, 3 * D, w_ih_ptr, 1, DV, o0, DV, BLOCK_K, BLOCK_O, BLOCK_C)
                _store_rows(drow + c_du, C2, K, o0, DV, du, BLOCK_K, BLOCK_O)
            for o0 in range(0, D, BLOCK_O):
                dhid = _matmul_rows(drow + c_dgh, C2, K, 3 * D, w_hh_ptr, 1, D, o0, D, BLOCK_K, BLOCK_O, BLOCK_C)
                dhid += _load_rows(drow + c_dh, C2, 1, K, o0, D, BLOCK_K, BLOCK_O) * _load_rows(row + c_z, C, 1, K, o0, D, BLOCK_K, BLOCK_O)
                _store_rows(drow + c_dhid, C2, K, o0, D, dhid, BLOCK_K, BLOCK_O)
            tl.debug_barrier()
        g = _load_rows(drow + c_du, C2, 1, K, 0, DV, BLOCK_K, BLOCK_DV)
        # through U, A = core(q, k, v): recompute A tile by tile; dk, dv add up over the iterations
        q = _load_rows(row + c_q, C, 1, K, 0, DQ, BLOCK_K, BLOCK_DQ)
        u = _load_rows(row + c_u, C, 1, K, 0, DV, BLOCK_K, BLOCK_DV)
        inv_z = 1.0 / tl.load(row + c_norm + offs_k * C, mask=valid_k, other=1.0)
        c = tl.sum(g * u, axis=1)
        g_over_z = g * inv_z[:, None]
        dq = tl.zeros([BLOCK_K, BLOCK_DQ], acc)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            valid_n = offs_n < N
            mask_nd = valid_n[:, None] & (offs_dq[None, :] < DQ)
            mask_ndv = valid_n[:, None] & (offs_dv[None, :] < DV)
            k = tl.load(k_ptr + b * stride_kb + offs_n[:, None] * stride_kn + offs_dq[None, :] * stride_kd,
                        mask=mask_nd, other=0.0)
            v = tl.load(v_ptr + b * stride_vb + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                        mask=mask_ndv, other=0.0)
            inside = valid_k[:, None] & valid_n[None, :]
            a = tl.where(inside, _softmax_over_slots(q, k, valid_k, scale), 0.0)
            w = tl.where(inside, a + eps, 0.0)
            dv = tl.dot(tl.trans(w), g_over_z, input_precision="ieee")
            da = (tl.dot(g, tl.trans(v), input_precision="ieee") - c[:, None]) * inv_z[:, None]
            if HAS_GRAD_ATTN:  # noqa: SIM102 (a compile-time branch around a runtime one)
                if t == 0:  # the masks are the last iteration's
                    da += tl.load(grad_attn_ptr + b * stride_gab + offs_k[:, None] * stride_gak + offs_n[None, :] * stride_gan,
                                  mask=inside, other=0.0)
            dl = a * (da - tl.sum(a * da, axis=0)[None, :]) * scale
            dk = tl.dot(tl.trans(dl), q, input_precision="ieee")
            dk_ptrs = dk_ptr + (b * N + offs_n[:, None]) * DQ + offs_dq[None, :]
            dv_ptrs = dv_ptr + (b * N + offs_n[:, None]) * DV + offs_dv[None, :]
            if t > 0:
                dk += tl.load(dk_ptrs, mask=mask_nd, other=0.0)
                dv += tl.load(dv_ptrs, mask=mask_ndv, other=0.0)
            tl.store(dk_ptrs, dk, mask=mask_nd)
            tl.store(dv_ptrs, dv, mask=mask_ndv)
            dq += tl.dot(dl, k, input_precision="ieee")
        _store_rows(drow + c_dq, C2, K, 0, DQ, dq, BLOCK_K, BLOCK_DQ)
        tl.debug_barrier()
        # through q = to_q(x) and x = LN(slots); the hidden state's share goes to x or to the slots
        for o0 in range(0, D, BLOCK_O):
            dx = _matmul_rows(drow + c_dq, C2, K, DQ, wq_ptr, 1, D, o0, D, BLOCK_K, BLOCK_O, BLOCK_C)
            if HIDDEN_NORMED:
                dx += _load_rows(drow + c_dhid, C2, 1, K, o0, D, BLOCK_K, BLOCK_O)
            _store_rows(drow + c_dx, C2, K, o0, D, dx, BLOCK_K, BLOCK_O)
        tl.debug_barrier()
        dx = _load_rows(drow + c_dx, C2, 1, K, 0, D, BLOCK_K, BLOCK_D)
        xhat = _load_rows(row + c_xh, C, 1, K, 0, D, BLOCK_K, BLOCK_D)
        rstd_x = _load_column(row + c_rsx, C, K, BLOCK_K)
        ds = _normalise_backward(dx * _load_vector(norm_w_ptr, 0, D, BLOCK_D)[None, :], xhat, rstd_x, D)
        if not HIDDEN_NORMED:
            ds += _load_rows(drow + c_dhid, C2, 1, K, 0, D, BLOCK_K, BLOCK_D)
        if j > 0:
            _store_rows(dact_ptr + ((j - 1) * B + b) * K * C2 + c_ds, C2, K, 0, D, ds, BLOCK_K, BLOCK_D)
        else:
            _store_rows(dslots_ptr + b * K * D, D, K, 0, D, ds, BLOCK_K, BLOCK_D)
        tl.debug_barrier()


# ------------------------------------------------------------------------------------------ launchers

def check_limits(K: int, D: int, Dq: int, Dv: int, fp64: bool = False) -> None:
    if not within_limits(K, max(D, Dq), Dv, fp64):
        raise ValueError(
            f"kdfast.kernels.slot_attention_iterations handles the core's limits (K <= {MAX_SLOTS}, widths <= "
            f"{MAX_DIM}, K x width <= {slot_tile_limit(fp64)} in {'float64' if fp64 else 'float32'}) for every "
            f"width, got K={K}, D={D}, Dq={Dq}, Dv={Dv}"
        )


def _geometry(K, D, Dq, Dv):
    """Block sizes and warps.

    The float32 dots are IEEE (FMA, not tensor cores: TF32 misses the 1e-5 tolerance), whose operands each
    thread holds whole, so small tiles keep the registers in bounds: compiled for sm_90 (Triton's ptxas, see
    tests/test_slot_attention.py) 16-token tiles and 16-column chunks at 8 warps spill nothing in the forward at
    movi-c and 40 bytes in the backward (328 at movi-e), where 64-token tiles spilled 4 KB. Still to be timed.
    """
    block_k, block_d, block_dq, block_dv = block_size(K), block_size(D), block_size(Dq), block_size(Dv)
    return {"BLOCK_K": block_k, "BLOCK_N": 16, "BLOCK_D": block_d, "BLOCK_DQ": block_dq, "BLOCK_DV": block_dv,
            "BLOCK_O": 32, "BLOCK_C": 16, "num_warps": 8}


def _widths(k, v, params):
    """(D, Dq, Dv, Dh, has a GRU, has an MLP) of one iteration, from k (B, N, Dq), v (B, N, Dv) and ``params``
    (PARAMETERS order; Dh = 0 without an MLP)."""
    p = dict(zip(PARAMETERS, params))
    gru, mlp = p["w_ih"] is not None, p["w1"] is not None
    return p["norm_w"].shape[0], k.shape[-1], v.shape[-1], p["w1"].shape[0] if mlp else 0, gru, mlp


def slot_attention_forward(slots, k, v, params, n_iters: int, scale: float, eps: float, ln_eps: float,
                           hidden_normed: bool, return_attn: bool, act_iters: int):
    """All iterations of a frame: (slots (B, K, D), attn (B, K, N) or (B, K, 0), act).

    slots (B, K, D), k (B, N, Dq), v (B, N, Dv): one dtype (float32 or float64), any strides. params: the
    iteration's parameters in PARAMETERS order, contiguous, in that dtype; w_ih None means no GRU, w1 None no
    MLP, bq / b_ih None no such bias. ``act`` (act_iters, B, K, C) holds the activations of the last
    ``act_iters`` iterations (1 when no backward follows, or gradients flow through the last iteration only;
    n_iters for gradients through all), in the columns of :func:`act_layout`.
    """
    (B, K, _), N = slots.shape, k.shape[1]
    p = dict(zip(PARAMETERS, params))
    D, Dq, Dv, Dh, gru, mlp = _widths(k, v, params)
    check_limits(K, D, Dq, Dv, is_fp64(slots.dtype))
    C = act_layout(k, v, params)["C"][0]
    dtype, device = slots.dtype, slots.device
    out = empty_output((B, K, D), dtype, device)
    attn = empty_output((B, K, N if return_attn else 0), dtype, device)
    act = empty_output((act_iters, B, K, C), dtype, device)
    with device_guard(slots):
        _slot_attention_fwd_kernel[(B,)](
            slots, k, v, *(slots if t is None else t for t in params), out, attn, act,
            B, K, N, D, Dq, Dv, Dh, C, n_iters, act_iters,
            *slots.stride(), *k.stride(), *v.stride(),
            float(scale), float(eps), float(ln_eps),
            HAS_Q_BIAS=p["bq"] is not None, HAS_GRU=gru, HAS_GRU_BIAS=p["b_ih"] is not None,
            HAS_MLP=mlp, HIDDEN_NORMED=hidden_normed, STORE_ATTN=return_attn,
            IS_FP64=is_fp64(dtype), **_geometry(K, D, Dq, Dv),
        )
    return out, attn, act


def slot_attention_backward(grad_slots, grad_attn, k, v, params, act, n_iters: int, scale: float, eps: float,
                            hidden_normed: bool):
    """(dslots, dk, dv, dact): the gradients of the slots entering the first iteration kept in ``act``, of
    k and v, and of every layer's output in those iterations, in the columns of :func:`dact_layout` (the
    parameters' gradients are products of ``act`` and ``dact`` columns, which the caller forms).

    grad_slots (B, K, D); grad_attn (B, K, N) or None: gradients of the forward's outputs.
    """
    act_iters, B, K, C = act.shape
    N = k.shape[1]
    p = dict(zip(PARAMETERS, params))
    D, Dq, Dv, Dh, gru, mlp = _widths(k, v, params)
    C2 = dact_layout(k, v, params)["C"][0]
    dtype, device = act.dtype, act.device
    dslots = empty_output((B, K, D), dtype, device)
    dk = empty_output((B, N, Dq), dtype, device)
    dv = empty_output((B, N, Dv), dtype, device)
    dact = empty_output((act_iters, B, K, C2), dtype, device)
    has_grad_attn = grad_attn is not None
    with device_guard(act):
        _slot_attention_bwd_kernel[(B,)](
            grad_slots, grad_attn if has_grad_attn else grad_slots, k, v,
            *(act if p[name] is None else p[name] for name in ("norm_w", "wq", "w_ih", "w_hh", "mlp_norm_w", "w1", "w3")),
            act, dact, dslots, dk, dv,
            B, K, N, D, Dq, Dv, Dh, C, C2, n_iters, act_iters,
            *grad_slots.stride(), *(grad_attn.stride() if has_grad_attn else (0, 0, 0)), *k.stride(), *v.stride(),
            float(scale), float(eps),
            HAS_GRU=gru, HAS_MLP=mlp, HIDDEN_NORMED=hidden_normed,
            HAS_GRAD_ATTN=has_grad_attn, IS_FP64=is_fp64(dtype), **_geometry(K, D, Dq, Dv),
        )
    return dslots, dk, dv, dact
