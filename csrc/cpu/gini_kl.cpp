// CPU kernels of the Gini impurity / KL reductions (design.md 3.4).
//
// Statistics: class_sums[c, f] = sum_{b: y_b = c} mean_{h,w} |a[b, f, h, w]| and counts[c], one pass over the
// activations, accumulated and returned in float64 for every input dtype (float lanes widened to double lanes;
// float32 inputs are exact in float64): the KL gradient is ill-conditioned in these sums, and float32 sums alone
// would cost it up to ~1e-4 relative error. The backward writes sign(a) * grad_class_sums[y_b, f] / (H W) in one
// pass, each element rounded once to the activations' dtype. Threads own blocks
// of features and walk the batch in order, so every sum has one fixed order: the same bits on every run and for
// every number of threads, without a reduction across threads. The activations are read through their strides
// (channels-last and (B, F) rows are walked with the features innermost, NCHW with the positions innermost).
//
// Finish: p, gini, q and kl from the (C, F) table in float64, whatever the input dtype (the backward's
// projection cancels; see kdfast.reference.gini_kl_backward). Partial sums over features use a fixed partition
// (kTableBlock), again independent of the number of threads.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "../common.h"
#include "vec.h"

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define KDFAST_STREAMING_STORES 1
#endif

namespace kdfast {
namespace {

// Element operations per thread below which the OpenMP fork costs more than it saves.
constexpr int64_t kParallelWork = 1 << 15;
// How far ahead the NCHW statistics pass prefetches (measured: 2-4 KB is 5-15% faster at one thread than none).
constexpr int64_t kPrefetchBytes = 3072;
// Features per block in the table passes: fixed, so that partial sums do not depend on the thread count.
constexpr int64_t kTableBlock = 256;

int64_t grain(int64_t work_per_item) {
  return std::max<int64_t>(1, kParallelWork / std::max<int64_t>(1, work_per_item));
}

// Strides and spatial size of a (B, F, H, W) tensor; a (B, F) tensor is a 1 x 1 map.
struct Layout {
  int64_t sb, sf, sh, sw, H, W;
};

Layout layout_of(const at::Tensor& t) {
  if (t.dim() == 2) {
    return {t.stride(0), t.stride(1), 0, 0, 1, 1};
  }
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3), t.size(2), t.size(3)};
}

enum class Walk {
  kFeaturesInner,   // features contiguous (channels-last, (B, F) rows): vectorise over features
  kPositionsInner,  // the H*W positions of a feature contiguous (NCHW): vectorise over positions
  kStrided,         // anything else (sliced, expanded, permuted maps): plain loops
};

Walk walk_of(const Layout& l) {
  if (l.sf == 1) {
    return Walk::kFeaturesInner;
  }
  if (l.H * l.W == 1 || ((l.H == 1 || l.sh == l.W * l.sw) && l.sw == 1)) {
    return Walk::kPositionsInner;
  }
  return Walk::kStrided;
}

// acc[i] += |x[i]| in float64, i < P. Written as a loop over arrays: GCC 12 vectorises it with whole-register
// conversions (vcvtps2pd ymm -> zmm), where __builtin_convertvector on vector types is split into quarters.
template <int64_t P, typename scalar_t>
KDFAST_INLINE void add_abs(double* __restrict acc, const scalar_t* __restrict x) {
#pragma omp simd
  for (int64_t i = 0; i < P; ++i) {
    acc[i] += std::abs(static_cast<double>(x[i]));
  }
}

// Lane sums of 8 vectors of 8 doubles: result[r] = sum of the lanes of v[r], by a butterfly of shuffles and 7
// vector adds (pairs of lanes, then quads, then halves; one fixed order).
using Vec8d = vec::vec_t<double>;
KDFAST_INLINE Vec8d pair_sums(const Vec8d& a, const Vec8d& b) {
  return __builtin_shufflevector(a, b, 0, 8, 2, 10, 4, 12, 6, 14) + __builtin_shufflevector(a, b, 1, 9, 3, 11, 5, 13, 7, 15);
}
KDFAST_INLINE Vec8d quad_sums(const Vec8d& a, const Vec8d& b) {
  return __builtin_shufflevector(a, b, 0, 1, 8, 9, 4, 5, 12, 13) + __builtin_shufflevector(a, b, 2, 3, 10, 11, 6, 7, 14, 15);
}
KDFAST_INLINE Vec8d transposed_sums(const Vec8d* v) {
  const Vec8d low = quad_sums(pair_sums(v[0], v[1]), pair_sums(v[2], v[3]));
  const Vec8d high = quad_sums(pair_sums(v[4], v[5]), pair_sums(v[6], v[7]));
  return __builtin_shufflevector(low, high, 0, 1, 2, 3, 8, 9, 10, 11) +
         __builtin_shufflevector(low, high, 4, 5, 6, 7, 12, 13, 14, 15);
}

template <typename T>
KDFAST_INLINE T sign_of(T x) {
  // torch.sign (and autograd of abs): 0 at 0 and at NaN
  return x > T(0) ? T(1) : (x < T(0) ? T(-1) : T(0));
}

// out[j] += mean over positions of |a[b, f0 + j, :, :]| for each sample b of members[0 : count], in that order,
// j < nf, in float64. pooled (nf) is scratch.
template <typename scalar_t>
KDFAST_CPU_CLONES void add_pooled(const scalar_t* a, Layout l, Walk walk, const int64_t* members, int64_t count,
                                  int64_t f0, int64_t nf, double inv_hw, double* pooled, double* out) {
  const int64_t HW = l.H * l.W;
  for (int64_t m = 0; m < count; ++m) {
    const scalar_t* base = a + members[m] * l.sb + f0 * l.sf;
    if (walk == Walk::kFeaturesInner) {
      std::fill(pooled, pooled + nf, 0.0);
      for (int64_t h = 0; h < l.H; ++h) {
        for (int64_t w = 0; w < l.W; ++w) {
          const scalar_t* x = base + h * l.sh + w * l.sw;
#pragma omp simd
          for (int64_t j = 0; j < nf; ++j) {
            pooled[j] += std::abs(static_cast<double>(x[j]));
          }
        }
      }
#pragma omp simd
      for (int64_t j = 0; j < nf; ++j) {
        out[j] += pooled[j] * inv_hw;
      }
      continue;
    }
    int64_t j = 0;
    if (walk == Walk::kPositionsInner) {
      // Eight features at a time, each summed in its own registers, and one transposing butterfly for the
      // eight sums: a ResNet map has 16 or 49 positions, so a horizontal sum per feature would cost about as
      // much as its loads. The positions past the last whole vector are added one by one.
      constexpr int64_t L = vec::Vec<double>::lanes, P = 2 * L;
      const int64_t whole = HW / P * P;
      for (; whole > 0 && j + L <= nf; j += L) {
        const scalar_t* x = base + j * l.sf;
        // the lines of the group kPrefetchBytes ahead: the hardware prefetchers restart at every 4 KB page
        const char* ahead = reinterpret_cast<const char*>(x) + kPrefetchBytes;
        for (int64_t line = 0; line < L * l.sf * int64_t(sizeof(scalar_t)); line += 64) {
          __builtin_prefetch(ahead + line);
        }
        alignas(64) double acc[L][P] = {};
        for (int64_t p = 0; p < whole; p += P) {
          for (int64_t r = 0; r < L; ++r) {
            add_abs<P>(acc[r], x + r * l.sf + p);
          }
        }
        Vec8d halves[L];
        for (int64_t r = 0; r < L; ++r) {
          Vec8d low, high;
          std::memcpy(&low, acc[r], sizeof(low));
          std::memcpy(&high, acc[r] + L, sizeof(high));
          halves[r] = low + high;
        }
        alignas(64) double sums[L];
        const Vec8d v = transposed_sums(halves);
        std::memcpy(sums, &v, sizeof(v));
        for (int64_t r = 0; r < L; ++r) {
          for (int64_t p = whole; p < HW; ++p) {
            sums[r] += std::abs(static_cast<double>(x[r * l.sf + p]));
          }
          out[j + r] += sums[r] * inv_hw;
        }
      }
    }
    // the features left (any layout): one by one
    for (; j < nf; ++j) {
      double total = 0;
      for (int64_t h = 0; h < l.H; ++h) {
        for (int64_t w = 0; w < l.W; ++w) {
          total += std::abs(static_cast<double>(base[j * l.sf + h * l.sh + w * l.sw]));
        }
      }
      out[j] += total * inv_hw;
    }
  }
}

// grad[b, f0 + j, :, :] = sign(a[b, f0 + j, :, :]) * g[j], j < nf; grad has layout lg (the same strides as
// a's la unless walk is kStrided).
template <typename scalar_t>
KDFAST_CPU_CLONES void scatter_features(const scalar_t* a, Layout la, scalar_t* grad, Layout lg, Walk walk, int64_t b,
                                        int64_t f0, int64_t nf, const acc_t<scalar_t>* g) {
  using acc = acc_t<scalar_t>;
  const scalar_t* in = a + b * la.sb + f0 * la.sf;
  scalar_t* out = grad + b * lg.sb + f0 * lg.sf;
  if (walk == Walk::kFeaturesInner) {
    for (int64_t h = 0; h < la.H; ++h) {
      for (int64_t w = 0; w < la.W; ++w) {
        const scalar_t* x = in + h * la.sh + w * la.sw;
        scalar_t* y = out + h * lg.sh + w * lg.sw;
#pragma omp simd
        for (int64_t j = 0; j < nf; ++j) {
          y[j] = static_cast<scalar_t>(sign_of(static_cast<acc>(x[j])) * g[j]);
        }
      }
    }
  } else if (walk == Walk::kPositionsInner) {
    const int64_t HW = la.H * la.W;
    for (int64_t j = 0; j < nf; ++j) {
      const scalar_t* x = in + j * la.sf;
      scalar_t* y = out + j * lg.sf;
      const acc gj = g[j];
#pragma omp simd
      for (int64_t p = 0; p < HW; ++p) {
        y[p] = static_cast<scalar_t>(sign_of(static_cast<acc>(x[p])) * gj);
      }
    }
  } else {
    for (int64_t j = 0; j < nf; ++j) {
      for (int64_t h = 0; h < la.H; ++h) {
        for (int64_t w = 0; w < la.W; ++w) {
          const acc x = static_cast<acc>(in[j * la.sf + h * la.sh + w * la.sw]);
          out[j * lg.sf + h * lg.sh + w * lg.sw] = static_cast<scalar_t>(sign_of(x) * g[j]);
        }
      }
    }
  }
}

#ifdef KDFAST_STREAMING_STORES
// The float32 NCHW backward of a run of nf whole feature maps of HW >= 16 positions, contiguous in a and in grad:
// grad = sign(a) * g[feature], as scatter_features computes it, written with streaming stores. The gradient is
// not read again soon, and a plain store first reads every line it writes: a third of the backward's traffic.
// An aligned 16-lane chunk holds the end of at most one feature map (HW >= 16), so its multipliers are one
// splat or a blend of two.
__attribute__((target("avx512f"))) void scatter_positions_streaming(const float* x, float* y, int64_t nf, int64_t HW,
                                                                    const float* g) {
  const int64_t n = nf * HW;
  auto one = [&](int64_t i) { y[i] = sign_of(x[i]) * g[i / HW]; };
  // up to the first 64-byte boundary of y, and the last partial chunk, one element at a time
  const int64_t head = std::min<int64_t>(n, ((64 - reinterpret_cast<uintptr_t>(y) % 64) % 64) / sizeof(float));
  for (int64_t i = 0; i < head; ++i) {
    one(i);
  }
  int64_t f = head / HW, end_of_f = (f + 1) * HW, i = head;
  for (; i + 16 <= n; i += 16) {
    __m512 gv = _mm512_set1_ps(g[f]);
    if (end_of_f < i + 16) {  // feature f ends inside this chunk: lanes from end_of_f on take g[f + 1]
      const __mmask16 next = static_cast<__mmask16>(0xFFFFu << (end_of_f - i));
      gv = _mm512_mask_mov_ps(gv, next, _mm512_set1_ps(g[f + 1]));
    }
    if (end_of_f <= i + 16) {
      ++f;
      end_of_f += HW;
    }
    const __m512 v = _mm512_loadu_ps(x + i);
    __m512 r = _mm512_mul_ps(v, gv);  // 0 (signed) at 0, NaN at NaN
    r = _mm512_mask_mov_ps(r, _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_GT_OQ), gv);
    r = _mm512_mask_mov_ps(r, _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_LT_OQ),
                           _mm512_sub_ps(_mm512_setzero_ps(), gv));
    _mm512_stream_ps(y + i, r);
  }
  for (; i < n; ++i) {
    one(i);
  }
}

bool streaming_stores_supported() {
  static const bool supported = __builtin_cpu_supports("avx512f");
  return supported;
}
#endif

// Features per block of the statistics passes: one block per thread, a multiple of 16 (whole cache lines of
// the table's rows), so that each thread reads the longest contiguous runs of a sample that it can (the hardware
// prefetchers lose a stream at every jump). The results do not depend on it.
int64_t feature_block(int64_t F) {
  const int64_t per = (F + at::get_num_threads() - 1) / at::get_num_threads();
  return std::max<int64_t>((per + 15) / 16 * 16, 16);
}

// The samples grouped by class, each class's in batch order (a stable counting sort): class c's are
// members[offsets[c] : offsets[c + 1]].
struct ClassMembers {
  std::vector<int64_t> members, offsets;
  ClassMembers(const int64_t* y, int64_t B, int64_t C) : members(B), offsets(C + 1, 0) {
    for (int64_t b = 0; b < B; ++b) {
      ++offsets[y[b] + 1];
    }
    for (int64_t c = 0; c < C; ++c) {
      offsets[c + 1] += offsets[c];
    }
    std::vector<int64_t> next(offsets.begin(), offsets.end() - 1);
    for (int64_t b = 0; b < B; ++b) {
      members[next[y[b]]++] = b;
    }
  }
};

// class_sums[:, f0 : f0 + nf] (float64) for one block of features, class by class: a class's row stays in
// cache while its samples are added, in batch order, so each class sum has one order whatever the threads.
template <typename scalar_t>
void statistics_block(const scalar_t* a, Layout l, Walk walk, const ClassMembers& classes, int64_t C, int64_t F,
                      int64_t f0, int64_t nf, double inv_hw, double* pooled, double* sums) {
  for (int64_t c = 0; c < C; ++c) {
    double* row = sums + c * F + f0;
    std::fill(row, row + nf, 0.0);
    const int64_t first = classes.offsets[c], count = classes.offsets[c + 1] - first;
    add_pooled<scalar_t>(a, l, walk, classes.members.data() + first, count, f0, nf, inv_hw, pooled, row);
  }
}

void check_activations(const at::Tensor& a) {
  TORCH_CHECK(a.defined(), "activations must be a tensor, got None");
  TORCH_CHECK(a.device().type() == at::kCPU, "activations must be on cpu, got ", a.device());
  TORCH_CHECK(a.dim() == 2 || a.dim() == 4, "activations must have shape (B, F, H, W) or (B, F), got ", a.sizes());
  TORCH_CHECK(at::isFloatingType(a.scalar_type()), "activations must be float32, float64, float16 or bfloat16, got ",
              a.scalar_type());
}

// Checks labels against B and C; returns them contiguous. Checked here, not only in Python: a label outside
// [0, C) would index outside the table.
at::Tensor check_labels(const at::Tensor& labels, int64_t B, int64_t C) {
  TORCH_CHECK(labels.defined() && labels.device().type() == at::kCPU && labels.scalar_type() == at::kLong &&
                  labels.dim() == 1 && labels.size(0) == B,
              "labels must be a (B,) = (", B, ",) int64 cpu tensor, got ", labels.sizes(), " ", labels.scalar_type(),
              " on ", labels.device());
  auto contiguous = labels.contiguous();
  const int64_t* y = contiguous.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(y[b] >= 0 && y[b] < C, "labels[", b, "] = ", y[b], " is out of range [0, num_classes=", C, ")");
  }
  return contiguous;
}

std::tuple<at::Tensor, at::Tensor> statistics_kernel(const at::Tensor& a, const at::Tensor& labels_,
                                                     int64_t num_classes) {
  check_activations(a);
  TORCH_CHECK(num_classes >= 1, "num_classes must be >= 1, got ", num_classes);
  const int64_t B = a.size(0), F = a.size(1), C = num_classes;
  const auto labels = check_labels(labels_, B, C);
  const int64_t* y = labels.const_data_ptr<int64_t>();
  auto counts = at::zeros({C}, labels.options());
  int64_t* n = counts.mutable_data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    ++n[y[b]];
  }
  auto sums = empty_output({C, F}, a.options().dtype(at::kDouble));
  const Layout l = layout_of(a);
  const Walk walk = walk_of(l);
  const int64_t fb = feature_block(F), blocks = (F + fb - 1) / fb;
  const ClassMembers classes(y, B, C);
  double* s = sums.mutable_data_ptr<double>();
  const double inv_hw = 1.0 / static_cast<double>(l.H * l.W);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "_gini_kl_statistics", [&] {
    const scalar_t* a_ptr = a.const_data_ptr<scalar_t>();
    at::parallel_for(0, blocks, grain((B * l.H * l.W + C) * fb), [&](int64_t begin, int64_t end) {
      std::vector<double> pooled(fb);
      for (int64_t blk = begin; blk < end; ++blk) {
        statistics_block<scalar_t>(a_ptr, l, walk, classes, C, F, blk * fb, std::min(fb, F - blk * fb), inv_hw,
                                   pooled.data(), s);
      }
    });
  });
  return {sums, counts};
}

at::Tensor statistics_backward_kernel(const at::Tensor& grad_sums_, const at::Tensor& a, const at::Tensor& labels_) {
  check_activations(a);
  const int64_t B = a.size(0), F = a.size(1);
  TORCH_CHECK(grad_sums_.defined() && grad_sums_.device().type() == at::kCPU && grad_sums_.dim() == 2 &&
                  grad_sums_.size(1) == F && at::isFloatingType(grad_sums_.scalar_type()),
              "grad_class_sums must be a floating cpu tensor of shape (C, F) with F = ", F, ", got ",
              grad_sums_.sizes());
  const int64_t C = grad_sums_.size(0);
  const auto labels = check_labels(labels_, B, C);
  const int64_t* y = labels.const_data_ptr<int64_t>();
  const auto grad_sums = grad_sums_.to(at::kDouble).contiguous();
  auto grad = at::empty_like(a);
  if (poison_outputs()) {
    grad.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  const Layout la = layout_of(a), lg = layout_of(grad);
  const bool same = la.sb == lg.sb && la.sf == lg.sf && la.sh == lg.sh && la.sw == lg.sw;
  const Walk walk = same ? walk_of(la) : Walk::kStrided;
  const int64_t fb = feature_block(F), blocks = (F + fb - 1) / fb;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "_gini_kl_statistics_backward", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* a_ptr = a.const_data_ptr<scalar_t>();
    scalar_t* grad_ptr = grad.mutable_data_ptr<scalar_t>();
    const double* gs = grad_sums.const_data_ptr<double>();
    const int64_t HW = la.H * la.W;
    const double inv_hw = 1.0 / static_cast<double>(HW);
#ifdef KDFAST_STREAMING_STORES
    const bool streaming = HW >= 16 && streaming_stores_supported();
#endif
    at::parallel_for(0, B * blocks, grain(2 * HW * fb), [&](int64_t begin, int64_t end) {
      std::vector<acc> g(fb);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / blocks, f0 = (item % blocks) * fb, nf = std::min(fb, F - f0);
        const double* row = gs + y[b] * F + f0;
        // g / (H W) rounded once (for float32, to float32); sign(a) * g is then exact
        for (int64_t j = 0; j < nf; ++j) {
          g[j] = static_cast<acc>(row[j] * inv_hw);
        }
#ifdef KDFAST_STREAMING_STORES
        if (std::is_same_v<scalar_t, float>) {
          if (streaming && walk == Walk::kPositionsInner && la.sf == HW && lg.sf == HW) {
            // (a plain `if`, not a template: this branch is compiled for every dtype and taken for float32)
            scatter_positions_streaming(reinterpret_cast<const float*>(a_ptr + b * la.sb + f0 * HW),
                                        reinterpret_cast<float*>(grad_ptr + b * lg.sb + f0 * HW), nf, HW,
                                        reinterpret_cast<const float*>(g.data()));
            continue;
          }
        }
#endif
        scatter_features<scalar_t>(a_ptr, la, grad_ptr, lg, walk, b, f0, nf, g.data());
      }
#ifdef KDFAST_STREAMING_STORES
      _mm_sfence();  // streaming stores are weakly ordered: visible before this thread's work counts as done
#endif
    });
  });
  return grad;
}

// ------------------------------------------------------------------------------------------ the (C, F) table
//
// Classes with count 0 are absent: their rows are skipped (gini_kl_statistics leaves them 0; a nonzero row there
// is ignored) and get gradient 0. With C = 1000 and a batch of 64 that skips most of the table.

// What the finish needs of the table, in float64: the present classes, 1 / (n_c + delta), 1 / Z_f,
// P_c = sum_f p[f, c] (0 for absent classes), their total, the batch size, and sum_f (1 - sum_c p^2).
struct TableStats {
  std::vector<int64_t> present;
  std::vector<double> inv_n, inv_z, colsum;
  double total = 0, batch = 0, gini_sum = 0;
};

// Z_f = sum_c S[f, c] + delta for the features [f0, f0 + nf) (classes outer, features inner and contiguous).
template <typename scalar_t>
KDFAST_CPU_CLONES void table_z(const scalar_t* cs, const int64_t* present, int64_t K, int64_t F, int64_t f0,
                               int64_t nf, const double* inv_n, double delta, double* z) {
  std::fill(z + f0, z + f0 + nf, 0.0);
  for (int64_t k = 0; k < K; ++k) {
    const scalar_t* row = cs + present[k] * F;
    const double in = inv_n[k];
#pragma omp simd
    for (int64_t f = f0; f < f0 + nf; ++f) {
      z[f] += static_cast<double>(row[f]) * in;
    }
  }
  for (int64_t f = f0; f < f0 + nf; ++f) {
    z[f] += delta;
  }
}

// For the features [f0, f0 + nf): colpart[k] = sum_f p[f, present[k]]; returns sum_f (1 - sum_c p^2) (sq:
// scratch).
template <typename scalar_t>
KDFAST_CPU_CLONES double table_p(const scalar_t* cs, const int64_t* present, int64_t K, int64_t F, int64_t f0,
                                 int64_t nf, const double* inv_n, const double* inv_z, double* colpart, double* sq) {
  std::fill(sq, sq + nf, 0.0);
  for (int64_t k = 0; k < K; ++k) {
    const scalar_t* row = cs + present[k] * F + f0;
    const double in = inv_n[k];
    double rowsum = 0;
#pragma omp simd reduction(+ : rowsum)
    for (int64_t j = 0; j < nf; ++j) {
      const double p = static_cast<double>(row[j]) * in * inv_z[f0 + j];
      sq[j] += p * p;
      rowsum += p;
    }
    colpart[k] = rowsum;
  }
  double gini = 0;
  for (int64_t j = 0; j < nf; ++j) {
    gini += 1.0 - sq[j];
  }
  return gini;
}

template <typename scalar_t>
TableStats table_stats(const scalar_t* cs, const int64_t* n, int64_t C, int64_t F, double delta) {
  TableStats st;
  for (int64_t c = 0; c < C; ++c) {
    st.batch += static_cast<double>(n[c]);
    if (n[c] > 0) {
      st.present.push_back(c);
      st.inv_n.push_back(1.0 / (static_cast<double>(n[c]) + delta));
    }
  }
  const int64_t K = static_cast<int64_t>(st.present.size());
  st.inv_z.resize(F);
  const int64_t blocks = (F + kTableBlock - 1) / kTableBlock;
  std::vector<double> colpart(blocks * K), gini_part(blocks);
  at::parallel_for(0, blocks, grain(2 * K * kTableBlock), [&](int64_t begin, int64_t end) {
    std::vector<double> sq(kTableBlock);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t f0 = blk * kTableBlock, nf = std::min(kTableBlock, F - f0);
      table_z(cs, st.present.data(), K, F, f0, nf, st.inv_n.data(), delta, st.inv_z.data());
      for (int64_t f = f0; f < f0 + nf; ++f) {
        st.inv_z[f] = 1.0 / st.inv_z[f];
      }
      gini_part[blk] = table_p(cs, st.present.data(), K, F, f0, nf, st.inv_n.data(), st.inv_z.data(),
                               colpart.data() + blk * K, sq.data());
    }
  });
  // the blocks' partial sums in block order
  st.colsum.assign(C, 0.0);
  for (int64_t blk = 0; blk < blocks; ++blk) {
    for (int64_t k = 0; k < K; ++k) {
      st.colsum[st.present[k]] += colpart[blk * K + k];
    }
    st.gini_sum += gini_part[blk];
  }
  for (int64_t c = 0; c < C; ++c) {
    st.total += st.colsum[c];
  }
  return st;
}

inline double target_of(bool uniform, int64_t C, int64_t n, double batch) {
  return uniform ? 1.0 / static_cast<double>(C) : static_cast<double>(n) / batch;
}

void check_table(const at::Tensor& cs, const at::Tensor& counts, double delta) {
  TORCH_CHECK(cs.defined() && cs.device().type() == at::kCPU && cs.dim() == 2 &&
                  (cs.scalar_type() == at::kFloat || cs.scalar_type() == at::kDouble),
              "class_sums must be a float32 or float64 cpu tensor of shape (C, F), got ", cs.sizes(), " ",
              cs.scalar_type());
  TORCH_CHECK(counts.defined() && counts.device().type() == at::kCPU && counts.scalar_type() == at::kLong &&
                  counts.dim() == 1 && counts.size(0) == cs.size(0),
              "counts must be an int64 cpu tensor of shape (C,) = (", cs.size(0), ",), got ", counts.sizes(), " ",
              counts.scalar_type());
  TORCH_CHECK(delta > 0 && delta < std::numeric_limits<double>::infinity(), "delta must be finite and positive, got ",
              delta);
}

// counts contiguous, checked: non-negative, at least one sample in total.
at::Tensor checked_counts(const at::Tensor& counts) {
  auto contiguous = counts.contiguous();
  const int64_t* n = contiguous.const_data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t c = 0; c < contiguous.numel(); ++c) {
    TORCH_CHECK(n[c] >= 0, "counts[", c, "] = ", n[c], " is negative");
    total += n[c];
  }
  TORCH_CHECK(total >= 1, "counts must hold at least one sample in total, got none");
  return contiguous;
}

std::tuple<at::Tensor, at::Tensor> from_statistics_kernel(const at::Tensor& cs_, const at::Tensor& counts_,
                                                          bool uniform, double delta) {
  check_table(cs_, counts_, delta);
  const auto cs = cs_.contiguous();
  const auto counts = checked_counts(counts_);
  const int64_t C = cs.size(0), F = cs.size(1);
  const int64_t* n = counts.const_data_ptr<int64_t>();
  auto gini = empty_output({}, cs.options());
  auto kl = empty_output({}, cs.options());
  AT_DISPATCH_FLOATING_TYPES(cs.scalar_type(), "_gini_kl_from_statistics", [&] {
    const TableStats st = table_stats(cs.const_data_ptr<scalar_t>(), n, C, F, delta);
    double total_kl = 0;
    for (int64_t c = 0; c < C; ++c) {
      const double t = target_of(uniform, C, n[c], st.batch);
      if (t > 0) {  // terms with t_c = 0 are 0
        total_kl += t * (std::log(t) - std::log((st.colsum[c] + delta) / st.total));
      }
    }
    gini.fill_(st.gini_sum / static_cast<double>(F));
    kl.fill_(total_kl);
  });
  return {gini, kl};
}

// The closed-form gradient (kdfast.reference.gini_kl_backward) for the features [f0, f0 + nf) of the present
// classes (the caller zeroes the absent ones' rows):
//   h[c, f] = alpha p + beta_c, dot_f = sum_c h p, grad[c, f] = ((h - dot_f) / Z_f + gamma / Z_f^2) / (n_c + delta).
template <typename scalar_t>
KDFAST_CPU_CLONES void table_grad(const scalar_t* cs, const int64_t* present, int64_t K, int64_t F, int64_t f0,
                                  int64_t nf, const double* inv_n, const double* inv_z, const double* beta,
                                  double alpha, double gamma, double* dot, scalar_t* grad) {
  std::fill(dot, dot + nf, 0.0);
  for (int64_t k = 0; k < K; ++k) {
    const scalar_t* row = cs + present[k] * F + f0;
    const double in = inv_n[k], bk = beta[k];
#pragma omp simd
    for (int64_t j = 0; j < nf; ++j) {
      const double p = static_cast<double>(row[j]) * in * inv_z[f0 + j];
      dot[j] += (alpha * p + bk) * p;
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    const scalar_t* row = cs + present[k] * F + f0;
    scalar_t* out = grad + present[k] * F + f0;
    const double in = inv_n[k], bk = beta[k];
#pragma omp simd
    for (int64_t j = 0; j < nf; ++j) {
      const double iz = inv_z[f0 + j];
      const double p = static_cast<double>(row[j]) * in * iz;
      out[j] = static_cast<scalar_t>(((alpha * p + bk - dot[j]) * iz + gamma * iz * iz) * in);
    }
  }
}

at::Tensor from_statistics_backward_kernel(const at::Tensor& grad_gini, const at::Tensor& grad_kl,
                                           const at::Tensor& cs_, const at::Tensor& counts_, bool uniform,
                                           double delta) {
  check_table(cs_, counts_, delta);
  TORCH_CHECK(grad_gini.numel() == 1 && grad_kl.numel() == 1, "grad_gini and grad_kl must be scalars, got shapes ",
              grad_gini.sizes(), " and ", grad_kl.sizes());
  const auto cs = cs_.contiguous();
  const auto counts = checked_counts(counts_);
  const int64_t C = cs.size(0), F = cs.size(1);
  const int64_t* n = counts.const_data_ptr<int64_t>();
  const double g_gini = grad_gini.item<double>(), g_kl = grad_kl.item<double>();
  auto grad = empty_output({C, F}, cs.options());
  AT_DISPATCH_FLOATING_TYPES(cs.scalar_type(), "_gini_kl_from_statistics_backward", [&] {
    const scalar_t* cs_ptr = cs.const_data_ptr<scalar_t>();
    const TableStats st = table_stats(cs_ptr, n, C, F, delta);
    const int64_t K = static_cast<int64_t>(st.present.size());
    std::vector<double> beta(K);
    double t_sum = 0;
    for (int64_t c = 0; c < C; ++c) {
      t_sum += target_of(uniform, C, n[c], st.batch);
    }
    for (int64_t k = 0; k < K; ++k) {
      const int64_t c = st.present[k];
      beta[k] = -g_kl * target_of(uniform, C, n[c], st.batch) / (st.colsum[c] + delta);
    }
    const double alpha = -2.0 * g_gini / static_cast<double>(F);
    // the KL normaliser's share, left after the projection cancels
    const double gamma = g_kl * (t_sum / st.total) * delta;
    const int64_t blocks = (F + kTableBlock - 1) / kTableBlock;
    scalar_t* out = grad.mutable_data_ptr<scalar_t>();
    // absent classes: no sample reads their gradient; 0, as documented
    for (int64_t c = 0; c < C; ++c) {
      if (n[c] == 0) {
        std::fill(out + c * F, out + (c + 1) * F, scalar_t(0));
      }
    }
    at::parallel_for(0, blocks, grain(3 * K * kTableBlock), [&](int64_t begin, int64_t end) {
      std::vector<double> dot(kTableBlock);
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t f0 = blk * kTableBlock, nf = std::min(kTableBlock, F - f0);
        table_grad(cs_ptr, st.present.data(), K, F, f0, nf, st.inv_n.data(), st.inv_z.data(), beta.data(), alpha,
                   gamma, dot.data(), out);
      }
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("_gini_kl_statistics", TORCH_FN(statistics_kernel));
  m.impl("_gini_kl_statistics_backward", TORCH_FN(statistics_backward_kernel));
  m.impl("_gini_kl_from_statistics", TORCH_FN(from_statistics_kernel));
  m.impl("_gini_kl_from_statistics_backward", TORCH_FN(from_statistics_backward_kernel));
}

}  // namespace kdfast
