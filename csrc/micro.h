// The engine's micro-kernel interface: the kernel family of one ISA for one panel shape, built by
// that ISA's own compile unit (micro_generic.cpp, micro_avx2.cpp, micro_avx512.cpp,
// micro_avx512_bf16.cpp, each compiling micro_kernels.h for its target, as ATen compiles its CPU
// kernels once per capability) and chosen at run time in engine.h (kernels_for).
#pragma once

#include "platform.h"

#include <c10/util/BFloat16.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

// MMRNN_TARGET_PUSH("avx2,fma") ... MMRNN_TARGET_POP(): every function defined between them is
// compiled for that target (GCC's push_options/target pragmas; clang's attribute push).
#define MMRNN_PRAGMA(x) _Pragma(#x)
#if defined(__clang__)
#define MMRNN_TARGET_PUSH(t) MMRNN_PRAGMA(clang attribute push(__attribute__((target(t))), apply_to = function))
#define MMRNN_TARGET_POP() _Pragma("clang attribute pop")
#else
#define MMRNN_TARGET_PUSH(t) _Pragma("GCC push_options") MMRNN_PRAGMA(GCC target(t))
#define MMRNN_TARGET_POP() _Pragma("GCC pop_options")
#endif

namespace mmrnn {

// kAvx512Bf16 is kAvx512 plus the bf16 dot instruction (used by the bfloat16 kernels only).
enum class Isa : int { kGeneric = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };

// The accumulation type of a storage type: float for bfloat16, the type itself otherwise.
template <typename S>
struct AccType {
  using type = S;
};
template <>
struct AccType<c10::BFloat16> {
  using type = float;
};
template <typename S>
using acc_t = typename AccType<S>::type;
template <typename S>
constexpr bool kIsBf16 = std::is_same_v<S, c10::BFloat16>;

// tile[r, c] = sum_k [x | h][r, k] * w[k, c] for `rows` rows (see micro_kernels.h); the last argument is
// null, or a panel of w's shape to prefetch into L2 while w is read (run_steps in engine.h).
template <typename S>
using MicroFn = void (*)(const S*, int64_t, int64_t, const S*, int64_t, const S*, int64_t, acc_t<S>*, const S*);

// The bounds of every tile any ISA's family computes; the callers' tile buffers are
// acc_t tile[kMaxRows * kMaxPanelWidth], and micro_kernels.h asserts each shape within them.
constexpr int kMaxRows = 8;         // rows: the 3-gate AVX-512 tile's 8
constexpr int kMaxPanelWidth = 64;  // values in a panel row: 4 vectors of 16 float32 (AVX-512)

// The weight gradient's tile (micro_kernels.h, wgrad_micro): tile[r, c] = sum_{k < K} a[k * lda + r] *
// z[k * ldz + c] for r rows and nv vectors of columns, tile rows nv * vw apart; float32 and float64.
template <typename S>
using WgradFn = void (*)(const S*, int64_t, const S*, int64_t, int64_t, S*);
constexpr int kMaxWgradVectors = 4;

// One ISA's kernel family for one panel shape (vw values per vector, nv vectors per panel row, mr
// rows per tile): fns[r - 1] computes r rows (1 <= r <= mr). Beside it the weight gradient's
// family (float32 and float64; none for bfloat16): wg[r - 1][n - 1] computes r rows of n vectors
// (1 <= r <= wg_mr, 1 <= n <= wg_nv).
// split[r - 1]: the same with the last gate block's sum over x's rows kept apart (the GRU's fused
// input product; three-gate families in float32 and float64 only, null otherwise).
template <typename S>
struct Kernels {
  int vw = 0, nv = 0, mr = 0;
  MicroFn<S> fns[kMaxRows] = {};
  MicroFn<S> split[kMaxRows] = {};
  int wg_mr = 0, wg_nv = 0;
  WgradFn<S> wg[kMaxRows][kMaxWgradVectors] = {};
};

// Each ISA's compile unit defines its `kernels<S>(groups)` for S = float, double, c10::BFloat16: the
// family for panels of `groups` gate blocks (micro_kernels.h). avx512_bf16 defines bfloat16 only.
namespace generic {
template <typename S>
Kernels<S> kernels(int groups);
}
#if MMRNN_X86
namespace avx2 {
template <typename S>
Kernels<S> kernels(int groups);
}
namespace avx512 {
template <typename S>
Kernels<S> kernels(int groups);
}
namespace avx512_bf16 {
template <typename S>
Kernels<S> kernels(int groups);
}
#endif

}  // namespace mmrnn
