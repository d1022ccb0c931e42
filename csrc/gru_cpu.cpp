// The fused multimodal GRU recurrence on CPU tensors: forward and BPTT backward, one call each per
// layer and direction. Time-major contract (see mmrnn_ext/reference.py), gates in torch's order r, z, n:
//   xp [T, B, 3H], w_hh [3H, H], b_hn None | [H], h0 [B, H], image_term None | [B, 3H] | [T, B, 3H],
//   lengths None | int64 [B]
//   forward  -> (out [T, B, H], gates [T, B, 4H] = r, z, n, W_hn h_{t-1} + b_hn)
//   backward -> (dGx [T, B, 3H] = dL/d(xp + image term), dhn [T, B, H] = dL/d(W_hn h + b_hn), dh0 [B, H])
// Per step: one GEMM h_{t-1} @ W_hh^T into the first 3H columns of that step's gates slot (row
// stride 4H), then one pass per row that forms r, z, n and h_t and overwrites the slot with what
// backward reads. Backward: one pass per row that writes dGx, dhn and the recurrent gradient
// [dr, dz, dhn] into a [B, 3H] scratch, plus dL/dh_t * z (the direct path) into the other of two
// alternating buffers, then one GEMM that accumulates scratch @ W_hh onto it: dL/dh_{t-1}.
#include "common.h"

namespace mmrnn {
namespace {

template <typename T, bool IMG, bool BIAS>
inline void gru_forward_row(T* __restrict grow, const T* __restrict xrow, const T* __restrict irow,
                            const T* __restrict bhn, const T* __restrict hprow, T* __restrict orow, int64_t H) {
  for (int64_t j = 0; j < H; ++j) {
    const T xr = xrow[j] + (IMG ? irow[j] : T(0));
    const T xz = xrow[H + j] + (IMG ? irow[H + j] : T(0));
    const T xn = xrow[2 * H + j] + (IMG ? irow[2 * H + j] : T(0));
    const T hn = grow[2 * H + j] + (BIAS ? bhn[j] : T(0));
    const T r = sigmoid_(grow[j] + xr);
    const T z = sigmoid_(grow[H + j] + xz);
    const T n = tanh_(xn + r * hn);
    grow[j] = r;
    grow[H + j] = z;
    grow[2 * H + j] = n;
    grow[3 * H + j] = hn;
    orow[j] = n + z * (hprow[j] - n);
  }
}

template <typename T>
void gru_forward_loop(const StepGemm<T>& gemm, const T* xp, const T* b_hn, const T* h0, const T* img, bool img_per_step,
                      const int64_t* lengths, T* out, T* gates, int64_t T_, int64_t B, int64_t H) {
  const int64_t step = B * H, G = 3 * H, W = 4 * H;
  for (int64_t t = 0; t < T_; ++t) {
    const T* h_prev = t == 0 ? h0 : out + (t - 1) * step;
    T* gt = gates + t * B * W;
    const T* x = xp + t * B * G;
    const T* im = img == nullptr ? nullptr : (img_per_step ? img + t * B * G : img);
    gemm.run(h_prev, static_cast<int>(H), gt, static_cast<int>(W), /*accumulate=*/false);
    at::parallel_for(0, B, row_grain(W), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        T* grow = gt + b * W;
        T* orow = out + t * step + b * H;
        const T* hprow = h_prev + b * H;
        if (t >= row_length(lengths, b, T_)) {
          std::fill(grow, grow + W, T(0));
          std::fill(orow, orow + H, T(0));
        } else if (im != nullptr) {
          if (b_hn != nullptr) gru_forward_row<T, true, true>(grow, x + b * G, im + b * G, b_hn, hprow, orow, H);
          else gru_forward_row<T, true, false>(grow, x + b * G, im + b * G, nullptr, hprow, orow, H);
        } else {
          if (b_hn != nullptr) gru_forward_row<T, false, true>(grow, x + b * G, nullptr, b_hn, hprow, orow, H);
          else gru_forward_row<T, false, false>(grow, x + b * G, nullptr, nullptr, hprow, orow, H);
        }
      }
    });
  }
}

// One row of one backward step. hout (a different buffer than hin, so that every pointer is
// restrict and the loop vectorises) gets the direct path dL/dh_t * z; the step's GEMM then adds
// srow @ W_hh to it.
template <typename T>
inline void gru_backward_row(const T* __restrict gyrow, const T* __restrict hin, const T* __restrict grow,
                             const T* __restrict hprow, T* __restrict dxrow, T* __restrict dhnrow, T* __restrict srow,
                             T* __restrict hout, int64_t H) {
  for (int64_t j = 0; j < H; ++j) {
    const T r = grow[j], z = grow[H + j], n = grow[2 * H + j], hn = grow[3 * H + j];
    const T dh = gyrow[j] + hin[j];
    const T dn = dh * (T(1) - z) * (T(1) - n * n);
    const T dz = dh * (hprow[j] - n) * z * (T(1) - z);
    const T dr = dn * hn * r * (T(1) - r);
    const T d_hn = dn * r;
    dxrow[j] = dr;
    dxrow[H + j] = dz;
    dxrow[2 * H + j] = dn;
    dhnrow[j] = d_hn;
    srow[j] = dr;
    srow[H + j] = dz;
    srow[2 * H + j] = d_hn;
    hout[j] = dh * z;
  }
}

// gh[0|1]: dL/dh_t arriving from step t+1, alternating buffers; read only where t+1 < length (the
// final state's gradient enters at a row's last step). Returns the buffer holding dL/dh_{-1}.
template <typename T>
T* gru_backward_loop(const StepGemm<T>& gemm, const T* gy, const T* ghl, const T* out, const T* h0, const T* gates,
                     const int64_t* lengths, T* dGx, T* dhn, T* scratch, T* gh0, T* gh1, int64_t T_, int64_t B, int64_t H) {
  const int64_t step = B * H, G = 3 * H, W = 4 * H;
  std::fill(gh0, gh0 + step, T(0));
  std::fill(gh1, gh1 + step, T(0));
  T* gh_in = gh0;
  T* gh_out = gh1;
  for (int64_t t = T_ - 1; t >= 0; --t) {
    const T* h_prev = t == 0 ? h0 : out + (t - 1) * step;
    at::parallel_for(0, B, row_grain(W), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t len = row_length(lengths, b, T_);
        T* dxrow = dGx + t * B * G + b * G;
        T* dhnrow = dhn + t * step + b * H;
        T* srow = scratch + b * G;
        if (t >= len) {
          std::fill(dxrow, dxrow + G, T(0));
          std::fill(dhnrow, dhnrow + H, T(0));
          std::fill(srow, srow + G, T(0));
          continue;
        }
        gru_backward_row<T>(gy + t * step + b * H, (t == len - 1 ? ghl : gh_in) + b * H, gates + t * B * W + b * W,
                            h_prev + b * H, dxrow, dhnrow, srow, gh_out + b * H, H);
      }
    });
    gemm.run(scratch, gh_out, /*accumulate=*/true);
    std::swap(gh_in, gh_out);
  }
  return gh_in;
}

std::tuple<at::Tensor, at::Tensor> gru_forward(const at::Tensor& xp, const at::Tensor& w_hh,
                                               const std::optional<at::Tensor>& b_hn, const at::Tensor& h0,
                                               const std::optional<at::Tensor>& image_term,
                                               const std::optional<at::Tensor>& lengths) {
  check_sequence(xp, "xp", 3);
  const int64_t T_ = xp.size(0), B = xp.size(1), H = xp.size(2) / 3;
  check_arg(w_hh, "w_hh", xp, {3 * H, H});
  if (b_hn.has_value()) check_arg(*b_hn, "b_hn", xp, {H});
  check_arg(h0, "h0", xp, {B, H});
  const bool per_step = check_image_term(image_term, xp, T_, B, 3 * H);
  check_blas_dims(B, 4 * H);
  const int64_t* len = check_lengths(lengths, T_, B);
  at::Tensor out = empty_huge({T_, B, H}, xp.options());
  at::Tensor gates = empty_huge({T_, B, 4 * H}, xp.options());
  {
    pybind11::gil_scoped_release no_gil;
    AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "mmrnn_gru_forward", [&] {
      const StepGemm<scalar_t> gemm(w_hh, /*transpose=*/true, static_cast<int>(B));
      gru_forward_loop<scalar_t>(gemm, xp.data_ptr<scalar_t>(), data_or_null<scalar_t>(b_hn), h0.data_ptr<scalar_t>(),
                                 data_or_null<scalar_t>(image_term), per_step, len, out.data_ptr<scalar_t>(),
                                 gates.data_ptr<scalar_t>(), T_, B, H);
    });
  }
  return {out, gates};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_backward(const at::Tensor& grad_out, const at::Tensor& grad_h_last,
                                                            const at::Tensor& out, const at::Tensor& gates,
                                                            const at::Tensor& h0, const at::Tensor& w_hh,
                                                            const std::optional<at::Tensor>& lengths) {
  check_sequence(out, "out", 1);
  const int64_t T_ = out.size(0), B = out.size(1), H = out.size(2);
  check_arg(grad_out, "grad_out", out, out.sizes());
  check_arg(grad_h_last, "grad_h_last", out, {B, H});
  check_arg(gates, "gates", out, {T_, B, 4 * H});
  check_arg(h0, "h0", out, {B, H});
  check_arg(w_hh, "w_hh", out, {3 * H, H});
  check_blas_dims(B, 4 * H);
  const int64_t* len = check_lengths(lengths, T_, B);
  at::Tensor dGx = empty_huge({T_, B, 3 * H}, out.options());
  at::Tensor dhn = empty_huge({T_, B, H}, out.options());
  at::Tensor scratch = at::empty({B, 3 * H}, out.options());
  at::Tensor gh = at::empty({2, B, H}, h0.options()), dh0 = at::empty_like(h0);
  {
    pybind11::gil_scoped_release no_gil;
    AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "mmrnn_gru_backward", [&] {
      const StepGemm<scalar_t> gemm(w_hh, /*transpose=*/false, static_cast<int>(B));
      scalar_t* gh_first = gh.data_ptr<scalar_t>();
      const scalar_t* dh_carried = gru_backward_loop<scalar_t>(
          gemm, grad_out.data_ptr<scalar_t>(), grad_h_last.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
          h0.data_ptr<scalar_t>(), gates.data_ptr<scalar_t>(), len, dGx.data_ptr<scalar_t>(), dhn.data_ptr<scalar_t>(),
          scratch.data_ptr<scalar_t>(), gh_first, gh_first + B * H, T_, B, H);
      initial_state_grad(dh_carried, grad_h_last.data_ptr<scalar_t>(), len, dh0.data_ptr<scalar_t>(), T_, B, H);
    });
  }
  return {dGx, dhn, dh0};
}

}  // namespace

void register_gru(pybind11::module& m) {
  m.def("gru_forward", &gru_forward, "GRU forward over the whole sequence -> (out, gates)", pybind11::arg("xp"),
        pybind11::arg("w_hh"), pybind11::arg("b_hn"), pybind11::arg("h0"), pybind11::arg("image_term"),
        pybind11::arg("lengths"));
  m.def("gru_backward", &gru_backward, "GRU BPTT over the whole sequence -> (dGx [T, B, 3H], dhn [T, B, H], dh0)",
        pybind11::arg("grad_out"), pybind11::arg("grad_h_last"), pybind11::arg("out"), pybind11::arg("gates"),
        pybind11::arg("h0"), pybind11::arg("w_hh"), pybind11::arg("lengths"));
}

}  // namespace mmrnn
