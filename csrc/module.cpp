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
}
