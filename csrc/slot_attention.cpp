// Schemas of the slot attention core kernels (design.md 3.1). The public autograd op
// (kdfast::slot_attention_core) is defined in kdfast/ops and calls these; in eager mode the cpp backend calls
// _slot_attention_core_cpp, whose backward is a C++ autograd node.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(kdfast, m) {
  // (updates (B,K,Dv), attn (B,K,N) or (B,K,0) without return_attn, norm Z (B,K) in the accumulator dtype).
  m.def(
      "_slot_attention_core_forward(Tensor q, Tensor k, Tensor v, float scale, float eps, bool return_attn) "
      "-> (Tensor, Tensor, Tensor)");
  // (dq, dk, dv), recomputing the attention from q and k (only q, k, v, the updates and Z are saved), or reading
  // it from attn (B,K,N, the accumulator dtype) where given.
  m.def(
      "_slot_attention_core_backward(Tensor grad_updates, Tensor? grad_attn, Tensor q, Tensor k, Tensor v, "
      "Tensor updates, Tensor norm, float scale, float eps, Tensor? attn=None) -> (Tensor, Tensor, Tensor)");
  // The cpp backend's eager op: the forward with the attention always computed (B,K,N, in the accumulator dtype,
  // as is norm), and a C++ autograd node whose backward reads it (csrc/cpu/slot_attention.cpp).
  m.def("_slot_attention_core_cpp(Tensor q, Tensor k, Tensor v, float scale, float eps) -> (Tensor, Tensor, Tensor)");
  // The cpp backend's eager iterations (kdfast.ops.slot_attention): n_iters of LayerNorm, q projection, the core
  // above, GRUCell and residual MLP in one call; optional layers are None. Returns (slots, the last attention),
  // slots in the inputs' dtype, the attention in the accumulator dtype (csrc/cpu/slot_attention_iterations.cpp).
  m.def(
      "_slot_attention_iterations_cpp(Tensor slots, Tensor k, Tensor v, Tensor norm_weight, Tensor norm_bias, "
      "Tensor q_weight, Tensor? q_bias, Tensor? gru_weight_ih, Tensor? gru_weight_hh, Tensor? gru_bias_ih, "
      "Tensor? gru_bias_hh, Tensor? mlp_norm_weight, Tensor? mlp_norm_bias, Tensor? mlp_weight1, Tensor? mlp_bias1, "
      "Tensor? mlp_weight2, Tensor? mlp_bias2, int n_iters, float scale, float eps, float norm_eps, "
      "bool hidden_normed, bool grad_last_only) -> (Tensor, Tensor)");
}
