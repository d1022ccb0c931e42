// The fused multimodal LSTM recurrence on CPU tensors: forward and BPTT backward, one call each per
// layer and direction. Time-major contract (see mmrnn_ext/reference.py), gates in torch's order i, f, g, o:
//   xp [T, B, 4H], w_hh [4H, H], h0, c0 [B, H], image_term None | [B, 4H] | [T, B, 4H], lengths None | int64 [B]
//   forward  -> (out [T, B, H], c_all [T, B, H], gates [T, B, 4H] = sigmoid(i), sigmoid(f), tanh(g), sigmoid(o))
//   infer    -> (out [T, B, H], h_last [B, H], c_last [B, H])      (saves nothing for backward)
//   backward -> (dG [T, B, 4H] = dL/d(pre-activation gates), dh0 [B, H], dc0 [B, H])
// Per step: one product h_{t-1} @ W_hh^T on the engine (engine.h), W_hh^T packed so that a tile
// holds all four gates of its hidden units; each tile gets the projected input and image term, the
// gate nonlinearities and the c/h update while in L1. Backward: per step one product
// dG_{t+1} @ W_hh whose tile (dL/dh_t for its units) goes straight into that step's gate
// gradients; tanh(c_t) is recomputed, not stored.
#include "engine.h"

namespace mmrnn {
namespace {

// One row's units [j0, j0 + n) of one forward step: pre-activations = product tile (gate g at
// acc[g * U + u]) + projected input (XP; gate g at x[g * H + u]; absent when the input product is
// fused into the tile) + image term.
template <typename T, bool XP, bool IMG, bool SAVE>
inline void lstm_forward_units(const T* __restrict acc, int64_t U, const T* __restrict x, const T* __restrict im,
                               const T* cp, T* c, T* __restrict h, T* __restrict gates,
                               int64_t H, int64_t n) {
  for (int64_t u = 0; u < n; ++u) {
    T a[4];
    for (int k = 0; k < 4; ++k) a[k] = acc[k * U + u] + (XP ? x[k * H + u] : T(0)) + (IMG ? im[k * H + u] : T(0));
    const T i = sigmoid_(a[0]), f = sigmoid_(a[1]), g = tanh_(a[2]), o = sigmoid_(a[3]);
    const T cn = f * cp[u] + i * g;
    if constexpr (SAVE) {
      gates[u] = i;
      gates[H + u] = f;
      gates[2 * H + u] = g;
      gates[3 * H + u] = o;
    }
    c[u] = cn;
    h[u] = o * tanh_(cn);
  }
}

// SAVE (training): c_all [T, B, H] and gates [T, B, 4H] are written for backward. !SAVE
// (inference): c [B, H] holds the running cell state (c0 on entry), and h_last/c_last (h0/c0 on
// entry) get each row's state at its last valid step. (cp and c are the same buffer then: each unit
// reads its own state before writing it.) xp [T, B, 4H], or (inference) x [T, B, I] with the input
// product fused (pw.K1 = I, xp null).
template <typename T, bool SAVE>
void lstm_forward_loop(const PackedWeight<T>& pw, const T* xp, const T* x_in, const T* h0, const T* c0, const T* img,
                       bool img_per_step, const int64_t* lengths, T* out, T* c_state, T* gates, T* h_last, T* c_last,
                       int64_t T_, int64_t B, int64_t H) {
  const int64_t step = B * H, G = 4 * H, U = pw.units, I = pw.K1;
  run_steps<T>(
      pw, T_, B,
      [&](int64_t t) {
        return Operands<T>{t == 0 ? h0 : out + (t - 1) * step, H, x_in == nullptr ? nullptr : x_in + t * B * I, I};
      },
      [&](int64_t t, int64_t b0, int64_t rows, int64_t j0, int64_t nu, const T* tile, int64_t ld) {
        const T* im = img == nullptr ? nullptr : (img_per_step ? img + t * B * G : img);
        for (int64_t b = b0; b < b0 + rows; ++b) {
          const int64_t len = row_length(lengths, b, T_), bj = b * H + j0;
          T* h = out + t * step + bj;
          T* c = SAVE ? c_state + t * step + bj : c_state + bj;
          T* gt = SAVE ? gates + t * B * G + b * G + j0 : nullptr;
          if (t >= len) {
            std::fill(h, h + nu, T(0));
            if constexpr (SAVE) {
              std::fill(c, c + nu, T(0));
              for (int k = 0; k < 4; ++k) std::fill(gt + k * H, gt + k * H + nu, T(0));
            }
            continue;
          }
          const T* cp = SAVE ? (t == 0 ? c0 + bj : c_state + (t - 1) * step + bj) : c;
          const T* acc = tile + (b - b0) * ld;
          const T* x = xp == nullptr ? nullptr : xp + t * B * G + b * G + j0;
          const T* i = im == nullptr ? nullptr : im + b * G + j0;
          if (x != nullptr) {
            if (i != nullptr) lstm_forward_units<T, true, true, SAVE>(acc, U, x, i, cp, c, h, gt, H, nu);
            else lstm_forward_units<T, true, false, SAVE>(acc, U, x, i, cp, c, h, gt, H, nu);
          } else {
            if (i != nullptr) lstm_forward_units<T, false, true, SAVE>(acc, U, x, i, cp, c, h, gt, H, nu);
            else lstm_forward_units<T, false, false, SAVE>(acc, U, x, i, cp, c, h, gt, H, nu);
          }
          if (!SAVE && t == len - 1) {
            std::copy(h, h + nu, h_last + bj);
            std::copy(c, c + nu, c_last + bj);
          }
        }
      });
}

// One row's units of one backward step: dG from the incoming dL/dh (hin + gy) and dL/dc (cin);
// dL/dc_{t-1} goes to cout (the same buffer as cin but for the final-state step: each unit reads
// its own value before writing it).
template <typename T>
inline void lstm_backward_units(const T* __restrict gy, const T* hin, const T* cin, const T* __restrict g4,
                                const T* __restrict c, const T* __restrict cp, T* __restrict d, T* cout, int64_t H,
                                int64_t n) {
  for (int64_t u = 0; u < n; ++u) {
    const T i = g4[u], f = g4[H + u], g = g4[2 * H + u], o = g4[3 * H + u];
    const T tc = tanh_(c[u]);
    const T dh = gy[u] + hin[u];
    const T dc = cin[u] + dh * o * (T(1) - tc * tc);
    d[u] = dc * g * i * (T(1) - i);
    d[H + u] = dc * cp[u] * f * (T(1) - f);
    d[2 * H + u] = dc * i * (T(1) - g * g);
    d[3 * H + u] = dh * tc * o * (T(1) - o);
    cout[u] = dc * f;
  }
}

// Reverse step s handles t = T - 1 - s with dL/dh_t = dG_{t+1} @ W_hh (no product at s = 0);
// step T writes dh0 = dG_0 @ W_hh and dc0. gc [B, H] carries dL/dc between steps. At a row's last
// step the final states' gradients enter.
template <typename T>
void lstm_backward_loop(const PackedWeight<T>& pw, const T* gy, const T* ghl, const T* gcl, const T* c0,
                        const T* c_all, const T* gates, const int64_t* lengths, T* dG, T* gc, T* dh0, T* dc0,
                        int64_t T_, int64_t B, int64_t H) {
  const int64_t step = B * H, G = 4 * H;
  run_steps<T>(
      pw, T_ + 1, B, [&](int64_t s) { return Operands<T>{s == 0 ? nullptr : dG + (T_ - s) * B * G, G}; },
      [&](int64_t s, int64_t b0, int64_t rows, int64_t j0, int64_t nu, const T* tile, int64_t ld) {
        const int64_t t = T_ - 1 - s;
        for (int64_t b = b0; b < b0 + rows; ++b) {
          const int64_t len = row_length(lengths, b, T_), bj = b * H + j0;
          const T* acc = tile + (b - b0) * ld;
          if (s == T_) {
            const T* dh = len == 0 ? ghl + bj : acc;
            const T* dc = len == 0 ? gcl + bj : gc + bj;
            std::copy(dh, dh + nu, dh0 + bj);
            std::copy(dc, dc + nu, dc0 + bj);
            continue;
          }
          T* d = dG + t * B * G + b * G + j0;
          if (t >= len) {
            for (int k = 0; k < 4; ++k) std::fill(d + k * H, d + k * H + nu, T(0));
            continue;
          }
          const bool last = t == len - 1;
          lstm_backward_units<T>(gy + t * step + bj, last ? ghl + bj : acc, last ? gcl + bj : gc + bj,
                                 gates + t * B * G + b * G + j0, c_all + t * step + bj,
                                 (t == 0 ? c0 : c_all + (t - 1) * step) + bj, d, gc + bj, H, nu);
        }
      });
}

// SAVE (training forward; `input` is xp, no w_ih) -> (out, c_all, gates). !SAVE (inference) ->
// (out, h_last, c_last); with w_ih, `input` is x [T, B, I] and the input product is fused into
// every step's tile, without it is xp [T, B, 4H].
template <bool SAVE>
std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_run(const at::Tensor& input, const std::optional<at::Tensor>& w_ih,
                                                        const at::Tensor& w_hh, const at::Tensor& h0,
                                                        const at::Tensor& c0,
                                                        const std::optional<at::Tensor>& image_term,
                                                        const std::optional<at::Tensor>& lengths) {
  const int64_t H = check_infer_input(input, w_ih, w_hh, 4);
  const int64_t T_ = input.size(0), B = input.size(1);
  check_arg(h0, "h0", input, {B, H});
  check_arg(c0, "c0", input, {B, H});
  const bool per_step = check_image_term(image_term, input, T_, B, 4 * H);
  const int64_t* len = check_lengths(lengths, T_, B);
  const Isa isa = cpu_isa();
  at::Tensor out = empty_huge({T_, B, H}, input.options());
  // SAVE: c_all [T, B, H] and gates [T, B, 4H]; else the running c (c0 on entry), h_last, c_last
  at::Tensor c = SAVE ? empty_huge({T_, B, H}, input.options()) : c0.clone();
  at::Tensor second = SAVE ? c : h0.clone();
  at::Tensor third = SAVE ? empty_huge({T_, B, 4 * H}, input.options()) : c0.clone();
  {
    pybind11::gil_scoped_release no_gil;
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "mmrnn_lstm_forward", [&] {
      const auto pw = pack_weight<scalar_t>(w_hh, 4, /*transpose=*/true, B, isa, w_ih.has_value() ? &*w_ih : nullptr);
      const scalar_t* data = input.data_ptr<scalar_t>();
      lstm_forward_loop<scalar_t, SAVE>(pw, w_ih.has_value() ? nullptr : data, w_ih.has_value() ? data : nullptr,
                                        h0.data_ptr<scalar_t>(), c0.data_ptr<scalar_t>(),
                                        data_or_null<scalar_t>(image_term), per_step, len, out.data_ptr<scalar_t>(),
                                        c.data_ptr<scalar_t>(), SAVE ? third.data_ptr<scalar_t>() : nullptr,
                                        SAVE ? nullptr : second.data_ptr<scalar_t>(),
                                        SAVE ? nullptr : third.data_ptr<scalar_t>(), T_, B, H);
    });
  }
  return {out, second, third};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_forward(const at::Tensor& xp, const at::Tensor& w_hh,
                                                            const at::Tensor& h0, const at::Tensor& c0,
                                                            const std::optional<at::Tensor>& image_term,
                                                            const std::optional<at::Tensor>& lengths) {
  return lstm_run<true>(xp, std::nullopt, w_hh, h0, c0, image_term, lengths);
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
  const int64_t* len = check_lengths(lengths, T_, B);
  const Isa isa = cpu_isa();
  at::Tensor dG = empty_huge(gates.sizes(), out.options());
  at::Tensor gc = at::empty_like(c0), dh0 = at::empty_like(h0), dc0 = at::empty_like(c0);
  {
    pybind11::gil_scoped_release no_gil;
    AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "mmrnn_lstm_backward", [&] {
      const auto pw = pack_weight<scalar_t>(w_hh, 1, /*transpose=*/false, B, isa);
      lstm_backward_loop<scalar_t>(pw, grad_out.data_ptr<scalar_t>(), grad_h_last.data_ptr<scalar_t>(),
                                   grad_c_last.data_ptr<scalar_t>(), c0.data_ptr<scalar_t>(), c_all.data_ptr<scalar_t>(),
                                   gates.data_ptr<scalar_t>(), len, dG.data_ptr<scalar_t>(), gc.data_ptr<scalar_t>(),
                                   dh0.data_ptr<scalar_t>(), dc0.data_ptr<scalar_t>(), T_, B, H);
    });
  }
  return {dG, dh0, dc0};
}

}  // namespace

void register_lstm(pybind11::module& m) {
  m.def("lstm_forward", &lstm_forward, "LSTM forward over the whole sequence -> (out, c_all, gates)", pybind11::arg("xp"),
        pybind11::arg("w_hh"), pybind11::arg("h0"), pybind11::arg("c0"), pybind11::arg("image_term"),
        pybind11::arg("lengths"));
  m.def("lstm_infer", &lstm_run<false>,
        "LSTM forward for inference -> (out, h_last, c_last); with w_ih the input is x and its product is fused",
        pybind11::arg("input"), pybind11::arg("w_ih"), pybind11::arg("w_hh"), pybind11::arg("h0"), pybind11::arg("c0"),
        pybind11::arg("image_term"), pybind11::arg("lengths"));
  m.def("lstm_backward", &lstm_backward, "LSTM BPTT over the whole sequence -> (dG [T, B, 4H], dh0, dc0)",
        pybind11::arg("grad_out"), pybind11::arg("grad_h_last"), pybind11::arg("grad_c_last"), pybind11::arg("out"),
        pybind11::arg("c_all"), pybind11::arg("gates"), pybind11::arg("h0"), pybind11::arg("c0"), pybind11::arg("w_hh"),
        pybind11::arg("lengths"));
}

}  // namespace mmrnn
