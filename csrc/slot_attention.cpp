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
}
