// Schemas of the Gini impurity / KL reduction kernels (design.md 3.4), in two stages: the statistics of the
// activations (the only pass over them, each way) and the finish on the small (C, F) table. The public autograd
// ops (kdfast::gini_kl_statistics, kdfast::gini_kl_from_statistics) are defined in kdfast/ops and call these.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(kdfast, m) {
  // (class_sums (C, F) in the accumulator dtype, counts (C,) int64)
  m.def("_gini_kl_statistics(Tensor activations, Tensor labels, int num_classes) -> (Tensor, Tensor)");
  // sign(activations) * grad_class_sums[labels] / (H * W), laid out like empty_like(activations)
  m.def("_gini_kl_statistics_backward(Tensor grad_class_sums, Tensor activations, Tensor labels) -> Tensor");
  // (gini, kl) in class_sums' dtype, computed in float64
  m.def("_gini_kl_from_statistics(Tensor class_sums, Tensor counts, bool uniform, float delta) -> (Tensor, Tensor)");
  m.def(
      "_gini_kl_from_statistics_backward(Tensor grad_gini, Tensor grad_kl, Tensor class_sums, Tensor counts, "
      "bool uniform, float delta) -> Tensor");
}
