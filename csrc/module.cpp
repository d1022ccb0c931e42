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

// A float CPU tensor of `ref`'s dtype, contiguous, of the given shape (`ref_name` names ref in the error).
void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name,
                at::IntArrayRef expected) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got one on ", t.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, ": expected dtype ", ref.scalar_type(), " (that of ", ref_name,
              "), got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor, got strides ", t.strides());
  TORCH_CHECK(t.sizes() == expected, name, ": expected shape ", expected, ", got ", t.sizes());
}

// The outer term of a layer and direction [B, G]: what its recurrence adds to every step's gates
// outside the recurrent product, image @ w_img^T + b_ih + b_hh (image [B, V], w_img [G, V]; either
// pair may be absent: the biases alone are broadcast over `batch` rows, None where there is neither),
// b_hh's last `inner` entries left out (they sit inside the product: the GRU's b_hn). The summed
// biases and the image product (torch's GEMM onto them) in one call: the training step's one call
// where torch's add, addmm (or expand and copy) were three ops on code the step's kernels had just
// pushed out of the caches (bench/NOTES.md).
std::optional<at::Tensor> outer_term(const std::optional<at::Tensor>& image, const std::optional<at::Tensor>& w_img,
                                     const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
                                     int64_t inner, int64_t batch) {
  TORCH_CHECK(image.has_value() == w_img.has_value(), "image and w_img: expected both or neither, got ",
              image.has_value() ? "image only" : "w_img only");
  TORCH_CHECK(b_ih.has_value() == b_hh.has_value(), "b_ih and b_hh: expected both or neither, got ",
              b_ih.has_value() ? "b_ih only" : "b_hh only");
  if (!image.has_value() && !b_ih.has_value()) return std::nullopt;
  const at::Tensor& ref = image.has_value() ? *w_img : *b_ih;
  TORCH_CHECK(ref.device().is_cpu() && (ref.scalar_type() == at::kFloat || ref.scalar_type() == at::kDouble),
              image.has_value() ? "w_img" : "b_ih", ": expected a float32 or float64 CPU tensor, got ",
              ref.scalar_type(), " on ", ref.device());
  const int64_t G = image.has_value() ? w_img->size(0) : b_ih->size(0);
  int64_t B = batch;
  if (image.has_value()) {
    TORCH_CHECK(w_img->dim() == 2, "w_img: expected a 2-D tensor [G, V], got shape ", w_img->sizes());
    TORCH_CHECK(image->dim() == 2, "image: expected a 2-D tensor [B, V] (static), got shape ", image->sizes());
    B = image->size(0);
    check_like(*image, "image", *w_img, "w_img", {B, w_img->size(1)});
    check_like(*w_img, "w_img", *w_img, "w_img", {G, image->size(1)});
  }
  if (image.has_value()) {
    TORCH_CHECK(batch == B, "batch: expected ", B, " (the image's rows), got ", batch);
  } else {
    TORCH_CHECK(batch >= 0, "batch: expected a row count >= 0, got ", batch);
  }
  if (b_ih.has_value()) {
    check_like(*b_ih, "b_ih", ref, image.has_value() ? "w_img" : "b_ih", {G});
    check_like(*b_hh, "b_hh", ref, image.has_value() ? "w_img" : "b_ih", {G});
  }
  TORCH_CHECK(inner >= 0 && inner <= G, "inner: expected a count in [0, ", G, "], got ", inner);
  // the summed biases (b_hh's inner entries left out) as one row
  at::Tensor bias;
  if (b_ih.has_value()) {
    bias = at::empty({G}, ref.options());
    AT_DISPATCH_FLOATING_TYPES(ref.scalar_type(), "mmrnn_outer_bias", [&] {
      const scalar_t* bi = b_ih->data_ptr<scalar_t>();
      const scalar_t* bh = b_hh->data_ptr<scalar_t>();
      scalar_t* o = bias.data_ptr<scalar_t>();
      for (int64_t g = 0; g < G; ++g) o[g] = g < G - inner ? bi[g] + bh[g] : bi[g];
    });
  }
  if (!image.has_value()) return bias.unsqueeze(0).expand({B, G}).contiguous();
  // the image product is [B, V] x [V, G], a few MFLOP: torch's GEMM (nothing packed; the engine's
  // linear packs W_img on every call and took 2x as long at [24, 64] x [64, 1280])
  at::Tensor out = at::empty({B, G}, ref.options());
  pybind11::gil_scoped_release no_gil;
  if (bias.defined()) at::addmm_out(out, bias.unsqueeze(0), *image, w_img->t());
  else at::mm_out(out, *image, w_img->t());
  return out;
}

// The outer term's inputs' gradients from its gradient, the BPTT's step sums S [B, W] (W = G, or
// G + inner where the sums carry the inner bias's too: the GRU's [dGx | dhn]): dW_img = S[:, :G]^T
// image [G, V] (with image [B, V]) on the engine's weight-gradient kernels, and with `bias` the
// biases' d_b_ih = sum_b S[b, :G] and d_b_hh = sum_b [S[b, :G - inner] | S[b, G:]] (rows added in
// order). One call where torch's slices, transpose, mm, sums and cat were six ops.
std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>> outer_grad(
    const at::Tensor& S, const std::optional<at::Tensor>& image, int64_t inner, bool bias) {
  TORCH_CHECK(S.device().is_cpu() && (S.scalar_type() == at::kFloat || S.scalar_type() == at::kDouble),
              "S: expected a float32 or float64 CPU tensor, got ", S.scalar_type(), " on ", S.device());
  TORCH_CHECK(S.dim() == 2 && S.is_contiguous(), "S: expected a contiguous 2-D tensor [B, W], got shape ", S.sizes(),
              ", strides ", S.strides());
  const int64_t B = S.size(0), W = S.size(1);
  TORCH_CHECK(inner >= 0 && 2 * inner <= W, "inner: expected a count in [0, ", W / 2, "] (S's width ", W,
              " = G + inner), got ", inner);
  const int64_t G = W - inner;
  if (image.has_value()) check_like(*image, "image", S, "S", {B, image->size(1)});
  std::optional<at::Tensor> d_w_img, d_b_ih, d_b_hh;
  if (image.has_value()) d_w_img = at::empty({G, image->size(1)}, S.options());
  if (bias) {
    d_b_ih = at::empty({G}, S.options());
    d_b_hh = at::empty({G}, S.options());
  }
  const mmrnn::Isa isa = mmrnn::cpu_isa();
  {
    pybind11::gil_scoped_release no_gil;
    AT_DISPATCH_FLOATING_TYPES(S.scalar_type(), "mmrnn_outer_grad", [&] {
      const scalar_t* s = S.data_ptr<scalar_t>();
      if (image.has_value()) {
        const int64_t V = image->size(1);
        const scalar_t* v = image->data_ptr<scalar_t>();
        std::vector<mmrnn::WgradPart<scalar_t>> parts{{v, v, 0, V, V, d_w_img->data_ptr<scalar_t>()}};
        mmrnn::weight_grad<scalar_t>(mmrnn::kernels_for<scalar_t>(isa, 1), s, W, G, B, parts);
      }
      if (bias) {
        std::vector<scalar_t> col(W, scalar_t(0));
        for (int64_t b = 0; b < B; ++b) {
          const scalar_t* row = s + b * W;
          for (int64_t w = 0; w < W; ++w) col[w] += row[w];
        }
        std::copy(col.begin(), col.begin() + G, d_b_ih->data_ptr<scalar_t>());
        scalar_t* bh = d_b_hh->data_ptr<scalar_t>();
        std::copy(col.begin(), col.begin() + (G - inner), bh);
        std::copy(col.begin() + G, col.end(), bh + (G - inner));
      }
    });
  }
  return {d_w_img, d_b_ih, d_b_hh};
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
  m.def("outer_term", &outer_term,
        "image @ w_img^T + b_ih + b_hh (b_hh's last `inner` entries left out) [B, G], or the biases over `batch` "
        "rows; None where there is neither",
        pybind11::arg("image"), pybind11::arg("w_img"), pybind11::arg("b_ih"), pybind11::arg("b_hh"),
        pybind11::arg("inner"), pybind11::arg("batch"));
  m.def("outer_grad", &outer_grad,
        "(S[:, :G]^T image, sum_b S[:, :G], sum_b [S[:, :G - inner] | S[:, G:]]) from step sums S [B, G + inner]",
        pybind11::arg("S"), pybind11::arg("image"), pybind11::arg("inner"), pybind11::arg("bias"));
}
