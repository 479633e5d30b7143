// CPU kernels of SlotContrast's slot-slot contrastive loss (design.md 3.2).
//
// For a pair of frames (t, t+1) and a group of S slots (all B*K with batch contrast, else the K of one batch
// element), on unit slots z: l[i, j] = <z_t^i, z_{t+1}^j> / temperature and loss[j] = logsumexp_i l[i, j] -
// l[j, j], computed as softplus(r[j]) with r[j] = logsumexp_{i != j} (l[i, j] - l[j, j]) (-inf when S == 1):
// when the positive dominates, the difference of two values ~1/temperature would cancel every digit of a
// loss ~exp(-1/temperature). The backward's p[j, j] - 1 is likewise -sigmoid(r[j]), and p[i, j] =
// sigmoid(r[j]) exp(l[i, j] - n[j]) for i != j, n[j] = logsumexp_{i != j} l[i, j] = l[j, j] + r[j].
//
// Every call first writes the unit slots once, row-major Z (T, N, dp) and transposed ZT (T, dp, np) (N = B*K;
// D and N zero-padded to whole vectors), so that every inner loop is a vector loop without tails. The logits
// are computed in tiles of 64 slots j at t+1 against all S slots i at t, (64, S), never the S x S matrix, by
// one register-blocked micro-kernel (8 rows x 2 vectors of multiply-adds) that also does the tile's products.
// - Forward: a tile row holds every i of its j, the diagonal included: one log-sum-exp per row.
// - Backward, per tile: G[j, i] = g_j (p[i, j] - [i == j]) / temperature as above, then
//   dz_{t+1}^j = sum_i G[j, i] z_t^i (complete within the tile) and dz_t^i += sum_j G[j, i] z_{t+1}^j, a sum
//   over tiles: each task (a fixed share, at most kMaxParts, of a pair's tiles) accumulates its own partial
//   dz_t, and a last pass adds them in task order, then applies the normalisation's backward. No atomics,
//   and the result does not depend on the number of threads.
// - Forward and backward in one pass (_slot_contrastive_loss_forward_backward): the backward's loop with r
//   taken from the tile and g = 1, for a mean or sum, whose upstream gradient is a constant: the
//   logits are formed once for both directions.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "../common.h"
#include "vec.h"

// Every helper a clone calls is always inlined (KDFAST_INLINE, csrc/common.h; the vectors in vec.h): a call out
// of a clone would run the baseline code.

namespace kdfast {
namespace {

using namespace vec;

// Multiply-adds per thread below which the OpenMP fork costs more than it saves.
constexpr int64_t kParallelWork = 1 << 15;
// Slots j at t+1 per logits tile (a tile is kTileRows x S), rows per register block of the micro-kernel, and
// rows of b per block of the tile-times-slots product (kBlockRows rows of D values stay in L1).
constexpr int64_t kTileRows = 64;
constexpr int kRows = 8;
constexpr int64_t kBlockRows = 128;
// Most tasks a pair's tiles are split into in the backward: each holds a partial dz_t of (S, dp), added up in
// task order at the end. Fixed, so that the result does not depend on the number of threads.
constexpr int64_t kMaxParts = 4;

int64_t grain(int64_t work_per_item) {
  return std::max<int64_t>(1, kParallelWork / std::max<int64_t>(1, work_per_item));
}


KDFAST_INLINE int64_t round_up(int64_t n, int64_t m) {
  return (n + m - 1) / m * m;
}

// log(1 + exp(r)) to full relative precision for tiny results (r -> -inf: 0) and without overflow for large r;
// NaN stays NaN.
template <typename T>
KDFAST_INLINE T softplus(T r) {
  return (r > T(0) ? r : T(0)) + std::log1p(std::exp(-std::abs(r)));
}

// 1 / (1 + exp(-r)) without overflow either way (r = -inf: 0); NaN stays NaN.
template <typename T>
KDFAST_INLINE T sigmoid(T r) {
  const T e = std::exp(-std::abs(r));
  return r >= T(0) ? T(1) / (T(1) + e) : e / (T(1) + e);
}


// The one micro-kernel, a register block of a matrix product: for r < rows (at most kRows) and the NV vectors
// from out[r]: out[r] = scale * sum_{s < n} a[r * a_row + s * a_col] * b[s * b_row] (+ out[r] when
// accumulating). Each step loads NV vectors of b and broadcasts kRows values of a: NV * kRows multiply-adds
// for kRows + NV loads. The a of all kRows rows must be readable, whatever `rows`. ROW_MAJOR_A fixes
// a_col = 1 (else a_row = 1), so that the compiler keeps acc in registers in a single loop.
template <typename T, int NV, bool ROW_MAJOR_A>
KDFAST_CPU_CLONES void micro(const T* a, int64_t a_stride, int64_t n, const T* b, int64_t b_row, T scale, T* out,
                             int64_t out_row, int rows, bool accumulate) {
  constexpr int64_t L = Vec<T>::lanes;
  vec_t<T> acc[kRows][NV] = {};
  for (int64_t s = 0; s < n; ++s) {
    vec_t<T> bv[NV];
    for (int v = 0; v < NV; ++v) {
      bv[v] = vload(b + s * b_row + v * L);
    }
    for (int r = 0; r < kRows; ++r) {
      const T w = ROW_MAJOR_A ? a[r * a_stride + s] : a[r + s * a_stride];
      for (int v = 0; v < NV; ++v) {
        acc[r][v] += w * bv[v];
      }
    }
  }
  // constant bounds, so that acc stays in registers
  for (int r = 0; r < kRows; ++r) {
    if (r < rows) {
      for (int v = 0; v < NV; ++v) {
        T* o = out + r * out_row + v * L;
        vstore(o, accumulate ? acc[r][v] * scale + vload(o) : acc[r][v] * scale);
      }
    }
  }
}

// out[r][0:width] (+)= scale * sum_{s < n} a[r, s] * b[s][0:width] for r < rows, width a multiple of the lanes,
// a[r, s] = a[r * a_stride + s] (ROW_MAJOR_A) or a[r + s * a_stride]: register blocks of kRows rows by two
// vectors (one for a last odd vector). Callers block n so that the rows of b they stream stay in L1.
template <bool ROW_MAJOR_A, typename T>
void product(const T* a, int64_t a_stride, int64_t rows, int64_t n, const T* b, int64_t b_row, int64_t width, T scale,
             T* out, int64_t out_row, bool accumulate) {
  constexpr int64_t L = Vec<T>::lanes;
  for (int64_t c = 0; c < width; c += 2 * L) {
    for (int64_t r = 0; r < rows; r += kRows) {
      const int valid = static_cast<int>(std::min<int64_t>(kRows, rows - r));
      const T* a_block = a + (ROW_MAJOR_A ? r * a_stride : r);
      if (c + L < width) {
        micro<T, 2, ROW_MAJOR_A>(a_block, a_stride, n, b + c, b_row, scale, out + r * out_row + c, out_row, valid,
                                 accumulate);
      } else {
        micro<T, 1, ROW_MAJOR_A>(a_block, a_stride, n, b + c, b_row, scale, out + r * out_row + c, out_row, valid,
                                 accumulate);
      }
    }
  }
}

// Row j of a logits tile (cols values, readable up to a whole vector past them) whose positive is at
// `diagonal`, in place: row[i] = exp(l[i, j] - m) for the negatives i != j, m their largest logit, and 0 on the
// diagonal and the padding up to a whole vector. Returns r = (m - l[j, j]) + log(sum) (-inf without negatives,
// NaN where any value is NaN) and the sum. m - l[j, j] is a logit difference, like the shifted logits
// l[i, j] - l[j, j] of the definition; only the final softplus(r) turns it into the loss.
template <typename T>
KDFAST_INLINE T shifted_negatives(T* row, int64_t cols, int64_t diagonal, T& sum) {
  constexpr int64_t L = Vec<T>::lanes;
  constexpr T minus_inf = -std::numeric_limits<T>::infinity();
  const int64_t padded = round_up(cols, L);
  const T positive = row[diagonal];
  for (int64_t c = cols; c < padded; ++c) {
    row[c] = minus_inf;
  }
  row[diagonal] = minus_inf;
  vec_t<T> vm = vload(row);
  for (int64_t c = L; c < padded; c += L) {
    const vec_t<T> v = vload(row + c);
    vm = v > vm ? v : vm;
  }
  const T m = hmax<T>(vm);
  // no finite negative: shift by 0, so that exp(-inf) gives 0 (and a NaN stays NaN) rather than exp(NaN)
  const vec_t<T> shift = vsplat(m == minus_inf ? T(0) : m);
  vec_t<T> total = {};
  for (int64_t c = 0; c < padded; c += L) {
    const vec_t<T> e = vexp(vload(row + c) - shift);
    total += e;
    vstore(row + c, e);
  }
  sum = hsum<T>(total);
  return sum == T(0) ? minus_inf : (m - positive) + std::log(sum);
}

// r of row j of a logits tile (see shifted_negatives; the row is overwritten).
template <typename T>
KDFAST_CPU_CLONES T row_log_odds(T* row, int64_t cols, int64_t diagonal) {
  T sum;
  return shifted_negatives(row, cols, diagonal, sum);
}

// Row j of a logits tile, in place: r, and row = g (softmax(row) - [c == diagonal]), the gradient of
// g * softplus(r): g sigmoid(r) exp(l[i, j] - l[j, j] - r) off the diagonal, -g sigmoid(r) on it, 0 on the
// padding up to a whole vector. Returns r. One exp per value.
template <typename T>
KDFAST_CPU_CLONES T row_loss_grad(T* row, int64_t cols, int64_t diagonal, T g) {
  constexpr int64_t L = Vec<T>::lanes;
  T sum;
  const T r = shifted_negatives(row, cols, diagonal, sum);
  const T weight = g * sigmoid(r);
  // exp(l - l[j, j] - r) = row / sum; without negatives the row is 0 and so is the weight
  const vec_t<T> scale = vsplat(sum > T(0) ? weight / sum : T(0));
  for (int64_t c = 0; c < round_up(cols, L); c += L) {
    vstore(row + c, scale * vload(row + c));
  }
  row[diagonal] = -weight;
  return r;
}

// weight * (exp(row - shift) [c != diagonal] - [c == diagonal]) for c < cols, 0 on the padding up to a whole
// vector: shift the negatives' log-sum-exp, weight g sigmoid(r).
template <typename T>
KDFAST_CPU_CLONES void row_softmax_grad(T* row, int64_t cols, int64_t diagonal, T shift, T weight) {
  constexpr int64_t L = Vec<T>::lanes;
  const int64_t padded = round_up(cols, L);
  if (shift == -std::numeric_limits<T>::infinity()) {
    std::fill(row, row + padded, T(0));  // no negatives (S == 1)
  } else {
    // the positive out before exp: l[j, j] - shift = -r may overflow
    row[diagonal] = -std::numeric_limits<T>::infinity();
    for (int64_t c = 0; c < padded; c += L) {
      vstore(row + c, weight * vexp(vload(row + c) - shift));
    }
    for (int64_t c = cols; c < padded; ++c) {
      row[c] = T(0);
    }
  }
  row[diagonal] = -weight;
}

// Sizes of one call. Slot n = b*K + k of frame t; group g holds the slots [g*S, (g+1)*S).
struct Geometry {
  int64_t B, T, K, D, N, S, groups, dp, np, tiles, tile_row;
};

template <typename T>
Geometry make_geometry(const at::Tensor& slots, bool batch_contrast) {
  constexpr int64_t L = Vec<T>::lanes;
  Geometry g;
  g.B = slots.size(0);
  g.T = slots.size(1);
  g.K = slots.size(2);
  g.D = slots.size(3);
  g.N = g.B * g.K;
  g.S = batch_contrast ? g.N : g.K;
  g.groups = batch_contrast ? 1 : g.B;
  g.dp = round_up(g.D, L);
  // the last vector of a group's columns may read a vector past the group's end
  g.np = round_up(g.N, L) + L;
  g.tiles = (g.S + kTileRows - 1) / kTileRows;
  g.tile_row = round_up(g.S, L);
  return g;
}

// Scratch memory left uninitialised (every element a kernel reads is written first). Buffers up to
// kCachedBytes are kept per thread between calls, grow-only: a fresh allocation of that size would come from
// new pages, whose first-touch faults cost ~10% of a small loss's time. At SlotContrast's presets a thread
// keeps ~12 MB (movi-e); at most kScratchSlots * kCachedBytes. `slot` names the buffer.
constexpr int64_t kCachedBytes = 8 << 20;
constexpr int kScratchSlots = 7;

template <typename T>
class Buffer {
 public:
  Buffer(int slot, int64_t n) {
    thread_local std::unique_ptr<T[]> cached[kScratchSlots];
    thread_local int64_t cached_size[kScratchSlots] = {};
    if (n * static_cast<int64_t>(sizeof(T)) > kCachedBytes) {
      owned_.reset(new T[n]);
      data_ = owned_.get();
      return;
    }
    if (cached_size[slot] < n) {
      cached[slot].reset(new T[n]);
      cached_size[slot] = n;
    }
    data_ = cached[slot].get();
  }
  T* data() { return data_; }
  const T* data() const { return data_; }
  T& operator[](int64_t i) { return data_[i]; }
  const T& operator[](int64_t i) const { return data_[i]; }

 private:
  T* data_;
  std::unique_ptr<T[]> owned_;
};

// z = x / max(||x||, eps) into dp values (zero-padded past D); returns ||x||.
template <typename scalar_t, typename T>
KDFAST_CPU_CLONES T unit_row(const scalar_t* x, int64_t D, int64_t dp, T eps, T* z) {
  constexpr int64_t L = Vec<T>::lanes;
  for (int64_t d = 0; d < dp; ++d) {
    z[d] = d < D ? static_cast<T>(x[d]) : T(0);
  }
  vec_t<T> ss = {};
  for (int64_t d = 0; d < dp; d += L) {
    const vec_t<T> v = vload(z + d);
    ss += v * v;
  }
  const T norm = std::sqrt(hsum<T>(ss));
  const T clamped = clamp_eps(norm, eps);
  for (int64_t d = 0; d < dp; ++d) {
    z[d] = z[d] / clamped;
  }
  return norm;
}

// The gradient of one slot from its dz, the sum of `count` buffers dz[0], dz[stride], ... then of `extra` (if
// not null), in that order: the backward of z = s / max(||s||, eps),
// ds = (dz - [||s|| >= eps] <dz, z> z) / max(||s||, eps). The norm term is skipped, not multiplied by 0, where
// the clamp is active (torch's where(): a NaN there stays out). sum: dp values of scratch.
template <typename T, typename OutT>
KDFAST_CPU_CLONES void slot_grad(const T* dz, int64_t stride, int64_t count, const T* extra, const T* z, T norm,
                                 T eps, int64_t D, int64_t dp, T* sum, OutT* out) {
  constexpr int64_t L = Vec<T>::lanes;
  for (int64_t d = 0; d < dp; d += L) {
    vec_t<T> v = {};
    for (int64_t k = 0; k < count; ++k) {
      v += vload(dz + k * stride + d);
    }
    if (extra != nullptr) {
      v += vload(extra + d);
    }
    vstore(sum + d, v);
  }
  T projection = 0;
  if (norm >= eps) {
    vec_t<T> p = {};
    for (int64_t d = 0; d < dp; d += L) {
      p += vload(sum + d) * vload(z + d);
    }
    projection = hsum<T>(p);
  }
  const T clamped = clamp_eps(norm, eps);
  for (int64_t d = 0; d < D; ++d) {
    out[d] = static_cast<OutT>((sum[d] - projection * z[d]) / clamped);
  }
}

// Unit slots of one call: row-major Z (T, N, dp) and transposed ZT (T, dp, np), zero-padded, and the norms
// (T, N). Z has kRows spare zero rows: a register block may read past the last slot.
template <typename T>
struct UnitSlots {
  Buffer<T> Z, ZT, norms;

  template <typename scalar_t>
  UnitSlots(const scalar_t* x, const Geometry& g, T eps)
      : Z(0, (g.T * g.N + kRows) * g.dp), ZT(1, g.T * g.dp * g.np), norms(2, g.T * g.N) {
    constexpr int64_t L = Vec<T>::lanes;
    at::parallel_for(0, g.T * g.N, grain(3 * g.D), [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t t = item / g.N, n = item % g.N;
        const scalar_t* src = x + ((n / g.K * g.T + t) * g.K + n % g.K) * g.D;
        norms[t * g.N + n] = unit_row(src, g.D, g.dp, eps, Z.data() + (t * g.N + n) * g.dp);
      }
    });
    std::fill(Z.data() + g.T * g.N * g.dp, Z.data() + (g.T * g.N + kRows) * g.dp, T(0));
    // ZT by blocks of L slots: a block writes one cache line of each of its dp rows, which stay in L1
    const int64_t blocks = g.np / L;
    at::parallel_for(0, g.T * blocks, grain(L * g.dp), [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t t = item / blocks, n0 = item % blocks * L;
        T* out = ZT.data() + t * g.dp * g.np + n0;
        for (int64_t i = 0; i < L; ++i) {
          if (n0 + i < g.N) {
            const T* z = Z.data() + (t * g.N + n0 + i) * g.dp;
            for (int64_t d = 0; d < g.dp; ++d) {
              out[d * g.np + i] = z[d];
            }
          } else {
            for (int64_t d = 0; d < g.dp; ++d) {
              out[d * g.np + i] = T(0);
            }
          }
        }
      }
    });
  }
};

// The logits tile of pair t, group `group`: tile[j][i] = l[i, j0 + j] = <z_t^i, z_{t+1}^{j0+j}> / temperature
// for j < rows, i < S (and up to a whole vector past S).
template <typename T>
void logits_tile(const Geometry& g, const T* Z, const T* ZT, int64_t t, int64_t group, int64_t j0, int64_t rows,
                 T inv_tau, T* tile) {
  const T* next = Z + ((t + 1) * g.N + group * g.S + j0) * g.dp;
  const T* columns = ZT + t * g.dp * g.np + group * g.S;
  product<true>(next, g.dp, rows, g.dp, columns, g.np, g.tile_row, inv_tau, tile, g.tile_row, false);
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_impl(const at::Tensor& slots, double temperature,
                                                            bool batch_contrast, double eps) {
  using T = acc_t<scalar_t>;
  const Geometry g = make_geometry<T>(slots, batch_contrast);
  const auto acc_options = slots.options().dtype(acc_dtype(slots.scalar_type()));
  auto losses = empty_output({g.T - 1, g.N}, acc_options);
  auto log_odds = empty_output({g.T - 1, g.N}, acc_options);
  auto negatives_lse = empty_output({g.T - 1, g.N}, acc_options);
  if (g.T == 1) {
    return {losses, log_odds, negatives_lse};
  }
  const UnitSlots<T> unit(slots.const_data_ptr<scalar_t>(), g, static_cast<T>(eps));
  const T* Z = unit.Z.data();
  const T* ZT = unit.ZT.data();

  const T inv_tau = static_cast<T>(1.0 / temperature);
  T* loss_ptr = losses.mutable_data_ptr<T>();
  T* log_odds_ptr = log_odds.mutable_data_ptr<T>();
  T* negatives_ptr = negatives_lse.mutable_data_ptr<T>();
  const int64_t tile_work = std::min(kTileRows, g.S) * g.S * g.dp;
  at::parallel_for(0, (g.T - 1) * g.groups * g.tiles, grain(tile_work), [&](int64_t begin, int64_t end) {
    Buffer<T> tile(5, kTileRows * g.tile_row);
    std::fill(tile.data(), tile.data() + kTileRows * g.tile_row, T(0));  // rows past a short tile: finite
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / (g.groups * g.tiles), group = item / g.tiles % g.groups;
      const int64_t j0 = item % g.tiles * kTileRows, rows = std::min(kTileRows, g.S - j0);
      logits_tile(g, Z, ZT, t, group, j0, rows, inv_tau, tile.data());
      for (int64_t j = 0; j < rows; ++j) {
        T* row = tile.data() + j * g.tile_row;
        const T diagonal = row[j0 + j];
        const T r = row_log_odds(row, g.S, j0 + j);
        const int64_t n = group * g.S + j0 + j;
        loss_ptr[t * g.N + n] = softplus(r);
        log_odds_ptr[t * g.N + n] = r;
        negatives_ptr[t * g.N + n] = diagonal + r;
      }
    }
  });
  return {losses, log_odds, negatives_lse};
}

// The gradient with respect to the slots of sum_{t, j} g_{t,j} loss_{t,j}, into out (B, T, K, D) of type OutT.
// With log_odds == nullptr, r comes from the tile (it holds every i of its rows) and the losses are written
// too: the forward and the backward in one pass, for a loss whose upstream gradient is known when the forward
// runs (a mean or sum: g constant). Else log_odds and negatives_lse are the forward's and g comes from the
// upstream grad.
template <typename scalar_t, typename OutT, typename GradFn>
void gradient(const at::Tensor& slots, const Geometry& g, double temperature, double eps,
              const acc_t<scalar_t>* log_odds, const acc_t<scalar_t>* negatives_lse, GradFn upstream,
              acc_t<scalar_t>* losses, OutT* out_ptr) {
  using T = acc_t<scalar_t>;
  const UnitSlots<T> unit(slots.const_data_ptr<scalar_t>(), g, static_cast<T>(eps));
  const T* Z = unit.Z.data();
  const T* ZT = unit.ZT.data();
  const T inv_tau = static_cast<T>(1.0 / temperature);
  const int64_t parts = std::min(g.tiles, kMaxParts);
  // dz_t of pair t from each part's tiles, and dz_{t+1} of pair t (complete within each tile)
  Buffer<T> partial(3, (g.T - 1) * parts * g.N * g.dp), dz_next(4, (g.T - 1) * g.N * g.dp);
  const int64_t part_work = 3 * std::min(kTileRows, g.S) * g.S * g.dp * g.tiles / parts;

  at::parallel_for(0, (g.T - 1) * g.groups * parts, grain(part_work), [&](int64_t begin, int64_t end) {
    // kRows spare values: a register block of the transposed product reads kRows columns past the last
    Buffer<T> tile(5, kTileRows * g.tile_row + kRows);
    std::fill(tile.data(), tile.data() + kTileRows * g.tile_row + kRows, T(0));  // rows past a short tile: finite
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / (g.groups * parts), group = item / parts % g.groups, part = item % parts;
      const int64_t base = group * g.S;  // first slot of the group
      T* dz = partial.data() + ((t * parts + part) * g.N + base) * g.dp;
      const T* frame = Z + (t * g.N + base) * g.dp;  // the slots i at t
      const T* next = Z + ((t + 1) * g.N + base) * g.dp;  // the slots j at t+1
      const int64_t first = part * g.tiles / parts, last = (part + 1) * g.tiles / parts;
      for (int64_t tile_index = first; tile_index < last; ++tile_index) {
        const int64_t j0 = tile_index * kTileRows, rows = std::min(kTileRows, g.S - j0);
        logits_tile(g, Z, ZT, t, group, j0, rows, inv_tau, tile.data());
        // G[j, i] = g_j (p[i, j] - [i == j]) / temperature, in place
        for (int64_t j = 0; j < rows; ++j) {
          const int64_t n = base + j0 + j;
          T* row = tile.data() + j * g.tile_row;
          const T gj = upstream(t, n) * inv_tau;
          if (log_odds == nullptr) {
            losses[t * g.N + n] = softplus(row_loss_grad(row, g.S, j0 + j, gj));
          } else {
            const T weight = gj * sigmoid(log_odds[t * g.N + n]);
            row_softmax_grad(row, g.S, j0 + j, negatives_lse[t * g.N + n], weight);
          }
        }
        // dz_{t+1}^j = sum_i G[j, i] z_t^i, over blocks of i that stay in L1
        T* dz_j = dz_next.data() + (t * g.N + base + j0) * g.dp;
        for (int64_t i0 = 0; i0 < g.S; i0 += kBlockRows) {
          product<true>(tile.data() + i0, g.tile_row, rows, std::min(kBlockRows, g.S - i0), frame + i0 * g.dp, g.dp,
                        g.dp, T(1), dz_j, g.dp, i0 > 0);
        }
        // dz_t^i += sum_j G[j, i] z_{t+1}^j over this tile's j
        product<false>(tile.data(), g.tile_row, g.S, rows, next + j0 * g.dp, g.dp, g.dp, T(1), dz, g.dp,
                       tile_index > first);
      }
    }
  });

  // dz of every slot (its buffers added in a fixed order), then the normalisation's backward
  const T e = static_cast<T>(eps);
  at::parallel_for(0, g.T * g.N, grain((parts + 3) * g.dp), [&](int64_t begin, int64_t end) {
    Buffer<T> sum(6, g.dp);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t u = item / g.N, n = item % g.N;
      // the frame's dz_t parts (none for the last frame), then dz_{t+1} of the pair before (none for the first)
      const T* parts_u = partial.data() + (u < g.T - 1 ? (u * parts * g.N + n) * g.dp : 0);
      const T* before = u > 0 ? dz_next.data() + ((u - 1) * g.N + n) * g.dp : nullptr;
      slot_grad(parts_u, g.N * g.dp, u < g.T - 1 ? parts : int64_t(0), before, Z + (u * g.N + n) * g.dp,
                unit.norms[u * g.N + n], e, g.D, g.dp, sum.data(),
                out_ptr + ((n / g.K * g.T + u) * g.K + n % g.K) * g.D);
    }
  });
}

template <typename scalar_t>
at::Tensor backward_impl(const at::Tensor& grad_losses, const at::Tensor& slots, const at::Tensor& log_odds_,
                         const at::Tensor& negatives_lse_, double temperature, bool batch_contrast, double eps,
                         double grad_scale) {
  using T = acc_t<scalar_t>;
  const Geometry g = make_geometry<T>(slots, batch_contrast);
  auto grad_slots = empty_output(slots.sizes(), slots.options());
  if (g.T == 1) {
    return grad_slots.zero_();
  }
  // Read through strides: the gradient of a mean or sum arrives expanded (stride 0).
  const auto grad = grad_losses.to(acc_dtype(slots.scalar_type()));
  const T* g_ptr = grad.const_data_ptr<T>();
  const int64_t gs0 = grad.stride(0), gs1 = grad.stride(1), gs2 = grad.stride(2), K = g.K;
  const T scale = static_cast<T>(grad_scale);
  const auto upstream = [=](int64_t t, int64_t n) { return g_ptr[t * gs0 + n / K * gs1 + n % K * gs2] * scale; };
  const auto log_odds = log_odds_.contiguous();
  const auto negatives_lse = negatives_lse_.contiguous();
  gradient<scalar_t>(slots, g, temperature, eps, log_odds.const_data_ptr<T>(), negatives_lse.const_data_ptr<T>(),
                     upstream, static_cast<T*>(nullptr), grad_slots.mutable_data_ptr<scalar_t>());
  return grad_slots;
}

// Forward and gradient in one pass: (losses, grad) where grad is the gradient of sum(losses) with respect
// to the slots, in the accumulator dtype: a mean or sum's backward is then grad times a scalar.
template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> forward_backward_impl(const at::Tensor& slots, double temperature,
                                                         bool batch_contrast, double eps) {
  using T = acc_t<scalar_t>;
  const Geometry g = make_geometry<T>(slots, batch_contrast);
  const auto acc_options = slots.options().dtype(acc_dtype(slots.scalar_type()));
  auto losses = empty_output({g.T - 1, g.N}, acc_options);
  auto grad = empty_output(slots.sizes(), acc_options);
  if (g.T == 1) {
    return {losses, grad.zero_()};
  }
  const auto upstream = [](int64_t, int64_t) { return T(1); };
  gradient<scalar_t>(slots, g, temperature, eps, static_cast<const T*>(nullptr), static_cast<const T*>(nullptr),
                     upstream, losses.mutable_data_ptr<T>(), grad.mutable_data_ptr<T>());
  return {losses, grad};
}

void check_slots(const at::Tensor& slots, double temperature, double eps) {
  check_input(slots, "slots", 4, at::kCPU);
  check_eps(eps);
  TORCH_CHECK(temperature > 0 && temperature < std::numeric_limits<double>::infinity(),
              "temperature must be finite and positive, got ", temperature);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_kernel(const at::Tensor& slots_, double temperature,
                                                              bool batch_contrast, double eps) {
  check_slots(slots_, temperature, eps);
  const auto slots = slots_.contiguous();
  std::tuple<at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, slots.scalar_type(), "_slot_contrastive_loss_forward", [&] {
    out = forward_impl<scalar_t>(slots, temperature, batch_contrast, eps);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> forward_backward_kernel(const at::Tensor& slots_, double temperature,
                                                           bool batch_contrast, double eps) {
  check_slots(slots_, temperature, eps);
  const auto slots = slots_.contiguous();
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, slots.scalar_type(), "_slot_contrastive_loss_forward_backward",
                                  [&] { out = forward_backward_impl<scalar_t>(slots, temperature, batch_contrast, eps); });
  return out;
}

// A per-column statistic of the forward: (T-1, B*K) in the accumulator dtype.
void check_column_stats(const at::Tensor& stats, const char* name, const at::Tensor& slots) {
  const int64_t B = slots.size(0), T = slots.size(1), K = slots.size(2);
  check_input(stats, name, 2, at::kCPU);
  TORCH_CHECK(stats.scalar_type() == acc_dtype(slots.scalar_type()), name, " must have the accumulator dtype ",
              acc_dtype(slots.scalar_type()), ", got ", stats.scalar_type());
  TORCH_CHECK(stats.size(0) == T - 1 && stats.size(1) == B * K, name, " must have shape (T-1,B*K) = ",
              at::IntArrayRef{T - 1, B * K}, ", got ", stats.sizes());
}

at::Tensor backward_kernel(const at::Tensor& grad_losses, const at::Tensor& slots_, const at::Tensor& log_odds,
                           const at::Tensor& negatives_lse, double temperature, bool batch_contrast, double eps,
                           double grad_scale) {
  check_slots(slots_, temperature, eps);
  const int64_t B = slots_.size(0), T = slots_.size(1), K = slots_.size(2);
  check_input(grad_losses, "grad_losses", 3, at::kCPU);
  TORCH_CHECK(grad_losses.size(0) == T - 1 && grad_losses.size(1) == B && grad_losses.size(2) == K,
              "grad_losses must have shape (T-1,B,K) = ", at::IntArrayRef{T - 1, B, K}, ", got ", grad_losses.sizes());
  check_column_stats(log_odds, "log_odds", slots_);
  check_column_stats(negatives_lse, "negatives_lse", slots_);
  const auto slots = slots_.contiguous();
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, slots.scalar_type(), "_slot_contrastive_loss_backward", [&] {
    out = backward_impl<scalar_t>(grad_losses, slots, log_odds, negatives_lse, temperature, batch_contrast, eps,
                                  grad_scale);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("_slot_contrastive_loss_forward", TORCH_FN(forward_kernel));
  m.impl("_slot_contrastive_loss_backward", TORCH_FN(backward_kernel));
  m.impl("_slot_contrastive_loss_forward_backward", TORCH_FN(forward_backward_kernel));
}

}  // namespace kdfast
