// The extension module mmrnn_ext._C: the CPU recurrences of every cell (rnn_cpu.cpp, lstm_cpu.cpp,
// gru_cpu.cpp), the cells' decoding step (cell_step.cpp) and their step with gradients (cell_train.cpp),
// each file registering its own functions.
#include "engine.h"

namespace {

// x [..., K] @ w[N, K]^T on the engine's kernels (the modules' float32 input projection), or with
// transpose_w false x [..., K] @ w[K, N] (its input gradient dA @ W_ih in training).
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, bool transpose_w) {
  TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble ||
                                       x.scalar_type() == at::kBFloat16),
              "x: expected a float32, float64 or bfloat16 CPU tensor, got ", x.scalar_type(), " on ", x.device());
  TORCH_CHECK(x.dim() >= 1, "x: expected at least one dimension, got a scalar");
  mmrnn::check_float_cpu(w, "w", x);
  TORCH_CHECK(w.dim() == 2 && w.size(transpose_w ? 1 : 0) == x.size(-1), "w: expected shape ",
              transpose_w ? "[N, " : "[", x.size(-1), transpose_w ? "]" : ", N]", ", got ", w.sizes());
  const at::Tensor xc = x.contiguous();
  const int64_t K = x.size(-1), N = w.size(transpose_w ? 0 : 1);
  int64_t M = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) M *= x.size(d);
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  sizes.back() = N;
  at::Tensor out = mmrnn::empty_huge(sizes, x.options());
  if (M == 0 || N == 0) return out;
  if (K == 0) return out.zero_();
  const mmrnn::Isa isa = mmrnn::cpu_isa();
  {
    pybind11::gil_scoped_release no_gil;
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "mmrnn_linear", [&] {
      const auto pw = mmrnn::pack_weight<scalar_t>(w, 1, transpose_w, isa);
      mmrnn::linear<scalar_t>(pw, xc.data_ptr<scalar_t>(), M, out.data_ptr<scalar_t>());
    });
  }
  return out;
}

// The weight gradients of a layer from its step gradients dA [T, B, M] (float32 or float64; the last
// dimension contiguous and rows evenly strided, so a column slice of a wider tensor needs no copy):
// dW_x = sum_t dA_t^T x_t [M, I] with x [T, B, I], and dW_h = sum_t dA_t^T h_{t-1} [M, H] with
// h_{-1} = h0 [B, H], h_t = out[t] [T, B, H] — one pass over dA for both (engine.h, weight_grad).
// tail [T, B, R] (optional, with dW_h): dW_h's last R rows are sum_t tail_t^T h_{t-1} instead of
// those of dA's last R columns (the GRU's n rows, which read d(W_hn h + b_hn)).
std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>> weight_grad(const at::Tensor& dA,
                                                                             const std::optional<at::Tensor>& x,
                                                                             const std::optional<at::Tensor>& h0,
                                                                             const std::optional<at::Tensor>& out,
                                                                             const std::optional<at::Tensor>& tail) {
  TORCH_CHECK(dA.device().is_cpu() && (dA.scalar_type() == at::kFloat || dA.scalar_type() == at::kDouble),
              "dA: expected a float32 or float64 CPU tensor, got ", dA.scalar_type(), " on ", dA.device());
  TORCH_CHECK(dA.dim() == 3, "dA: expected a 3-D tensor [T, B, M], got shape ", dA.sizes());
  TORCH_CHECK(h0.has_value() == out.has_value(), "h0 and out: expected both (dW_h) or neither, got ",
              h0.has_value() ? "h0 only" : "out only");
  const int64_t T_ = dA.size(0), B = dA.size(1), M = dA.size(2);
  if (x.has_value()) {
    mmrnn::check_float_cpu(*x, "x", dA);
    TORCH_CHECK(x->dim() == 3 && x->size(0) == T_ && x->size(1) == B, "x: expected shape [", T_, ", ", B,
                ", I], got ", x->sizes());
  }
  if (out.has_value()) {
    mmrnn::check_float_cpu(*out, "out", dA);
    TORCH_CHECK(out->dim() == 3 && out->size(0) == T_ && out->size(1) == B, "out: expected shape [", T_, ", ", B,
                ", H], got ", out->sizes());
    mmrnn::check_arg(*h0, "h0", dA, {B, out->size(2)});
  }
  if (tail.has_value()) {
    TORCH_CHECK(out.has_value(), "tail: expected only with h0 and out (it replaces rows of dW_h)");
    TORCH_CHECK(tail->device().is_cpu() && tail->scalar_type() == dA.scalar_type(), "tail: expected a CPU tensor of ",
                dA.scalar_type(), " (that of dA), got ", tail->scalar_type(), " on ", tail->device());
    TORCH_CHECK(tail->dim() == 3 && tail->size(0) == T_ && tail->size(1) == B && tail->size(2) <= M,
                "tail: expected shape [", T_, ", ", B, ", R] with R <= ", M, ", got ", tail->sizes());
  }
  // rows k = t * B + b of dA at k * lda: the last dimension contiguous, rows evenly strided (else a copy)
  auto rows_of = [&](const at::Tensor& t) -> std::pair<at::Tensor, int64_t> {
    const int64_t width = t.size(2), ld_in = B > 1 ? t.stride(1) : t.stride(0);
    const bool even = width <= 1 || t.stride(2) == 1;
    if (even && (T_ <= 1 || t.stride(0) == B * ld_in) && ld_in >= width) return {t, ld_in};
    return {t.contiguous(), width};
  };
  at::Tensor a;
  int64_t ld = 0;
  std::tie(a, ld) = rows_of(dA);
  at::Tensor tail_rows;
  int64_t ld_tail = 0;
  if (tail.has_value()) std::tie(tail_rows, ld_tail) = rows_of(*tail);
  std::optional<at::Tensor> dw_x, dw_h;
  if (x.has_value()) dw_x = at::empty({M, x->size(2)}, dA.options());
  if (out.has_value()) dw_h = at::empty({M, out->size(2)}, dA.options());
  const mmrnn::Isa isa = mmrnn::cpu_isa();
  {
    pybind11::gil_scoped_release no_gil;
    AT_DISPATCH_FLOATING_TYPES(dA.scalar_type(), "mmrnn_weight_grad", [&] {
      std::vector<mmrnn::WgradPart<scalar_t>> parts;
      if (x.has_value()) {
        const scalar_t* xs = x->data_ptr<scalar_t>();
        parts.push_back({xs, xs, 0, x->size(2), x->size(2), dw_x->data_ptr<scalar_t>()});
      }
      if (out.has_value()) {
        parts.push_back({h0->data_ptr<scalar_t>(), out->data_ptr<scalar_t>(), B, out->size(2), out->size(2),
                         dw_h->data_ptr<scalar_t>()});
        if (tail.has_value()) {
          parts.back().tail = tail_rows.data_ptr<scalar_t>();
          parts.back().ld_tail = ld_tail;
          parts.back().tail_row = M - tail->size(2);
        }
      }
      mmrnn::weight_grad<scalar_t>(mmrnn::kernels_for<scalar_t>(isa, 1), a.data_ptr<scalar_t>(), ld, M, T_ * B,
                                   parts);
    });
  }
  return {dw_x, dw_h};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mmrnn_ext C++ backend: the fused multimodal RNN, LSTM and GRU recurrences on CPU tensors";
  mmrnn::register_rnn(m);
  mmrnn::register_lstm(m);
  mmrnn::register_gru(m);
  mmrnn::register_cell_step(m);
  mmrnn::register_cell_train(m);
  m.def(
      "buffer_cache_stats",
      [] {
        const auto s = mmrnn::buffer_cache_stats();
        return pybind11::make_tuple(s.cached, s.in_use, s.limit);
      },
      "(cached, in use, limit) bytes of the engine's block cache (csrc/buffers.h)");
  m.def("buffer_cache_release", &mmrnn::buffer_cache_release, "frees every cached block of the engine's buffers");
  m.def("linear", &linear, "x @ w^T (transpose_w) or x @ w on the recurrences' kernels", pybind11::arg("x"),
        pybind11::arg("w"), pybind11::arg("transpose_w") = true);
  m.def("weight_grad", &weight_grad,
        "(dW_x, dW_h) = (sum_t dA_t^T x_t, sum_t dA_t^T h_{t-1}) on the engine's kernels, each None where its "
        "operands are; with tail [T, B, R], dW_h's last R rows read it instead of dA's last R columns",
        pybind11::arg("dA"), pybind11::arg("x"), pybind11::arg("h0"), pybind11::arg("out"),
        pybind11::arg("tail") = pybind11::none());
}
