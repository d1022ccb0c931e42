// The fused multimodal RNN recurrence on CPU tensors: forward and BPTT backward, one call each per
// layer and direction. Time-major contract (see mmrnn_ext/reference.py):
//   xp [T, B, H], w_hh [H, H], h0 [B, H], image_term None | [B, H] | [T, B, H], lengths None | int64 [B]
//   forward  -> out [T, B, H]        (h_t = f(xp_t + h_{t-1} W_hh^T + img); zero past a row's length)
//   backward -> (dA [T, B, H], dh0 [B, H])
//
// Each step is one BLAS GEMM written straight into that step's output (or gradient) slot, followed
// by one pass over the slot that adds the projected input and image term, applies the
// nonlinearity and the lengths mask. The GEMM is the Fortran BLAS symbol exported by libtorch_cpu
// (MKL in the x86 wheels): calling it directly skips the dispatcher and any per-step allocation,
// which matters at small hidden sizes (a 32x64x64 torch.mm costs ~3 us from Python, twice its
// arithmetic on the 2-core machine the benchmarks ran on).
// ATen + torch's pybind11 casters rather than <torch/extension.h>: the whole C++ frontend is not
// needed here and more than doubles the build time.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>
#include <optional>

#ifdef __linux__
#include <sys/mman.h>
#endif

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc);
// MKL's packed GEMM (exported by the x86 torch wheels; weak, so a torch built on another BLAS still
// loads this library and takes the plain path). It lays W_hh out once for the T products that reuse
// it: measured on the 2-core EPYC, 8x1024x1024 52.6 vs 30.0 GF/s, 32x256x256 89.5 vs 82.8 GF/s.
size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k) __attribute__((weak));
void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha, const float* src, int ld,
                      float* dest) __attribute__((weak));
void cblas_sgemm_compute(int layout, int transa, int transb, int m, int n, int k, const float* a, int lda,
                         const float* b, int ldb, float beta, float* c, int ldc) __attribute__((weak));
}

namespace mmrnn {
namespace {

inline void blas_gemm(char ta, char tb, int m, int n, int k, const float* a, int lda, const float* b, int ldb,
                      float* c, int ldc) {
  const float one = 1.f, zero = 0.f;
  sgemm_(&ta, &tb, &m, &n, &k, &one, a, &lda, b, &ldb, &zero, c, &ldc);
}
inline void blas_gemm(char ta, char tb, int m, int n, int k, const double* a, int lda, const double* b, int ldb,
                      double* c, int ldc) {
  const double one = 1.0, zero = 0.0;
  dgemm_(&ta, &tb, &m, &n, &k, &one, a, &lda, b, &ldb, &zero, c, &ldc);
}

// Row-major C[M, N] = A[M, K] @ W[K, N].
template <typename T>
inline void gemm_a_w(const T* a, const T* w, T* c, int M, int N, int K) {
  if (M == 0 || N == 0) return;
  blas_gemm('N', 'N', N, M, K, w, N, a, K, c, N);
}

// The per-step product C[B, H] = A[B, H] @ op(W), op(W) = W^T (forward) or W (backward), with W the
// row-major [H, H] weight_hh. Prepared once per call, run T times.
template <typename T>
class StepGemm {
 public:
  StepGemm(const at::Tensor& w, bool transpose, int B, int H) : B_(B), H_(H) {
    constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112, kBMatrix = 162;
    if constexpr (std::is_same_v<T, float>) {
      if (cblas_sgemm_pack_get_size != nullptr && cblas_sgemm_pack != nullptr && cblas_sgemm_compute != nullptr && B > 0 &&
          H > 0) {
        const size_t bytes = cblas_sgemm_pack_get_size(kBMatrix, B, H, H);
        packed_ = at::empty({static_cast<int64_t>((bytes + sizeof(float) - 1) / sizeof(float))}, w.options());
        cblas_sgemm_pack(kRowMajor, kBMatrix, transpose ? kTrans : kNoTrans, B, H, H, 1.f, w.data_ptr<float>(), H,
                         packed_.data_ptr<float>());
        return;
      }
    }
    // plain BLAS: MKL runs A @ W faster from a contiguous W than A @ W^T from a transposed one
    // (8x1024x1024: 41 vs 29 GF/s), so the forward's W^T is made contiguous once
    w_ = transpose ? w.t().contiguous() : w;
  }

  void run(const T* a, T* c) const {
    if (B_ == 0 || H_ == 0) return;
    if constexpr (std::is_same_v<T, float>) {
      if (packed_.defined()) {
        constexpr int kRowMajor = 101, kNoTrans = 111, kPacked = 151;
        cblas_sgemm_compute(kRowMajor, kNoTrans, kPacked, B_, H_, H_, a, H_, packed_.data_ptr<float>(), H_, 0.f, c, H_);
        return;
      }
    }
    gemm_a_w(a, w_.data_ptr<T>(), c, B_, H_, H_);
  }

 private:
  int B_, H_;
  at::Tensor packed_, w_;
};

// tanh in float32 with only arithmetic and selects, so that the compiler vectorises the loops that
// call it (libm's tanhf does not vectorise without -ffast-math, which would change the process's
// floating-point mode when this library loads). Max error ~2 ulp, checked in tests against torch.tanh.
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
  // |x| >= 0.4: 1 - 2 / (exp(2|x|) + 1), exp by Cody-Waite reduction y = n ln2 + r, |r| <= ln2/2
  const float y = std::min(2.f * ax, 40.f);
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
  const float big_abs = 1.f - 2.f / (e * scale + 1.f);
  const float big = x < 0.f ? -big_abs : big_abs;
  const float res = ax < 0.4f ? small : big;
  return x != x ? x : res;  // NaN in, NaN out
}

template <typename T, bool RELU>
inline T activation(T a) {
  if constexpr (RELU) {
    return a < T(0) ? T(0) : a;  // NaN passes through, as torch.relu
  } else if constexpr (std::is_same_v<T, float>) {
    return tanh_f32(a);
  } else {
    return std::tanh(a);
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

// Rows per parallel chunk: enough elements per chunk that the fork costs less than the work.
inline int64_t row_grain(int64_t H) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(H, 1)); }

template <typename T, bool RELU>
void forward_loop(const StepGemm<T>& gemm, const T* xp, const T* h0, const T* img, bool img_per_step, const int64_t* lengths,
                  T* out, int64_t T_, int64_t B, int64_t H) {
  const int64_t step = B * H;
  for (int64_t t = 0; t < T_; ++t) {
    const T* h_prev = t == 0 ? h0 : out + (t - 1) * step;
    T* o = out + t * step;
    const T* x = xp + t * step;
    const T* im = img == nullptr ? nullptr : (img_per_step ? img + t * step : img);
    gemm.run(h_prev, o);
    at::parallel_for(0, B, row_grain(H), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        T* __restrict orow = o + b * H;
        const T* __restrict xrow = x + b * H;
        if (lengths != nullptr && t >= lengths[b]) {
          std::fill(orow, orow + H, T(0));
        } else if (im != nullptr) {
          const T* __restrict irow = im + b * H;
          for (int64_t j = 0; j < H; ++j) orow[j] = activation<T, RELU>(orow[j] + xrow[j] + irow[j]);
        } else {
          for (int64_t j = 0; j < H; ++j) orow[j] = activation<T, RELU>(orow[j] + xrow[j]);
        }
      }
    });
  }
}

template <typename T, bool RELU>
void backward_loop(const StepGemm<T>& gemm, const T* gy, const T* ghl, const T* out, const int64_t* lengths, T* dA, T* g,
                   T* dh0, int64_t T_, int64_t B, int64_t H) {
  // g holds dL/dh_t arriving from step t+1 (dA_{t+1} @ W_hh); it is only read where t+1 < length.
  const int64_t step = B * H;
  std::fill(g, g + step, T(0));
  for (int64_t t = T_ - 1; t >= 0; --t) {
    const T* gyt = gy + t * step;
    const T* ht = out + t * step;
    T* d = dA + t * step;
    at::parallel_for(0, B, row_grain(H), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t len = lengths == nullptr ? T_ : lengths[b];
        T* __restrict drow = d + b * H;
        if (t >= len) {
          std::fill(drow, drow + H, T(0));
          continue;
        }
        // the row's h_last is h_{len-1}: its gradient enters there; earlier steps get dA_{t+1} W_hh
        const T* __restrict gin = t == len - 1 ? ghl + b * H : g + b * H;
        const T* __restrict gyrow = gyt + b * H;
        const T* __restrict hrow = ht + b * H;
        for (int64_t j = 0; j < H; ++j) drow[j] = (gyrow[j] + gin[j]) * activation_grad_from_output<T, RELU>(hrow[j]);
      }
    });
    gemm.run(d, g);
  }
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = lengths == nullptr ? T_ : lengths[b];
    const T* src = len == 0 ? ghl + b * H : g + b * H;
    std::copy(src, src + H, dh0 + b * H);
  }
}

// The [T, B, H] buffers written here are fresh allocations; first-touch page faults on them cost as
// much as a third of the forward at (64, 256, ., ., 512) on the 2-core VM (33.5 MB: 16.7 ms with
// 4 KB pages, 4.5 ms with 2 MB pages). Ask for transparent huge pages before the first write, as
// torch does for its own allocations under THP_MEM_ALLOC_ENABLE=1. Advisory only: failure is harmless.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = 2u << 20;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + t.nbytes();
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = end & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

void check_float_cpu(const at::Tensor& t, const char* name, const at::Tensor& ref) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got one on ", t.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, ": expected dtype ", ref.scalar_type(), " (that of xp), got ",
              t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor, got strides ", t.strides());
}

void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, name, ": expected shape ", expected, ", got ", t.sizes());
}

// Validates the inputs shared by forward and backward; returns the lengths pointer (or nullptr).
const int64_t* check_lengths(const std::optional<at::Tensor>& lengths, int64_t T_, int64_t B) {
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

void check_blas_dims(int64_t B, int64_t H) {
  TORCH_CHECK(B <= INT_MAX && H <= INT_MAX && B * H <= INT_MAX, "batch ", B, " x hidden ", H,
              " exceeds the 32-bit BLAS interface");
}

at::Tensor rnn_forward(const at::Tensor& xp, const at::Tensor& w_hh, const at::Tensor& h0,
                       const std::optional<at::Tensor>& image_term, const std::optional<at::Tensor>& lengths, bool relu) {
  TORCH_CHECK(xp.dim() == 3, "xp: expected a 3-D tensor [T, B, H], got ", xp.dim(), "-D of shape ", xp.sizes());
  TORCH_CHECK(xp.scalar_type() == at::kFloat || xp.scalar_type() == at::kDouble,
              "xp: the cpp backend computes float32 and float64, got ", xp.scalar_type());
  const int64_t T_ = xp.size(0), B = xp.size(1), H = xp.size(2);
  check_float_cpu(xp, "xp", xp);
  check_float_cpu(w_hh, "w_hh", xp);
  check_shape(w_hh, "w_hh", {H, H});
  check_float_cpu(h0, "h0", xp);
  check_shape(h0, "h0", {B, H});
  bool per_step = false;
  if (image_term.has_value()) {
    check_float_cpu(*image_term, "image_term", xp);
    per_step = image_term->dim() == 3;
    TORCH_CHECK(image_term->sizes() == at::IntArrayRef({B, H}) || image_term->sizes() == at::IntArrayRef({T_, B, H}),
                "image_term: expected shape [", B, ", ", H, "] or [", T_, ", ", B, ", ", H, "], got ", image_term->sizes());
  }
  check_blas_dims(B, H);
  const int64_t* len = check_lengths(lengths, T_, B);
  at::Tensor out = at::empty_like(xp);
  advise_huge_pages(out);
  {
    pybind11::gil_scoped_release no_gil;
    AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "mmrnn_rnn_forward", [&] {
      const scalar_t* img = image_term.has_value() ? image_term->data_ptr<scalar_t>() : nullptr;
      const StepGemm<scalar_t> gemm(w_hh, /*transpose=*/true, static_cast<int>(B), static_cast<int>(H));
      auto run = relu ? forward_loop<scalar_t, true> : forward_loop<scalar_t, false>;
      run(gemm, xp.data_ptr<scalar_t>(), h0.data_ptr<scalar_t>(), img, per_step, len,
          out.data_ptr<scalar_t>(), T_, B, H);
    });
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> rnn_backward(const at::Tensor& grad_out, const at::Tensor& grad_h_last,
                                                const at::Tensor& out, const at::Tensor& h0, const at::Tensor& w_hh,
                                                const std::optional<at::Tensor>& lengths, bool relu) {
  TORCH_CHECK(out.dim() == 3, "out: expected a 3-D tensor [T, B, H], got ", out.dim(), "-D of shape ", out.sizes());
  TORCH_CHECK(out.scalar_type() == at::kFloat || out.scalar_type() == at::kDouble,
              "out: the cpp backend computes float32 and float64, got ", out.scalar_type());
  const int64_t T_ = out.size(0), B = out.size(1), H = out.size(2);
  check_float_cpu(out, "out", out);
  check_float_cpu(grad_out, "grad_out", out);
  check_shape(grad_out, "grad_out", out.sizes());
  check_float_cpu(grad_h_last, "grad_h_last", out);
  check_shape(grad_h_last, "grad_h_last", {B, H});
  check_float_cpu(h0, "h0", out);
  check_shape(h0, "h0", {B, H});
  check_float_cpu(w_hh, "w_hh", out);
  check_shape(w_hh, "w_hh", {H, H});
  check_blas_dims(B, H);
  const int64_t* len = check_lengths(lengths, T_, B);
  at::Tensor dA = at::empty_like(out);
  advise_huge_pages(dA);
  at::Tensor dh0 = at::empty_like(h0);
  at::Tensor g = at::empty_like(h0);
  {
    pybind11::gil_scoped_release no_gil;
    AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "mmrnn_rnn_backward", [&] {
      const StepGemm<scalar_t> gemm(w_hh, /*transpose=*/false, static_cast<int>(B), static_cast<int>(H));
      auto run = relu ? backward_loop<scalar_t, true> : backward_loop<scalar_t, false>;
      run(gemm, grad_out.data_ptr<scalar_t>(), grad_h_last.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), len, dA.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), dh0.data_ptr<scalar_t>(), T_,
          B, H);
    });
  }
  return {dA, dh0};
}

at::Tensor tanh_float32(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, "x: expected a float32 CPU tensor, got ",
              x.scalar_type(), " on ", x.device());
  at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty_like(xc);
  const float* src = xc.data_ptr<float>();
  float* dst = y.data_ptr<float>();
  for (int64_t i = 0; i < xc.numel(); ++i) dst[i] = tanh_f32(src[i]);
  return y;
}

}  // namespace
}  // namespace mmrnn

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mmrnn_ext C++ backend: the fused multimodal RNN recurrence on CPU tensors";
  m.def("rnn_forward", &mmrnn::rnn_forward, "forward over the whole sequence -> out [T, B, H]", pybind11::arg("xp"),
        pybind11::arg("w_hh"), pybind11::arg("h0"), pybind11::arg("image_term"), pybind11::arg("lengths"),
        pybind11::arg("relu"));
  m.def("rnn_backward", &mmrnn::rnn_backward, "BPTT over the whole sequence -> (dA [T, B, H], dh0 [B, H])",
        pybind11::arg("grad_out"), pybind11::arg("grad_h_last"), pybind11::arg("out"), pybind11::arg("h0"),
        pybind11::arg("w_hh"), pybind11::arg("lengths"), pybind11::arg("relu"));
  m.def("tanh_float32", &mmrnn::tanh_float32, "the recurrence's float32 tanh, exposed for its accuracy test",
        pybind11::arg("x"));
}
