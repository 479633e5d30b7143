// The cpp backend's slot attention iterations (kdfast.ops.slot_attention, design.md 3.1) in one call: each
// iteration is LayerNorm, the q projection, the fused core (kdfast::_slot_attention_core_cpp), GRUCell and the
// residual MLP, as ATen ops called from C++. The slot-sized layers are a few small GEMMs on B K rows; run from
// Python each op costs more in interpreter and dispatch than in arithmetic, so the loop lives here. Autograd
// records the ATen ops and the core's C++ node as usual (CompositeImplicitAutograd), so gradients, fake tensors
// and torch.compile see ordinary ops.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace kdfast {
namespace {

using Core = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                            double, double);

struct Layers {
  const at::Tensor &norm_weight, &norm_bias, &q_weight;
  const std::optional<at::Tensor> &q_bias, &gru_weight_ih, &gru_weight_hh, &gru_bias_ih, &gru_bias_hh,
      &mlp_norm_weight, &mlp_norm_bias, &mlp_weight1, &mlp_bias1, &mlp_weight2, &mlp_bias2;
  double scale, eps, norm_eps;
  bool hidden_normed;
};

bool given(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined();
}

// One iteration: (new slots, the attention (B, K, N)).
std::tuple<at::Tensor, at::Tensor> step(const at::Tensor& slots, const at::Tensor& k, const at::Tensor& v,
                                        const Layers& p) {
  static const auto core =
      c10::Dispatcher::singleton().findSchemaOrThrow("kdfast::_slot_attention_core_cpp", "").typed<Core>();
  const int64_t B = slots.size(0), K = slots.size(1), D = slots.size(2);
  const at::Tensor x = at::layer_norm(slots, {D}, p.norm_weight, p.norm_bias, p.norm_eps);
  const at::Tensor q = at::linear(x, p.q_weight, p.q_bias);
  auto [updates, attn, norm] = core.call(q, k, v, p.scale, p.eps);
  const at::Tensor& hidden = p.hidden_normed ? x : slots;
  at::Tensor h;
  if (given(p.gru_weight_ih)) {
    h = at::gru_cell(updates.reshape({B * K, -1}), hidden.reshape({B * K, D}), *p.gru_weight_ih, *p.gru_weight_hh,
                     p.gru_bias_ih, p.gru_bias_hh)
            .view({B, K, D});
  } else {
    h = hidden + updates;
  }
  if (given(p.mlp_weight1)) {
    at::Tensor y = at::layer_norm(h, {D}, p.mlp_norm_weight, p.mlp_norm_bias, p.norm_eps);
    y = at::linear(at::relu(at::linear(y, *p.mlp_weight1, p.mlp_bias1)), *p.mlp_weight2, p.mlp_bias2);
    h = h + y;
  }
  return {h, attn};
}

std::tuple<at::Tensor, at::Tensor> iterations(
    const at::Tensor& slots, const at::Tensor& k, const at::Tensor& v, const at::Tensor& norm_weight,
    const at::Tensor& norm_bias, const at::Tensor& q_weight, const std::optional<at::Tensor>& q_bias,
    const std::optional<at::Tensor>& gru_weight_ih, const std::optional<at::Tensor>& gru_weight_hh,
    const std::optional<at::Tensor>& gru_bias_ih, const std::optional<at::Tensor>& gru_bias_hh,
    const std::optional<at::Tensor>& mlp_norm_weight, const std::optional<at::Tensor>& mlp_norm_bias,
    const std::optional<at::Tensor>& mlp_weight1, const std::optional<at::Tensor>& mlp_bias1,
    const std::optional<at::Tensor>& mlp_weight2, const std::optional<at::Tensor>& mlp_bias2, int64_t n_iters,
    double scale, double eps, double norm_eps, bool hidden_normed, bool grad_last_only) {
  TORCH_CHECK(n_iters >= 1, "n_iters must be >= 1, got ", n_iters);
  TORCH_CHECK(slots.dim() == 3, "slots must have shape (B, K, D), got ", slots.sizes());
  TORCH_CHECK(given(gru_weight_ih) == given(gru_weight_hh), "gru_weight_ih and gru_weight_hh come together");
  TORCH_CHECK(!given(mlp_weight1) || given(mlp_weight2), "mlp_weight1 needs mlp_weight2");
  const Layers p{norm_weight,   norm_bias,     q_weight,    q_bias,      gru_weight_ih, gru_weight_hh,
                 gru_bias_ih,   gru_bias_hh,   mlp_norm_weight, mlp_norm_bias, mlp_weight1, mlp_bias1,
                 mlp_weight2,   mlp_bias2,     scale,       eps,         norm_eps,      hidden_normed};
  at::Tensor s = slots, attn;
  for (int64_t it = 0; it < n_iters; ++it) {
    const bool last = it == n_iters - 1;
    if (grad_last_only && !last) {
      // implicit differentiation: the first n_iters - 1 iterations without autograd
      const at::NoGradGuard no_grad;
      s = std::get<0>(step(s, k, v, p));
      continue;
    }
    if (grad_last_only && n_iters > 1) {
      s = s.detach();
    }
    std::tie(s, attn) = step(s, k, v, p);
  }
  return {s, attn};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CompositeImplicitAutograd, m) {
  m.impl("_slot_attention_iterations_cpp", TORCH_FN(iterations));
}

}  // namespace kdfast
