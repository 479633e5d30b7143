// Schemas of the slot matching kernels (design.md 3.2). The public autograd ops
// (kdfast::slot_cosine_similarity, kdfast::slot_match_loss) are defined in kdfast/ops and call these.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(kdfast, m) {
  m.def("_slot_cosine_similarity_forward(Tensor a, Tensor b, float eps) -> Tensor");
  m.def(
      "_slot_cosine_similarity_backward(Tensor grad, Tensor a, Tensor b, float eps) "
      "-> (Tensor, Tensor)");
  m.def(
      "_slot_match_loss_forward(Tensor student, Tensor teacher, Tensor? assignment, float eps) "
      "-> Tensor");
  m.def(
      "_slot_match_loss_backward(Tensor grad_losses, Tensor student, Tensor teacher, "
      "Tensor? assignment, float eps, float grad_scale) -> Tensor");
}
