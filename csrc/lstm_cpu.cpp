// The fused multimodal LSTM recurrence on CPU tensors: forward and BPTT backward, one call each per
// layer and direction. Time-major contract (see mmrnn_ext/reference.py), gates in torch's order i, f, g, o:
//   xp [T, B, 4H], w_hh [4H, H], h0, c0 [B, H], image_term None | [B, 4H] | [T, B, 4H], lengths None | int64 [B]
//   forward  -> (out [T, B, H], c_all [T, B, H], gates [T, B, 4H] = sigmoid(i), sigmoid(f), tanh(g), sigmoid(o))
//   backward -> (dG [T, B, 4H] = dL/d(pre-activation gates), dh0 [B, H], dc0 [B, H])
// Per step: one GEMM h_{t-1} @ W_hh^T straight into that step's gates slot, then one pass per row
// (no temporaries over T*B*H) that adds the projected input and image term, applies the four gate nonlinearities, updates c
// and h and overwrites the slot with the activated gates (what backward reads). Backward: one pass
// per row, then one GEMM dG_t @ W_hh for dL/dh_{t-1}; tanh(c_t) is recomputed, not stored.
#include "common.h"

namespace mmrnn {
namespace {

// One row of one forward step: pre-activations = GEMM result (in grow) + input + image term.
template <typename T, bool IMG>
inline void lstm_forward_row(T* __restrict grow, const T* __restrict xrow, const T* __restrict irow,
                             const T* __restrict cprow, T* __restrict crow, T* __restrict orow, int64_t H) {
  for (int64_t j = 0; j < H; ++j) {
    T a[4];
    for (int k = 0; k < 4; ++k) a[k] = grow[k * H + j] + xrow[k * H + j] + (IMG ? irow[k * H + j] : T(0));
    const T i = sigmoid_(a[0]), f = sigmoid_(a[1]), g = tanh_(a[2]), o = sigmoid_(a[3]);
    const T c = f * cprow[j] + i * g;
    grow[j] = i;
    grow[H + j] = f;
    grow[2 * H + j] = g;
    grow[3 * H + j] = o;
    crow[j] = c;
    orow[j] = o * tanh_(c);
  }
}

template <typename T>
void lstm_forward_loop(const StepGemm<T>& gemm, const T* xp, const T* h0, const T* c0, const T* img, bool img_per_step,
                       const int64_t* lengths, T* out, T* c_all, T* gates, int64_t T_, int64_t B, int64_t H) {
  const int64_t step = B * H, gstep = 4 * step, G = 4 * H;
  for (int64_t t = 0; t < T_; ++t) {
    const T* h_prev = t == 0 ? h0 : out + (t - 1) * step;
    const T* c_prev = t == 0 ? c0 : c_all + (t - 1) * step;
    T* gt = gates + t * gstep;
    const T* x = xp + t * gstep;
    const T* im = img == nullptr ? nullptr : (img_per_step ? img + t * gstep : img);
    gemm.run(h_prev, gt);
    at::parallel_for(0, B, row_grain(G), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        T* grow = gt + b * G;
        T* orow = out + t * step + b * H;
        T* crow = c_all + t * step + b * H;
        if (t >= row_length(lengths, b, T_)) {
          std::fill(grow, grow + G, T(0));
          std::fill(orow, orow + H, T(0));
          std::fill(crow, crow + H, T(0));
        } else if (im != nullptr) {
          lstm_forward_row<T, true>(grow, x + b * G, im + b * G, c_prev + b * H, crow, orow, H);
        } else {
          lstm_forward_row<T, false>(grow, x + b * G, nullptr, c_prev + b * H, crow, orow, H);
        }
      }
    });
  }
}

// One row of one backward step: dG from the incoming dL/dh (hin + gy) and dL/dc (cin); writes the
// gradient dL/dc_{t-1} to cout (a different buffer than cin, so that every pointer is restrict and
// the loop vectorises).
template <typename T>
inline void lstm_backward_row(const T* __restrict gyrow, const T* __restrict hin, const T* __restrict cin,
                              const T* __restrict grow, const T* __restrict crow, const T* __restrict cprow,
                              T* __restrict drow, T* __restrict cout, int64_t H) {
  for (int64_t j = 0; j < H; ++j) {
    const T i = grow[j], f = grow[H + j], g = grow[2 * H + j], o = grow[3 * H + j];
    const T tc = tanh_(crow[j]);
    const T dh = gyrow[j] + hin[j];
    const T dc = cin[j] + dh * o * (T(1) - tc * tc);
    drow[j] = dc * g * i * (T(1) - i);
    drow[H + j] = dc * cprow[j] * f * (T(1) - f);
    drow[2 * H + j] = dc * i * (T(1) - g * g);
    drow[3 * H + j] = dh * tc * o * (T(1) - o);
    cout[j] = dc * f;
  }
}

// gh: dL/dh_t arriving from step t+1 (dG_{t+1} @ W_hh); gc[0|1]: dL/dc_t arriving from step t+1,
// alternating buffers. Both are read only where t+1 < length; at a row's last step the final
// states' gradients enter. Returns the buffer that holds dL/dc_{-1} (before step 0).
template <typename T>
T* lstm_backward_loop(const StepGemm<T>& gemm, const T* gy, const T* ghl, const T* gcl, const T* c0, const T* c_all,
                      const T* gates, const int64_t* lengths, T* dG, T* gh, T* gc0, T* gc1, int64_t T_, int64_t B,
                      int64_t H) {
  const int64_t step = B * H, gstep = 4 * step, G = 4 * H;
  std::fill(gh, gh + step, T(0));
  std::fill(gc0, gc0 + step, T(0));
  T* gc_in = gc0;
  T* gc_out = gc1;
  for (int64_t t = T_ - 1; t >= 0; --t) {
    T* dgt = dG + t * gstep;
    at::parallel_for(0, B, row_grain(G), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t len = row_length(lengths, b, T_);
        T* drow = dgt + b * G;
        if (t >= len) {
          std::fill(drow, drow + G, T(0));
          continue;
        }
        const bool last = t == len - 1;
        lstm_backward_row<T>(gy + t * step + b * H, (last ? ghl : gh) + b * H, (last ? gcl : gc_in) + b * H,
                             gates + t * gstep + b * G, c_all + t * step + b * H,
                             (t == 0 ? c0 : c_all + (t - 1) * step) + b * H, drow, gc_out + b * H, H);
      }
    });
    gemm.run(dgt, gh);
    std::swap(gc_in, gc_out);
  }
  return gc_in;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_forward(const at::Tensor& xp, const at::Tensor& w_hh,
                                                            const at::Tensor& h0, const at::Tensor& c0,
                                                            const std::optional<at::Tensor>& image_term,
                                                            const std::optional<at::Tensor>& lengths) {
  check_sequence(xp, "xp", 4);
  const int64_t T_ = xp.size(0), B = xp.size(1), H = xp.size(2) / 4;
  check_arg(w_hh, "w_hh", xp, {4 * H, H});
  check_arg(h0, "h0", xp, {B, H});
  check_arg(c0, "c0", xp, {B, H});
  const bool per_step = check_image_term(image_term, xp, T_, B, 4 * H);
  check_blas_dims(B, 4 * H);
  const int64_t* len = check_lengths(lengths, T_, B);
  at::Tensor out = empty_huge({T_, B, H}, xp.options());
  at::Tensor c_all = empty_huge({T_, B, H}, xp.options());
  at::Tensor gates = empty_huge(xp.sizes(), xp.options());
  {
    pybind11::gil_scoped_release no_gil;
    AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "mmrnn_lstm_forward", [&] {
      const StepGemm<scalar_t> gemm(w_hh, /*transpose=*/true, static_cast<int>(B));
      lstm_forward_loop<scalar_t>(gemm, xp.data_ptr<scalar_t>(), h0.data_ptr<scalar_t>(), c0.data_ptr<scalar_t>(),
                                  data_or_null<scalar_t>(image_term), per_step, len, out.data_ptr<scalar_t>(),
                                  c_all.data_ptr<scalar_t>(), gates.data_ptr<scalar_t>(), T_, B, H);
    });
  }
  return {out, c_all, gates};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_backward(
    const at::Tensor& grad_out, const at::Tensor& grad_h_last, const at::Tensor& grad_c_last, const at::Tensor& out,
    const at::Tensor& c_all, const at::Tensor& gates, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& lengths) {
  check_sequence(out, "out", 1);
  const int64_t T_ = out.size(0), B = out.size(1), H = out.size(2);
  check_arg(grad_out, "grad_out", out, out.sizes());
  check_arg(grad_h_last, "grad_h_last", out, {B, H});
  check_arg(grad_c_last, "grad_c_last", out, {B, H});
  check_arg(c_all, "c_all", out, out.sizes());
  check_arg(gates, "gates", out, {T_, B, 4 * H});
  check_arg(h0, "h0", out, {B, H});
  check_arg(c0, "c0", out, {B, H});
  check_arg(w_hh, "w_hh", out, {4 * H, H});
  check_blas_dims(B, 4 * H);
  const int64_t* len = check_lengths(lengths, T_, B);
  at::Tensor dG = empty_huge(gates.sizes(), out.options());
  at::Tensor gh = at::empty_like(h0), gc = at::empty({2, B, H}, c0.options());
  at::Tensor dh0 = at::empty_like(h0), dc0 = at::empty_like(c0);
  {
    pybind11::gil_scoped_release no_gil;
    AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "mmrnn_lstm_backward", [&] {
      const StepGemm<scalar_t> gemm(w_hh, /*transpose=*/false, static_cast<int>(B));
      scalar_t* gc_first = gc.data_ptr<scalar_t>();
      const scalar_t* dc_carried = lstm_backward_loop<scalar_t>(
          gemm, grad_out.data_ptr<scalar_t>(), grad_h_last.data_ptr<scalar_t>(), grad_c_last.data_ptr<scalar_t>(),
          c0.data_ptr<scalar_t>(), c_all.data_ptr<scalar_t>(), gates.data_ptr<scalar_t>(), len, dG.data_ptr<scalar_t>(),
          gh.data_ptr<scalar_t>(), gc_first, gc_first + B * H, T_, B, H);
      initial_state_grad(gh.data_ptr<scalar_t>(), grad_h_last.data_ptr<scalar_t>(), len, dh0.data_ptr<scalar_t>(), T_, B, H);
      initial_state_grad(dc_carried, grad_c_last.data_ptr<scalar_t>(), len, dc0.data_ptr<scalar_t>(), T_, B, H);
    });
  }
  return {dG, dh0, dc0};
}

}  // namespace

void register_lstm(pybind11::module& m) {
  m.def("lstm_forward", &lstm_forward, "LSTM forward over the whole sequence -> (out, c_all, gates)", pybind11::arg("xp"),
        pybind11::arg("w_hh"), pybind11::arg("h0"), pybind11::arg("c0"), pybind11::arg("image_term"),
        pybind11::arg("lengths"));
  m.def("lstm_backward", &lstm_backward, "LSTM BPTT over the whole sequence -> (dG [T, B, 4H], dh0, dc0)",
        pybind11::arg("grad_out"), pybind11::arg("grad_h_last"), pybind11::arg("grad_c_last"), pybind11::arg("out"),
        pybind11::arg("c_all"), pybind11::arg("gates"), pybind11::arg("h0"), pybind11::arg("c0"), pybind11::arg("w_hh"),
        pybind11::arg("lengths"));
}

}  // namespace mmrnn
