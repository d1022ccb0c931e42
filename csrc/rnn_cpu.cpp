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

// XP: add the projected input (absent when the input product is fused into the tile). Storage S,
// computed in C = acc_t<S>.
template <typename S, typename C, bool RELU, bool XP, bool IMG>
inline void rnn_forward_units(const C* __restrict acc, const S* __restrict x, const S* __restrict im,
                              S* __restrict o, int64_t n) {
  MMRNN_IVDEP
  for (int64_t u = 0; u < n; ++u)
    o[u] = activation<C, RELU>(acc[u] + (XP ? C(x[u]) : C(0)) + (IMG ? C(im[u]) : C(0)));
}

// xp [T, B, H] (the projected input), or x [T, B, I] with the input product fused (pw.K1 = I, xp
// null). h_last (optional; h0 on entry) gets each row's state at its last valid step.
template <typename T, bool RELU>
void forward_loop(const PackedWeight<T>& pw, const T* xp, const T* x, const T* h0, const T* img, bool img_per_step,
                  const int64_t* lengths, T* out, T* h_last, int64_t T_, int64_t B, int64_t H) {
  using C = acc_t<T>;
  const int64_t step = B * H, I = pw.K1;
  run_steps<T>(
      pw, T_, B,
      [&](int64_t t) { return Operands<T>{t == 0 ? h0 : out + (t - 1) * step, H, x == nullptr ? nullptr : x + t * B * I, I}; },
      [&](int64_t t, int64_t b0, int64_t rows, int64_t j0, int64_t nu, const C* tile, int64_t ld) {
        const T* im = img == nullptr ? nullptr : (img_per_step ? img + t * step : img);
        for (int64_t b = b0; b < b0 + rows; ++b) {
          const int64_t len = row_length(lengths, b, T_), bj = b * H + j0;
          T* o = out + t * step + bj;
          const C* acc = tile + (b - b0) * ld;
          if (t >= len) {
            std::fill(o, o + nu, T(0));
            continue;
          }
          const T* xr = xp == nullptr ? nullptr : xp + t * step + bj;
          const T* ir = im == nullptr ? nullptr : im + bj;
          if (xr != nullptr) {
            if (ir != nullptr) rnn_forward_units<T, C, RELU, true, true>(acc, xr, ir, o, nu);
            else rnn_forward_units<T, C, RELU, true, false>(acc, xr, ir, o, nu);
          } else {
            if (ir != nullptr) rnn_forward_units<T, C, RELU, false, true>(acc, xr, ir, o, nu);
            else rnn_forward_units<T, C, RELU, false, false>(acc, xr, ir, o, nu);
          }
          if (h_last != nullptr && t == len - 1) std::copy(o, o + nu, h_last + bj);
        }
      });
}

// One row's units of one backward step: dA from dL/dh (gy + gin, gin the tile (C) or the final
// state's gradient (S)); SUM: each also added to the row's step sums sm (step_sums_data).
template <typename S, typename C, bool RELU, bool SUM, typename GIn>
inline void rnn_backward_units(const S* __restrict g, const GIn* __restrict gin, const S* __restrict h,
                               S* __restrict d, C* __restrict sm, int64_t n) {
  MMRNN_IVDEP
  for (int64_t u = 0; u < n; ++u) {
    const C v = (C(g[u]) + C(gin[u])) * activation_grad_from_output<C, RELU>(C(h[u]));
    d[u] = v;
    if constexpr (SUM) sm[u] += v;
  }
}

// Reverse step s handles t = T - 1 - s with the product dA_{t+1} @ W_hh (none at s = 0); step T
// writes dh0 from dA_0 @ W_hh. At a row's last step the final state's gradient enters instead.
// sums: nullptr, or [B, H] to get each row's dA summed over steps (step_sums_data).
template <typename T, bool RELU>
void backward_loop(const PackedWeight<T>& pw, const T* gy, const T* ghl, const T* out, const int64_t* lengths, T* dA,
                   T* dh0, acc_t<T>* sums, int64_t T_, int64_t B, int64_t H) {
  using C = acc_t<T>;
  const int64_t step = B * H;
  run_steps<T>(
      pw, T_ + 1, B,
      [&](int64_t s) { return Operands<T>{s == 0 ? nullptr : dA + (T_ - s) * step, H}; },
      [&](int64_t s, int64_t b0, int64_t rows, int64_t j0, int64_t nu, const C* tile, int64_t ld) {
        const int64_t t = T_ - 1 - s;
        for (int64_t b = b0; b < b0 + rows; ++b) {
          const int64_t len = row_length(lengths, b, T_);
          const C* __restrict acc = tile + (b - b0) * ld;
          if (s == T_) {
            if (len == 0) std::copy(ghl + b * H + j0, ghl + b * H + j0 + nu, dh0 + b * H + j0);
            else std::copy(acc, acc + nu, dh0 + b * H + j0);
            continue;
          }
          T* __restrict d = dA + t * step + b * H + j0;
          if (t >= len) {
            std::fill(d, d + nu, T(0));
            continue;
          }
          const T* __restrict g = gy + t * step + b * H + j0;
          const T* __restrict h = out + t * step + b * H + j0;
          auto units = [&](const auto* __restrict gin) {  // the final state's gradient (T) or the tile's (C)
            if (sums != nullptr) rnn_backward_units<T, C, RELU, true>(g, gin, h, d, sums + b * H + j0, nu);
            else rnn_backward_units<T, C, RELU, false>(g, gin, h, d, static_cast<C*>(nullptr), nu);
          };
          if (t == len - 1) units(ghl + b * H + j0);
          else units(acc);
          if (t > 0) {  // what the next step reads for these units, asked for ahead (see prefetch_span)
            prefetch_span(g - step, nu);
            prefetch_span(h - step, nu);
          }
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
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, xp.scalar_type(), "mmrnn_rnn_forward", [&] {
      const auto pw = pack_weight<scalar_t>(w_hh, 1, /*transpose=*/true, isa);
      auto run = relu ? forward_loop<scalar_t, true> : forward_loop<scalar_t, false>;
      run(pw, xp.data_ptr<scalar_t>(), nullptr, h0.data_ptr<scalar_t>(), data_or_null<scalar_t>(image_term), per_step,
          len, out.data_ptr<scalar_t>(), nullptr, T_, B, H);
    });
  }
  return out;
}

// The forward for inference: out and h_last only. With w_ih, `input` is x [T, B, I] and the input
// product is fused into every step's tile; without, it is xp [T, B, H].
std::tuple<at::Tensor, at::Tensor> rnn_infer(const at::Tensor& input, const std::optional<at::Tensor>& w_ih,
                                             const at::Tensor& w_hh, const at::Tensor& h0,
                                             const std::optional<at::Tensor>& image_term,
                                             const std::optional<at::Tensor>& lengths, bool relu) {
  const int64_t H = check_infer_input(input, w_ih, w_hh, 1);
  const int64_t T_ = input.size(0), B = input.size(1);
  check_arg(h0, "h0", input, {B, H});
  const bool per_step = check_image_term(image_term, input, T_, B, H);
  const int64_t* len = check_lengths(lengths, T_, B);
  const Isa isa = cpu_isa();
  at::Tensor out = empty_huge({T_, B, H}, input.options());
  at::Tensor h_last = h0.clone();
  {
    pybind11::gil_scoped_release no_gil;
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, input.scalar_type(), "mmrnn_rnn_infer", [&] {
      const auto pw = pack_weight<scalar_t>(w_hh, 1, /*transpose=*/true, isa, w_ih.has_value() ? &*w_ih : nullptr);
      auto run = relu ? forward_loop<scalar_t, true> : forward_loop<scalar_t, false>;
      const scalar_t* data = input.data_ptr<scalar_t>();
      run(pw, w_ih.has_value() ? nullptr : data, w_ih.has_value() ? data : nullptr, h0.data_ptr<scalar_t>(),
          data_or_null<scalar_t>(image_term), per_step, len, out.data_ptr<scalar_t>(), h_last.data_ptr<scalar_t>(), T_,
          B, H);
    });
  }
  return {out, h_last};
}

std::tuple<at::Tensor, at::Tensor> rnn_backward(const at::Tensor& grad_out, const at::Tensor& grad_h_last,
                                                const at::Tensor& out, const at::Tensor& h0, const at::Tensor& w_hh,
                                                const std::optional<at::Tensor>& lengths, bool relu,
                                                const std::optional<at::Tensor>& sums) {
  check_sequence(out, "out", 1);
  const int64_t T_ = out.size(0), B = out.size(1), H = out.size(2);
  check_arg(grad_out, "grad_out", out, out.sizes());
  check_arg(grad_h_last, "grad_h_last", out, {B, H});
  check_arg(h0, "h0", out, {B, H});
  check_arg(w_hh, "w_hh", out, {H, H});
  const int64_t* len = check_lengths(lengths, T_, B);
  void* sum_data = step_sums_data(sums, out, B, H);
  const Isa isa = cpu_isa();
  at::Tensor dA = empty_huge(out.sizes(), out.options());
  at::Tensor dh0 = at::empty_like(h0);
  {
    pybind11::gil_scoped_release no_gil;
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, out.scalar_type(), "mmrnn_rnn_backward", [&] {
      const auto pw = pack_weight<scalar_t>(w_hh, 1, /*transpose=*/false, isa);
      auto run = relu ? backward_loop<scalar_t, true> : backward_loop<scalar_t, false>;
      run(pw, grad_out.data_ptr<scalar_t>(), grad_h_last.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), len,
          dA.data_ptr<scalar_t>(), dh0.data_ptr<scalar_t>(), static_cast<acc_t<scalar_t>*>(sum_data), T_, B, H);
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
  m.def("rnn_infer", &rnn_infer,
        "RNN forward for inference -> (out, h_last); with w_ih the input is x and its product is fused",
        pybind11::arg("input"), pybind11::arg("w_ih"), pybind11::arg("w_hh"), pybind11::arg("h0"),
        pybind11::arg("image_term"), pybind11::arg("lengths"), pybind11::arg("relu"));
  m.def("rnn_backward", &rnn_backward,
        "RNN BPTT over the whole sequence -> (dA [T, B, H], dh0 [B, H]); sums [B, H] (float32; float64 for "
        "float64), when given, gets each row's dA summed over steps",
        pybind11::arg("grad_out"), pybind11::arg("grad_h_last"), pybind11::arg("out"), pybind11::arg("h0"),
        pybind11::arg("w_hh"), pybind11::arg("lengths"), pybind11::arg("relu"), pybind11::arg("sums") = pybind11::none());
  m.def("parallel_build", [] { return kParallelBuild; },
        "whether this build runs its work on torch's intra-op threads (False: compiled without OpenMP, one thread)");
  m.def("cpu_isa", [] { return std::string(isa_name(cpu_isa())); },
        "the vector path the recurrences take on this CPU (avx512_bf16, avx512, avx2 or generic; MMRNN_CPU_ISA caps it)");
  m.def("tanh_float32", [](const at::Tensor& x) { return apply_f32(x, tanh_f32); },
        "the recurrences' float32 tanh, exposed for its accuracy test", pybind11::arg("x"));
  m.def("sigmoid_float32", [](const at::Tensor& x) { return apply_f32(x, sigmoid_f32); },
        "the gated recurrences' float32 sigmoid, exposed for its accuracy test", pybind11::arg("x"));
}

}  // namespace mmrnn
