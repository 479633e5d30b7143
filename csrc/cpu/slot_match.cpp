// CPU kernels of the slot matching ops (design.md 3.2). A batch element (cosine) or a slot (loss) is a
// handful of rows of D values: the kernels walk contiguous rows once, compute each norm once, and use the
// threads only when there is enough work to pay for waking them.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "../common.h"

// Returning a 64-byte vector has no fixed ABI without AVX-512; here such helpers are always inlined.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace kdfast {
namespace {

// Multiply-adds per thread below which the OpenMP fork costs more than it saves.
constexpr int64_t kParallelWork = 1 << 15;

int64_t grain(int64_t work_per_item) {
  return std::max<int64_t>(1, kParallelWork / std::max<int64_t>(1, work_per_item));
}

// 64-byte vectors (GCC/Clang vector extensions): one zmm in the AVX-512 clone, two ymm in the AVX2 clone,
// four xmm in the baseline. Explicit because `omp simd reduction` finishes every dot product with a
// lane-by-lane scalar sum through memory, which costs more than the dot itself at D = 64.
template <typename T, int Bytes = 64>
struct Vec {
  typedef T type __attribute__((vector_size(Bytes)));
  static constexpr int64_t lanes = Bytes / sizeof(T);
};

// L consecutive values as a vector of the accumulate type T (converting from half/bfloat16 if needed).
template <typename T, typename scalar_t = T>
KDFAST_INLINE typename Vec<T>::type load(const scalar_t* p) {
  typename Vec<T>::type v;
  if constexpr (std::is_same_v<T, scalar_t>) {
    std::memcpy(&v, p, sizeof(v));
  } else {
    T tmp[Vec<T>::lanes];
    for (int64_t l = 0; l < Vec<T>::lanes; ++l) {
      tmp[l] = static_cast<T>(p[l]);
    }
    std::memcpy(&v, tmp, sizeof(v));
  }
  return v;
}

template <typename T>
KDFAST_INLINE void store(T* p, const typename Vec<T>::type& v) {
  std::memcpy(p, &v, sizeof(v));
}

// Sum of the lanes by halving, in vector registers.
template <typename T, int Bytes = 64>
KDFAST_INLINE T hsum(const typename Vec<T, Bytes>::type& v) {
  if constexpr (Bytes == 16) {
    T s = v[0];
    for (int64_t l = 1; l < Vec<T, 16>::lanes; ++l) {
      s += v[l];
    }
    return s;
  } else {
    typename Vec<T, Bytes / 2>::type lo, hi;
    std::memcpy(&lo, &v, Bytes / 2);
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + Bytes / 2, Bytes / 2);
    return hsum<T, Bytes / 2>(lo + hi);
  }
}

template <typename T>
KDFAST_INLINE T dot(const T* x, const T* y, int64_t D) {
  constexpr int64_t L = Vec<T>::lanes;
  typename Vec<T>::type s = {};
  int64_t d = 0;
  for (; d + L <= D; d += L) {
    s += load<T>(x + d) * load<T>(y + d);
  }
  T r = hsum<T>(s);
  for (; d < D; ++d) {
    r += x[d] * y[d];
  }
  return r;
}

// <x, y_c> for c < 4: each load of x feeds four products.
template <typename T>
KDFAST_INLINE void dot4(const T* x, const T* const* y, int64_t D, T* out) {
  constexpr int64_t L = Vec<T>::lanes;
  typename Vec<T>::type s0 = {}, s1 = {}, s2 = {}, s3 = {};
  int64_t d = 0;
  for (; d + L <= D; d += L) {
    const auto v = load<T>(x + d);
    s0 += v * load<T>(y[0] + d);
    s1 += v * load<T>(y[1] + d);
    s2 += v * load<T>(y[2] + d);
    s3 += v * load<T>(y[3] + d);
  }
  out[0] = hsum<T>(s0);
  out[1] = hsum<T>(s1);
  out[2] = hsum<T>(s2);
  out[3] = hsum<T>(s3);
  for (; d < D; ++d) {
    for (int64_t c = 0; c < 4; ++c) {
      out[c] += x[d] * y[c][d];
    }
  }
}

// Element-wise conversion, cloned so that it vectorises (half and bfloat16 to float and back).
template <typename From, typename To>
KDFAST_CPU_CLONES void convert(const From* src, To* dst, int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    dst[k] = static_cast<To>(src[k]);
  }
}

// A batch element's rows in the accumulate type: the input itself for float and double, a converted
// copy for half and bfloat16, so that all the arithmetic runs on one vectorisable type.
template <typename scalar_t>
const acc_t<scalar_t>* rows_as_acc(const scalar_t* src, int64_t n, std::vector<acc_t<scalar_t>>& buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t<scalar_t>>) {
    return src;
  } else {
    buf.resize(n);
    convert(src, buf.data(), n);
    return buf.data();
  }
}

// Where results are computed before they reach dst: dst itself for float and double, else a buffer that
// store_rows() converts.
template <typename scalar_t>
acc_t<scalar_t>* acc_dst(scalar_t* dst, int64_t n, std::vector<acc_t<scalar_t>>& buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t<scalar_t>>) {
    return dst;
  } else {
    buf.resize(n);
    return buf.data();
  }
}

template <typename scalar_t>
void store_rows(const acc_t<scalar_t>* src, scalar_t* dst, int64_t n) {
  if constexpr (!std::is_same_v<scalar_t, acc_t<scalar_t>>) {
    convert(src, dst, n);
  }
}

// 1 / clamp_min(||x_r||, eps) per row; keep[r] = ||x_r|| >= eps, i.e. whether the clamp passes gradient.
template <typename T>
KDFAST_INLINE void inverse_norms(const T* x, int64_t rows, int64_t D, T eps, T* inv, bool* keep) {
  for (int64_t r = 0; r < rows; ++r) {
    const T n = std::sqrt(dot(x + r * D, x + r * D, D));
    inv[r] = T(1) / clamp_eps(n, eps);
    keep[r] = n >= eps;
  }
}

// Cosines C (K x M) of one batch element, and the inverse clamped norms the backward reuses.
template <typename T>
KDFAST_CPU_CLONES void cosines(const T* A, const T* Bm, int64_t K, int64_t M, int64_t D, T eps, T* ia, T* ib,
                               bool* keep, T* C) {
  inverse_norms(A, K, D, eps, ia, keep);
  inverse_norms(Bm, M, D, eps, ib, keep + K);
  for (int64_t i = 0; i < K; ++i) {
    for (int64_t m = 0; m < M; m += 4) {
      const int64_t cols = std::min<int64_t>(4, M - m);
      const T* y[4];
      for (int64_t c = 0; c < 4; ++c) {
        y[c] = Bm + (m + (c < cols ? c : 0)) * D;  // a short last group repeats a column
      }
      T s[4];
      dot4(A + i * D, y, D, s);
      for (int64_t c = 0; c < cols; ++c) {
        // (dot / nca) / ncb stays bounded even for tiny eps, where 1 / (nca * ncb) would overflow.
        C[i * M + m + c] = s[c] * ia[i] * ib[m + c];
      }
    }
  }
}

// out_i = (sum_j G[i,j] y_j / ncy_j - [nx_i >= eps] r_i x_i / ncx_i) / ncx_i, the gradient of one side.
// The norm term is skipped, not multiplied by 0, where the clamp is active (torch's where()).
// out_i is built in registers, four vectors of D at a time (four independent sums), and written once.
template <typename T>
KDFAST_CPU_CLONES void normalized_grad(const T* X, const T* Y, const T* G, int64_t g_row, int64_t g_col,
                                       int64_t rows, int64_t others, int64_t D, const T* ix, const T* iy,
                                       const T* r, const bool* keep, T* w, T* out) {
  constexpr int64_t L = Vec<T>::lanes;
  for (int64_t i = 0; i < rows; ++i) {
    const T* x = X + i * D;
    T* o = out + i * D;
    const T self = keep[i] ? -r[i] * ix[i] : T(0);
    const T s = ix[i];
    for (int64_t j = 0; j < others; ++j) {
      w[j] = G[i * g_row + j * g_col] * iy[j];
    }
    int64_t d = 0;
    for (; d + 4 * L <= D; d += 4 * L) {
      auto o0 = self * load<T>(x + d), o1 = self * load<T>(x + d + L);
      auto o2 = self * load<T>(x + d + 2 * L), o3 = self * load<T>(x + d + 3 * L);
      for (int64_t j = 0; j < others; ++j) {
        const T* y = Y + j * D + d;
        o0 += w[j] * load<T>(y);
        o1 += w[j] * load<T>(y + L);
        o2 += w[j] * load<T>(y + 2 * L);
        o3 += w[j] * load<T>(y + 3 * L);
      }
      store(o + d, s * o0);
      store(o + d + L, s * o1);
      store(o + d + 2 * L, s * o2);
      store(o + d + 3 * L, s * o3);
    }
    for (; d + L <= D; d += L) {
      auto o0 = self * load<T>(x + d);
      for (int64_t j = 0; j < others; ++j) {
        o0 += w[j] * load<T>(Y + j * D + d);
      }
      store(o + d, s * o0);
    }
    for (; d < D; ++d) {
      T od = self * x[d];
      for (int64_t j = 0; j < others; ++j) {
        od += w[j] * Y[j * D + d];
      }
      o[d] = s * od;
    }
  }
}

// One thread's share [begin, end) of the batch.
template <typename scalar_t>
void cosine_forward_batches(int64_t begin, int64_t end, const scalar_t* a_ptr, const scalar_t* b_ptr,
                            scalar_t* out_ptr, int64_t K, int64_t M, int64_t D, double eps) {
  using acc = acc_t<scalar_t>;
  std::vector<acc> abuf, bbuf, cbuf, ia(K), ib(M);
  std::unique_ptr<bool[]> keep(new bool[K + M]);
  for (int64_t n = begin; n < end; ++n) {
    scalar_t* out = out_ptr + n * K * M;
    acc* C = acc_dst(out, K * M, cbuf);
    cosines(rows_as_acc(a_ptr + n * K * D, K * D, abuf), rows_as_acc(b_ptr + n * M * D, M * D, bbuf), K, M, D,
            static_cast<acc>(eps), ia.data(), ib.data(), keep.get(), C);
    store_rows(C, out, K * M);
  }
}

template <typename scalar_t>
void cosine_backward_batches(int64_t begin, int64_t end, const scalar_t* g_ptr, const scalar_t* a_ptr,
                             const scalar_t* b_ptr, scalar_t* ga_ptr, scalar_t* gb_ptr, int64_t K, int64_t M,
                             int64_t D, double eps) {
  using acc = acc_t<scalar_t>;
  std::vector<acc> abuf, bbuf, gbuf, obuf, C(K * M), ia(K), ib(M), r(K), c(M), w(std::max(K, M));
  std::unique_ptr<bool[]> keep(new bool[K + M]);
  for (int64_t n = begin; n < end; ++n) {
    const acc* A = rows_as_acc(a_ptr + n * K * D, K * D, abuf);
    const acc* Bm = rows_as_acc(b_ptr + n * M * D, M * D, bbuf);
    const acc* G = rows_as_acc(g_ptr + n * K * M, K * M, gbuf);
    cosines(A, Bm, K, M, D, static_cast<acc>(eps), ia.data(), ib.data(), keep.get(), C.data());
    // r_i = sum_m G C and c_m = sum_i G C: the gradients reaching the two norms.
    std::fill(c.begin(), c.end(), acc(0));
    for (int64_t i = 0; i < K; ++i) {
      acc ri = 0;
      for (int64_t m = 0; m < M; ++m) {
        const acc gc = G[i * M + m] * C[i * M + m];
        ri += gc;
        c[m] += gc;
      }
      r[i] = ri;
    }
    acc* ga = acc_dst(ga_ptr + n * K * D, K * D, obuf);
    normalized_grad(A, Bm, G, M, 1, K, M, D, ia.data(), ib.data(), r.data(), keep.get(), w.data(), ga);
    store_rows(ga, ga_ptr + n * K * D, K * D);
    acc* gb = acc_dst(gb_ptr + n * M * D, M * D, obuf);
    normalized_grad(Bm, A, G, 1, M, M, K, D, ib.data(), ia.data(), c.data(), keep.get() + K, w.data(), gb);
    store_rows(gb, gb_ptr + n * M * D, M * D);
  }
}

// Teacher row matched to slot i of batch element n (the host checked the assignment's range).
KDFAST_INLINE int64_t matched(const int64_t* idx, int64_t n, int64_t i, int64_t K) {
  return idx == nullptr ? i : idx[n * K + i];
}

// <s,s>, <t,t>, <s,t> in one pass over the two rows.
template <typename T, typename scalar_t>
KDFAST_INLINE void pair_dots(const scalar_t* s, const scalar_t* t, int64_t D, T& ss, T& tt, T& st) {
  constexpr int64_t L = Vec<T>::lanes;
  typename Vec<T>::type xx = {}, yy = {}, xy = {};
  int64_t d = 0;
  for (; d + L <= D; d += L) {
    const auto x = load<T>(s + d), y = load<T>(t + d);
    xx += x * x;
    yy += y * y;
    xy += x * y;
  }
  ss = hsum<T>(xx);
  tt = hsum<T>(yy);
  st = hsum<T>(xy);
  for (; d < D; ++d) {
    const T x = static_cast<T>(s[d]), y = static_cast<T>(t[d]);
    ss += x * x;
    tt += y * y;
    st += x * y;
  }
}

// One thread's share [begin, end) of the B*K slots.
template <typename scalar_t>
KDFAST_CPU_CLONES void match_loss_forward_rows(int64_t begin, int64_t end, const scalar_t* s_ptr,
                                               const scalar_t* t_ptr, const int64_t* idx, acc_t<scalar_t>* out,
                                               int64_t K, int64_t M, int64_t D, double eps) {
  using acc = acc_t<scalar_t>;
  const acc e = static_cast<acc>(eps);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t n = row / K;
    acc ss, tt, st;
    pair_dots(s_ptr + row * D, t_ptr + (n * M + matched(idx, n, row % K, K)) * D, D, ss, tt, st);
    out[row] = acc(1) - st / clamp_eps(std::sqrt(ss), e) / clamp_eps(std::sqrt(tt), e);
  }
}

template <typename scalar_t>
KDFAST_CPU_CLONES void match_loss_backward_rows(int64_t begin, int64_t end, const acc_t<scalar_t>* g_ptr,
                                                int64_t g_s0, int64_t g_s1, const scalar_t* s_ptr,
                                                const scalar_t* t_ptr, const int64_t* idx, scalar_t* out_ptr,
                                                int64_t K, int64_t M, int64_t D, double eps, double grad_scale) {
  using acc = acc_t<scalar_t>;
  const acc e = static_cast<acc>(eps), scale = static_cast<acc>(grad_scale);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t n = row / K, i = row % K;
    const scalar_t* s = s_ptr + row * D;
    const scalar_t* t = t_ptr + (n * M + matched(idx, n, i, K)) * D;
    acc ss, tt, st;
    pair_dots(s, t, D, ss, tt, st);
    const acc ns = std::sqrt(ss);
    const acc ncs = clamp_eps(ns, e), nct = clamp_eps(std::sqrt(tt), e);
    // -g (t^ - [ns >= eps] cos s^) / ncs with the unit vectors s^ = s / ncs, t^ = t / nct divided, not multiplied
    // by a rounded reciprocal, and cos = <s^, t^>: for parallel rows (always so at D = 1) the difference is then
    // exactly 0, the true gradient, instead of rounding noise / ||s||.
    acc cs = 0;
    if (ns >= e) {
#pragma omp simd reduction(+ : cs)
      for (int64_t d = 0; d < D; ++d) {
        cs += (static_cast<acc>(s[d]) / ncs) * (static_cast<acc>(t[d]) / nct);
      }
    }
    const acc outer = -g_ptr[n * g_s0 + i * g_s1] * scale / ncs;
    scalar_t* o = out_ptr + row * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) {
      o[d] = static_cast<scalar_t>(outer * (static_cast<acc>(t[d]) / nct - cs * (static_cast<acc>(s[d]) / ncs)));
    }
    (void)st;
  }
}

void check_pair(const at::Tensor& a, const at::Tensor& b, const char* a_name, const char* b_name) {
  check_input(a, a_name, 3, at::kCPU);
  check_input(b, b_name, 3, at::kCPU);
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), a_name, " and ", b_name, " must have the same dtype, got ",
              a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK(a.size(0) == b.size(0) && a.size(2) == b.size(2), a_name, " (B,K,D) and ", b_name,
              " (B,M,D) must agree in B and D, got ", a.sizes(), " and ", b.sizes());
}

at::Tensor cosine_forward_kernel(const at::Tensor& a_, const at::Tensor& b_, double eps) {
  check_pair(a_, b_, "a", "b");
  check_eps(eps);
  const auto a = a_.contiguous();
  const auto b = b_.contiguous();
  const int64_t B = a.size(0), K = a.size(1), M = b.size(1), D = a.size(2);
  auto out = empty_output({B, K, M}, a.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "_slot_cosine_similarity_forward", [&] {
    at::parallel_for(0, B, grain((K + 1) * (M + 1) * D), [&](int64_t begin, int64_t end) {
      cosine_forward_batches<scalar_t>(begin, end, a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
                                       out.mutable_data_ptr<scalar_t>(), K, M, D, eps);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> cosine_backward_kernel(const at::Tensor& grad_, const at::Tensor& a_,
                                                          const at::Tensor& b_, double eps) {
  check_pair(a_, b_, "a", "b");
  check_input(grad_, "grad", 3, at::kCPU);
  check_eps(eps);
  TORCH_CHECK(grad_.scalar_type() == a_.scalar_type(), "grad must have the dtype of a (", a_.scalar_type(),
              "), got ", grad_.scalar_type());
  TORCH_CHECK(grad_.size(0) == a_.size(0) && grad_.size(1) == a_.size(1) && grad_.size(2) == b_.size(1),
              "grad must have shape (B,K,M) = ", at::IntArrayRef{a_.size(0), a_.size(1), b_.size(1)},
              ", got ", grad_.sizes());
  const auto a = a_.contiguous();
  const auto b = b_.contiguous();
  const auto grad = grad_.contiguous();
  const int64_t B = a.size(0), K = a.size(1), M = b.size(1), D = a.size(2);
  auto grad_a = empty_output({B, K, D}, a.options());
  auto grad_b = empty_output({B, M, D}, b.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "_slot_cosine_similarity_backward", [&] {
    at::parallel_for(0, B, grain(3 * (K + 1) * (M + 1) * D), [&](int64_t begin, int64_t end) {
      cosine_backward_batches<scalar_t>(begin, end, grad.const_data_ptr<scalar_t>(), a.const_data_ptr<scalar_t>(),
                                        b.const_data_ptr<scalar_t>(), grad_a.mutable_data_ptr<scalar_t>(),
                                        grad_b.mutable_data_ptr<scalar_t>(), K, M, D, eps);
    });
  });
  return {grad_a, grad_b};
}

// Checks student/teacher/assignment; returns the assignment made contiguous (undefined for identity).
at::Tensor check_match_inputs(const at::Tensor& student, const at::Tensor& teacher,
                              const c10::optional<at::Tensor>& assignment, double eps) {
  check_pair(student, teacher, "student", "teacher");
  check_eps(eps);
  const int64_t B = student.size(0), K = student.size(1), M = teacher.size(1);
  if (!assignment.has_value() || !assignment->defined()) {
    TORCH_CHECK(M == K, "without an assignment teacher must have as many slots as student (", K, "), got ", M);
    return at::Tensor();
  }
  const auto& idx = *assignment;
  TORCH_CHECK(idx.device().type() == at::kCPU, "assignment must be on cpu, got ", idx.device());
  TORCH_CHECK(idx.scalar_type() == at::kLong, "assignment must be int64, got ", idx.scalar_type());
  TORCH_CHECK(idx.dim() == 2 && idx.size(0) == B && idx.size(1) == K, "assignment must have shape (B,K) = ",
              at::IntArrayRef{B, K}, ", got ", idx.sizes());
  auto contiguous = idx.contiguous();
  // Checked here, not in the kernels: an index outside [0, M) would read outside teacher.
  const int64_t* p = contiguous.const_data_ptr<int64_t>();
  for (int64_t k = 0; k < B * K; ++k) {
    TORCH_CHECK(p[k] >= 0 && p[k] < M, "assignment[", k / K, "][", k % K, "] = ", p[k], " is out of range [0, ",
                M, ")");
  }
  return contiguous;
}

at::Tensor match_loss_forward_kernel(const at::Tensor& student_, const at::Tensor& teacher_,
                                     const c10::optional<at::Tensor>& assignment, double eps) {
  const auto idx = check_match_inputs(student_, teacher_, assignment, eps);
  const auto student = student_.contiguous();
  const auto teacher = teacher_.contiguous();
  const int64_t B = student.size(0), K = student.size(1), M = teacher.size(1), D = student.size(2);
  auto losses = empty_output({B, K}, student.options().dtype(acc_dtype(student.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "_slot_match_loss_forward", [&] {
    at::parallel_for(0, B * K, grain(3 * D), [&](int64_t begin, int64_t end) {
      match_loss_forward_rows<scalar_t>(begin, end, student.const_data_ptr<scalar_t>(),
                                        teacher.const_data_ptr<scalar_t>(),
                                        idx.defined() ? idx.const_data_ptr<int64_t>() : nullptr,
                                        losses.mutable_data_ptr<acc_t<scalar_t>>(), K, M, D, eps);
    });
  });
  return losses;
}

at::Tensor match_loss_backward_kernel(const at::Tensor& grad_losses, const at::Tensor& student_,
                                      const at::Tensor& teacher_, const c10::optional<at::Tensor>& assignment,
                                      double eps, double grad_scale) {
  const auto idx = check_match_inputs(student_, teacher_, assignment, eps);
  const int64_t B = student_.size(0), K = student_.size(1), M = teacher_.size(1), D = student_.size(2);
  check_input(grad_losses, "grad_losses", 2, at::kCPU);
  TORCH_CHECK(grad_losses.size(0) == B && grad_losses.size(1) == K, "grad_losses must have shape (B,K) = ",
              at::IntArrayRef{B, K}, ", got ", grad_losses.sizes());
  const auto student = student_.contiguous();
  const auto teacher = teacher_.contiguous();
  // Read through strides: the gradient of a mean or sum arrives expanded (stride 0).
  const auto g = grad_losses.to(acc_dtype(student.scalar_type()));
  auto grad_student = empty_output({B, K, D}, student.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "_slot_match_loss_backward", [&] {
    at::parallel_for(0, B * K, grain(5 * D), [&](int64_t begin, int64_t end) {
      match_loss_backward_rows<scalar_t>(begin, end, g.const_data_ptr<acc_t<scalar_t>>(), g.stride(0), g.stride(1),
                                         student.const_data_ptr<scalar_t>(), teacher.const_data_ptr<scalar_t>(),
                                         idx.defined() ? idx.const_data_ptr<int64_t>() : nullptr,
                                         grad_student.mutable_data_ptr<scalar_t>(), K, M, D, eps, grad_scale);
    });
  });
  return grad_student;
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("_slot_cosine_similarity_forward", TORCH_FN(cosine_forward_kernel));
  m.impl("_slot_cosine_similarity_backward", TORCH_FN(cosine_backward_kernel));
  m.impl("_slot_match_loss_forward", TORCH_FN(match_loss_forward_kernel));
  m.impl("_slot_match_loss_backward", TORCH_FN(match_loss_backward_kernel));
}

}  // namespace kdfast
