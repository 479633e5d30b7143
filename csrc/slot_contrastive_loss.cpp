// Schemas of the slot contrastive loss kernels (design.md 3.2). The public autograd op
// (kdfast::slot_contrastive_loss) is defined in kdfast/ops and calls these.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(kdfast, m) {
  // (losses, log_odds, negatives_lse), each (T-1, B*K) in the accumulator dtype: per column j,
  // r[j] = logsumexp_{i != j} (l[i, j] - l[j, j]), losses = softplus(r) and negatives_lse = logsumexp_{i != j}
  // l[i, j]; the backward needs r and negatives_lse.
  m.def(
      "_slot_contrastive_loss_forward(Tensor slots, float temperature, bool batch_contrast, float eps) "
      "-> (Tensor, Tensor, Tensor)");
  // (losses, grad): the forward and, in the same pass, grad = d sum(losses) / d slots in the accumulator
  // dtype (CPU): a mean or sum's backward is then a scale of grad.
  m.def(
      "_slot_contrastive_loss_forward_backward(Tensor slots, float temperature, bool batch_contrast, float eps) "
      "-> (Tensor, Tensor)");
  m.def(
      "_slot_contrastive_loss_backward(Tensor grad_losses, Tensor slots, Tensor log_odds, Tensor negatives_lse, "
      "float temperature, bool batch_contrast, float eps, float grad_scale) -> Tensor");
}
