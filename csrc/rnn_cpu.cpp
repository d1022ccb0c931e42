// The fused multimodal RNN recurrence on CPU tensors: forward and BPTT backward, one call each per
// layer and direction. Time-major contract (see mmrnn_ext/reference.py):
//   xp [T, B, H], w_hh [H, H], h0 [B, H], image_term None | [B, H] | [T, B, H], lengths None | int64 [B]
//   forward  -> out [T, B, H]        (h_t = f(xp_t + h_{t-1} W_hh^T + img); zero past a row's length)
//   backward -> (dA [T, B, H], dh0 [B, H])
// Each step is one product on the engine (engine.h) whose every output tile gets the projected
// input, the image term, the nonlinearity and the lengths mask before it leaves L1. BPTT: one
// product per step, dA_{t+1} @ W_hh, with the activation's derivative fused the same way, and one
// more for dh0.
#include "engine.h"

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

template <typename T, bool RELU, bool IMG>
inline void rnn_forward_units(const T* __restrict acc, const T* __restrict x, const T* __restrict im,
                              T* __restrict o, int64_t n) {
  for (int64_t u = 0; u < n; ++u) o[u] = activation<T, RELU>(acc[u] + x[u] + (IMG ? im[u] : T(0)));
}

template <typename T, bool RELU>
void forward_loop(const PackedWeight<T>& pw, const T* xp, const T* h0, const T* img, bool img_per_step,
                  const int64_t* lengths, T* out, int64_t T_, int64_t B, int64_t H) {
  const int64_t step = B * H;
  run_steps<T>(
      pw, T_, B, [&](int64_t t) { return std::make_pair(t == 0 ? h0 : out + (t - 1) * step, H); },
      [&](int64_t t, int64_t b0, int64_t rows, int64_t j0, int64_t nu, const T* tile, int64_t ld) {
        const T* im = img == nullptr ? nullptr : (img_per_step ? img + t * step : img);
        for (int64_t b = b0; b < b0 + rows; ++b) {
          T* o = out + t * step + b * H + j0;
          const T* acc = tile + (b - b0) * ld;
          if (t >= row_length(lengths, b, T_)) std::fill(o, o + nu, T(0));
          else if (im != nullptr) rnn_forward_units<T, RELU, true>(acc, xp + t * step + b * H + j0, im + b * H + j0, o, nu);
          else rnn_forward_units<T, RELU, false>(acc, xp + t * step + b * H + j0, nullptr, o, nu);
        }
      });
}

// Reverse step s handles t = T - 1 - s with the product dA_{t+1} @ W_hh (none at s = 0); step T
// writes dh0 from dA_0 @ W_hh. At a row's last step the final state's gradient enters instead.
template <typename T, bool RELU>
void backward_loop(const PackedWeight<T>& pw, const T* gy, const T* ghl, const T* out, const int64_t* lengths, T* dA,
                   T* dh0, int64_t T_, int64_t B, int64_t H) {
  const int64_t step = B * H;
  run_steps<T>(
      pw, T_ + 1, B,
      [&](int64_t s) { return std::make_pair(s == 0 ? nullptr : dA + (T_ - s) * step, H); },
      [&](int64_t s, int64_t b0, int64_t rows, int64_t j0, int64_t nu, const T* tile, int64_t ld) {
        const int64_t t = T_ - 1 - s;
        for (int64_t b = b0; b < b0 + rows; ++b) {
          const int64_t len = row_length(lengths, b, T_);
          const T* __restrict acc = tile + (b - b0) * ld;
          if (s == T_) {
            const T* src = len == 0 ? ghl + b * H + j0 : acc;
            std::copy(src, src + nu, dh0 + b * H + j0);
            continue;
          }
          T* __restrict d = dA + t * step + b * H + j0;
          if (t >= len) {
            std::fill(d, d + nu, T(0));
            continue;
          }
          const T* __restrict gin = t == len - 1 ? ghl + b * H + j0 : acc;
          const T* __restrict g = gy + t * step + b * H + j0;
          const T* __restrict h = out + t * step + b * H + j0;
          for (int64_t u = 0; u < nu; ++u) d[u] = (g[u] + gin[u]) * activation_grad_from_output<T, RELU>(h[u]);
        }
      });
}

at::Tensor rnn_forward(const at::Tensor& xp, const at::Tensor& w_hh, const at::Tensor& h0,
                       const std::optional<at::Tensor>& image_term, const std::optional<at::Tensor>& lengths, bool relu) {
  check_sequence(xp, "xp", 1);
  const int64_t T_ = xp.size(0), B = xp.size(1), H = xp.size(2);
  check_arg(w_hh, "w_hh", xp, {H, H});
  check_arg(h0, "h0", xp, {B, H});
  const bool per_step = check_image_term(image_term, xp, T_, B, H);
  const int64_t* len = check_lengths(lengths, T_, B);
  const Isa isa = cpu_isa();
  at::Tensor out = empty_huge(xp.sizes(), xp.options());
  {
    pybind11::gil_scoped_release no_gil;
    AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "mmrnn_rnn_forward", [&] {
      const auto pw = pack_weight<scalar_t>(w_hh, 1, /*transpose=*/true, B, isa);
      auto run = relu ? forward_loop<scalar_t, true> : forward_loop<scalar_t, false>;
      run(pw, xp.data_ptr<scalar_t>(), h0.data_ptr<scalar_t>(), data_or_null<scalar_t>(image_term), per_step, len,
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
  const int64_t* len = check_lengths(lengths, T_, B);
  const Isa isa = cpu_isa();
  at::Tensor dA = empty_huge(out.sizes(), out.options());
  at::Tensor dh0 = at::empty_like(h0);
  {
    pybind11::gil_scoped_release no_gil;
    AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "mmrnn_rnn_backward", [&] {
      const auto pw = pack_weight<scalar_t>(w_hh, 1, /*transpose=*/false, B, isa);
      auto run = relu ? backward_loop<scalar_t, true> : backward_loop<scalar_t, false>;
      run(pw, grad_out.data_ptr<scalar_t>(), grad_h_last.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), len,
          dA.data_ptr<scalar_t>(), dh0.data_ptr<scalar_t>(), T_, B, H);
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
  m.def("cpu_isa", [] { return std::string(isa_name(cpu_isa())); },
        "the vector path the recurrences take on this CPU (avx512, avx2 or generic; MMRNN_CPU_ISA caps it)");
  m.def("tanh_float32", [](const at::Tensor& x) { return apply_f32(x, tanh_f32); },
        "the recurrences' float32 tanh, exposed for its accuracy test", pybind11::arg("x"));
  m.def("sigmoid_float32", [](const at::Tensor& x) { return apply_f32(x, sigmoid_f32); },
        "the gated recurrences' float32 sigmoid, exposed for its accuracy test", pybind11::arg("x"));
}

}  // namespace mmrnn
