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
// fused into the tile) + image term. Storage S, computed in C = acc_t<S>; c is the running cell
// state (C, updated in place: each unit reads its own state before writing it).
template <typename S, typename C, bool XP, bool IMG, bool SAVE>
inline void lstm_forward_units(const C* __restrict acc, int64_t U, const S* __restrict x, const S* __restrict im,
                               C* __restrict c, S* __restrict c_save, S* __restrict h, S* __restrict gates, int64_t H,
                               int64_t n) {
  MMRNN_IVDEP
  for (int64_t u = 0; u < n; ++u) {
    C a[4];
    for (int k = 0; k < 4; ++k)
      a[k] = acc[k * U + u] + (XP ? C(x[k * H + u]) : C(0)) + (IMG ? C(im[k * H + u]) : C(0));
    const C i = sigmoid_(a[0]), f = sigmoid_(a[1]), g = tanh_(a[2]), o = sigmoid_(a[3]);
    const C cn = f * c[u] + i * g;
    if constexpr (SAVE) {
      gates[u] = i;
      gates[H + u] = f;
      gates[2 * H + u] = g;
      gates[3 * H + u] = o;
      c_save[u] = cn;
    }
    c[u] = cn;
    h[u] = o * tanh_(cn);
  }
}

// c_run [B, H] (C) carries the cell state (c0 on entry). SAVE (training): c_all [T, B, H] and
// gates [T, B, 4H] are written for backward. h_last/c_last (inference; training where not null) get
// each row's state at its last valid step (h0/c0 on entry). xp [T, B, 4H], or (inference) x [T, B, I] with the input
// product fused (pw.K1 = I, xp null).
template <typename T, bool SAVE>
void lstm_forward_loop(const PackedWeight<T>& pw, const T* xp, const T* x_in, const T* h0, const T* img,
                       bool img_per_step, const int64_t* lengths, T* out, acc_t<T>* c_run, T* c_all, T* gates,
                       T* h_last, T* c_last, int64_t T_, int64_t B, int64_t H) {
  using C = acc_t<T>;
  const int64_t step = B * H, G = 4 * H, U = pw.units, I = pw.K1;
  run_steps<T>(
      pw, T_, B,
      [&](int64_t t) {
        return Operands<T>{t == 0 ? h0 : out + (t - 1) * step, H, x_in == nullptr ? nullptr : x_in + t * B * I, I};
      },
      [&](int64_t t, int64_t b0, int64_t rows, int64_t j0, int64_t nu, const C* tile, int64_t ld) {
        const T* im = img == nullptr ? nullptr : (img_per_step ? img + t * B * G : img);
        for (int64_t b = b0; b < b0 + rows; ++b) {
          const int64_t len = row_length(lengths, b, T_), bj = b * H + j0;
          T* h = out + t * step + bj;
          T* cs = SAVE ? c_all + t * step + bj : nullptr;
          T* gt = SAVE ? gates + t * B * G + b * G + j0 : nullptr;
          if (t >= len) {
            std::fill(h, h + nu, T(0));
            if constexpr (SAVE) {
              std::fill(cs, cs + nu, T(0));
              for (int k = 0; k < 4; ++k) std::fill(gt + k * H, gt + k * H + nu, T(0));
            }
            continue;
          }
          C* c = c_run + bj;
          const C* acc = tile + (b - b0) * ld;
          const T* x = xp == nullptr ? nullptr : xp + t * B * G + b * G + j0;
          const T* i = im == nullptr ? nullptr : im + b * G + j0;
          if (x != nullptr) {
            if (i != nullptr) lstm_forward_units<T, C, true, true, SAVE>(acc, U, x, i, c, cs, h, gt, H, nu);
            else lstm_forward_units<T, C, true, false, SAVE>(acc, U, x, i, c, cs, h, gt, H, nu);
          } else {
            if (i != nullptr) lstm_forward_units<T, C, false, true, SAVE>(acc, U, x, i, c, cs, h, gt, H, nu);
            else lstm_forward_units<T, C, false, false, SAVE>(acc, U, x, i, c, cs, h, gt, H, nu);
          }
          if (h_last != nullptr && t == len - 1) {
            std::copy(h, h + nu, h_last + bj);
            std::copy(c, c + nu, c_last + bj);
          }
          if (SAVE && t + 1 < T_) {  // the next step's saves of these units, asked for ahead (see prefetch_span)
            for (int k = 0; k < 4; ++k) prefetch_span<true>(gt + B * G + k * H, nu);
            prefetch_span<true>(cs + step, nu);
            prefetch_span<true>(h + step, nu);
          }
        }
      });
}

// One row's units of one backward step: dG from the incoming dL/dh (hin + gy) and dL/dc (cin);
// dL/dc_{t-1} goes to cout (the same buffer as cin but for the final-state step: each unit reads
// its own value before writing it). hin/cin: the tile and carry (C) or the final states' gradients (S).
// SUM: the four gates' gradients also added to the row's step sums sm (step_sums_data, laid out as d).
template <typename S, typename C, bool SUM, typename HIn, typename CIn>
inline void lstm_backward_units(const S* __restrict gy, const HIn* hin, const CIn* cin, const S* __restrict g4,
                                const S* __restrict c, const S* __restrict cp, S* __restrict d, C* cout,
                                C* __restrict sm, int64_t H, int64_t n) {
  MMRNN_IVDEP
  for (int64_t u = 0; u < n; ++u) {
    const C i = g4[u], f = g4[H + u], g = g4[2 * H + u], o = g4[3 * H + u];
    const C tc = tanh_(C(c[u]));
    const C dh = C(gy[u]) + C(hin[u]);
    const C dc = C(cin[u]) + dh * o * (C(1) - tc * tc);
    const C di = dc * g * i * (C(1) - i), df = dc * C(cp[u]) * f * (C(1) - f), dg = dc * i * (C(1) - g * g),
            dout = dh * tc * o * (C(1) - o);
    d[u] = di;
    d[H + u] = df;
    d[2 * H + u] = dg;
    d[3 * H + u] = dout;
    cout[u] = dc * f;
    if constexpr (SUM) {
      sm[u] += di;
      sm[H + u] += df;
      sm[2 * H + u] += dg;
      sm[3 * H + u] += dout;
    }
  }
}

// Reverse step s handles t = T - 1 - s with dL/dh_t = dG_{t+1} @ W_hh (no product at s = 0);
// step T writes dh0 = dG_0 @ W_hh and dc0. gc [B, H] (C) carries dL/dc between steps. At a row's
// last step the final states' gradients enter. sums: nullptr, or [B, 4H] to get each row's dG summed
// over steps (step_sums_data).
template <typename T>
void lstm_backward_loop(const PackedWeight<T>& pw, const T* gy, const T* ghl, const T* gcl, const T* c0,
                        const T* c_all, const T* gates, const int64_t* lengths, T* dG, acc_t<T>* gc, T* dh0, T* dc0,
                        acc_t<T>* sums, int64_t T_, int64_t B, int64_t H) {
  using C = acc_t<T>;
  const int64_t step = B * H, G = 4 * H;
  run_steps<T>(
      pw, T_ + 1, B, [&](int64_t s) { return Operands<T>{s == 0 ? nullptr : dG + (T_ - s) * B * G, G}; },
      [&](int64_t s, int64_t b0, int64_t rows, int64_t j0, int64_t nu, const C* tile, int64_t ld) {
        const int64_t t = T_ - 1 - s;
        for (int64_t b = b0; b < b0 + rows; ++b) {
          const int64_t len = row_length(lengths, b, T_), bj = b * H + j0;
          const C* acc = tile + (b - b0) * ld;
          if (s == T_) {
            if (len == 0) {
              std::copy(ghl + bj, ghl + bj + nu, dh0 + bj);
              std::copy(gcl + bj, gcl + bj + nu, dc0 + bj);
            } else {
              std::copy(acc, acc + nu, dh0 + bj);
              std::copy(gc + bj, gc + bj + nu, dc0 + bj);
            }
            continue;
          }
          T* d = dG + t * B * G + b * G + j0;
          if (t >= len) {
            for (int k = 0; k < 4; ++k) std::fill(d + k * H, d + k * H + nu, T(0));
            continue;
          }
          const T* g4 = gates + t * B * G + b * G + j0;
          const T* c = c_all + t * step + bj;
          const T* cp = (t == 0 ? c0 : c_all + (t - 1) * step) + bj;
          C* sm = sums == nullptr ? nullptr : sums + b * G + j0;
          auto units = [&](const auto* hin, const auto* cin) {  // the tile and carry, or the final states' gradients
            if (sm != nullptr) lstm_backward_units<T, C, true>(gy + t * step + bj, hin, cin, g4, c, cp, d, gc + bj, sm, H, nu);
            else lstm_backward_units<T, C, false>(gy + t * step + bj, hin, cin, g4, c, cp, d, gc + bj, sm, H, nu);
          };
          if (t == len - 1) units(ghl + bj, gcl + bj);
          else units(acc, gc + bj);
          if (t > 0) {  // what the next step reads and writes for these units, asked for ahead
            prefetch_span(gy + (t - 1) * step + bj, nu);
            for (int k = 0; k < 4; ++k) prefetch_span(g4 - B * G + k * H, nu);
            for (int k = 0; k < 4; ++k) prefetch_span<true>(d - B * G + k * H, nu);
            prefetch_span(c - step, nu);
            if (t > 1) prefetch_span(cp - step, nu);
          }
        }
      });
}

// SAVE (training forward) -> (out, c_all, gates), with `finals` then (h_last, c_last) too.
// !SAVE (inference) -> (out, h_last, c_last). With w_ih, `input` is x [T, B, I] and the input
// product is fused into every step's tile, without it is xp [T, B, 4H].
template <bool SAVE>
std::vector<at::Tensor> lstm_run(const at::Tensor& input, const std::optional<at::Tensor>& w_ih, const at::Tensor& w_hh,
                                 const at::Tensor& h0, const at::Tensor& c0, const std::optional<at::Tensor>& image_term,
                                 const std::optional<at::Tensor>& lengths, bool finals = !SAVE) {
  const int64_t H = check_infer_input(input, w_ih, w_hh, 4);
  const int64_t T_ = input.size(0), B = input.size(1);
  check_arg(h0, "h0", input, {B, H});
  check_arg(c0, "c0", input, {B, H});
  const bool per_step = check_image_term(image_term, input, T_, B, 4 * H);
  const int64_t* len = check_lengths(lengths, T_, B);
  const Isa isa = cpu_isa();
  at::Tensor out = empty_huge({T_, B, H}, input.options());
  at::Tensor c_run = c0.to(carry_type(c0.scalar_type()), /*non_blocking=*/false, /*copy=*/true);
  // SAVE: c_all [T, B, H] and gates [T, B, 4H]; the final states (h0 and c0 for rows of length 0)
  at::Tensor second = SAVE ? empty_huge({T_, B, H}, input.options()) : at::Tensor();
  at::Tensor third = SAVE ? empty_huge({T_, B, 4 * H}, input.options()) : at::Tensor();
  at::Tensor h_last = finals ? h0.clone() : at::Tensor();
  at::Tensor c_last = finals ? c0.clone() : at::Tensor();
  {
    pybind11::gil_scoped_release no_gil;
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, input.scalar_type(), "mmrnn_lstm_forward", [&] {
      const auto pw = pack_weight<scalar_t>(w_hh, 4, /*transpose=*/true, isa, w_ih.has_value() ? &*w_ih : nullptr);
      const scalar_t* data = input.data_ptr<scalar_t>();
      lstm_forward_loop<scalar_t, SAVE>(pw, w_ih.has_value() ? nullptr : data, w_ih.has_value() ? data : nullptr,
                                        h0.data_ptr<scalar_t>(), data_or_null<scalar_t>(image_term), per_step, len,
                                        out.data_ptr<scalar_t>(), c_run.data_ptr<acc_t<scalar_t>>(),
                                        SAVE ? second.data_ptr<scalar_t>() : nullptr,
                                        SAVE ? third.data_ptr<scalar_t>() : nullptr,
                                        finals ? h_last.data_ptr<scalar_t>() : nullptr,
                                        finals ? c_last.data_ptr<scalar_t>() : nullptr, T_, B, H);
    });
  }
  if (!SAVE) return {out, h_last, c_last};
  if (!finals) return {out, second, third};
  return {out, second, third, h_last, c_last};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_forward(const at::Tensor& xp, const at::Tensor& w_hh,
                                                            const at::Tensor& h0, const at::Tensor& c0,
                                                            const std::optional<at::Tensor>& image_term,
                                                            const std::optional<at::Tensor>& lengths) {
  const auto r = lstm_run<true>(xp, std::nullopt, w_hh, h0, c0, image_term, lengths);
  return {r[0], r[1], r[2]};
}

// The training forward with the input product fused, and the final states: (out, c_all, gates, h_last, c_last).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_forward_fused(
    const at::Tensor& x, const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& h0, const at::Tensor& c0,
    const std::optional<at::Tensor>& image_term, const std::optional<at::Tensor>& lengths) {
  const auto r = lstm_run<true>(x, w_ih, w_hh, h0, c0, image_term, lengths, /*finals=*/true);
  return {r[0], r[1], r[2], r[3], r[4]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_infer(const at::Tensor& input, const std::optional<at::Tensor>& w_ih,
                                                          const at::Tensor& w_hh, const at::Tensor& h0,
                                                          const at::Tensor& c0,
                                                          const std::optional<at::Tensor>& image_term,
                                                          const std::optional<at::Tensor>& lengths) {
  const auto r = lstm_run<false>(input, w_ih, w_hh, h0, c0, image_term, lengths);
  return {r[0], r[1], r[2]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_backward(
    const at::Tensor& grad_out, const at::Tensor& grad_h_last, const at::Tensor& grad_c_last, const at::Tensor& out,
    const at::Tensor& c_all, const at::Tensor& gates, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& sums) {
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
  void* sum_data = step_sums_data(sums, out, B, 4 * H);
  const Isa isa = cpu_isa();
  at::Tensor dG = empty_huge(gates.sizes(), out.options());
  at::Tensor gc = at::empty(c0.sizes(), c0.options().dtype(carry_type(c0.scalar_type())));
  at::Tensor dh0 = at::empty_like(h0), dc0 = at::empty_like(c0);
  {
    pybind11::gil_scoped_release no_gil;
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, out.scalar_type(), "mmrnn_lstm_backward", [&] {
      const auto pw = pack_weight<scalar_t>(w_hh, 1, /*transpose=*/false, isa);
      lstm_backward_loop<scalar_t>(pw, grad_out.data_ptr<scalar_t>(), grad_h_last.data_ptr<scalar_t>(),
                                   grad_c_last.data_ptr<scalar_t>(), c0.data_ptr<scalar_t>(), c_all.data_ptr<scalar_t>(),
                                   gates.data_ptr<scalar_t>(), len, dG.data_ptr<scalar_t>(), gc.data_ptr<acc_t<scalar_t>>(),
                                   dh0.data_ptr<scalar_t>(), dc0.data_ptr<scalar_t>(),
                                   static_cast<acc_t<scalar_t>*>(sum_data), T_, B, H);
    });
  }
  return {dG, dh0, dc0};
}

}  // namespace

void register_lstm(pybind11::module& m) {
  m.def("lstm_forward", &lstm_forward, "LSTM forward over the whole sequence -> (out, c_all, gates)", pybind11::arg("xp"),
        pybind11::arg("w_hh"), pybind11::arg("h0"), pybind11::arg("c0"), pybind11::arg("image_term"),
        pybind11::arg("lengths"));
  m.def("lstm_forward_fused", &lstm_forward_fused,
        "LSTM forward over the whole sequence, the input product of x [T, B, I] fused -> (out, c_all, gates, h_last, "
        "c_last)",
        pybind11::arg("x"), pybind11::arg("w_ih"), pybind11::arg("w_hh"), pybind11::arg("h0"), pybind11::arg("c0"),
        pybind11::arg("image_term"), pybind11::arg("lengths"));
  m.def("lstm_infer", &lstm_infer,
        "LSTM forward for inference -> (out, h_last, c_last); with w_ih the input is x and its product is fused",
        pybind11::arg("input"), pybind11::arg("w_ih"), pybind11::arg("w_hh"), pybind11::arg("h0"), pybind11::arg("c0"),
        pybind11::arg("image_term"), pybind11::arg("lengths"));
  m.def("lstm_backward", &lstm_backward,
        "LSTM BPTT over the whole sequence -> (dG [T, B, 4H], dh0, dc0); sums [B, 4H] (float32; float64 for "
        "float64), when given, gets each row's dG summed over steps",
        pybind11::arg("grad_out"), pybind11::arg("grad_h_last"), pybind11::arg("grad_c_last"), pybind11::arg("out"),
        pybind11::arg("c_all"), pybind11::arg("gates"), pybind11::arg("h0"), pybind11::arg("c0"), pybind11::arg("w_hh"),
        pybind11::arg("lengths"), pybind11::arg("sums") = pybind11::none());
}

}  // namespace mmrnn
