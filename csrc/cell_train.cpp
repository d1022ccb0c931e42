// One step of a cell with gradients (RNNCell, LSTMCell, GRUCell in a training loop: an attention
// decoder calls the cell once per step, forward and backward). The per-call cost, not the
// arithmetic, decides these small steps, so the whole step is one C++ autograd node:
//
//   forward   the engine's decoding step (cell_step.cpp: x, v and h products and the gate pass in
//             one sweep over the weights, no BLAS call) also writing the activations backward reads
//             (nothing is recomputed).
//   backward  one pass for d(pre-activation), then the products the inputs ask for (dx, dh, dv,
//             dW_ih, dW_hh, dW_img, the bias sums), all in C++ on the autograd engine's thread —
//             no Python, no per-op autograd nodes.
//
// When the backward itself is differentiated (create_graph=True: gradient penalties, Hessian-vector
// products), the step is recomputed with differentiable aten ops from the saved inputs and
// differentiated with torch::autograd::grad, so every order is exact.
#include "common.h"

#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

namespace mmrnn {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// the tensor arguments, in order (their edge index in the node)
enum Arg : int { kX = 0, kH, kC, kV, kWih, kWhh, kWimg, kBih, kBhh, kArgs };

at::Tensor product(const at::Tensor& bias, const at::Tensor& a, const at::Tensor& w) {
  return bias.defined() ? at::addmm(bias, a, w.t()) : at::mm(a, w.t());
}

// Rows of [B, n] blocks of work: parallel from ~64k elements (a fork costs a few microseconds).
template <typename F>
void rows(int64_t B, int64_t width, const F& f) {
  if (B * width < (1 << 16) || parallel_threads() == 1 || at::in_parallel_region()) {
    f(0, B);
  } else {
    at::parallel_for(0, B, row_grain(width), f);
  }
}

// The step as differentiable aten ops: the definition the fused passes implement, and what the
// double backward differentiates. -> {h', c'} (c' undefined but for the LSTM).
variable_list step_ops(int64_t kind, const variable_list& a) {
  const at::Tensor &x = a[kX], &h = a[kH], &c = a[kC], &v = a[kV];
  at::Tensor gi = product(a[kBih], x, a[kWih]);
  if (v.defined()) gi = gi + at::mm(v, a[kWimg].t());
  at::Tensor gh = product(a[kBhh], h, a[kWhh]);
  if (kind == kRnnTanh || kind == kRnnRelu) {
    const at::Tensor pre = gi + gh;
    return {kind == kRnnTanh ? at::tanh(pre) : at::relu(pre), at::Tensor()};
  }
  if (kind == kLstm) {
    const auto g = (gi + gh).chunk(4, 1);
    const at::Tensor c_new = at::sigmoid(g[1]) * c + at::sigmoid(g[0]) * at::tanh(g[2]);
    return {at::sigmoid(g[3]) * at::tanh(c_new), c_new};
  }
  const auto i = gi.chunk(3, 1), r_z_n = gh.chunk(3, 1);
  const at::Tensor r = at::sigmoid(i[0] + r_z_n[0]), z = at::sigmoid(i[1] + r_z_n[1]);
  const at::Tensor n = at::tanh(i[2] + r * r_z_n[2]);
  return {(1 - z) * n + z * h, at::Tensor()};
}

// The per-row backward passes: one plain loop over the H units with every array a separate restrict
// pointer, so that the compiler vectorises them (with the gates addressed from one base pointer it
// cannot prove the arrays apart, and the scalar activations cost more than the products).
template <typename T>
void lstm_bwd_row(const T* __restrict ai, const T* __restrict af, const T* __restrict ag, const T* __restrict ao,
                  const T* __restrict tanh_c, const T* __restrict c, const T* __restrict dh, const T* __restrict dc_new,
                  T* __restrict di, T* __restrict df, T* __restrict dg, T* __restrict d_o, T* __restrict dc, int64_t H) {
  for (int64_t j = 0; j < H; ++j) {
    const T i = ai[j], f = af[j], g = ag[j], o = ao[j], t = tanh_c[j], dy = dh[j];
    const T dct = dc_new[j] + dy * o * (T(1) - t * t);
    di[j] = dct * g * i * (T(1) - i);
    df[j] = dct * c[j] * f * (T(1) - f);
    dg[j] = dct * i * (T(1) - g * g);
    d_o[j] = dy * t * o * (T(1) - o);
    dc[j] = dct * f;
  }
}

template <typename T>
void gru_bwd_row(const T* __restrict ar, const T* __restrict az, const T* __restrict an, const T* __restrict qn,
                 const T* __restrict h, const T* __restrict dh, T* __restrict dir, T* __restrict diz,
                 T* __restrict din, T* __restrict dhr, T* __restrict dhz, T* __restrict dhn, T* __restrict dh_direct,
                 int64_t H) {
  for (int64_t j = 0; j < H; ++j) {
    const T r = ar[j], z = az[j], n = an[j], dy = dh[j];
    const T dan = dy * (T(1) - z) * (T(1) - n * n);
    const T dar = dan * qn[j] * r * (T(1) - r);
    const T daz = dy * (h[j] - n) * z * (T(1) - z);
    dir[j] = dar, diz[j] = daz, din[j] = dan;
    dhr[j] = dar, dhz[j] = daz, dhn[j] = dan * r;
    dh_direct[j] = dy * z;
  }
}

template <typename T>
void rnn_bwd_row(const T* __restrict y, const T* __restrict dh, T* __restrict d, bool relu, int64_t H) {
  if (relu) {
    for (int64_t j = 0; j < H; ++j) d[j] = y[j] > T(0) ? dh[j] : T(0);
  } else {
    for (int64_t j = 0; j < H; ++j) d[j] = dh[j] * (T(1) - y[j] * y[j]);
  }
}

struct CellTrain : public torch::autograd::Function<CellTrain> {
  // The optional arguments are std::nullopt when absent (an absent tensor is no input of the node:
  // the edge of argument k is the count of present arguments before it, kept in "edges").
  static variable_list forward(AutogradContext* ctx, int64_t kind, const at::Tensor& x, const at::Tensor& h,
                               const std::optional<at::Tensor>& c_, const std::optional<at::Tensor>& v_,
                               const at::Tensor& w_ih, const at::Tensor& w_hh, const std::optional<at::Tensor>& w_img_,
                               const std::optional<at::Tensor>& b_ih_, const std::optional<at::Tensor>& b_hh_) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto opt = [](const std::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); };
    const at::Tensor c = opt(c_), v = opt(v_), w_img = opt(w_img_), b_ih = opt(b_ih_), b_hh = opt(b_hh_);
    std::vector<int64_t> edges;
    int64_t present = 0;
    for (const at::Tensor* t : {&x, &h, &c, &v, &w_ih, &w_hh, &w_img, &b_ih, &b_hh}) {
      edges.push_back(t->defined() ? present++ : -1);
    }
    ctx->saved_data["edges"] = edges;
    const int64_t B = x.size(0), H = w_hh.size(1), G = gate_count(kind);
    // the engine's decoding step (csrc/cell_step.cpp: every part's product and the gate pass in one
    // sweep over the weights), also writing the activations that backward reads
    at::Tensor h_new = at::empty({B, H}, x.options());
    at::Tensor c_new = kind == kLstm ? at::empty({B, H}, x.options()) : at::Tensor();
    at::Tensor acts = kind == kLstm || kind == kGru ? at::empty({B, G * H}, x.options()) : at::Tensor();
    at::Tensor aux = kind == kLstm || kind == kGru ? at::empty({B, H}, x.options()) : at::Tensor();
    step_forward(kind, x, h, c_, v_, w_ih, w_hh, w_img_, b_ih_, b_hh_, h_new, c_new, acts, aux, /*release_gil=*/false);
    ctx->saved_data["kind"] = kind;
    // an output without a gradient (c' of the last step, h' when only c' is used) stays undefined:
    // backward reads zeros for it instead of a [B, H] zero fill per call
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({x, h, c, v, w_ih, w_hh, w_img, b_ih, b_hh, acts, aux, h_new});
    if (kind == kLstm) return {h_new, c_new};
    return {h_new};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const int64_t kind = ctx->saved_data["kind"].toInt();
    variable_list s = ctx->get_saved_variables();
    const std::vector<int64_t> edges = ctx->saved_data["edges"].toIntVector();
    auto needs = [&](int k) { return edges[k] >= 0 && ctx->needs_input_grad(edges[k]); };
    variable_list result(1 + kArgs);  // the kind (no gradient), then one per tensor argument
    const at::Tensor dh_new = grads[0], dc_new = kind == kLstm ? grads[1] : at::Tensor();
    if (!dh_new.defined() && !dc_new.defined()) return result;
    bool any = false;
    for (int k = 0; k < kArgs; ++k) any = any || needs(k);
    if (!any) return result;
    if (at::GradMode::is_enabled()) return differentiable_backward(kind, s, needs, dh_new, dc_new);
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const at::Tensor &x = s[kX], &h = s[kH], &c = s[kC], &v = s[kV];
    // aux: tanh(c') for the LSTM, W_hn h + b_hn for the GRU
    const at::Tensor &acts = s[kArgs], &aux = s[kArgs + 1], &h_new = s[kArgs + 2];
    const int64_t B = x.size(0), H = s[kWhh].size(1), GH = gate_count(kind) * H;
    // dGi: d(pre-activation) on the input side; dGh: on the recurrent side (the same but for the GRU)
    at::Tensor dGi = at::empty({B, GH}, x.options()), dGh = kind == kGru ? at::empty({B, GH}, x.options()) : dGi;
    at::Tensor dh_direct, dc;  // the GRU's z * dh'; the LSTM's dc = f * (dc' + ...)
    if (kind == kGru) dh_direct = at::empty({B, H}, x.options());
    if (kind == kLstm) dc = at::empty({B, H}, x.options());
    const at::Tensor dhn = dh_new.defined() ? dh_new.contiguous() : at::Tensor();
    const at::Tensor dcn = dc_new.defined() ? dc_new.contiguous() : at::Tensor();
    const at::Tensor hc = kind == kGru ? h.contiguous() : at::Tensor();
    const at::Tensor cc = kind == kLstm ? c.contiguous() : at::Tensor();
    // a row of zeros stands in for an output that got no gradient
    const at::Tensor dh_zero =
        dhn.defined() && (kind != kLstm || dcn.defined()) ? at::Tensor() : at::zeros({H}, x.options());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mmrnn_cell_train_bwd", [&] {
      using T = scalar_t;
      const T* A = acts.defined() ? acts.data_ptr<T>() : nullptr;  // the RNN keeps only h'
      T* D = dGi.data_ptr<T>();
      const T* dhp = dhn.defined() ? dhn.data_ptr<T>() : nullptr;
      rows(B, GH, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          const T* a = A == nullptr ? nullptr : A + b * GH;
          T* d = D + b * GH;
          const T* dy = dhp == nullptr ? dh_zero.data_ptr<T>() : dhp + b * H;
          if (kind == kRnnTanh || kind == kRnnRelu) {
            rnn_bwd_row<T>(h_new.data_ptr<T>() + b * H, dy, d, kind == kRnnRelu, H);
          } else if (kind == kLstm) {
            const T* dcp = dcn.defined() ? dcn.data_ptr<T>() + b * H : dh_zero.data_ptr<T>();
            lstm_bwd_row<T>(a, a + H, a + 2 * H, a + 3 * H, aux.data_ptr<T>() + b * H, cc.data_ptr<T>() + b * H, dy,
                            dcp, d, d + H, d + 2 * H, d + 3 * H, dc.data_ptr<T>() + b * H, H);
          } else {
            T* dr = dGh.data_ptr<T>() + b * GH;
            gru_bwd_row<T>(a, a + H, a + 2 * H, aux.data_ptr<T>() + b * H, hc.data_ptr<T>() + b * H, dy, d,
                           d + H, d + 2 * H, dr, dr + H, dr + 2 * H, dh_direct.data_ptr<T>() + b * H, H);
          }
        }
      });
    });
    if (needs(kX)) result[1 + kX] = at::mm(dGi, s[kWih]);
    if (needs(kH)) {
      result[1 + kH] = kind == kGru ? at::addmm(dh_direct, dGh, s[kWhh]) : at::mm(dGh, s[kWhh]);
    }
    if (needs(kC)) result[1 + kC] = dc;
    if (needs(kV)) result[1 + kV] = at::mm(dGi, s[kWimg]);
    if (needs(kWih)) result[1 + kWih] = at::mm(dGi.t(), x);
    if (needs(kWhh)) result[1 + kWhh] = at::mm(dGh.t(), h);
    if (needs(kWimg)) result[1 + kWimg] = at::mm(dGi.t(), v);
    if (needs(kBih)) result[1 + kBih] = dGi.sum(0);
    if (needs(kBhh)) result[1 + kBhh] = kind == kGru || !needs(kBih) ? dGh.sum(0) : result[1 + kBih].clone();
    return result;
  }

  // create_graph=True: the step recomputed from the saved inputs as aten ops (whose history leads
  // back to them) and differentiated, so that the gradients are themselves differentiable.
  template <typename Needs>
  static variable_list differentiable_backward(int64_t kind, const variable_list& s, const Needs& needs,
                                               const at::Tensor& dh_new, const at::Tensor& dc_new) {
    variable_list args(s.begin(), s.begin() + kArgs), inputs;
    std::vector<int> which;
    for (int k = 0; k < kArgs; ++k) {
      if (needs(k)) {
        inputs.push_back(args[k]);
        which.push_back(k);
      }
    }
    const variable_list outs = step_ops(kind, args);
    variable_list ys, dys;
    if (dh_new.defined()) ys.push_back(outs[0]), dys.push_back(dh_new);
    if (dc_new.defined()) ys.push_back(outs[1]), dys.push_back(dc_new);
    const variable_list g = torch::autograd::grad(ys, inputs, dys, /*retain_graph=*/true, /*create_graph=*/true,
                                                  /*allow_unused=*/true);
    variable_list result(1 + kArgs);
    for (size_t n = 0; n < which.size(); ++n) result[1 + which[n]] = g[n];
    return result;
  }
};

// kind: 0 RNN tanh, 1 RNN relu, 2 LSTM, 3 GRU; x [B, I], h [B, H], c [B, H] (LSTM only), image
// [B, V] with w_img [G*H, V] (both or neither), w_ih [G*H, I], w_hh [G*H, H], b_ih / b_hh [G*H] or
// None. float32 / float64 CPU tensors. -> (h', c' or None), differentiable.
std::tuple<at::Tensor, std::optional<at::Tensor>> cell_train(
    int64_t kind, const at::Tensor& x, const at::Tensor& h, const std::optional<at::Tensor>& c,
    const std::optional<at::Tensor>& image, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& w_img, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh) {
  check_step_args(kind, x, h, c, image, w_ih, w_hh, w_img, b_ih, b_hh);  // the decoding step's checks
  const variable_list out = CellTrain::apply(kind, x, h, c, image, w_ih, w_hh, w_img, b_ih, b_hh);
  return {out[0], kind == kLstm ? std::optional<at::Tensor>(out[1]) : std::nullopt};
}

}  // namespace

void register_cell_train(pybind11::module& m) {
  m.def("cell_train", &cell_train,
        "one step of a cell with gradients, one autograd node (kind 0 RNN tanh, 1 RNN relu, 2 LSTM, 3 GRU) -> "
        "(h', c' or None)",
        pybind11::arg("kind"), pybind11::arg("x"), pybind11::arg("h"), pybind11::arg("c"), pybind11::arg("image"),
        pybind11::arg("w_ih"), pybind11::arg("w_hh"), pybind11::arg("w_img"), pybind11::arg("b_ih"),
        pybind11::arg("b_hh"));
}

}  // namespace mmrnn
