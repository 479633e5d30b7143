// Helpers shared by the kdfast kernels (every device).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <cstdlib>
#include <cstring>
#include <limits>

namespace kdfast {

// Reductions run in at::opmath_type: float for float/half/bfloat16, double for double.
template <typename scalar_t>
using acc_t = at::opmath_type<scalar_t>;

inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// KDFAST_POISON=1 fills outputs with NaN so that tests catch elements a kernel never writes.
// Read once: the environment lookup is not free and must not differ between calls.
inline bool poison_outputs() {
  static const bool on = [] {
    const char* v = std::getenv("KDFAST_POISON");
    return v != nullptr && std::strcmp(v, "1") == 0;
  }();
  return on;
}

inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  if (poison_outputs()) {
    return at::full(sizes, std::numeric_limits<double>::quiet_NaN(), options);
  }
  return at::empty(sizes, options);
}

// The extension is built for the baseline ISA (SSE2 on x86-64); hot CPU loops are also compiled for
// AVX2+FMA and AVX-512, and the loader picks the best clone once (ifunc), so calls pay nothing extra.
// A cloned function must not throw or allocate: GCC 12 turns an exception leaving it into std::terminate.
// Define KDFAST_CPU_CLONES empty (or as one target) when building to test a single code path.
#ifndef KDFAST_CPU_CLONES
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define KDFAST_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define KDFAST_CPU_CLONES
#endif
#endif

// Helpers that KDFAST_CPU_CLONES functions call: GCC does not inline a plain inline function into a
// target_clones clone, so without this the clone calls the baseline (SSE2, unvectorised) copy.
#define KDFAST_INLINE inline __attribute__((always_inline))

// max(n, eps) written so that a NaN norm stays NaN, as torch's clamp_min does.
template <typename T>
KDFAST_INLINE T clamp_eps(T n, T eps) {
  return n < eps ? eps : n;
}

inline void check_input(const at::Tensor& t, const char* name, int64_t dim, at::DeviceType device) {
  TORCH_CHECK(t.defined(), name, " must be a tensor, got None");
  TORCH_CHECK(t.device().type() == device, name, " must be on ", device, ", got ", t.device());
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dimensions, got shape ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name,
              " must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
}

inline void check_eps(double eps) {
  TORCH_CHECK(eps >= 0 && eps < std::numeric_limits<double>::infinity(),
              "eps must be finite and non-negative, got ", eps);
}

}  // namespace kdfast
