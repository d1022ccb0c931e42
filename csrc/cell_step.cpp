// One step of a cell for decoding (RNNCell, LSTMCell, GRUCell called once per generated token):
//   pre = x W_ih^T + v W_img^T + h W_hh^T + b_ih + b_hh,  then the cell's gate pass.
// A single step reads every weight once, so packing W (what the sequence kernels do once per call,
// to reuse it T times) would cost as much as the step itself; these kernels read the weights where
// they are, row-major, and keep nothing between calls: a weight changed in place is always seen.
// Each output block is NR rows of a weight times MR rows of the operand, accumulated as vectors
// along K and reduced at the end (dot-product form). Units are split among the threads when a step
// is large enough to repay the fork; the gate pass of a unit runs where its pre-activations were
// computed.
#include "engine.h"

namespace mmrnn {
namespace {

// A weight (row-major, K values per row) and the operand rows it multiplies (K values per row).
template <typename T>
struct Part {
  const T* w = nullptr;
  const T* a = nullptr;
  int64_t K = 0;
};

// The sum of a vector's lanes by halving (log2(lanes) adds instead of lanes - 1 scalar ones).
template <typename V>
__attribute__((always_inline)) inline auto lane_sum(const V& v) {
  constexpr int n = sizeof(V) / sizeof(v[0]);
  if constexpr (n == 2) {
    return v[0] + v[1];
  } else if constexpr (n == 4) {
    return lane_sum(__builtin_shufflevector(v, v, 0, 1) + __builtin_shufflevector(v, v, 2, 3));
  } else if constexpr (n == 8) {
    return lane_sum(__builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7));
  } else {
    static_assert(n == 16, "vectors of 2 to 16 lanes");
    return lane_sum(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                    __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15));
  }
}

// out[r * ldo + n] = sum over the parts of sum_k a[(b0 + r) * K + k] * w[(n0 + n) * K + k] for
// r < MR, n < NR: every part accumulates into the same vectors, reduced once at the end. Operands
// are row-major, of any alignment. The body is shared by every ISA; each instantiation is compiled
// for its own target.
#define MMRNN_DOT_BODY                                                                                  \
  typedef T vec __attribute__((vector_size(VW * sizeof(T))));                                          \
  typedef T uvec __attribute__((vector_size(VW * sizeof(T)), aligned(sizeof(T))));                     \
  vec acc[MR][NR];                                                                                      \
  T tail[MR][NR];                                                                                       \
  _Pragma("GCC unroll 8") for (int r = 0; r < MR; ++r)                                                  \
      _Pragma("GCC unroll 8") for (int n = 0; n < NR; ++n) {                                            \
    acc[r][n] = vec{};                                                                                  \
    tail[r][n] = T(0);                                                                                  \
  }                                                                                                     \
  for (int p = 0; p < n_parts; ++p) {                                                                   \
    const int64_t K = parts[p].K;                                                                       \
    const T* a = parts[p].a + b0 * K;                                                                   \
    const T* w = parts[p].w + n0 * K;                                                                   \
    int64_t k = 0;                                                                                      \
    for (; k + VW <= K; k += VW) {                                                                      \
      vec wv[NR], av[MR];                                                                               \
      _Pragma("GCC unroll 8") for (int n = 0; n < NR; ++n) wv[n] = *reinterpret_cast<const uvec*>(w + n * K + k); \
      _Pragma("GCC unroll 8") for (int r = 0; r < MR; ++r) av[r] = *reinterpret_cast<const uvec*>(a + r * K + k); \
      _Pragma("GCC unroll 8") for (int r = 0; r < MR; ++r)                                              \
          _Pragma("GCC unroll 8") for (int n = 0; n < NR; ++n) acc[r][n] += av[r] * wv[n];              \
    }                                                                                                   \
    for (; k < K; ++k)                                                                                  \
      for (int r = 0; r < MR; ++r)                                                                      \
        for (int n = 0; n < NR; ++n) tail[r][n] += a[r * K + k] * w[n * K + k];                         \
  }                                                                                                     \
  _Pragma("GCC unroll 8") for (int r = 0; r < MR; ++r)                                                  \
      _Pragma("GCC unroll 8") for (int n = 0; n < NR; ++n) out[r * ldo + n] = lane_sum(acc[r][n]) + tail[r][n];

#define MMRNN_DOT_ARGS const Part<T>*__restrict parts, int n_parts, int64_t b0, int64_t n0, T *__restrict out, int64_t ldo

#if MMRNN_X86
template <typename T, int VW, int MR, int NR>
__attribute__((target("avx512f,avx512vl,avx512dq,avx2,fma"))) void dot_avx512(MMRNN_DOT_ARGS) {
  MMRNN_DOT_BODY
}
template <typename T, int VW, int MR, int NR>
__attribute__((target("avx2,fma"))) void dot_avx2(MMRNN_DOT_ARGS) {
  MMRNN_DOT_BODY
}
#endif
template <typename T, int VW, int MR, int NR>
void dot_generic(MMRNN_DOT_ARGS) {
  MMRNN_DOT_BODY
}
#undef MMRNN_DOT_ARGS
#undef MMRNN_DOT_BODY

template <typename T>
using DotFn = void (*)(const Part<T>*, int, int64_t, int64_t, T*, int64_t);

// NR weight rows per block; fns[r - 1] takes r operand rows (r <= MR).
constexpr int kNR = 4;
constexpr int kMR = 4;

template <typename T>
struct DotKernels {
  int mr = 1;
  DotFn<T> fns[kMR] = {};
};

template <typename T, Isa I, int MR, int... R>
void fill_dots(DotKernels<T>& d, std::integer_sequence<int, R...>) {
  constexpr bool wide = I == Isa::kAvx512 || I == Isa::kAvx512Bf16;
  constexpr int VW = (wide ? 64 : I == Isa::kAvx2 ? 32 : 16) / static_cast<int>(sizeof(T));
  d.mr = MR;
#if MMRNN_X86
  if constexpr (wide) ((d.fns[R] = &dot_avx512<T, VW, R + 1, kNR>), ...);
  else if constexpr (I == Isa::kAvx2) ((d.fns[R] = &dot_avx2<T, VW, R + 1, kNR>), ...);
  else ((d.fns[R] = &dot_generic<T, VW, R + 1, kNR>), ...);
#else
  static_assert(I == Isa::kGeneric, "only the portable path exists off x86");
  ((d.fns[R] = &dot_generic<T, VW, R + 1, kNR>), ...);
#endif
}

// 4 x 4 blocks with AVX-512 (16 accumulators + 8 operands of 32 registers), 2 x 4 otherwise.
template <typename T>
DotKernels<T> dot_kernels(Isa isa) {
  DotKernels<T> d;
  switch (isa) {
#if MMRNN_X86
    case Isa::kAvx512Bf16:
    case Isa::kAvx512: fill_dots<T, Isa::kAvx512, 4>(d, std::make_integer_sequence<int, 4>{}); break;
    case Isa::kAvx2: fill_dots<T, Isa::kAvx2, 2>(d, std::make_integer_sequence<int, 2>{}); break;
#endif
    default: fill_dots<T, Isa::kGeneric, 2>(d, std::make_integer_sequence<int, 2>{}); break;
  }
  return d;
}

// The step for rows [b0, b0 + rows) and units [j0, j0 + nu) (nu <= kNR): every gate's
// pre-activation from the parts (x, v, then h last), then the gate pass. The GRU's n gate keeps its
// input side (x, v) apart from its recurrent side (h), which the reset gate scales.
//
// acts / aux (training, else nullptr): the activations kept for backward, acts [B, G*H] (LSTM i, f, g,
// o after their sigmoid / tanh; GRU r, z, n) and aux [B, H] (LSTM tanh(c'); GRU W_hn h + b_hn).
template <typename T>
void step_block(const DotKernels<T>& dk, int kind, const Part<T>* parts, int n_parts, const T* b_ih, const T* b_hh,
                const T* h, const T* c, T* h_new, T* c_new, int64_t b0, int64_t rows, int64_t j0, int64_t nu,
                int64_t H, T* acts, T* aux) {
  const int64_t G = gate_count(kind);
  alignas(64) T pre[4][kMR][kNR] = {}, hn[kMR][kNR] = {};
  for (int64_t g = 0; g < G; ++g) {
    const int64_t n0 = g * H + j0;
    const bool split = kind == kGru && g == 2;
    if (nu == kNR) {
      dk.fns[rows - 1](parts, split ? n_parts - 1 : n_parts, b0, n0, &pre[g][0][0], kNR);
      if (split) dk.fns[rows - 1](parts + n_parts - 1, 1, b0, n0, &hn[0][0], kNR);
    } else {  // the last, partial block: one unit at a time
      for (int r = 0; r < rows; ++r) {
        for (int64_t n = 0; n < nu; ++n) {
          T s = T(0), sh = T(0);
          for (int p = 0; p < n_parts; ++p) {
            const T* ar = parts[p].a + (b0 + r) * parts[p].K;
            const T* wr = parts[p].w + (n0 + n) * parts[p].K;
            T d = T(0);
            for (int64_t k = 0; k < parts[p].K; ++k) d += ar[k] * wr[k];
            (split && p == n_parts - 1 ? sh : s) += d;
          }
          pre[g][r][n] = s;
          if (split) hn[r][n] = sh;
        }
      }
    }
  }
  // The gate pass over the block's kMR x kNR slots at once (slot e = r * kNR + n; slots past the
  // rows or units compute on zeros and are not stored): biases added, the state gathered, then
  // plain loops of fixed length with the kind decided outside them, which the compiler vectorises
  // (a slot at a time with the kind switched inside cost as much as the products for the LSTM).
  constexpr int E = kMR * kNR;
  alignas(64) T prev[E] = {}, out_h[E], out_c[E], act[4][E], out_aux[E];
  for (int64_t g = 0; g < G; ++g) {
    for (int r = 0; r < kMR; ++r) {
      for (int n = 0; n < kNR; ++n) {
        const bool live = r < rows && n < nu;
        const int64_t j = j0 + n;
        const bool outer_hh = !(kind == kGru && g == 2);  // the GRU's b_hn goes with the recurrent side
        const T bias = live ? (b_ih ? b_ih[g * H + j] : T(0)) + (b_hh && outer_hh ? b_hh[g * H + j] : T(0)) : T(0);
        pre[g][r][n] = live ? pre[g][r][n] + bias : T(0);
      }
    }
  }
  const T* state = kind == kLstm ? c : kind == kGru ? h : nullptr;
  if (state != nullptr)
    for (int r = 0; r < rows; ++r)
      for (int64_t n = 0; n < nu; ++n) prev[r * kNR + n] = state[(b0 + r) * H + j0 + n];
  const T* a0 = &pre[0][0][0];
  if (kind == kRnnTanh) {
    for (int e = 0; e < E; ++e) out_h[e] = tanh_(a0[e]);
  } else if (kind == kRnnRelu) {
    for (int e = 0; e < E; ++e) out_h[e] = a0[e] < T(0) ? T(0) : a0[e];  // NaN passes through, as torch.relu
  } else if (kind == kLstm) {
    const T *a1 = &pre[1][0][0], *a2 = &pre[2][0][0], *a3 = &pre[3][0][0];
    for (int e = 0; e < E; ++e) {
      const T i = sigmoid_(a0[e]), f = sigmoid_(a1[e]), g = tanh_(a2[e]), o = sigmoid_(a3[e]);
      const T cn = f * prev[e] + i * g, t = tanh_(cn);
      act[0][e] = i, act[1][e] = f, act[2][e] = g, act[3][e] = o;
      out_c[e] = cn, out_aux[e] = t;
      out_h[e] = o * t;
    }
  } else {  // GRU, torch's reset-after form: n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
    alignas(64) T bhn[E] = {};
    if (b_hh != nullptr)
      for (int r = 0; r < rows; ++r)
        for (int64_t n = 0; n < nu; ++n) bhn[r * kNR + n] = b_hh[2 * H + j0 + n];
    const T *a1 = &pre[1][0][0], *a2 = &pre[2][0][0], *hh = &hn[0][0];
    for (int e = 0; e < E; ++e) {
      const T rg = sigmoid_(a0[e]), z = sigmoid_(a1[e]), q = hh[e] + bhn[e];
      const T nn = tanh_(a2[e] + rg * q);
      act[0][e] = rg, act[1][e] = z, act[2][e] = nn, out_aux[e] = q;
      out_h[e] = nn + z * (prev[e] - nn);
    }
  }
  for (int r = 0; r < rows; ++r) {
    for (int64_t n = 0; n < nu; ++n) {
      const int64_t bj = (b0 + r) * H + j0 + n;
      h_new[bj] = out_h[r * kNR + n];
      if (kind == kLstm) c_new[bj] = out_c[r * kNR + n];
      if (acts != nullptr && (kind == kLstm || kind == kGru)) {
        for (int64_t g = 0; g < G; ++g) acts[(b0 + r) * G * H + g * H + j0 + n] = act[g][r * kNR + n];
        aux[bj] = out_aux[r * kNR + n];
      }
    }
  }
}

void check_2d(const at::Tensor& t, const char* name, const at::Tensor& ref, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got one on ", t.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, ": expected dtype ", ref.scalar_type(),
              " (that of x), got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, name, ": expected shape [", rows, ", ", cols,
              "], got ", t.sizes());
}

void check_1d(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& ref, int64_t n) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == ref.scalar_type() && t->dim() == 1 && t->size(0) == n, name,
              ": expected a CPU ", ref.scalar_type(), " tensor of shape [", n, "], got ", t->scalar_type(), " of shape ",
              t->sizes(), " on ", t->device());
}

}  // namespace

// The arguments of a cell step (cell_step here, cell_train in cell_train.cpp), checked before any
// work: a refused one raises, and the module's checked path then names it for the user.
void check_step_args(int64_t kind, const at::Tensor& x, const at::Tensor& h, const std::optional<at::Tensor>& c,
                     const std::optional<at::Tensor>& image, const at::Tensor& w_ih, const at::Tensor& w_hh,
                     const std::optional<at::Tensor>& w_img, const std::optional<at::Tensor>& b_ih,
                     const std::optional<at::Tensor>& b_hh) {
  TORCH_CHECK(kind >= 0 && kind <= 3, "kind: expected 0 (RNN tanh), 1 (RNN relu), 2 (LSTM) or 3 (GRU), got ", kind);
  TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
              "x: the cell step computes float32 and float64 CPU tensors, got ", x.scalar_type(), " on ",
              x.device());
  TORCH_CHECK(x.dim() == 2, "x: expected a 2-D tensor [B, I], got shape ", x.sizes());
  const int64_t G = gate_count(kind), B = x.size(0), I = x.size(1);
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) == G * w_hh.size(1), "w_hh: expected shape [", G, "H, H], got ",
              w_hh.sizes());
  const int64_t H = w_hh.size(1);
  check_2d(w_hh, "w_hh", x, G * H, H);
  check_2d(w_ih, "w_ih", x, G * H, I);
  check_2d(h, "h", x, B, H);
  TORCH_CHECK(c.has_value() == (kind == kLstm), "c: expected ", kind == kLstm ? "a tensor (LSTM)" : "None", ", got ",
              c.has_value() ? "a tensor" : "None");
  if (c.has_value()) check_2d(*c, "c", x, B, H);
  TORCH_CHECK(image.has_value() == w_img.has_value(), "image and w_img: expected both or neither, got ",
              image.has_value() ? "image only" : "w_img only");
  if (image.has_value()) {
    TORCH_CHECK(w_img->dim() == 2, "w_img: expected a 2-D tensor, got shape ", w_img->sizes());
    check_2d(*w_img, "w_img", x, G * H, w_img->size(1));
    check_2d(*image, "image", x, B, w_img->size(1));
  }
  check_1d(b_ih, "b_ih", x, G * H);
  check_1d(b_hh, "b_hh", x, G * H);
}

namespace {

// kind: 0 RNN tanh, 1 RNN relu, 2 LSTM, 3 GRU. x [B, I], h [B, H], c [B, H] (LSTM only), image
// [B, V] with w_img [G*H, V] (both or neither), w_ih [G*H, I], w_hh [G*H, H], b_ih/b_hh [G*H] or
// None. -> (h', c') with c' undefined (None) but for the LSTM. float32 / float64.
std::tuple<at::Tensor, std::optional<at::Tensor>> cell_step(
    int64_t kind, const at::Tensor& x, const at::Tensor& h, const std::optional<at::Tensor>& c,
    const std::optional<at::Tensor>& image, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& w_img, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh) {
  check_step_args(kind, x, h, c, image, w_ih, w_hh, w_img, b_ih, b_hh);
  const int64_t B = x.size(0), H = w_hh.size(1);
  at::Tensor h_new = at::empty({B, H}, x.options());
  std::optional<at::Tensor> c_new;
  if (kind == kLstm) c_new = at::empty({B, H}, x.options());
  step_forward(kind, x, h, c, image, w_ih, w_hh, w_img, b_ih, b_hh, h_new, c_new ? *c_new : at::Tensor(), at::Tensor(),
               at::Tensor(), /*release_gil=*/true);
  return {h_new, c_new};
}

}  // namespace

// The step on checked arguments into h_new (and c_new for the LSTM); acts / aux defined: the
// activations kept for backward too (see step_block).
void step_forward(int64_t kind, const at::Tensor& x, const at::Tensor& h, const std::optional<at::Tensor>& c,
                  const std::optional<at::Tensor>& image, const at::Tensor& w_ih, const at::Tensor& w_hh,
                  const std::optional<at::Tensor>& w_img, const std::optional<at::Tensor>& b_ih,
                  const std::optional<at::Tensor>& b_hh, const at::Tensor& h_new, const at::Tensor& c_new,
                  const at::Tensor& acts, const at::Tensor& aux, bool release_gil) {
  const int64_t G = gate_count(kind), B = x.size(0), I = x.size(1), H = w_hh.size(1);
  // expect_contiguous: no copy for what already is (the usual case)
  const auto xc = x.expect_contiguous(), hc = h.expect_contiguous(), wi = w_ih.expect_contiguous(),
             wh = w_hh.expect_contiguous();
  const at::Tensor cc = c.has_value() ? c->contiguous() : at::Tensor();
  const at::Tensor vc = image.has_value() ? image->contiguous() : at::Tensor();
  const at::Tensor wv = w_img.has_value() ? w_img->contiguous() : at::Tensor();
  const at::Tensor bi = b_ih.has_value() ? b_ih->contiguous() : at::Tensor();
  const at::Tensor bh = b_hh.has_value() ? b_hh->contiguous() : at::Tensor();
  if (B == 0 || H == 0) return;
  const Isa isa = cpu_isa();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mmrnn_cell_step", [&] {
    using T = scalar_t;
    const DotKernels<T> dk = dot_kernels<T>(isa);
    Part<T> parts[3];  // x, v (if any), h: the recurrent part last
    int n_parts = 0;
    parts[n_parts++] = Part<T>{wi->data_ptr<T>(), xc->data_ptr<T>(), I};
    if (vc.defined()) parts[n_parts++] = Part<T>{wv.data_ptr<T>(), vc.data_ptr<T>(), vc.size(1)};
    parts[n_parts++] = Part<T>{wh->data_ptr<T>(), hc->data_ptr<T>(), H};
    const T* pb_ih = bi.defined() ? bi.data_ptr<T>() : nullptr;
    const T* pb_hh = bh.defined() ? bh.data_ptr<T>() : nullptr;
    const T* ph = hc->data_ptr<T>();
    const T* pc = cc.defined() ? cc.data_ptr<T>() : nullptr;
    T* out_h = h_new.data_ptr<T>();
    T* out_c = c_new.defined() ? c_new.data_ptr<T>() : nullptr;
    T* out_acts = acts.defined() ? acts.data_ptr<T>() : nullptr;
    T* out_aux = aux.defined() ? aux.data_ptr<T>() : nullptr;
    const int64_t blocks = (H + kNR - 1) / kNR, K = I + H + (vc.defined() ? vc.size(1) : 0);
    auto run = [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t j0 = q * kNR, nu = std::min<int64_t>(kNR, H - j0);
        for (int64_t b0 = 0; b0 < B; b0 += dk.mr) {
          step_block<T>(dk, static_cast<int>(kind), parts, n_parts, pb_ih, pb_hh, ph, pc, out_h, out_c, b0,
                        std::min<int64_t>(dk.mr, B - b0), j0, nu, H, out_acts, out_aux);
        }
      }
    };
    // two threads from ~0.5 MFLOP a step (a fork costs a few microseconds)
    if (2 * B * G * H * K < (1 << 19) || parallel_threads() == 1 || at::in_parallel_region()) {
      run(0, blocks);
    } else if (release_gil) {
      pybind11::gil_scoped_release no_gil;
      at::parallel_for(0, blocks, std::max<int64_t>(1, blocks / parallel_threads()), run);
    } else {
      at::parallel_for(0, blocks, std::max<int64_t>(1, blocks / parallel_threads()), run);
    }
  });
}

void register_cell_step(pybind11::module& m) {
  m.def("cell_step", &cell_step,
        "one decoding step of a cell on the weights as they are (kind 0 RNN tanh, 1 RNN relu, 2 LSTM, 3 GRU) -> "
        "(h', c' or None)",
        pybind11::arg("kind"), pybind11::arg("x"), pybind11::arg("h"), pybind11::arg("c"), pybind11::arg("image"),
        pybind11::arg("w_ih"), pybind11::arg("w_hh"), pybind11::arg("w_img"), pybind11::arg("b_ih"),
        pybind11::arg("b_hh"));
}

}  // namespace mmrnn
