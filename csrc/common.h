// What the three cells' CPU recurrences share: the vectorisable activations, argument checks,
// the lengths convention (the buffers: buffers.h). The per-step product and its fused epilogue run on
// the engine in engine.h; each cell's file (rnn_cpu.cpp, lstm_cpu.cpp, gru_cpu.cpp) adds its
// forward, inference and BPTT passes on it.
//
// ATen + torch's pybind11 casters rather than <torch/extension.h>: the whole C++ frontend is not
// needed here and more than doubles the build time.
#pragma once

#include "buffers.h"
#include "platform.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>
#include <optional>
#include <type_traits>


// Before a loop over a row's hidden units whose iteration u reads and writes index u only: it is
// vectorised without the run-time alias checks the compiler otherwise adds per call (seven
// pointers pairwise in the LSTM's pass), which weigh where a call covers one vector of units (4 per
// panel: the AVX2 LSTM tile): LSTM training forward at (32,128,.,.,256), one thread, 2-core Zen 1
// EPYC, 91.8 -> 88.1 ms (bench/NOTES.md, "Training").
#if defined(__clang__)
#define MMRNN_IVDEP _Pragma("clang loop vectorize(assume_safety)")
#else
#define MMRNN_IVDEP _Pragma("GCC ivdep")
#endif

namespace mmrnn {

// The threads at::parallel_for can use here. With torch's OpenMP backend at::parallel_for is a
// header template that runs in parallel only when the extension itself is compiled with OpenMP
// (INTRA_OP_PARALLEL); a build without it (Apple clang has no OpenMP) runs every call on the
// calling thread, with the same results bit for bit (the work split never changes what a value
// sums), and plans its work for one thread.
#ifdef INTRA_OP_PARALLEL
constexpr bool kParallelBuild = true;
#else
constexpr bool kParallelBuild = false;
#endif
inline int64_t parallel_threads() { return kParallelBuild ? at::get_num_threads() : 1; }

// exp(y) for y in [0, 88] in float32 with only arithmetic and selects, so that the compiler
// vectorises the loops that call it (libm's expf/tanhf do not vectorise without -ffast-math, which
// would change the process's floating-point mode when this library loads). Cody-Waite reduction
// y = n ln2 + r, |r| <= ln2/2, degree-7 polynomial.
inline float exp_f32_nonneg(float y) {
  const float n = static_cast<float>(static_cast<int>(y * 1.44269504088896341f + 0.5f));
  const float r = (y - n * 0.693359375f) - n * -2.12194440e-4f;
  float e = 1.f / 5040.f;
  e = e * r + 1.f / 720.f;
  e = e * r + 1.f / 120.f;
  e = e * r + 1.f / 24.f;
  e = e * r + 1.f / 6.f;
  e = e * r + 0.5f;
  e = e * r + 1.f;
  e = e * r + 1.f;
  const int bits = (static_cast<int>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return e * scale;
}

// tanh in float32, max error ~2 ulp (checked in tests against torch.tanh).
inline float tanh_f32(float x) {
  const float ax = std::fabs(x);
  // |x| < 0.4: Taylor series to x^13 (truncation < 4e-9 relative)
  const float x2 = x * x;
  float p = 21844.f / 6081075.f;
  p = p * x2 - 1382.f / 155925.f;
  p = p * x2 + 62.f / 2835.f;
  p = p * x2 - 17.f / 315.f;
  p = p * x2 + 2.f / 15.f;
  p = p * x2 - 1.f / 3.f;
  const float small = x + x * x2 * p;
  // |x| >= 0.4: 1 - 2 / (exp(2|x|) + 1)
  const float big_abs = 1.f - 2.f / (exp_f32_nonneg(std::min(2.f * ax, 40.f)) + 1.f);
  const float big = x < 0.f ? -big_abs : big_abs;
  const float res = ax < 0.4f ? small : big;
  return x != x ? x : res;  // NaN in, NaN out
}

// sigmoid in float32 from E = exp(|x|) (no overflow for |x| <= 87): E / (E + 1) for x >= 0,
// 1 / (E + 1) below. Relative error a few ulp on [-87, 87]; beyond, within 2e-38 absolute.
inline float sigmoid_f32(float x) {
  const float e = exp_f32_nonneg(std::min(std::fabs(x), 87.f));
  const float inv = 1.f / (e + 1.f);
  const float res = x < 0.f ? inv : e * inv;
  return x != x ? x : res;
}

template <typename T>
inline T tanh_(T x) {
  if constexpr (std::is_same_v<T, float>) {
    return tanh_f32(x);
  } else {
    return std::tanh(x);
  }
}

template <typename T>
inline T sigmoid_(T x) {
  if constexpr (std::is_same_v<T, float>) {
    return sigmoid_f32(x);
  } else {
    return T(1) / (T(1) + std::exp(-x));
  }
}

// The dtype of a state carried between steps for a storage dtype: float32 for bfloat16 (acc_t in
// engine.h), itself otherwise.
inline at::ScalarType carry_type(at::ScalarType st) { return st == at::kBFloat16 ? at::kFloat : st; }

// Rows per parallel chunk: enough elements per chunk that the fork costs less than the work.
inline int64_t row_grain(int64_t width) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1)); }

// Asks for the n values at p in L2 (one prefetch per 64-byte line; WRITE: for a store to them).
// The recurrences' per-tile passes call it for the next step's rows of their units: those rows of
// the saved gates, states and gradients are a few 64-byte lines apart in [T, B, .] tensors too large
// for the caches, which the hardware's stream prefetch does not follow, and the pass otherwise waits
// on each line. A step later they are in L2. Measured on the 2-core Zen 4 EPYC, alternated in one
// process, best of 15, ms, without / with (bench/NOTES.md, "Prefetching the next step's rows"):
// BPTT at (32,128,.,.,256) RNN 3.10/2.82, LSTM 12.05/11.68, GRU 9.90/9.69; the GRU's training forward
// 14.30/13.23 (its step 37.4/36.3); inference (which writes only h) gained nothing and has none.
template <bool WRITE = false, typename T>
inline void prefetch_span(const T* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  const int64_t bytes = n * static_cast<int64_t>(sizeof(T));
  for (int64_t l = 0; l < bytes; l += 64) __builtin_prefetch(c + l, WRITE ? 1 : 0, 2);
}

// Lengths convention, shared by every cell: row b is live at step t while t < lengths[b]; its output
// is zero past that and its final state is the one at step lengths[b] - 1 (the initial state when
// the length is 0), so BPTT lets the final state's gradient in at that step.
inline int64_t row_length(const int64_t* lengths, int64_t b, int64_t T_) { return lengths == nullptr ? T_ : lengths[b]; }

inline void check_float_cpu(const at::Tensor& t, const char* name, const at::Tensor& ref) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got one on ", t.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, ": expected dtype ", ref.scalar_type(), " (that of xp), got ",
              t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor, got strides ", t.strides());
}

inline void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, name, ": expected shape ", expected, ", got ", t.sizes());
}

// A float CPU tensor of xp's dtype, contiguous, of the given shape.
inline void check_arg(const at::Tensor& t, const char* name, const at::Tensor& ref, at::IntArrayRef expected) {
  check_float_cpu(t, name, ref);
  check_shape(t, name, expected);
}

// The leading [T, B, G*H] tensor of a call: float32, float64 or bfloat16 on CPU, last dimension a multiple of G.
inline void check_sequence(const at::Tensor& t, const char* name, int64_t gates) {
  TORCH_CHECK(t.dim() == 3, name, ": expected a 3-D tensor [T, B, ", gates, "H], got ", t.dim(), "-D of shape ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble || t.scalar_type() == at::kBFloat16,
              name, ": the cpp backend computes float32, float64 and bfloat16, got ", t.scalar_type());
  check_float_cpu(t, name, t);
  TORCH_CHECK(t.size(2) % gates == 0, name, ": expected a last dimension of ", gates, " x hidden size, got ", t.size(2));
}

// The leading tensor of an inference call: xp [T, B, G*H], or with w_ih x [T, B, I] and w_ih
// [G*H, I] (the fused input product). w_hh [G*H, H] is checked here too; returns H.
inline int64_t check_infer_input(const at::Tensor& input, const std::optional<at::Tensor>& w_ih, const at::Tensor& w_hh,
                                 int64_t gates) {
  if (!w_ih.has_value()) {
    check_sequence(input, "xp", gates);
    const int64_t H = input.size(2) / gates;
    check_arg(w_hh, "w_hh", input, {gates * H, H});
    return H;
  }
  TORCH_CHECK(input.dim() == 3, "x: expected a 3-D tensor [T, B, I], got ", input.dim(), "-D of shape ", input.sizes());
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble ||
                  input.scalar_type() == at::kBFloat16,
              "x: the cpp backend computes float32, float64 and bfloat16, got ", input.scalar_type());
  check_float_cpu(input, "x", input);
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) == gates * w_hh.size(1), "w_hh: expected shape [", gates,
              "H, H], got ", w_hh.sizes());
  const int64_t H = w_hh.size(1);
  check_arg(w_hh, "w_hh", input, {gates * H, H});
  check_arg(*w_ih, "w_ih", input, {gates * H, input.size(2)});
  return H;
}

// An optional image term of shape [B, width] (static) or [T, B, width] (per step); returns whether
// it is per step.
inline bool check_image_term(const std::optional<at::Tensor>& image_term, const at::Tensor& xp, int64_t T_, int64_t B,
                             int64_t width) {
  if (!image_term.has_value()) return false;
  check_float_cpu(*image_term, "image_term", xp);
  TORCH_CHECK(image_term->sizes() == at::IntArrayRef({B, width}) || image_term->sizes() == at::IntArrayRef({T_, B, width}),
              "image_term: expected shape [", B, ", ", width, "] or [", T_, ", ", B, ", ", width, "], got ",
              image_term->sizes());
  return image_term->dim() == 3;
}

// Validates lengths; returns its data pointer (or nullptr).
inline const int64_t* check_lengths(const std::optional<at::Tensor>& lengths, int64_t T_, int64_t B) {
  if (!lengths.has_value()) return nullptr;
  const at::Tensor& l = *lengths;
  TORCH_CHECK(l.device().is_cpu() && l.scalar_type() == at::kLong && l.dim() == 1 && l.size(0) == B && l.is_contiguous(),
              "lengths: expected a contiguous CPU int64 tensor of shape [", B, "], got ", l.scalar_type(), " of shape ",
              l.sizes(), " on ", l.device());
  const int64_t* p = l.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(p[b] >= 0 && p[b] <= T_, "lengths: expected values in [0, ", T_, "], got lengths[", b, "] = ", p[b]);
  }
  return p;
}

// The optional buffer a BPTT call fills with each row's step gradients summed over time, sums[b] =
// sum_t dA_t[b] ([B, width] in the carry dtype, overwritten): the gradient of a static image term
// (and so of the image weight and the biases that ride with it), accumulated in the reverse loop's
// per-tile pass while the tile's gradients are in registers, instead of one more pass over dA
// [T, B, width] after it. Each element is owned by one tile, so one thread, and added in step order:
// the sums do not depend on the thread count. Returns its data (nullptr without one), zeroed.
inline void* step_sums_data(const std::optional<at::Tensor>& sums, const at::Tensor& ref, int64_t B, int64_t width) {
  if (!sums.has_value()) return nullptr;
  const at::Tensor& s = *sums;
  TORCH_CHECK(s.device().is_cpu() && s.scalar_type() == carry_type(ref.scalar_type()) && s.is_contiguous() &&
                  s.sizes() == at::IntArrayRef({B, width}),
              "sums: expected a contiguous CPU ", carry_type(ref.scalar_type()), " tensor of shape [", B, ", ", width,
              "], got ", s.scalar_type(), " of shape ", s.sizes(), " on ", s.device());
  s.zero_();
  return s.data_ptr();
}

template <typename T>
inline const T* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

// dh0 (or dc0) after the reverse loop: the carried gradient, or the final state's own gradient for
// rows of length 0 (whose final state is the initial one).
template <typename T>
void initial_state_grad(const T* carried, const T* grad_last, const int64_t* lengths, T* dst, int64_t T_, int64_t B,
                        int64_t H) {
  for (int64_t b = 0; b < B; ++b) {
    const T* src = row_length(lengths, b, T_) == 0 ? grad_last + b * H : carried + b * H;
    std::copy(src, src + H, dst + b * H);
  }
}

// One extension module, one registration function per cell's file.
void register_rnn(pybind11::module& m);
void register_lstm(pybind11::module& m);
void register_gru(pybind11::module& m);
void register_cell_step(pybind11::module& m);
void register_cell_train(pybind11::module& m);

// A single cell step's kind (cell_step.cpp, cell_train.cpp) and its gate count.
enum StepKind : int { kRnnTanh = 0, kRnnRelu = 1, kLstm = 2, kGru = 3 };
inline int64_t gate_count(int64_t kind) { return kind == kLstm ? 4 : kind == kGru ? 3 : 1; }

// The arguments of one cell step (cell_step.cpp), raising on the first refused one.
void check_step_args(int64_t kind, const at::Tensor& x, const at::Tensor& h, const std::optional<at::Tensor>& c,
                     const std::optional<at::Tensor>& image, const at::Tensor& w_ih, const at::Tensor& w_hh,
                     const std::optional<at::Tensor>& w_img, const std::optional<at::Tensor>& b_ih,
                     const std::optional<at::Tensor>& b_hh);

// One cell step (cell_step.cpp) on checked arguments: kind 0 RNN tanh, 1 RNN relu, 2 LSTM, 3 GRU; writes
// h_new [B, H] (and c_new for the LSTM); acts [B, G*H] and aux [B, H] defined: also the activations a
// backward needs (LSTM i, f, g, o and tanh(c'); GRU r, z, n and W_hn h + b_hn). release_gil: the
// caller holds the GIL and threads may run without it.
void step_forward(int64_t kind, const at::Tensor& x, const at::Tensor& h, const std::optional<at::Tensor>& c,
                  const std::optional<at::Tensor>& image, const at::Tensor& w_ih, const at::Tensor& w_hh,
                  const std::optional<at::Tensor>& w_img, const std::optional<at::Tensor>& b_ih,
                  const std::optional<at::Tensor>& b_hh, const at::Tensor& h_new, const at::Tensor& c_new,
                  const at::Tensor& acts, const at::Tensor& aux, bool release_gil);

}  // namespace mmrnn
