// The fused multimodal GRU recurrence on CPU tensors: forward and BPTT backward, one call each per
// layer and direction. Time-major contract (see mmrnn_ext/reference.py), gates in torch's order r, z, n:
//   xp [T, B, 3H], w_hh [3H, H], b_hn None | [H], h0 [B, H], image_term None | [B, 3H] | [T, B, 3H],
//   lengths None | int64 [B]
//   forward  -> (out [T, B, H], gates [T, B, 4H] = r, z, n, W_hn h_{t-1} + b_hn)
//   infer    -> (out [T, B, H], h_last [B, H])                    (saves nothing for backward)
//   backward -> (dGx [T, B, 3H] = dL/d(xp + image term), dhn [T, B, H] = dL/d(W_hn h + b_hn), dh0 [B, H])
// Per step: one product h_{t-1} @ W_hh^T on the engine (engine.h), packed so that a tile holds the
// three gate blocks of its hidden units; each tile forms r, z, n and h_t while in L1. Backward:
// per step one product [dr, dz, dhn]_{t+1} @ W_hh (read where the previous step wrote dGx and dhn)
// plus the direct path dL/dh_{t+1} * z_{t+1}, fused into that step's gradients.
#include "engine.h"

namespace mmrnn {
namespace {

// Storage S, computed in C = acc_t<S>; hr is the running state h_{t-1} (C), replaced by h_t in
// place (each unit reads its own state before writing it), h the output row (S). FUSED: the input
// product is in the tile (r and z in acc, W_in x_t in xn_tile) and x is unused.
template <typename S, typename C, bool IMG, bool BIAS, bool SAVE, bool FUSED>
inline void gru_forward_units(const C* __restrict acc, int64_t U, const S* __restrict x, const C* __restrict xn_tile,
                              const S* __restrict im, const S* __restrict bhn, C* __restrict hr, S* __restrict h,
                              S* __restrict gates, int64_t H, int64_t n) {
  MMRNN_IVDEP
  for (int64_t u = 0; u < n; ++u) {
    const C xr = (FUSED ? C(0) : C(x[u])) + (IMG ? C(im[u]) : C(0));
    const C xz = (FUSED ? C(0) : C(x[H + u])) + (IMG ? C(im[H + u]) : C(0));
    const C xn = (FUSED ? xn_tile[u] : C(x[2 * H + u])) + (IMG ? C(im[2 * H + u]) : C(0));
    const C hn = acc[2 * U + u] + (BIAS ? C(bhn[u]) : C(0));
    const C r = sigmoid_(acc[u] + xr);
    const C z = sigmoid_(acc[U + u] + xz);
    const C nn = tanh_(xn + r * hn);
    if constexpr (SAVE) {
      gates[u] = r;
      gates[H + u] = z;
      gates[2 * H + u] = nn;
      gates[3 * H + u] = hn;
    }
    const C hv = nn + z * (hr[u] - nn);
    hr[u] = hv;
    h[u] = hv;
  }
}

// h_run [B, H] (C) carries the state (h0 on entry). SAVE (training): gates [T, B, 4H] is written
// for backward. h_last (inference; training where not null; h0 on entry) gets each row's state at
// its last valid step.
// xp [T, B, 3H] (the projected input), or with the input product fused (pw.split, xp null) x
// [T, B, I], I = pw.K1.
template <typename T, bool SAVE>
void gru_forward_loop(const PackedWeight<T>& pw, const T* xp, const T* x_in, const T* b_hn, const T* h0, const T* img,
                      bool img_per_step, const int64_t* lengths, T* out, acc_t<T>* h_run, T* gates, T* h_last,
                      int64_t T_, int64_t B, int64_t H) {
  using C = acc_t<T>;
  const int64_t step = B * H, G = 3 * H, W = 4 * H, U = pw.units, I = pw.K1;
  run_steps<T>(
      pw, T_, B,
      [&](int64_t t) {
        return Operands<T>{t == 0 ? h0 : out + (t - 1) * step, H, x_in == nullptr ? nullptr : x_in + t * B * I, I};
      },
      [&](int64_t t, int64_t b0, int64_t rows, int64_t j0, int64_t nu, const C* tile, int64_t ld) {
        const T* im = img == nullptr ? nullptr : (img_per_step ? img + t * B * G : img);
        const T* bias = b_hn == nullptr ? nullptr : b_hn + j0;
        for (int64_t b = b0; b < b0 + rows; ++b) {
          const int64_t len = row_length(lengths, b, T_), bj = b * H + j0;
          T* h = out + t * step + bj;
          T* gt = SAVE ? gates + t * B * W + b * W + j0 : nullptr;
          if (t >= len) {
            std::fill(h, h + nu, T(0));
            if constexpr (SAVE) for (int k = 0; k < 4; ++k) std::fill(gt + k * H, gt + k * H + nu, T(0));
            continue;
          }
          const C* acc = tile + (b - b0) * ld;
          C* hr = h_run + bj;
          const T* i = im == nullptr ? nullptr : im + b * G + j0;
          auto units = [&](auto fused, const T* x, const C* xn) {
            constexpr bool F = decltype(fused)::value;
            if (i != nullptr) {
              if (bias != nullptr) gru_forward_units<T, C, true, true, SAVE, F>(acc, U, x, xn, i, bias, hr, h, gt, H, nu);
              else gru_forward_units<T, C, true, false, SAVE, F>(acc, U, x, xn, i, bias, hr, h, gt, H, nu);
            } else {
              if (bias != nullptr) gru_forward_units<T, C, false, true, SAVE, F>(acc, U, x, xn, i, bias, hr, h, gt, H, nu);
              else gru_forward_units<T, C, false, false, SAVE, F>(acc, U, x, xn, i, bias, hr, h, gt, H, nu);
            }
          };
          if (xp == nullptr) units(std::true_type{}, nullptr, tile + rows * ld + (b - b0) * U);
          else units(std::false_type{}, xp + t * B * G + b * G + j0, nullptr);
          if (h_last != nullptr && t == len - 1) std::copy(h, h + nu, h_last + bj);
          if (SAVE && t + 1 < T_) {  // the next step's saves of these units, asked for ahead (see prefetch_span)
            for (int k = 0; k < 4; ++k) prefetch_span<true>(gt + B * W + k * H, nu);
            prefetch_span<true>(h + step, nu);
          }
        }
      });
}

// One row's units of one backward step. hz (C) carries dL/dh_t * z_t (the direct path into
// h_{t-1}) from step to step; hin is dL/dh_t arriving from step t+1 (C) or the final state's
// gradient (S). SUM: dr, dz, dn and dhn also added to the row's step sums sm (step_sums_data,
// [dr, dz, dn, dhn] blocks of H).
template <typename S, typename C, bool SUM, typename HIn>
inline void gru_backward_units(const S* __restrict gy, const HIn* hin, const S* __restrict g4, const S* __restrict hp,
                               S* __restrict dx, S* __restrict dhn, C* hz, C* __restrict sm, int64_t H, int64_t n) {
  MMRNN_IVDEP
  for (int64_t u = 0; u < n; ++u) {
    const C r = g4[u], z = g4[H + u], nn = g4[2 * H + u], hn = g4[3 * H + u];
    const C dh = C(gy[u]) + C(hin[u]);
    const C dn = dh * (C(1) - z) * (C(1) - nn * nn);
    const C dz = dh * (C(hp[u]) - nn) * z * (C(1) - z);
    const C dr = dn * hn * r * (C(1) - r);
    const C d_hn = dn * r;
    dx[u] = dr;
    dx[H + u] = dz;
    dx[2 * H + u] = dn;
    dhn[u] = d_hn;
    hz[u] = dh * z;
    if constexpr (SUM) {
      sm[u] += dr;
      sm[H + u] += dz;
      sm[2 * H + u] += dn;
      sm[3 * H + u] += d_hn;
    }
  }
}

// Reverse step s handles t = T - 1 - s; its product is S_{t+1} @ W_hh, S = [dr, dz, dhn] as step
// s - 1 wrote it: the kernels' two-part operand reads dr, dz from dGx's first 2H columns and dhn from
// dhn (pw.K1 = 2H), nothing copied (a [B, 3H] copy per step before: GRU BPTT at (32,128,.,.,256)
// 10.25 -> 9.55 ms, (24,100,.,.,320) 8.94 -> 8.56, 2-core Zen 4 EPYC). Step T writes dh0. sums:
// nullptr, or [B, 4H] to get each row's [dGx | dhn] summed over steps (step_sums_data).
template <typename T>
void gru_backward_loop(const PackedWeight<T>& pw, const T* gy, const T* ghl, const T* out, const T* h0, const T* gates,
                       const int64_t* lengths, T* dGx, T* dhn, acc_t<T>* hz, T* dh0, acc_t<T>* sums, int64_t T_,
                       int64_t B, int64_t H) {
  using C = acc_t<T>;
  const int64_t step = B * H, G = 3 * H, W = 4 * H;
  run_steps<T>(
      pw, T_ + 1, B,
      [&](int64_t s) { return Operands<T>{s == 0 ? nullptr : dhn + (T_ - s) * step, H, dGx + (T_ - s) * B * G, G}; },
      [&](int64_t s, int64_t b0, int64_t rows, int64_t j0, int64_t nu, const C* tile, int64_t ld) {
        const int64_t t = T_ - 1 - s;
        alignas(64) C gin[64];
        for (int64_t b = b0; b < b0 + rows; ++b) {
          const int64_t len = row_length(lengths, b, T_), bj = b * H + j0;
          const C* acc = tile + (b - b0) * ld;
          if (s == T_) {
            for (int64_t u = 0; u < nu; ++u) dh0[bj + u] = len == 0 ? ghl[bj + u] : T(acc[u] + hz[bj + u]);
            continue;
          }
          T* dx = dGx + t * B * G + b * G + j0;
          if (t >= len) {
            for (int k = 0; k < 3; ++k) std::fill(dx + k * H, dx + k * H + nu, T(0));
            std::fill(dhn + t * step + bj, dhn + t * step + bj + nu, T(0));
            continue;
          }
          const T* g4 = gates + t * B * W + b * W + j0;
          const T* hp = (t == 0 ? h0 : out + (t - 1) * step) + bj;
          C* sm = sums == nullptr ? nullptr : sums + b * W + j0;
          auto units = [&](const auto* hin) {  // the tile (with the direct path) or the final state's gradient
            if (sm != nullptr) gru_backward_units<T, C, true>(gy + t * step + bj, hin, g4, hp, dx, dhn + t * step + bj, hz + bj, sm, H, nu);
            else gru_backward_units<T, C, false>(gy + t * step + bj, hin, g4, hp, dx, dhn + t * step + bj, hz + bj, sm, H, nu);
          };
          if (t == len - 1) {
            units(ghl + bj);
          } else {
            for (int64_t u = 0; u < nu; ++u) gin[u] = acc[u] + hz[bj + u];
            units(static_cast<const C*>(gin));
          }
          if (t > 0) {  // what the next step reads and writes for these units, asked for ahead
            prefetch_span(gy + (t - 1) * step + bj, nu);
            for (int k = 0; k < 4; ++k) prefetch_span(g4 - B * W + k * H, nu);
            for (int k = 0; k < 3; ++k) prefetch_span<true>(dx - B * G + k * H, nu);
            prefetch_span<true>(dhn + (t - 1) * step + bj, nu);
            if (t > 1) prefetch_span(hp - step, nu);
          }
        }
      });
}

// SAVE (training forward) -> (out, gates [T, B, 4H]); !SAVE (inference) -> (out, h_last). With
// w_ih [3H, I], `input` is x [T, B, I] and the input product is fused into every step's tile
// (float32 and float64: the split kernels, micro_kernels.h); without, it is xp [T, B, 3H].
// With `finals` (training) the final state h_last follows: (out, gates, h_last).
template <bool SAVE>
std::vector<at::Tensor> gru_run(const at::Tensor& input, const std::optional<at::Tensor>& w_ih, const at::Tensor& w_hh,
                                const std::optional<at::Tensor>& b_hn, const at::Tensor& h0,
                                const std::optional<at::Tensor>& image_term, const std::optional<at::Tensor>& lengths,
                                bool finals = !SAVE) {
  const int64_t H = check_infer_input(input, w_ih, w_hh, 3);
  const int64_t T_ = input.size(0), B = input.size(1);
  if (b_hn.has_value()) check_arg(*b_hn, "b_hn", input, {H});
  check_arg(h0, "h0", input, {B, H});
  TORCH_CHECK(!w_ih.has_value() || input.scalar_type() != at::kBFloat16,
              "x: the GRU's fused input product computes float32 and float64, got BFloat16 (project the input first "
              "and pass xp without w_ih)");
  const bool per_step = check_image_term(image_term, input, T_, B, 3 * H);
  const int64_t* len = check_lengths(lengths, T_, B);
  const Isa isa = cpu_isa();
  at::Tensor out = empty_huge({T_, B, H}, input.options());
  at::Tensor second = SAVE ? empty_huge({T_, B, 4 * H}, input.options()) : at::Tensor();
  at::Tensor h_last = finals ? h0.clone() : at::Tensor();  // h0 for rows of length 0
  at::Tensor h_run = h0.to(carry_type(h0.scalar_type()), /*non_blocking=*/false, /*copy=*/true);
  {
    pybind11::gil_scoped_release no_gil;
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, input.scalar_type(), "mmrnn_gru_forward", [&] {
      auto pw = pack_weight<scalar_t>(w_hh, 3, /*transpose=*/true, isa, w_ih.has_value() ? &*w_ih : nullptr);
      pw.split = w_ih.has_value();
      const scalar_t* data = input.data_ptr<scalar_t>();
      gru_forward_loop<scalar_t, SAVE>(pw, w_ih.has_value() ? nullptr : data, w_ih.has_value() ? data : nullptr,
                                       data_or_null<scalar_t>(b_hn), h0.data_ptr<scalar_t>(),
                                       data_or_null<scalar_t>(image_term), per_step, len, out.data_ptr<scalar_t>(),
                                       h_run.data_ptr<acc_t<scalar_t>>(), SAVE ? second.data_ptr<scalar_t>() : nullptr,
                                       finals ? h_last.data_ptr<scalar_t>() : nullptr, T_, B, H);
    });
  }
  if (!SAVE) return {out, h_last};
  if (!finals) return {out, second};
  return {out, second, h_last};
}

std::tuple<at::Tensor, at::Tensor> gru_forward(const at::Tensor& xp, const at::Tensor& w_hh,
                                               const std::optional<at::Tensor>& b_hn, const at::Tensor& h0,
                                               const std::optional<at::Tensor>& image_term,
                                               const std::optional<at::Tensor>& lengths) {
  const auto r = gru_run<true>(xp, std::nullopt, w_hh, b_hn, h0, image_term, lengths);
  return {r[0], r[1]};
}

// The training forward with the input product fused, and the final state: (out, gates, h_last).
std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_forward_fused(const at::Tensor& x, const at::Tensor& w_ih,
                                                                 const at::Tensor& w_hh,
                                                                 const std::optional<at::Tensor>& b_hn,
                                                                 const at::Tensor& h0,
                                                                 const std::optional<at::Tensor>& image_term,
                                                                 const std::optional<at::Tensor>& lengths) {
  const auto r = gru_run<true>(x, w_ih, w_hh, b_hn, h0, image_term, lengths, /*finals=*/true);
  return {r[0], r[1], r[2]};
}

std::tuple<at::Tensor, at::Tensor> gru_infer(const at::Tensor& input, const std::optional<at::Tensor>& w_ih,
                                             const at::Tensor& w_hh, const std::optional<at::Tensor>& b_hn,
                                             const at::Tensor& h0, const std::optional<at::Tensor>& image_term,
                                             const std::optional<at::Tensor>& lengths) {
  const auto r = gru_run<false>(input, w_ih, w_hh, b_hn, h0, image_term, lengths);
  return {r[0], r[1]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_backward(const at::Tensor& grad_out, const at::Tensor& grad_h_last,
                                                            const at::Tensor& out, const at::Tensor& gates,
                                                            const at::Tensor& h0, const at::Tensor& w_hh,
                                                            const std::optional<at::Tensor>& lengths,
                                                            const std::optional<at::Tensor>& sums) {
  check_sequence(out, "out", 1);
  const int64_t T_ = out.size(0), B = out.size(1), H = out.size(2);
  check_arg(grad_out, "grad_out", out, out.sizes());
  check_arg(grad_h_last, "grad_h_last", out, {B, H});
  check_arg(gates, "gates", out, {T_, B, 4 * H});
  check_arg(h0, "h0", out, {B, H});
  check_arg(w_hh, "w_hh", out, {3 * H, H});
  const int64_t* len = check_lengths(lengths, T_, B);
  void* sum_data = step_sums_data(sums, out, B, 4 * H);
  const Isa isa = cpu_isa();
  at::Tensor dGx = empty_huge({T_, B, 3 * H}, out.options());
  at::Tensor dhn = empty_huge({T_, B, H}, out.options());
  at::Tensor hz = at::empty(h0.sizes(), h0.options().dtype(carry_type(h0.scalar_type())));
  at::Tensor dh0 = at::empty_like(h0);
  {
    pybind11::gil_scoped_release no_gil;
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, out.scalar_type(), "mmrnn_gru_backward", [&] {
      auto pw = pack_weight<scalar_t>(w_hh, 1, /*transpose=*/false, isa);
      // the product's operand [dr, dz | dhn]_{t+1} in two parts (see gru_backward_loop): W_hh's rows
      // are packed in that order, and with an even first part the bfloat16 pairs are those of one part
      pw.K1 = 2 * H;
      gru_backward_loop<scalar_t>(pw, grad_out.data_ptr<scalar_t>(), grad_h_last.data_ptr<scalar_t>(),
                                  out.data_ptr<scalar_t>(), h0.data_ptr<scalar_t>(), gates.data_ptr<scalar_t>(), len,
                                  dGx.data_ptr<scalar_t>(), dhn.data_ptr<scalar_t>(),
                                  hz.data_ptr<acc_t<scalar_t>>(), dh0.data_ptr<scalar_t>(),
                                  static_cast<acc_t<scalar_t>*>(sum_data), T_, B, H);
    });
  }
  return {dGx, dhn, dh0};
}

}  // namespace

void register_gru(pybind11::module& m) {
  m.def("gru_forward", &gru_forward, "GRU forward over the whole sequence -> (out, gates)", pybind11::arg("xp"),
        pybind11::arg("w_hh"), pybind11::arg("b_hn"), pybind11::arg("h0"), pybind11::arg("image_term"),
        pybind11::arg("lengths"));
  m.def("gru_forward_fused", &gru_forward_fused,
        "GRU training forward with the input product fused (x [T, B, I] and w_ih [3H, I]) -> (out, gates, h_last)",
        pybind11::arg("x"), pybind11::arg("w_ih"), pybind11::arg("w_hh"), pybind11::arg("b_hn"), pybind11::arg("h0"),
        pybind11::arg("image_term"), pybind11::arg("lengths"));
  m.def("gru_infer", &gru_infer,
        "GRU forward that saves nothing for backward -> (out, h_last); with w_ih the input is x and its product is "
        "fused", pybind11::arg("input"), pybind11::arg("w_ih"), pybind11::arg("w_hh"), pybind11::arg("b_hn"),
        pybind11::arg("h0"), pybind11::arg("image_term"), pybind11::arg("lengths"));
  m.def("gru_backward", &gru_backward,
        "GRU BPTT over the whole sequence -> (dGx [T, B, 3H], dhn [T, B, H], dh0); sums [B, 4H] (float32; float64 "
        "for float64), when given, gets each row's [dGx | dhn] summed over steps",
        pybind11::arg("grad_out"), pybind11::arg("grad_h_last"), pybind11::arg("out"), pybind11::arg("gates"),
        pybind11::arg("h0"), pybind11::arg("w_hh"), pybind11::arg("lengths"), pybind11::arg("sums") = pybind11::none());
}

}  // namespace mmrnn
