// CPU kernels of the slot attention core (design.md 3.1): one pass over the N tokens each way.
//
// Per batch element, tokens are taken in tiles of kTile. The products of a tile with a long inner dimension run
// in the BLAS that torch links (MKL or OpenBLAS: its Fortran sgemm_/dgemm_), called directly, so they cost what a
// GEMM of that size costs and nothing of the dispatcher; those over the K slots (dv, dk) in register-blocked
// loops (a BLAS call spends more packing their operands than computing them). Everything elementwise between them
// is one fused pass over the (K, tile) block while it is in cache, with one vector lane per token (the softmax
// runs over the K slots).
//   forward:  L = q k_tile^T; W = softmax_slots(s L) + eps, Z += sum_t W (and the masks stored);
//             numerator += W v_tile.
//   backward: the attention is recomputed from q and k (nothing of size (K, N) is saved): L = q k_tile^T,
//             P = G v_tile^T; then dL and W / Z in one pass; dv_tile = (W / Z)^T G, dk_tile = dL^T q,
//             dq += dL k_tile.
// Where torch exports no such BLAS (or KDFAST_CPU_BLAS=0), every product runs in the register-blocked loops.
//
// Threads take (batch element, tile) pairs. The partial sums of a tile (numerator and Z forward, dq backward)
// go to their own slot of a buffer and are added up tile by tile in order at the end, and each BLAS call runs
// on one thread, so the result has one summation order whatever the number of threads: the same bits on
// every run.
//
// float16/bfloat16 inputs are computed in float32 (converted once here); float64 in float64.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "../common.h"
#include "vec.h"

// The BLAS inside libtorch_cpu (LP64 Fortran interface, as torch's own CPUBlas calls it). Weak: a torch that
// does not export them still loads this library, and the portable products are used instead.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
// MKL only (its C entry point): the BLAS thread count of the calling thread (returns the previous one; 0 means the global one).
int MKL_Set_Num_Threads_Local(int nt) __attribute__((weak));
}

namespace kdfast {
namespace {

using namespace vec;

// Tokens per tile, and per work item: a whole number of vectors of float and double, fixed so that partial
// sums do not depend on the thread count. Wide enough that the per-call cost of the BLAS is small against
// the product, small enough that the (K, tile) blocks stay in L1/L2.
constexpr int64_t kTile = 256;
// Products whose inner dimension is at most this (dv and dk: the K slots) run in product(): a BLAS call
// spends more on packing than such a product costs.
constexpr int64_t kSmallInner = 16;

// KDFAST_CPU_BLAS=0 uses the portable products even where torch exports a BLAS (read once).
inline bool blas_disabled() {
  static const bool off = [] {
    const char* v = std::getenv("KDFAST_CPU_BLAS");
    return v != nullptr && std::strcmp(v, "0") == 0;
  }();
  return off;
}

inline bool have_blas(float*) {
  return sgemm_ != nullptr && !blas_disabled();
}
inline bool have_blas(double*) {
  return dgemm_ != nullptr && !blas_disabled();
}

inline void blas_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
                      const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
                      const int* ldc) {
  sgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
inline void blas_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k, const double* alpha,
                      const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
                      const int* ldc) {
  dgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// Inside a work item the BLAS runs on the calling thread only: the work is already spread over the threads,
// and a BLAS that splits a product differently with more threads would make the bits depend on the count.
class SingleThreadedBlas {
 public:
  SingleThreadedBlas() : previous_(MKL_Set_Num_Threads_Local != nullptr ? MKL_Set_Num_Threads_Local(1) : 0) {}
  ~SingleThreadedBlas() {
    if (MKL_Set_Num_Threads_Local != nullptr) {
      MKL_Set_Num_Threads_Local(previous_);
    }
  }
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;

 private:
  int previous_;
};

// One register block of product: R rows by NV whole vectors of columns.
template <typename T, int R, int NV>
KDFAST_INLINE void product_block(const T* a, int64_t ar, int64_t as, const T* b, int64_t ldb, int64_t S, T* out,
                                 int64_t ldo, bool accumulate) {
  constexpr int64_t V = Vec<T>::lanes;
  vec_t<T> acc[R][NV] = {};
  for (int64_t s = 0; s < S; ++s) {
    vec_t<T> bv[NV];
    for (int j = 0; j < NV; ++j) {
      bv[j] = vload(b + s * ldb + j * V);
    }
    for (int r = 0; r < R; ++r) {
      const vec_t<T> w = vsplat(a[r * ar + s * as]);
      for (int j = 0; j < NV; ++j) {
        acc[r][j] += w * bv[j];
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < NV; ++j) {
      T* o = out + r * ldo + j * V;
      vstore(o, accumulate ? vload(o) + acc[r][j] : acc[r][j]);
    }
  }
}

// The rows < R left below a whole block of R, as one block of that height (the slots left after blocks of
// four are a good share of K = 7 to 15).
template <typename T, int R, int NV>
KDFAST_INLINE void rest_rows(int64_t rows, const T* a, int64_t ar, int64_t as, const T* b, int64_t ldb, int64_t S,
                             T* out, int64_t ldo, bool accumulate) {
  if constexpr (R > 1) {
    if (rows == R - 1) {
      product_block<T, R - 1, NV>(a, ar, as, b, ldb, S, out, ldo, accumulate);
    } else if (rows > 0) {
      rest_rows<T, R - 1, NV>(rows, a, ar, as, b, ldb, S, out, ldo, accumulate);
    }
  }
}

// out[r, c] = (out[r, c] if accumulate else 0) + sum_{s < S} a[r * ar + s * as] * b[s * ldb + c], r < M, c < C.
// Register blocks of 4 rows by 4 vectors (each vector of b loaded serves 4 rows), then 8 rows by one vector for
// narrow products; columns past the last whole vector one by one (b is never read past column C).
template <typename T>
KDFAST_CPU_CLONES void product(const T* a, int64_t ar, int64_t as, const T* b, int64_t ldb, int64_t M, int64_t S,
                               int64_t C, T* out, int64_t ldo, bool accumulate) {
  constexpr int64_t V = Vec<T>::lanes;
  const int64_t vector_cols = C / V * V;
  int64_t c0 = 0;
  for (; c0 + 4 * V <= vector_cols; c0 += 4 * V) {
    int64_t r0 = 0;
    for (; r0 + 4 <= M; r0 += 4) {
      product_block<T, 4, 4>(a + r0 * ar, ar, as, b + c0, ldb, S, out + r0 * ldo + c0, ldo, accumulate);
    }
    rest_rows<T, 4, 4>(M - r0, a + r0 * ar, ar, as, b + c0, ldb, S, out + r0 * ldo + c0, ldo, accumulate);
  }
  for (; c0 < vector_cols; c0 += V) {
    int64_t r0 = 0;
    for (; r0 + 8 <= M; r0 += 8) {
      product_block<T, 8, 1>(a + r0 * ar, ar, as, b + c0, ldb, S, out + r0 * ldo + c0, ldo, accumulate);
    }
    rest_rows<T, 8, 1>(M - r0, a + r0 * ar, ar, as, b + c0, ldb, S, out + r0 * ldo + c0, ldo, accumulate);
  }
  for (int64_t r = 0; r < M; ++r) {
    for (int64_t c = vector_cols; c < C; ++c) {
      T total = accumulate ? out[r * ldo + c] : T(0);
      for (int64_t s = 0; s < S; ++s) {
        total += a[r * ar + s * as] * b[s * ldb + c];
      }
      out[r * ldo + c] = total;
    }
  }
}

// Row-major out (M, C) = op(a) (M, S) op(b) (S, C), op(x) = x^T where its flag is set (a transposed is stored
// (S, M), b transposed (C, S)). The BLAS takes the products with a long inner dimension; those over the K slots
// (dv and dk) cost less than its packing and run in product(). scratch (S * C) holds b^T for product().
template <typename T>
void matmul(const T* a, int64_t lda, bool ta, const T* b, int64_t ldb, bool tb, int64_t M, int64_t S, int64_t C,
            T* out, int64_t ldo, T* scratch) {
  if (have_blas(out) && S > kSmallInner) {
    // Column-major BLAS sees every row-major matrix transposed: out^T = op(b)^T op(a)^T.
    const int m = static_cast<int>(C), n = static_cast<int>(M), k = static_cast<int>(S);
    const int ilda = static_cast<int>(lda), ildb = static_cast<int>(ldb), ildo = static_cast<int>(ldo);
    const T one = 1, zero = 0;
    blas_gemm(tb ? "T" : "N", ta ? "T" : "N", &m, &n, &k, &one, b, &ildb, a, &ilda, &zero, out, &ildo);
    return;
  }
  if (tb) {
    for (int64_t s = 0; s < S; ++s) {
      for (int64_t c = 0; c < C; ++c) {
        scratch[s * C + c] = b[c * ldb + s];
      }
    }
    b = scratch;
    ldb = C;
  }
  product(a, ta ? 1 : lda, ta ? lda : 1, b, ldb, M, S, C, out, ldo, false);
}

template <typename T>
KDFAST_INLINE vec_t<T> lane_index() {
  vec_t<T> index;
  for (int64_t l = 0; l < Vec<T>::lanes; ++l) {
    index[l] = T(l);
  }
  return index;
}

// x, with the lanes from `valid` on set to 0 (the tokens past the end of a tile).
template <typename T>
KDFAST_INLINE vec_t<T> first_lanes(const vec_t<T>& x, int64_t valid) {
  return lane_index<T>() < vsplat(T(valid)) ? x : vec_t<T>{};
}

// L[:, t : t + lanes] (K rows of ld) becomes softmax over the K slots of scale L: one vector lane per token.
template <typename T>
KDFAST_INLINE void softmax_over_slots(T* L, int64_t K, int64_t ld, int64_t t, T scale) {
  vec_t<T> m = scale * vload(L + t);
  for (int64_t i = 1; i < K; ++i) {
    m = vmax<T>(m, scale * vload(L + i * ld + t));
  }
  vec_t<T> total = {};
  for (int64_t i = 0; i < K; ++i) {
    const vec_t<T> e = vexp(scale * vload(L + i * ld + t) - m);
    vstore(L + i * ld + t, e);
    total += e;
  }
  const vec_t<T> inv = T(1) / total;
  for (int64_t i = 0; i < K; ++i) {
    vstore(L + i * ld + t, vload(L + i * ld + t) * inv);
  }
}

// x[:valid] as a vector, the lanes past it 0 (never reading past x[valid - 1]).
template <typename T>
KDFAST_INLINE vec_t<T> load_first(const T* x, int64_t valid) {
  if (valid == Vec<T>::lanes) {
    return vload(x);
  }
  T lanes[Vec<T>::lanes] = {};
  std::copy(x, x + valid, lanes);
  return vload(lanes);
}

// x[:valid] = the first valid lanes of v (never writing past x[valid - 1]).
template <typename T>
KDFAST_INLINE void store_first(T* x, const vec_t<T>& v, int64_t valid) {
  if (valid == Vec<T>::lanes) {
    vstore(x, v);
    return;
  }
  T lanes[Vec<T>::lanes];
  vstore(lanes, v);
  std::copy(lanes, lanes + valid, x);
}

// Forward pass over the tile's block L (K, ld) of dot products <q_i, k_t>, t < tn: L becomes
// W = softmax_i(scale L[:, t]) + eps (0 past tn), attn (K, attn_ld, may be null) gets the softmax A, and
// z (K) the sum of W over the tile. zacc holds K vectors of partial sums.
template <typename T>
KDFAST_CPU_CLONES void attention_weights(T* L, int64_t K, int64_t ld, int64_t tn, T scale, T eps, T* attn,
                                         int64_t attn_ld, T* zacc, T* z) {
  constexpr int64_t V = Vec<T>::lanes;
  std::fill(zacc, zacc + K * V, T(0));
  for (int64_t t = 0; t < tn; t += V) {
    const int64_t valid = std::min(V, tn - t);
    softmax_over_slots(L, K, ld, t, scale);
    for (int64_t i = 0; i < K; ++i) {
      const vec_t<T> a = vload(L + i * ld + t);
      if (attn != nullptr) {
        store_first(attn + i * attn_ld + t, a, valid);
      }
      const vec_t<T> w = valid == V ? a + eps : first_lanes<T>(a + eps, valid);
      vstore(L + i * ld + t, w);
      vstore(zacc + i * V, vload(zacc + i * V) + w);
    }
  }
  for (int64_t i = 0; i < K; ++i) {
    T total = 0;
    for (int64_t l = 0; l < V; ++l) {
      total += zacc[i * V + l];
    }
    z[i] = total;
  }
}

// Backward pass over the tile's block P = <G_i, v_t> (K, ld), t < tn, and the attention A of its tokens: the
// softmax over the slots of scale L, L = <q_i, k_t> (K, ld), recomputed from L where saved_A is null, else read
// from saved_A (K, a_ld), as the forward stored it. With g_i = (P_i - c_i) / Z_i + GA_i (the gradient reaching
// A), P becomes dL = scale A (g - sum_j A_j g_j) and L becomes W / Z = (A + eps) / Z_i. GA (K, ga_ld) may be null.
template <typename T>
KDFAST_CPU_CLONES void attention_gradients(T* L, T* P, int64_t K, int64_t ld, int64_t tn, T scale, T eps, const T* c,
                                           const T* inv_z, const T* GA, int64_t ga_ld, const T* saved_A,
                                           int64_t a_ld) {
  constexpr int64_t V = Vec<T>::lanes;
  for (int64_t t = 0; t < tn; t += V) {
    const int64_t valid = std::min(V, tn - t);
    if (saved_A == nullptr) {
      softmax_over_slots(L, K, ld, t, scale);
    } else {
      for (int64_t i = 0; i < K; ++i) {
        vstore(L + i * ld + t, load_first(saved_A + i * a_ld + t, valid));
      }
    }
    vec_t<T> colsum = {};
    for (int64_t i = 0; i < K; ++i) {
      const vec_t<T> a = vload(L + i * ld + t);
      vec_t<T> g = (vload(P + i * ld + t) - c[i]) * inv_z[i];
      if (GA != nullptr) {
        g += load_first(GA + i * ga_ld + t, valid);
      }
      vstore(P + i * ld + t, g);
      colsum += a * g;
    }
    for (int64_t i = 0; i < K; ++i) {
      const vec_t<T> a = vload(L + i * ld + t);
      vstore(P + i * ld + t, scale * a * (vload(P + i * ld + t) - colsum));
      vstore(L + i * ld + t, (a + eps) * inv_z[i]);
    }
  }
}

// row[:n] += x[:n]
template <typename T>
KDFAST_INLINE void add_into(T* row, const T* x, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    row[j] += x[j];
  }
}

struct Shape {
  int64_t B, K, N, D, Dv, tiles;
};

// Work items per thread at the least: below about 2^16 multiply-adds a thread costs more to wake than it saves
// (the recipes' small grids: 64 tokens, 7 slots of 16 features), so small calls run on the calling thread.
int64_t grain(const Shape& s) {
  constexpr int64_t kParallelWork = int64_t(1) << 16;
  const int64_t per_item = s.K * std::min(s.N, kTile) * (s.D + s.Dv);
  return std::max<int64_t>(1, kParallelWork / std::max<int64_t>(1, per_item));
}

Shape shape_of(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  const int64_t N = k.size(1);
  return {q.size(0), q.size(1), N, q.size(2), v.size(2), (N + kTile - 1) / kTile};
}

// Whether a product q k^T or G v^T runs in product(), which takes the tile of keys or values transposed.
template <typename T>
bool needs_scratch(const Shape& s) {
  return !have_blas(static_cast<T*>(nullptr)) || std::min(s.D, s.Dv) <= kSmallInner;
}

// Per-thread working memory: the (K, kTile) blocks, the K vectors of Z's partial sums, and (where product()
// takes q k^T or G v^T) room for a transposed tile of keys or values.
template <typename T>
struct Workspace {
  std::vector<T> L, P, zacc, scratch;
  Workspace(const Shape& s, bool backward)
      : L(s.K * kTile),
        P(backward ? s.K * kTile : 0),
        zacc(s.K * Vec<T>::lanes),
        scratch(needs_scratch<T>(s) ? std::max(s.D, s.Dv) * kTile : 0) {}
};

// Numerator (K, Dv) and Z (K) of the tile [n0, n0 + tn) of one batch element, into part (K * (Dv + 1));
// the masks if attn (K, N) is given.
template <typename T>
void forward_tile(const Shape& s, const T* q, const T* k, const T* v, T scale, T eps, int64_t n0, int64_t tn,
                  T* attn, T* part, Workspace<T>& w) {
  const int64_t K = s.K, D = s.D, Dv = s.Dv;
  T* L = w.L.data();
  matmul(q, D, false, k + n0 * D, D, true, K, D, tn, L, kTile, w.scratch.data());  // L = q k^T
  attention_weights(L, K, kTile, tn, scale, eps, attn == nullptr ? nullptr : attn + n0, s.N, w.zacc.data(),
                    part + K * Dv);
  matmul(L, kTile, false, v + n0 * Dv, Dv, false, K, tn, Dv, part, Dv, w.scratch.data());  // numerator = W v
}

// One tile of the backward: rows of dk and dv written whole, dq's partial sum into dq_part (K, D). A: the
// batch element's attention (K, N) as the forward computed it, or null to recompute it from q and k.
template <typename T>
void backward_tile(const Shape& s, const T* G, const T* GA, const T* A, const T* q, const T* k, const T* v, const T* c,
                   const T* inv_z, T scale, T eps, int64_t n0, int64_t tn, T* dq_part, T* dk, T* dv,
                   Workspace<T>& w) {
  const int64_t K = s.K, D = s.D, Dv = s.Dv;
  T *L = w.L.data(), *P = w.P.data(), *scratch = w.scratch.data();
  if (A == nullptr) {
    matmul(q, D, false, k + n0 * D, D, true, K, D, tn, L, kTile, scratch);  // L = q k^T
  }
  matmul(G, Dv, false, v + n0 * Dv, Dv, true, K, Dv, tn, P, kTile, scratch);  // P = G v^T
  attention_gradients(L, P, K, kTile, tn, scale, eps, c, inv_z, GA == nullptr ? nullptr : GA + n0, s.N,
                      A == nullptr ? nullptr : A + n0, s.N);
  matmul(L, kTile, true, G, Dv, false, tn, K, Dv, dv + n0 * Dv, Dv, scratch);     // dv_t = sum_i W[i,t] G_i / Z_i
  matmul(P, kTile, true, q, D, false, tn, K, D, dk + n0 * D, D, scratch);         // dk_t = sum_i dL[i,t] q_i
  matmul(P, kTile, false, k + n0 * D, D, false, K, tn, D, dq_part, D, scratch);  // dq_i = sum_t dL[i,t] k_t
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_impl(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, double scale, double eps,
                                                            bool return_attn) {
  const Shape s = shape_of(q, k, v);
  const auto options = q.options();
  auto updates = empty_output({s.B, s.K, s.Dv}, options);
  auto attn = empty_output({s.B, s.K, return_attn ? s.N : 0}, options);
  auto norm = empty_output({s.B, s.K}, options);
  const int64_t part_size = s.K * (s.Dv + 1);
  std::vector<T> parts(s.B * s.tiles * part_size);
  const T *qp = q.const_data_ptr<T>(), *kp = k.const_data_ptr<T>(), *vp = v.const_data_ptr<T>();
  T* ap = return_attn ? attn.mutable_data_ptr<T>() : nullptr;
  at::parallel_for(0, s.B * s.tiles, grain(s), [&](int64_t begin, int64_t end) {
    Workspace<T> w(s, false);
    const SingleThreadedBlas single_threaded;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / s.tiles, n0 = item % s.tiles * kTile;
      forward_tile<T>(s, qp + b * s.K * s.D, kp + b * s.N * s.D, vp + b * s.N * s.Dv, T(scale), T(eps), n0,
                      std::min(kTile, s.N - n0), ap == nullptr ? nullptr : ap + b * s.K * s.N,
                      parts.data() + item * part_size, w);
    }
  });
  T *up = updates.mutable_data_ptr<T>(), *zp = norm.mutable_data_ptr<T>();
  at::parallel_for(0, s.B, grain(s) * s.tiles, [&](int64_t begin, int64_t end) {
    std::vector<T> total(part_size);
    for (int64_t b = begin; b < end; ++b) {
      const T* first = parts.data() + b * s.tiles * part_size;
      std::copy(first, first + part_size, total.begin());
      for (int64_t tile = 1; tile < s.tiles; ++tile) {
        add_into(total.data(), first + tile * part_size, part_size);
      }
      for (int64_t i = 0; i < s.K; ++i) {
        const T z = total[s.K * s.Dv + i];
        zp[b * s.K + i] = z;
        for (int64_t j = 0; j < s.Dv; ++j) {
          up[(b * s.K + i) * s.Dv + j] = total[i * s.Dv + j] / z;
        }
      }
    }
  });
  return {updates, attn, norm};
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_impl(const at::Tensor& G, const at::Tensor* GA,
                                                             const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, const at::Tensor& U,
                                                             const at::Tensor& Z, const at::Tensor* A, double scale,
                                                             double eps) {
  const Shape s = shape_of(q, k, v);
  auto dq = empty_output(q.sizes(), q.options());
  auto dk = empty_output(k.sizes(), k.options());
  auto dv = empty_output(v.sizes(), v.options());
  // c_i = <G_i, U_i> and 1 / Z_i, per batch element and slot
  std::vector<T> c(s.B * s.K), inv_z(s.B * s.K);
  const T *gp = G.const_data_ptr<T>(), *upp = U.const_data_ptr<T>(), *zp = Z.const_data_ptr<T>();
  for (int64_t r = 0; r < s.B * s.K; ++r) {
    T acc = 0;
    for (int64_t j = 0; j < s.Dv; ++j) {
      acc += gp[r * s.Dv + j] * upp[r * s.Dv + j];
    }
    c[r] = acc;
    inv_z[r] = T(1) / zp[r];
  }
  const int64_t part_size = s.K * s.D;
  std::vector<T> parts(s.B * s.tiles * part_size);
  const T *qp = q.const_data_ptr<T>(), *kp = k.const_data_ptr<T>(), *vp = v.const_data_ptr<T>();
  const T* gap = GA == nullptr ? nullptr : GA->const_data_ptr<T>();
  const T* attn = A == nullptr ? nullptr : A->const_data_ptr<T>();
  T *dkp = dk.mutable_data_ptr<T>(), *dvp = dv.mutable_data_ptr<T>();
  at::parallel_for(0, s.B * s.tiles, grain(s), [&](int64_t begin, int64_t end) {
    Workspace<T> w(s, true);
    const SingleThreadedBlas single_threaded;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / s.tiles, n0 = item % s.tiles * kTile;
      backward_tile<T>(s, gp + b * s.K * s.Dv, gap == nullptr ? nullptr : gap + b * s.K * s.N,
                       attn == nullptr ? nullptr : attn + b * s.K * s.N, qp + b * s.K * s.D,
                       kp + b * s.N * s.D, vp + b * s.N * s.Dv, c.data() + b * s.K, inv_z.data() + b * s.K, T(scale),
                       T(eps), n0, std::min(kTile, s.N - n0), parts.data() + item * part_size, dkp + b * s.N * s.D,
                       dvp + b * s.N * s.Dv, w);
    }
  });
  T* dqp = dq.mutable_data_ptr<T>();
  at::parallel_for(0, s.B, grain(s) * s.tiles, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      T* out = dqp + b * part_size;
      const T* first = parts.data() + b * s.tiles * part_size;
      std::copy(first, first + part_size, out);
      for (int64_t tile = 1; tile < s.tiles; ++tile) {
        add_into(out, first + tile * part_size, part_size);
      }
    }
  });
  return {dq, dk, dv};
}

void check_core(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, double eps) {
  check_input(q, "q", 3, at::kCPU);
  check_input(k, "k", 3, at::kCPU);
  check_input(v, "v", 3, at::kCPU);
  check_eps(eps);
  TORCH_CHECK(std::isfinite(scale), "scale must be finite, got ", scale);
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "q, k and v must have one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0), "q, k and v must have one batch size B");
  TORCH_CHECK(k.size(2) == q.size(2), "q (B,K,D) and k (B,N,D) must have one D, got ", q.sizes(), " and ", k.sizes());
  TORCH_CHECK(v.size(1) == k.size(1), "k (B,N,D) and v (B,N,Dv) must have one N, got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(q.numel() > 0 && k.numel() > 0 && v.numel() > 0, "q, k and v must be non-empty");
  // The BLAS takes 32-bit sizes (the tile's token count is at most kTile).
  constexpr int64_t int_max = std::numeric_limits<int>::max();
  TORCH_CHECK(q.size(1) <= int_max && q.size(2) <= int_max && v.size(2) <= int_max,
              "the cpp backend handles K, D and Dv up to ", int_max, ", got q ", q.sizes(), " and v ", v.sizes());
}

// Contiguous, in the accumulator dtype (float16/bfloat16 computed in float32).
at::Tensor prepared(const at::Tensor& t) {
  return t.to(acc_dtype(t.scalar_type())).contiguous();
}

// (updates, attn, norm), all in the accumulator dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_in_acc_dtype(const at::Tensor& q_, const at::Tensor& k_,
                                                                    const at::Tensor& v_, double scale, double eps,
                                                                    bool return_attn) {
  check_core(q_, k_, v_, scale, eps);
  const auto q = prepared(q_), k = prepared(k_), v = prepared(v_);
  std::tuple<at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "_slot_attention_core_forward", [&] {
    out = forward_impl<scalar_t>(q, k, v, scale, eps, return_attn);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_kernel(const at::Tensor& q, const at::Tensor& k,
                                                              const at::Tensor& v, double scale, double eps,
                                                              bool return_attn) {
  auto [updates, attn, norm] = forward_in_acc_dtype(q, k, v, scale, eps, return_attn);
  return {updates.to(q.scalar_type()), attn.to(q.scalar_type()), norm};
}

// saved_attn: the forward's attention (B, K, N) in the accumulator dtype, or none to recompute it.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_kernel(const at::Tensor& grad_updates,
                                                               const std::optional<at::Tensor>& grad_attn,
                                                               const at::Tensor& q_, const at::Tensor& k_,
                                                               const at::Tensor& v_, const at::Tensor& updates,
                                                               const at::Tensor& norm, double scale, double eps,
                                                               const std::optional<at::Tensor>& saved_attn) {
  check_core(q_, k_, v_, scale, eps);
  const int64_t B = q_.size(0), K = q_.size(1), N = k_.size(1), Dv = v_.size(2);
  check_input(grad_updates, "grad_updates", 3, at::kCPU);
  TORCH_CHECK(grad_updates.sizes() == at::IntArrayRef({B, K, Dv}), "grad_updates must have shape (B,K,Dv) = ",
              at::IntArrayRef({B, K, Dv}), ", got ", grad_updates.sizes());
  TORCH_CHECK(updates.sizes() == at::IntArrayRef({B, K, Dv}), "updates must have shape (B,K,Dv), got ",
              updates.sizes());
  TORCH_CHECK(norm.sizes() == at::IntArrayRef({B, K}), "norm must have shape (B,K), got ", norm.sizes());
  at::Tensor ga;
  if (grad_attn.has_value() && grad_attn->defined()) {
    check_input(*grad_attn, "grad_attn", 3, at::kCPU);
    TORCH_CHECK(grad_attn->sizes() == at::IntArrayRef({B, K, N}), "grad_attn must have shape (B,K,N) = ",
                at::IntArrayRef({B, K, N}), ", got ", grad_attn->sizes());
    ga = prepared(*grad_attn);
  }
  at::Tensor A;
  if (saved_attn.has_value() && saved_attn->defined()) {
    const auto acc = acc_dtype(q_.scalar_type());
    TORCH_CHECK(saved_attn->device().type() == at::kCPU && saved_attn->sizes() == at::IntArrayRef({B, K, N}) &&
                    saved_attn->scalar_type() == acc,
                "attn must be the forward's attention, a (B,K,N) = ", at::IntArrayRef({B, K, N}), " ", acc,
                " cpu tensor, got ", saved_attn->sizes(), " ", saved_attn->scalar_type(), " on ", saved_attn->device());
    A = saved_attn->contiguous();
  }
  const auto q = prepared(q_), k = prepared(k_), v = prepared(v_);
  const auto G = prepared(grad_updates), U = prepared(updates), Z = norm.to(q.scalar_type()).contiguous();
  std::tuple<at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "_slot_attention_core_backward", [&] {
    out = backward_impl<scalar_t>(G, ga.defined() ? &ga : nullptr, q, k, v, U, Z, A.defined() ? &A : nullptr, scale,
                                  eps);
  });
  return {std::get<0>(out).to(q_.scalar_type()), std::get<1>(out).to(k_.scalar_type()),
          std::get<2>(out).to(v_.scalar_type())};
}

// _slot_attention_core_cpp: (updates in the inputs' dtype, the attention (B, K, N) and Z in the accumulator dtype).
std::tuple<at::Tensor, at::Tensor, at::Tensor> cpp_core_kernel(const at::Tensor& q, const at::Tensor& k,
                                                               const at::Tensor& v, double scale, double eps) {
  auto [updates, attn, norm] = forward_in_acc_dtype(q, k, v, scale, eps, /*return_attn=*/true);
  return {updates.to(q.scalar_type()), attn, norm};
}

// Shapes and dtypes only (fake tensors, torch.compile tracing), with symbolic sizes.
std::tuple<at::Tensor, at::Tensor, at::Tensor> cpp_core_meta(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, double scale, double eps) {
  const auto acc = q.options().dtype(acc_dtype(q.scalar_type()));
  return {at::empty_symint({q.sym_size(0), q.sym_size(1), v.sym_size(2)}, q.options()),
          at::empty_symint({q.sym_size(0), q.sym_size(1), k.sym_size(1)}, acc),
          at::empty_symint({q.sym_size(0), q.sym_size(1)}, acc)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_meta(const at::Tensor& grad_updates,
                                                             const std::optional<at::Tensor>& grad_attn,
                                                             const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, const at::Tensor& updates,
                                                             const at::Tensor& norm, double scale, double eps,
                                                             const std::optional<at::Tensor>& saved_attn) {
  return {at::empty_symint(q.sym_sizes(), q.options()), at::empty_symint(k.sym_sizes(), k.options()),
          at::empty_symint(v.sym_sizes(), v.options())};
}

}  // namespace

// The cpp backend's eager entry point, kdfast::_slot_attention_core_cpp: the kernels behind a C++ autograd node,
// so an eager training step runs no Python on its way back. The forward always computes the attention (B, K, N)
// and the node keeps it for the backward, which then skips recomputing q k^T and the softmax (a fifth of its
// products): on the CPU that tensor is smaller than the keys, which are saved anyway. kdfast/ops/slot_attention.py
// calls it outside torch.compile; a compiled graph uses the custom op, whose backward recomputes (design.md 3.1).
// Both directions go through the dispatcher below autograd, so fake tensors reach the Meta kernels.
class SlotAttentionCore : public torch::autograd::Function<SlotAttentionCore> {
 public:
  using Core = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                const at::Tensor&, double, double);
  using Backward = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
      const at::Tensor&, const at::Tensor&, double, double, const std::optional<at::Tensor>&);

  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& q,
                                                const at::Tensor& k, const at::Tensor& v, double scale, double eps) {
    static const auto core = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("kdfast::_slot_attention_core_cpp", "")
                                 .typed<Core>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [updates, attn, norm] = core.call(q, k, v, scale, eps);
    ctx->save_for_backward({q, k, v, updates, norm, attn});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["eps"] = eps;
    ctx->mark_non_differentiable({norm});
    ctx->set_materialize_grads(false);  // an unused output's gradient stays undefined, not a tensor of zeros
    return {updates, attn, norm};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    // The kernels' gradients are not themselves differentiable: refuse rather than give a wrong second derivative.
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "kdfast.slot_attention_core: the cpp backend's backward is not differentiable (no double backward); "
                "use backend='reference' for higher-order gradients");
    static const auto backward_op = c10::Dispatcher::singleton()
                                        .findSchemaOrThrow("kdfast::_slot_attention_core_backward", "")
                                        .typed<Backward>();
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &q = saved[0], &k = saved[1], &v = saved[2], &updates = saved[3], &norm = saved[4],
                     &attn = saved[5];
    const at::Tensor grad_updates = grads[0].defined() ? grads[0] : at::zeros_like(updates);
    std::optional<at::Tensor> grad_attn;
    if (grads[1].defined()) {
      grad_attn = grads[1];
    }
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [dq, dk, dv] = backward_op.call(grad_updates, grad_attn, q, k, v, updates, norm,
                                         ctx->saved_data["scale"].toDouble(), ctx->saved_data["eps"].toDouble(), attn);
    return {dq, dk, dv, at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> cpp_core_autograd(const at::Tensor& q, const at::Tensor& k,
                                                                 const at::Tensor& v, double scale, double eps) {
  auto out = SlotAttentionCore::apply(q, k, v, scale, eps);
  return {out[0], out[1], out[2]};
}

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("_slot_attention_core_forward", TORCH_FN(forward_kernel));
  m.impl("_slot_attention_core_backward", TORCH_FN(backward_kernel));
  m.impl("_slot_attention_core_cpp", TORCH_FN(cpp_core_kernel));
}

TORCH_LIBRARY_IMPL(kdfast, Meta, m) {
  m.impl("_slot_attention_core_cpp", TORCH_FN(cpp_core_meta));
  m.impl("_slot_attention_core_backward", TORCH_FN(backward_meta));
}

TORCH_LIBRARY_IMPL(kdfast, Autograd, m) {
  m.impl("_slot_attention_core_cpp", TORCH_FN(cpp_core_autograd));
}

}  // namespace kdfast
