// 64-byte vectors (GCC/Clang vector extensions) shared by the CPU kernels that work on whole vectors of one
// floating type: one zmm in the AVX-512 clone, two ymm in the AVX2 clone, four xmm in the baseline
// (KDFAST_CPU_CLONES). Every helper is always inlined into its (cloned) caller, so it is compiled for the
// caller's instruction set; returning a 64-byte vector has no fixed ABI without AVX-512 otherwise.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "../common.h"

#pragma GCC diagnostic ignored "-Wpsabi"

namespace kdfast {
namespace vec {

template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(64)));
  static constexpr int64_t lanes = 64 / sizeof(T);
};
template <typename T>
using vec_t = typename Vec<T>::type;

template <typename T>
KDFAST_INLINE vec_t<T> vload(const T* p) {
  vec_t<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
KDFAST_INLINE void vstore(T* p, const vec_t<T>& v) {
  std::memcpy(p, &v, sizeof(v));
}

// An explicit broadcast of lane 0: GCC emits one vbroadcast (from memory where x comes from memory). The
// arithmetic spellings (0 + x, x - 0) get a scalar add first or, inside unrolled blocks, lane-by-lane inserts.
template <typename T>
KDFAST_INLINE vec_t<T> vsplat(T x) {
  const vec_t<T> v = {x};
  if constexpr (Vec<T>::lanes == 16) {
    return __builtin_shufflevector(v, v, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
  } else {
    static_assert(Vec<T>::lanes == 8, "vsplat: 64-byte vectors of float or double");
    return __builtin_shufflevector(v, v, 0, 0, 0, 0, 0, 0, 0, 0);
  }
}

// A NaN lane needs no care in callers: exp(NaN - m) is NaN, so sums over it are NaN, as in torch.
template <typename T>
KDFAST_INLINE vec_t<T> vmax(const vec_t<T>& a, const vec_t<T>& b) {
  return a > b ? a : b;
}

template <typename T>
KDFAST_INLINE T hmax(const vec_t<T>& v) {
  T m = v[0];
  for (int64_t l = 1; l < Vec<T>::lanes; ++l) {
    m = v[l] > m ? v[l] : m;
  }
  return m;
}

template <typename T>
KDFAST_INLINE T hsum(const vec_t<T>& v) {
  T s = v[0];
  for (int64_t l = 1; l < Vec<T>::lanes; ++l) {
    s += v[l];
  }
  return s;
}

// exp of 16 floats for arguments <= ~0 (x - max): exp(x) = 2^n exp(r), n = round(x / ln 2) by the 1.5 * 2^23
// trick, r = x - n ln 2 (ln 2 in two parts), exp(r) by Cephes' degree-5 polynomial (~1 ulp). Below -87.3
// (float's normal range, and -inf) the result is 0; NaN stays NaN.
KDFAST_INLINE vec_t<float> vexp(vec_t<float> x) {
  typedef int32_t vint __attribute__((vector_size(64)));
  using vf = vec_t<float>;
  const vf round = vsplat(12582912.0f);
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
KDFAST_INLINE vec_t<double> vexp(vec_t<double> x) {
  for (int64_t l = 0; l < Vec<double>::lanes; ++l) {
    x[l] = std::exp(x[l]);
  }
  return x;
}

}  // namespace vec
}  // namespace kdfast
