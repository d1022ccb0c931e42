// The fused multimodal RNN recurrence on CPU tensors: forward and BPTT backward, one call each per
// layer and direction. Time-major contract (see mmrnn_ext/reference.py):
//   xp [T, B, H], w_hh [H, H], h0 [B, H], image_term None | [B, H] | [T, B, H], lengths None | int64 [B]
//   forward  -> out [T, B, H]        (h_t = f(xp_t + h_{t-1} W_hh^T + img); zero past a row's length)
//   backward -> (dA [T, B, H], dh0 [B, H])
// Each step is one BLAS GEMM written straight into that step's output (or gradient) slot, followed
// by one pass over the slot that adds the projected input and image term, applies the
// nonlinearity and the lengths mask.
#include "common.h"

namespace mmrnn {
namespace {

template <typename T, bool RELU>
inline T activation(T a) {
  if constexpr (RELU) {
    return a < T(0) ? T(0) : a;  // NaN passes through, as torch.relu
  } else {
    return tanh_(a);
  }
}

template <typename T, bool RELU>
inline T activation_grad_from_output(T h) {
  if constexpr (RELU) {
    return h > T(0) ? T(1) : T(0);
  } else {
    return T(1) - h * h;
  }
}

template <typename T, bool RELU>
void forward_loop(const StepGemm<T>& gemm, const T* xp, const T* h0, const T* img, bool img_per_step, const int64_t* lengths,
                  T* out, int64_t T_, int64_t B, int64_t H) {
  const int64_t step = B * H;
  for (int64_t t = 0; t < T_; ++t) {
    const T* h_prev = t == 0 ? h0 : out + (t - 1) * step;
    T* o = out + t * step;
    const T* x = xp + t * step;
    const T* im = img == nullptr ? nullptr : (img_per_step ? img + t * step : img);
    gemm.run(h_prev, o);
    at::parallel_for(0, B, row_grain(H), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        T* __restrict orow = o + b * H;
        const T* __restrict xrow = x + b * H;
        if (t >= row_length(lengths, b, T_)) {
          std::fill(orow, orow + H, T(0));
        } else if (im != nullptr) {
          const T* __restrict irow = im + b * H;
          for (int64_t j = 0; j < H; ++j) orow[j] = activation<T, RELU>(orow[j] + xrow[j] + irow[j]);
        } else {
          for (int64_t j = 0; j < H; ++j) orow[j] = activation<T, RELU>(orow[j] + xrow[j]);
        }
      }
    });
  }
}

template <typename T, bool RELU>
void backward_loop(const StepGemm<T>& gemm, const T* gy, const T* ghl, const T* out, const int64_t* lengths, T* dA, T* g,
                   T* dh0, int64_t T_, int64_t B, int64_t H) {
  // g holds dL/dh_t arriving from step t+1 (dA_{t+1} @ W_hh); it is only read where t+1 < length.
  const int64_t step = B * H;
  std::fill(g, g + step, T(0));
  for (int64_t t = T_ - 1; t >= 0; --t) {
    const T* gyt = gy + t * step;
    const T* ht = out + t * step;
    T* d = dA + t * step;
    at::parallel_for(0, B, row_grain(H), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t len = row_length(lengths, b, T_);
        T* __restrict drow = d + b * H;
        if (t >= len) {
          std::fill(drow, drow + H, T(0));
          continue;
        }
        const T* __restrict gin = t == len - 1 ? ghl + b * H : g + b * H;
        const T* __restrict gyrow = gyt + b * H;
        const T* __restrict hrow = ht + b * H;
        for (int64_t j = 0; j < H; ++j) drow[j] = (gyrow[j] + gin[j]) * activation_grad_from_output<T, RELU>(hrow[j]);
      }
    });
    gemm.run(d, g);
  }
  initial_state_grad(g, ghl, lengths, dh0, T_, B, H);
}

at::Tensor rnn_forward(const at::Tensor& xp, const at::Tensor& w_hh, const at::Tensor& h0,
                       const std::optional<at::Tensor>& image_term, const std::optional<at::Tensor>& lengths, bool relu) {
  check_sequence(xp, "xp", 1);
  const int64_t T_ = xp.size(0), B = xp.size(1), H = xp.size(2);
  check_arg(w_hh, "w_hh", xp, {H, H});
  check_arg(h0, "h0", xp, {B, H});
  const bool per_step = check_image_term(image_term, xp, T_, B, H);
  check_blas_dims(B, H);
  const int64_t* len = check_lengths(lengths, T_, B);
  at::Tensor out = empty_huge(xp.sizes(), xp.options());
  {
    pybind11::gil_scoped_release no_gil;
    AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "mmrnn_rnn_forward", [&] {
      const StepGemm<scalar_t> gemm(w_hh, /*transpose=*/true, static_cast<int>(B));
      auto run = relu ? forward_loop<scalar_t, true> : forward_loop<scalar_t, false>;
      run(gemm, xp.data_ptr<scalar_t>(), h0.data_ptr<scalar_t>(), data_or_null<scalar_t>(image_term), per_step, len,
          out.data_ptr<scalar_t>(), T_, B, H);
    });
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> rnn_backward(const at::Tensor& grad_out, const at::Tensor& grad_h_last,
                                                const at::Tensor& out, const at::Tensor& h0, const at::Tensor& w_hh,
                                                const std::optional<at::Tensor>& lengths, bool relu) {
  check_sequence(out, "out", 1);
  const int64_t T_ = out.size(0), B = out.size(1), H = out.size(2);
  check_arg(grad_out, "grad_out", out, out.sizes());
  check_arg(grad_h_last, "grad_h_last", out, {B, H});
  check_arg(h0, "h0", out, {B, H});
  check_arg(w_hh, "w_hh", out, {H, H});
  check_blas_dims(B, H);
  const int64_t* len = check_lengths(lengths, T_, B);
  at::Tensor dA = empty_huge(out.sizes(), out.options());
  at::Tensor dh0 = at::empty_like(h0);
  at::Tensor g = at::empty_like(h0);
  {
    pybind11::gil_scoped_release no_gil;
    AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "mmrnn_rnn_backward", [&] {
      const StepGemm<scalar_t> gemm(w_hh, /*transpose=*/false, static_cast<int>(B));
      auto run = relu ? backward_loop<scalar_t, true> : backward_loop<scalar_t, false>;
      run(gemm, grad_out.data_ptr<scalar_t>(), grad_h_last.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), len,
          dA.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), dh0.data_ptr<scalar_t>(), T_, B, H);
    });
  }
  return {dA, dh0};
}

// The activations exposed for their accuracy tests.
at::Tensor apply_f32(const at::Tensor& x, float (*fn)(float)) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, "x: expected a float32 CPU tensor, got ",
              x.scalar_type(), " on ", x.device());
  at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty_like(xc);
  const float* src = xc.data_ptr<float>();
  float* dst = y.data_ptr<float>();
  for (int64_t i = 0; i < xc.numel(); ++i) dst[i] = fn(src[i]);
  return y;
}

}  // namespace

void register_rnn(pybind11::module& m) {
  m.def("rnn_forward", &rnn_forward, "RNN forward over the whole sequence -> out [T, B, H]", pybind11::arg("xp"),
        pybind11::arg("w_hh"), pybind11::arg("h0"), pybind11::arg("image_term"), pybind11::arg("lengths"),
        pybind11::arg("relu"));
  m.def("rnn_backward", &rnn_backward, "RNN BPTT over the whole sequence -> (dA [T, B, H], dh0 [B, H])",
        pybind11::arg("grad_out"), pybind11::arg("grad_h_last"), pybind11::arg("out"), pybind11::arg("h0"),
        pybind11::arg("w_hh"), pybind11::arg("lengths"), pybind11::arg("relu"));
  m.def("tanh_float32", [](const at::Tensor& x) { return apply_f32(x, tanh_f32); },
        "the recurrences' float32 tanh, exposed for its accuracy test", pybind11::arg("x"));
  m.def("sigmoid_float32", [](const at::Tensor& x) { return apply_f32(x, sigmoid_f32); },
        "the gated recurrences' float32 sigmoid, exposed for its accuracy test", pybind11::arg("x"));
}

}  // namespace mmrnn
