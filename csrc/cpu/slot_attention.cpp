// CPU kernels of the slot attention core (design.md 3.1): one pass over the N tokens each way.
//
// Per batch element, tokens are taken in tiles of kTile: the tile's keys are transposed to (D, kTile), so
// that the logits L[i, t] = s <q_i, k_t> and the softmax over the K slots run along the tokens, one vector
// lane per token. Forward: per tile, W = A + eps adds into the numerator (K, Dv) and Z (K). Backward: per
// tile the attention is recomputed from q and k (nothing of size (K, N) is saved), then dv and dk rows of the
// tile are written whole and dq adds up.
//
// Threads take (batch element, block of kBlock tokens) pairs. The partial sums of a block (numerator and Z
// forward, dq backward) go to their own slot of a buffer and are added up block by block in order at the end,
// so the result has one summation order whatever the number of threads: the same bits on every run.
//
// float16/bfloat16 inputs are computed in float32 (converted once here); float64 in float64.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "../common.h"

// Returning a 64-byte vector has no fixed ABI without AVX-512; here such helpers are always inlined.
#pragma GCC diagnostic ignored "-Wpsabi"
#define KDFAST_VEC inline __attribute__((always_inline))

namespace kdfast {
namespace {

// Tokens per tile (a whole number of vectors of float and double), and per block of work: fixed, so that
// partial sums do not depend on the thread count.
constexpr int64_t kTile = 64;
constexpr int64_t kBlock = 256;

template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(64)));
  static constexpr int64_t lanes = 64 / sizeof(T);
};
template <typename T>
using vec_t = typename Vec<T>::type;

template <typename T>
KDFAST_VEC vec_t<T> vload(const T* p) {
  vec_t<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
KDFAST_VEC void vstore(T* p, const vec_t<T>& v) {
  std::memcpy(p, &v, sizeof(v));
}

template <typename T>
KDFAST_VEC vec_t<T> vsplat(T x) {
  return vec_t<T>{} + x;
}

// exp of 16 floats for arguments <= 0 (x - max over the slots): exp(x) = 2^n exp(r), n = round(x / ln 2),
// r = x - n ln 2 (ln 2 split in two for accuracy), exp(r) by its degree-6 Taylor-like minimax polynomial
// (Cephes' coefficients, ~1 ulp). Below -87.3 (float's normal range) the result is 0; NaN stays NaN.
KDFAST_VEC vec_t<float> vexp(vec_t<float> x) {
  typedef int32_t vint __attribute__((vector_size(64)));
  using vf = vec_t<float>;
  const vf round = vsplat(12582912.0f);  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const vf n = (x * 1.44269504088896341f + round) - round;
  const vf r = x - n * 0.693359375f + n * 2.12194440e-4f;
  vf p = ((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r + 4.1665795894e-2f) * r +
          1.6666665459e-1f) * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const vint bits = (__builtin_convertvector(n, vint) + 127) << 23;
  vf two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  p = p * two_n;
  p = x < vsplat(-87.3365447505531f) ? vsplat(0.0f) : p;
  return x != x ? x : p;
}

// float64 is the gradcheck and oracle path: std::exp's accuracy matters more than its speed.
KDFAST_VEC vec_t<double> vexp(vec_t<double> x) {
  for (int64_t l = 0; l < Vec<double>::lanes; ++l) {
    x[l] = std::exp(x[l]);
  }
  return x;
}

// A NaN logit needs no care here: exp(NaN - m) is NaN, so its column's sum and masks are NaN, as in torch.
template <typename T>
KDFAST_VEC vec_t<T> vmax(const vec_t<T>& a, const vec_t<T>& b) {
  return a > b ? a : b;
}

// Token tile [n0, n0 + tn) of one batch element, tn <= kTile: keys transposed into kt (D, kTile), zero-padded.
template <typename T>
void transpose_tile(const T* x, int64_t D, int64_t n0, int64_t tn, T* xt) {
  for (int64_t d = 0; d < D; ++d) {
    T* row = xt + d * kTile;
    for (int64_t t = 0; t < tn; ++t) {
      row[t] = x[(n0 + t) * D + d];
    }
    std::fill(row + tn, row + kTile, T(0));
  }
}

// out[r, c] = (out[r, c] if accumulate else 0) + sum_{s < S} a[r * ar + s * as] * b[s * ldb + c], r < M, c < C.
// Register blocks of 4 rows by 4 vectors: each vector of b loaded serves 4 rows. Columns past the last whole
// vector are done one by one (b is never read past column C).
template <typename T>
KDFAST_CPU_CLONES void product(const T* a, int64_t ar, int64_t as, const T* b, int64_t ldb, int64_t M, int64_t S,
                               int64_t C, T* out, int64_t ldo, bool accumulate) {
  constexpr int64_t V = Vec<T>::lanes;
  constexpr int64_t R = 4, NV = 4;
  const int64_t vector_cols = C / V * V;
  for (int64_t c0 = 0; c0 < vector_cols; c0 += NV * V) {
    const int64_t nv = std::min<int64_t>(NV, (vector_cols - c0) / V);
    for (int64_t r0 = 0; r0 < M; r0 += R) {
      const int64_t nr = std::min<int64_t>(R, M - r0);
      vec_t<T> acc[R][NV] = {};
      for (int64_t s = 0; s < S; ++s) {
        vec_t<T> bv[NV];
        for (int64_t j = 0; j < NV; ++j) {
          bv[j] = j < nv ? vload(b + s * ldb + c0 + j * V) : vec_t<T>{};
        }
        for (int64_t r = 0; r < R; ++r) {
          const vec_t<T> w = vsplat(r < nr ? a[(r0 + r) * ar + s * as] : T(0));
          for (int64_t j = 0; j < NV; ++j) {
            acc[r][j] += w * bv[j];
          }
        }
      }
      for (int64_t r = 0; r < nr; ++r) {
        for (int64_t j = 0; j < nv; ++j) {
          T* o = out + (r0 + r) * ldo + c0 + j * V;
          vstore(o, accumulate ? vload(o) + acc[r][j] : acc[r][j]);
        }
      }
    }
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

// In place: the tile of dot products (K, kTile) becomes the softmax over its K rows of scale times them.
template <typename T>
KDFAST_CPU_CLONES void softmax_over_slots(T* L, int64_t K, T scale) {
  constexpr int64_t V = Vec<T>::lanes;
  for (int64_t t = 0; t < kTile; t += V) {
    vec_t<T> m = scale * vload(L + t);
    for (int64_t i = 1; i < K; ++i) {
      m = vmax<T>(m, scale * vload(L + i * kTile + t));
    }
    vec_t<T> total = {};
    for (int64_t i = 0; i < K; ++i) {
      const vec_t<T> e = vexp(scale * vload(L + i * kTile + t) - m);
      vstore(L + i * kTile + t, e);
      total += e;
    }
    const vec_t<T> inv = T(1) / total;
    for (int64_t i = 0; i < K; ++i) {
      vstore(L + i * kTile + t, vload(L + i * kTile + t) * inv);
    }
  }
}

// row[:n] += w * x[:n]
template <typename T>
KDFAST_VEC void axpy(T* row, T w, const T* x, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    row[j] += w * x[j];
  }
}

struct Shape {
  int64_t B, K, N, D, Dv, blocks;
};

Shape shape_of(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  const int64_t N = k.size(1);
  return {q.size(0), q.size(1), N, q.size(2), v.size(2), (N + kBlock - 1) / kBlock};
}

// Numerator (K, Dv) and Z (K) of one block of tokens, into part (K * (Dv + 1)); the masks if attn is given.
template <typename T>
KDFAST_CPU_CLONES void forward_block(const Shape& s, const T* q, const T* k, const T* v, T scale, T eps,
                                     int64_t n_begin, int64_t n_end, T* attn, T* part, T* kt, T* A) {
  const int64_t K = s.K, D = s.D, Dv = s.Dv;
  std::fill(part, part + K * (Dv + 1), T(0));
  T* z = part + K * Dv;
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kTile) {
    const int64_t tn = std::min(kTile, n_end - n0);
    transpose_tile(k, D, n0, tn, kt);
    product(q, D, 1, kt, kTile, K, D, kTile, A, kTile, false);
    softmax_over_slots(A, K, scale);
    for (int64_t i = 0; i < K; ++i) {
      T* a = A + i * kTile;
      if (attn != nullptr) {
        std::copy(a, a + tn, attn + i * s.N + n0);
      }
      T zi = 0;
      for (int64_t t = 0; t < tn; ++t) {
        a[t] += eps;
        zi += a[t];
      }
      z[i] += zi;
    }
    product(A, kTile, 1, v + n0 * Dv, Dv, K, tn, Dv, part, Dv, true);  // numerator += W v
  }
}

// One block of tokens of the backward: rows of dk and dv written whole, dq's partial sum into dq_part (K, D).
template <typename T>
KDFAST_CPU_CLONES void backward_block(const Shape& s, const T* G, const T* GA, const T* q, const T* k, const T* v,
                                      const T* c, const T* inv_z, T scale, T eps, int64_t n_begin, int64_t n_end,
                                      T* dq_part, T* dk, T* dv, T* kt, T* vt, T* A, T* dA) {
  const int64_t K = s.K, D = s.D, Dv = s.Dv;
  std::fill(dq_part, dq_part + K * D, T(0));
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kTile) {
    const int64_t tn = std::min(kTile, n_end - n0);
    transpose_tile(k, D, n0, tn, kt);
    transpose_tile(v, Dv, n0, tn, vt);
    product(q, D, 1, kt, kTile, K, D, kTile, A, kTile, false);
    softmax_over_slots(A, K, scale);
    product(G, Dv, 1, vt, kTile, K, Dv, kTile, dA, kTile, false);  // <G_i, v_t>
    T colsum[kTile] = {};
    for (int64_t i = 0; i < K; ++i) {
      const T* a = A + i * kTile;
      T* da = dA + i * kTile;
      const T ci = c[i], zi = inv_z[i];
      const T* ga = GA == nullptr ? nullptr : GA + i * s.N + n0;
      for (int64_t t = 0; t < tn; ++t) {
        da[t] = (da[t] - ci) * zi + (ga == nullptr ? T(0) : ga[t]);
        colsum[t] += a[t] * da[t];
      }
    }
    // dA becomes dL = s A (dA - sum_j A_j dA_j), then A becomes W / Z
    for (int64_t i = 0; i < K; ++i) {
      T* a = A + i * kTile;
      T* da = dA + i * kTile;
      const T zi = inv_z[i];
      for (int64_t t = 0; t < tn; ++t) {
        da[t] = scale * a[t] * (da[t] - colsum[t]);
        a[t] = (a[t] + eps) * zi;
      }
    }
    product(A, 1, kTile, G, Dv, tn, K, Dv, dv + n0 * Dv, Dv, false);      // dv_t = sum_i W[i,t] G_i / Z_i
    product(dA, 1, kTile, q, D, tn, K, D, dk + n0 * D, D, false);         // dk_t = sum_i dL[i,t] q_i
    product(dA, kTile, 1, k + n0 * D, D, K, tn, D, dq_part, D, true);     // dq_i += sum_t dL[i,t] k_t
  }
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
  std::vector<T> parts(s.B * s.blocks * part_size);
  const T *qp = q.const_data_ptr<T>(), *kp = k.const_data_ptr<T>(), *vp = v.const_data_ptr<T>();
  T* ap = return_attn ? attn.mutable_data_ptr<T>() : nullptr;
  at::parallel_for(0, s.B * s.blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> kt(s.D * kTile), A(s.K * kTile);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / s.blocks, block = item % s.blocks;
      forward_block<T>(s, qp + b * s.K * s.D, kp + b * s.N * s.D, vp + b * s.N * s.Dv, T(scale), T(eps),
                       block * kBlock, std::min(s.N, (block + 1) * kBlock), ap == nullptr ? nullptr : ap + b * s.K * s.N,
                       parts.data() + item * part_size, kt.data(), A.data());
    }
  });
  T *up = updates.mutable_data_ptr<T>(), *zp = norm.mutable_data_ptr<T>();
  at::parallel_for(0, s.B, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> total(part_size);
    for (int64_t b = begin; b < end; ++b) {
      std::fill(total.begin(), total.end(), T(0));
      for (int64_t block = 0; block < s.blocks; ++block) {
        const T* part = parts.data() + (b * s.blocks + block) * part_size;
        axpy(total.data(), T(1), part, part_size);
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
                                                             const at::Tensor& Z, double scale, double eps) {
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
  std::vector<T> parts(s.B * s.blocks * s.K * s.D);
  const T *qp = q.const_data_ptr<T>(), *kp = k.const_data_ptr<T>(), *vp = v.const_data_ptr<T>();
  const T* gap = GA == nullptr ? nullptr : GA->const_data_ptr<T>();
  T *dkp = dk.mutable_data_ptr<T>(), *dvp = dv.mutable_data_ptr<T>();
  at::parallel_for(0, s.B * s.blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> kt(s.D * kTile), vt(s.Dv * kTile), A(s.K * kTile), dA(s.K * kTile);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / s.blocks, block = item % s.blocks;
      backward_block<T>(s, gp + b * s.K * s.Dv, gap == nullptr ? nullptr : gap + b * s.K * s.N, qp + b * s.K * s.D,
                        kp + b * s.N * s.D, vp + b * s.N * s.Dv, c.data() + b * s.K, inv_z.data() + b * s.K, T(scale),
                        T(eps), block * kBlock, std::min(s.N, (block + 1) * kBlock),
                        parts.data() + item * s.K * s.D, dkp + b * s.N * s.D, dvp + b * s.N * s.Dv, kt.data(),
                        vt.data(), A.data(), dA.data());
    }
  });
  T* dqp = dq.mutable_data_ptr<T>();
  const int64_t part_size = s.K * s.D;
  at::parallel_for(0, s.B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      T* out = dqp + b * part_size;
      std::fill(out, out + part_size, T(0));
      for (int64_t block = 0; block < s.blocks; ++block) {
        axpy(out, T(1), parts.data() + (b * s.blocks + block) * part_size, part_size);
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
}

// Contiguous, in the accumulator dtype (float16/bfloat16 computed in float32).
at::Tensor prepared(const at::Tensor& t) {
  return t.to(acc_dtype(t.scalar_type())).contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_kernel(const at::Tensor& q_, const at::Tensor& k_,
                                                              const at::Tensor& v_, double scale, double eps,
                                                              bool return_attn) {
  check_core(q_, k_, v_, scale, eps);
  const auto q = prepared(q_), k = prepared(k_), v = prepared(v_);
  std::tuple<at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "_slot_attention_core_forward", [&] {
    out = forward_impl<scalar_t>(q, k, v, scale, eps, return_attn);
  });
  const auto dtype = q_.scalar_type();
  return {std::get<0>(out).to(dtype), std::get<1>(out).to(dtype), std::get<2>(out)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_kernel(const at::Tensor& grad_updates,
                                                               const std::optional<at::Tensor>& grad_attn,
                                                               const at::Tensor& q_, const at::Tensor& k_,
                                                               const at::Tensor& v_, const at::Tensor& updates,
                                                               const at::Tensor& norm, double scale, double eps) {
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
  const auto q = prepared(q_), k = prepared(k_), v = prepared(v_);
  const auto G = prepared(grad_updates), U = prepared(updates), Z = norm.to(q.scalar_type()).contiguous();
  std::tuple<at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "_slot_attention_core_backward", [&] {
    out = backward_impl<scalar_t>(G, ga.defined() ? &ga : nullptr, q, k, v, U, Z, scale, eps);
  });
  return {std::get<0>(out).to(q_.scalar_type()), std::get<1>(out).to(k_.scalar_type()),
          std::get<2>(out).to(v_.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("_slot_attention_core_forward", TORCH_FN(forward_kernel));
  m.impl("_slot_attention_core_backward", TORCH_FN(backward_kernel));
}

}  // namespace kdfast
