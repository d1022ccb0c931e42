// The recurrence engine shared by the three cells' CPU kernels: the per-step product
// C[B, N] = A[B, K] @ W' run by our own register-blocked micro-kernels on W' packed once per call,
// with each cell's elementwise pass (gates, state update, lengths mask) fused onto every output
// tile while it is still in L1, and both cores of a step working at once (one barrier per step).
//
// Why our own kernel: BLAS vendors dispatch small-batch GEMMs very differently. MKL's sgemm runs
// [8,1024] x [1024,4096] at 9.4 GF/s on an AMD EPYC where oneDNN runs it at 67.5 (bench/NOTES.md);
// these micro-kernels reach ~105 GF/s per core there from plain vector code, on Intel and AMD alike.
//
// Layout. W' is cut into column panels; panel p holds `units` consecutive hidden units of every one
// of `groups` gate blocks, K rows of (groups x units) contiguous values (gate g's units at columns
// [g*units, (g+1)*units)). A thread's slice of the output therefore holds whole hidden units: the
// gate pass of unit j reads only its own panel's tile (and state at j), so it runs in the thread
// that computed the tile. The forward packs W_hh^T with groups = G (the cell's gate count); BPTT
// packs W_hh with groups = 1 (its product has H columns, K = G*H).
//
// ISA. AVX-512, AVX2+FMA and a portable 128-bit path are compiled into every build (GCC vector
// extensions under per-function target attributes) and chosen at run time from the CPU's flags;
// MMRNN_CPU_ISA=avx512|avx2|generic caps the choice (tests force each path on one machine).
//
// bfloat16. Storage S = bfloat16 computes in float32 (acc_t<S>): W' holds bf16 pairs (rows k and
// k + 1 of a column side by side, each part's odd last row paired with a zero), so that one 32-bit
// lane holds what the CPU's bf16 dot instruction (vdpbf16ps, avx512_bf16) multiplies into one
// float32 lane; without that instruction the same panels are widened to float32 in registers (a
// shift and a mask per pair) and run through FMAs. The operands A (x, h, gradients) stay bf16 in
// memory; the tile, the gate pass and the carried state are float32.
#pragma once

#include "common.h"

#include <c10/util/BFloat16.h>
#if MMRNN_X86
#include <immintrin.h>
#endif

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <thread>
#include <utility>

namespace mmrnn {

// kAvx512Bf16 is kAvx512 plus the bf16 dot instruction (used by the bfloat16 kernels only).
enum class Isa : int { kGeneric = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };

inline const char* isa_name(Isa isa) {
  return isa == Isa::kAvx512Bf16 ? "avx512_bf16" : isa == Isa::kAvx512 ? "avx512" : isa == Isa::kAvx2 ? "avx2" : "generic";
}

// The widest path this CPU runs, capped by MMRNN_CPU_ISA (read on every call, so a test can switch
// paths in one process). An unknown value is an error, not a silent default.
inline Isa cpu_isa() {
  static const Isa detected = [] {
#if MMRNN_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
      return __builtin_cpu_supports("avx512bf16") ? Isa::kAvx512Bf16 : Isa::kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
    return Isa::kGeneric;
  }();
  const char* env = std::getenv("MMRNN_CPU_ISA");
  if (env == nullptr || *env == '\0') return detected;
  const std::string cap(env);
  Isa want;
  if (cap == "avx512_bf16") want = Isa::kAvx512Bf16;
  else if (cap == "avx512") want = Isa::kAvx512;
  else if (cap == "avx2") want = Isa::kAvx2;
  else if (cap == "generic") want = Isa::kGeneric;
  else TORCH_CHECK(false, "MMRNN_CPU_ISA: expected avx512_bf16, avx512, avx2 or generic, got '", cap, "'");
  return static_cast<int>(want) < static_cast<int>(detected) ? want : detected;
}

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

// tile[r, c] = sum_k A[r, k] * w[k, c] for MR rows and one panel of NV vectors of VW values, where
// A = [x | h]: its first K1 columns come from x (row stride ldx), the other K - K1 from h (row
// stride ldh). K1 = 0 is a plain product with h; K1 > 0 fuses a step's input projection into its
// recurrent product (W' holds W_ih's K1 rows above W_hh's). The body is shared by every ISA; each
// instantiation is compiled for its own target.
//
// Small tiles (B = 1, 2: MR x NV < 8 accumulators) would wait on the multiply-add's latency (4-6
// cycles) rather than its throughput, so KU = 8 / (MR x NV) sets of accumulators take consecutive
// k in turn and are summed at the end. Measured on the 2-core EPYC, LSTM recurrence at
// (1, 512, ., 256): float32 71 -> 85 GF/s, bfloat16 55 -> 146 (with the 6 x 4 tile; bench/NOTES.md).
template <int MR, int NV>
constexpr int k_unroll() {
  return MR * NV >= 8 ? 1 : (8 + MR * NV - 1) / (MR * NV);
}

#define MMRNN_MICRO_BODY                                                                              \
  typedef T vec __attribute__((vector_size(VW * sizeof(T))));                                        \
  constexpr int KU = k_unroll<MR, NV>();                                                              \
  vec acc[KU][MR][NV];                                                                                \
  _Pragma("GCC unroll 8") for (int q = 0; q < KU; ++q)                                                \
      _Pragma("GCC unroll 16") for (int r = 0; r < MR; ++r)                                           \
          _Pragma("GCC unroll 8") for (int v = 0; v < NV; ++v) acc[q][r][v] = vec{};                  \
  for (int part = 0; part < 2; ++part) {                                                              \
    const T* a = part == 0 ? x : h;                                                                   \
    const int64_t lda = part == 0 ? ldx : ldh, k0 = part == 0 ? 0 : K1;                               \
    const int64_t k1 = part == 0 ? K1 : K;                                                            \
    int64_t k = k0;                                                                                   \
    auto row = [&](int64_t kk, vec(*ac)[NV]) __attribute__((always_inline)) {                         \
      const vec* wk = reinterpret_cast<const vec*>(w + kk * (NV * VW));                              \
      vec wv[NV];                                                                                     \
      _Pragma("GCC unroll 8") for (int v = 0; v < NV; ++v) wv[v] = wk[v];                             \
      _Pragma("GCC unroll 16") for (int r = 0; r < MR; ++r) {                                         \
        const vec s = vec{} + a[r * lda + kk - k0];                                                   \
        _Pragma("GCC unroll 8") for (int v = 0; v < NV; ++v) ac[r][v] += wv[v] * s;                   \
      }                                                                                               \
    };                                                                                                \
    for (; k + KU <= k1; k += KU) {                                                                   \
      _Pragma("GCC unroll 8") for (int q = 0; q < KU; ++q) row(k + q, acc[q]);                        \
    }                                                                                                 \
    for (; k < k1; ++k) row(k, acc[0]);                                                               \
  }                                                                                                   \
  _Pragma("GCC unroll 16") for (int r = 0; r < MR; ++r)                                               \
      _Pragma("GCC unroll 8") for (int v = 0; v < NV; ++v) {                                          \
    vec s = acc[0][r][v];                                                                             \
    _Pragma("GCC unroll 8") for (int q = 1; q < KU; ++q) s += acc[q][r][v];                           \
    *reinterpret_cast<vec*>(tile + r * (NV * VW) + v * VW) = s;                                       \
  }

#define MMRNN_MICRO_ARGS                                                                              \
  const T *__restrict x, int64_t ldx, int64_t K1, const T *__restrict h, int64_t ldh, const T *__restrict w, \
      int64_t K, T *__restrict tile

#if MMRNN_X86
template <typename T, int VW, int NV, int MR>
__attribute__((target("avx512f,avx512vl,avx512dq,avx2,fma"))) void micro_avx512(MMRNN_MICRO_ARGS) {
  MMRNN_MICRO_BODY
}
template <typename T, int VW, int NV, int MR>
__attribute__((target("avx2,fma"))) void micro_avx2(MMRNN_MICRO_ARGS) {
  MMRNN_MICRO_BODY
}
#endif
template <typename T, int VW, int NV, int MR>
void micro_generic(MMRNN_MICRO_ARGS) {
  MMRNN_MICRO_BODY
}
#undef MMRNN_MICRO_ARGS
#undef MMRNN_MICRO_BODY

inline float bf16_bits_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// The bfloat16 form: w holds bf16 pairs (see the top of this file): pair row q of a panel is NV
// vectors of VW 32-bit lanes, lane c holding column c's rows 2q (low half) and 2q + 1 (high half).
// Part 0 (x, K1 rows) takes pair rows [0, ceil(K1/2)), part 1 (h) the ones after; a part's odd
// last row is paired with a zero row (its A value with 0). PAIR(kk, ac, full) accumulates pair row
// kk / 2 into the accumulator set ac: A's values at kk and kk + 1 (full), or at kk and a zero.
// Widening path: a lane shifted left by 16 is the low bf16 as a float32, masked to its high half the
// high one; two FMAs per lane.
#define MMRNN_MICRO_BF16_LOOP(PAIR)                                                                   \
  const int64_t kp1 = (K1 + 1) & ~int64_t(1);                                                         \
  for (int part = 0; part < 2; ++part) {                                                              \
    const uint16_t* a = part == 0 ? xs : hs;                                                          \
    const int64_t lda = part == 0 ? ldx : ldh, n = part == 0 ? K1 : K - K1;                           \
    const uint16_t* wp = ws + (part == 0 ? 0 : kp1) * (NV * VW);                                      \
    int64_t k = 0;                                                                                    \
    for (; k + 2 * KU <= n; k += 2 * KU) {                                                            \
      _Pragma("GCC unroll 8") for (int q = 0; q < KU; ++q) PAIR(k + 2 * q, acc[q], true);             \
    }                                                                                                 \
    for (; k + 2 <= n; k += 2) PAIR(k, acc[0], true);                                                 \
    if (k < n) PAIR(k, acc[0], false);                                                                \
  }

#define MMRNN_WIDEN_PAIR(kk, ac, full)                                                                \
  {                                                                                                   \
    const uvec* wk = reinterpret_cast<const uvec*>(wp + (kk) * (NV * VW));                            \
    vec lo[NV], hi[NV];                                                                               \
    _Pragma("GCC unroll 8") for (int v = 0; v < NV; ++v) {                                            \
      lo[v] = reinterpret_cast<vec>(wk[v] << 16);                                                     \
      hi[v] = reinterpret_cast<vec>(wk[v] & 0xffff0000u);                                             \
    }                                                                                                 \
    _Pragma("GCC unroll 16") for (int r = 0; r < MR; ++r) {                                           \
      const vec s0 = vec{} + bf16_bits_to_float(a[r * lda + (kk)]);                                   \
      const vec s1 = vec{} + ((full) ? bf16_bits_to_float(a[r * lda + (kk) + 1]) : 0.f);              \
      _Pragma("GCC unroll 8") for (int v = 0; v < NV; ++v) ac[r][v] += lo[v] * s0 + hi[v] * s1;       \
    }                                                                                                 \
  }

#define MMRNN_MICRO_BF16_BODY                                                                         \
  typedef float vec __attribute__((vector_size(VW * 4)));                                             \
  typedef uint32_t uvec __attribute__((vector_size(VW * 4)));                                         \
  constexpr int KU = k_unroll<MR, NV>();                                                              \
  const uint16_t* xs = reinterpret_cast<const uint16_t*>(x);                                          \
  const uint16_t* hs = reinterpret_cast<const uint16_t*>(h);                                          \
  const uint16_t* ws = reinterpret_cast<const uint16_t*>(w);                                          \
  vec acc[KU][MR][NV];                                                                                \
  _Pragma("GCC unroll 8") for (int q = 0; q < KU; ++q)                                                \
      _Pragma("GCC unroll 16") for (int r = 0; r < MR; ++r)                                           \
          _Pragma("GCC unroll 8") for (int v = 0; v < NV; ++v) acc[q][r][v] = vec{};                  \
  MMRNN_MICRO_BF16_LOOP(MMRNN_WIDEN_PAIR)                                                             \
  _Pragma("GCC unroll 16") for (int r = 0; r < MR; ++r)                                               \
      _Pragma("GCC unroll 8") for (int v = 0; v < NV; ++v) {                                          \
    vec s = acc[0][r][v];                                                                             \
    _Pragma("GCC unroll 8") for (int q = 1; q < KU; ++q) s += acc[q][r][v];                           \
    *reinterpret_cast<vec*>(tile + r * (NV * VW) + v * VW) = s;                                       \
  }

#define MMRNN_MICRO_BF16_ARGS                                                                         \
  const c10::BFloat16 *__restrict x, int64_t ldx, int64_t K1, const c10::BFloat16 *__restrict h, int64_t ldh, \
      const c10::BFloat16 *__restrict w, int64_t K, float *__restrict tile

#if MMRNN_X86
template <int VW, int NV, int MR>
__attribute__((target("avx512f,avx512vl,avx512dq,avx2,fma"))) void micro_bf16_avx512(MMRNN_MICRO_BF16_ARGS) {
  MMRNN_MICRO_BF16_BODY
}
template <int VW, int NV, int MR>
__attribute__((target("avx2,fma"))) void micro_bf16_avx2(MMRNN_MICRO_BF16_ARGS) {
  MMRNN_MICRO_BF16_BODY
}
#endif  // MMRNN_X86
template <int VW, int NV, int MR>
void micro_bf16_generic(MMRNN_MICRO_BF16_ARGS) {
  MMRNN_MICRO_BF16_BODY
}

#if MMRNN_X86

// The same product on the bf16 dot instruction: per pair row, one broadcast of each row's two A
// values (one 32-bit lane, straight from memory) and one vdpbf16ps per accumulator (32
// multiply-adds).
#define MMRNN_DOT_PAIR(kk, ac, full)                                                                  \
  {                                                                                                   \
    const __m512i* wk = reinterpret_cast<const __m512i*>(wp + (kk) * (NV * VW));                      \
    __m512i wv[NV];                                                                                   \
    _Pragma("GCC unroll 8") for (int v = 0; v < NV; ++v) wv[v] = _mm512_load_si512(wk + v);           \
    _Pragma("GCC unroll 16") for (int r = 0; r < MR; ++r) {                                           \
      int two;                                                                                        \
      if (full) std::memcpy(&two, a + r * lda + (kk), sizeof(two));                                   \
      else two = a[r * lda + (kk)];                                                                   \
      const __m512i s = _mm512_set1_epi32(two);                                                       \
      _Pragma("GCC unroll 8") for (int v = 0; v < NV; ++v) ac[r][v] =                                 \
          _mm512_dpbf16_ps(ac[r][v], (__m512bh)wv[v], (__m512bh)s);                                   \
    }                                                                                                 \
  }

template <int VW, int NV, int MR>
__attribute__((target("avx512f,avx512vl,avx512dq,avx512bf16,avx2,fma"))) void micro_bf16_dot(MMRNN_MICRO_BF16_ARGS) {
  static_assert(VW == 16, "the bf16 dot kernel runs 512-bit vectors");
  constexpr int KU = k_unroll<MR, NV>();
  const uint16_t* xs = reinterpret_cast<const uint16_t*>(x);
  const uint16_t* hs = reinterpret_cast<const uint16_t*>(h);
  const uint16_t* ws = reinterpret_cast<const uint16_t*>(w);
  __m512 acc[KU][MR][NV];
#pragma GCC unroll 8
  for (int q = 0; q < KU; ++q)
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[q][r][v] = _mm512_setzero_ps();
  MMRNN_MICRO_BF16_LOOP(MMRNN_DOT_PAIR)
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      __m512 s = acc[0][r][v];
#pragma GCC unroll 8
      for (int q = 1; q < KU; ++q) s = _mm512_add_ps(s, acc[q][r][v]);
      _mm512_store_ps(tile + r * (NV * VW) + v * VW, s);
    }
}
#undef MMRNN_DOT_PAIR
#endif  // MMRNN_X86
#undef MMRNN_WIDEN_PAIR
#undef MMRNN_MICRO_BF16_LOOP
#undef MMRNN_MICRO_BF16_ARGS
#undef MMRNN_MICRO_BF16_BODY

template <typename S>
using MicroFn = void (*)(const S*, int64_t, int64_t, const S*, int64_t, const S*, int64_t, acc_t<S>*);

constexpr int kMaxRows = 8;  // the largest MR of any configuration

// One ISA's kernel family for one panel shape: fns[r - 1] computes r rows (1 <= r <= mr).
template <typename S>
struct Kernels {
  int vw = 0, nv = 0, mr = 0;
  MicroFn<S> fns[kMaxRows] = {};
};

template <typename S, Isa I, int VW, int NV, int MR, int... R>
void fill_kernels(Kernels<S>& k, std::integer_sequence<int, R...>) {
  k.vw = VW;
  k.nv = NV;
  k.mr = MR;
#if MMRNN_X86
  if constexpr (kIsBf16<S>) {
    if constexpr (I == Isa::kAvx512Bf16) ((k.fns[R] = &micro_bf16_dot<VW, NV, R + 1>), ...);
    else if constexpr (I == Isa::kAvx512) ((k.fns[R] = &micro_bf16_avx512<VW, NV, R + 1>), ...);
    else if constexpr (I == Isa::kAvx2) ((k.fns[R] = &micro_bf16_avx2<VW, NV, R + 1>), ...);
    else ((k.fns[R] = &micro_bf16_generic<VW, NV, R + 1>), ...);
  } else {
    if constexpr (I == Isa::kAvx512 || I == Isa::kAvx512Bf16) ((k.fns[R] = &micro_avx512<S, VW, NV, R + 1>), ...);
    else if constexpr (I == Isa::kAvx2) ((k.fns[R] = &micro_avx2<S, VW, NV, R + 1>), ...);
    else ((k.fns[R] = &micro_generic<S, VW, NV, R + 1>), ...);
  }
#else
  static_assert(I == Isa::kGeneric, "only the portable path exists off x86");
  if constexpr (kIsBf16<S>) ((k.fns[R] = &micro_bf16_generic<VW, NV, R + 1>), ...);
  else ((k.fns[R] = &micro_generic<S, VW, NV, R + 1>), ...);
#endif
}

// The panel shape for `groups` gate blocks: NV vectors per K row and MR rows per tile, as many
// accumulators as the register file holds with room for the panel's row (32 vector registers with
// AVX-512, 16 otherwise). groups must divide NV*VW (units = NV*VW / groups). Four gates (or one)
// with AVX-512: 6 rows x 4 vectors at every batch size. (A 12 x 2 tile for batches up to 12, one
// pass over each panel a step, lost once small tiles got their split accumulators: on the 2-core
// EPYC the LSTM forward at (8, 256, ., 1024) runs 188 GF/s with 6 x 4 against 167, at B = 12 199
// against 135; in bfloat16 372 against 209 — bench/NOTES.md.) bfloat16 takes the same shapes
// (float32 accumulators).
template <typename S, Isa I>
Kernels<S> kernels_for(int groups) {
  constexpr bool wide = I == Isa::kAvx512 || I == Isa::kAvx512Bf16;
  constexpr int VW = (wide ? 64 : I == Isa::kAvx2 ? 32 : 16) / static_cast<int>(sizeof(acc_t<S>));
  Kernels<S> k;
  if constexpr (wide) {
    if (groups == 3) fill_kernels<S, I, VW, 3, 8>(k, std::make_integer_sequence<int, 8>{});
    else fill_kernels<S, I, VW, 4, 6>(k, std::make_integer_sequence<int, 6>{});
  } else {
    if (groups == 3) fill_kernels<S, I, VW, 3, 4>(k, std::make_integer_sequence<int, 4>{});
    else fill_kernels<S, I, VW, 2, 6>(k, std::make_integer_sequence<int, 6>{});
  }
  return k;
}

template <typename S>
Kernels<S> kernels_for(Isa isa, int groups) {
  switch (isa) {
#if MMRNN_X86
    case Isa::kAvx512Bf16: return kernels_for<S, Isa::kAvx512Bf16>(groups);
    case Isa::kAvx512: return kernels_for<S, Isa::kAvx512>(groups);
    case Isa::kAvx2: return kernels_for<S, Isa::kAvx2>(groups);
#endif
    default: return kernels_for<S, Isa::kGeneric>(groups);
  }
}

// W' packed into panels (see the top of this file), with the kernels that read it. A panel holds
// `stride` values: K rows of `width` (bfloat16: ceil(K1/2) + ceil((K - K1)/2) pair rows of 2 x width).
template <typename S>
struct PackedWeight {
  Kernels<S> kern;
  int64_t K = 0, K1 = 0, H = 0, groups = 1, units = 0, width = 0, panels = 0, stride = 0;  // K1: rows of W_ih (fused)
  at::Tensor buf;
  const S* panel(int64_t p) const { return buf.template data_ptr<S>() + p * stride; }
};

// transpose (forward): W' = w^T for w [groups*H, K]; column (g, j) of W' is row g*H + j of w.
// !transpose (BPTT):   W' = w for w [K, H], groups = 1.
// w_in (forward only): W_ih [groups*H, K1], whose transpose goes above w's: the fused input product.
template <typename S>
PackedWeight<S> pack_weight(const at::Tensor& w, int64_t groups, bool transpose, Isa isa,
                            const at::Tensor* w_in = nullptr) {
  PackedWeight<S> pw;
  pw.kern = kernels_for<S>(isa, static_cast<int>(groups));
  pw.groups = groups;
  pw.K1 = w_in == nullptr ? 0 : w_in->size(1);
  pw.K = (transpose ? w.size(1) : w.size(0)) + pw.K1;
  pw.H = transpose ? w.size(0) / groups : w.size(1);
  pw.width = static_cast<int64_t>(pw.kern.nv) * pw.kern.vw;
  pw.units = pw.width / groups;
  pw.panels = (pw.H + pw.units - 1) / pw.units;
  // the packed row of source row k, and its slot: row k at [k * width + c]; bf16 pairs at
  // [(k' / 2) * 2 * width + 2 * c + k' % 2], k' = k in part 0, k - K1 + ceil(K1 / 2) * 2 in part 1
  const int64_t kp1 = kIsBf16<S> ? (pw.K1 + 1) / 2 * 2 : pw.K1;
  const int64_t kp = kIsBf16<S> ? kp1 + (pw.K - pw.K1 + 1) / 2 * 2 : pw.K;
  pw.stride = kp * pw.width;
  pw.buf = at::zeros({std::max<int64_t>(pw.panels * pw.stride, 1)}, w.options());
  const S* src = w.data_ptr<S>();
  const S* src_in = w_in == nullptr ? nullptr : w_in->data_ptr<S>();
  S* dst = pw.buf.template data_ptr<S>();
  const int64_t K = pw.K, K1 = pw.K1, H = pw.H, U = pw.units, Wd = pw.width, stride = pw.stride;
  auto slot = [&](int64_t k, int64_t c) -> int64_t {
    if constexpr (kIsBf16<S>) {
      const int64_t kk = k < K1 ? k : k - K1 + kp1;
      return (kk / 2) * 2 * Wd + 2 * c + kk % 2;
    } else {
      return k * Wd + c;
    }
  };
  at::parallel_for(0, pw.panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      S* pp = dst + p * stride;
      for (int64_t g = 0; g < groups; ++g) {
        for (int64_t u = 0; u < U; ++u) {
          const int64_t j = p * U + u, c = g * U + u;
          if (j >= H) continue;  // zero columns past the last unit (buf starts zeroed)
          if (transpose) {
            const S* row_in = src_in + (g * H + j) * K1;
            for (int64_t k = 0; k < K1; ++k) pp[slot(k, c)] = row_in[k];
            const S* row = src + (g * H + j) * (K - K1);
            for (int64_t k = K1; k < K; ++k) pp[slot(k, c)] = row[k - K1];
          } else {
            for (int64_t k = 0; k < K; ++k) pp[slot(k, c)] = src[k * H + j];
          }
        }
      }
    }
  });
  return pw;
}

// A barrier for the workers of one recurrence call. Workers may be grouped unevenly into threads
// (at::parallel_for hands a thread a range of them, all of them to one thread inside another
// parallel region), so each thread arrives with its count of workers and waits for all of them:
// it never waits on a thread that does not run. Spins briefly, then yields (several calls at once
// may share the cores).
class StepBarrier {
 public:
  explicit StepBarrier(int64_t workers) : workers_(workers) {}
  void arrive_and_wait(int64_t count, int64_t generation) {
    arrived_.fetch_add(count, std::memory_order_acq_rel);
    const int64_t target = workers_ * (generation + 1);
    for (int spins = 0; arrived_.load(std::memory_order_acquire) < target; ++spins) {
      if (spins < 4000) {
#if MMRNN_X86
        __builtin_ia32_pause();
#endif
      } else {
        std::this_thread::yield();
      }
    }
  }

 private:
  std::atomic<int64_t> arrived_{0};
  const int64_t workers_;
};

// How many workers share a step: one per thread, fewer when a step is too small to repay a barrier
// (~1-2 us), never more than there are panels.
inline int64_t step_workers(int64_t flops_per_step, int64_t panels) {
  int64_t n = parallel_threads();
  if (flops_per_step < (1 << 18)) n = 1;
  return std::max<int64_t>(1, std::min(n, panels));
}

// A step's operands: the recurrent one h (rows of stride ldh; null: a zero product) and, with a
// fused input product (pw.K1 > 0), the step's input x (rows of stride ldx).
template <typename T>
struct Operands {
  const T* h = nullptr;
  int64_t ldh = 0;
  const T* x = nullptr;
  int64_t ldx = 0;
};

// Runs `steps` dependent products with the epilogue fused: for s in [0, steps), every tile of
//   tile = [x_s | h_s] @ W'  (Operands a_of(s); a null h_s means a zero product)
// is handed to epi(s, b0, rows, j0, units, tile, ld_tile) (tile in acc_t<T>) — rows [b0, b0 + rows) and hidden units
// [j0, j0 + units) (fewer than pw.units in the last panel), gate g of unit j0 + u at
// tile[r * ld_tile + g * pw.units + u]. Step s + 1 starts after every tile of step s is through
// its epilogue. Called with the GIL released.
template <typename T, class AOf, class Epi>
void run_steps(const PackedWeight<T>& pw, int64_t steps, int64_t B, AOf a_of, Epi epi) {
  if (steps == 0 || B == 0 || pw.H == 0) return;
  const int64_t workers = step_workers(2 * B * pw.K * pw.groups * pw.H, pw.panels);
  const int mr = pw.kern.mr;
  const int64_t blocks = (B + mr - 1) / mr;
  StepBarrier barrier(workers);
  auto run = [&](int64_t w0, int64_t w1) {
    using C = acc_t<T>;
    alignas(64) C tile[kMaxRows * 64];
    for (int64_t s = 0; s < steps; ++s) {
      const Operands<T> a = a_of(s);
      for (int64_t w = w0; w < w1; ++w) {
        for (int64_t p = w * pw.panels / workers; p < (w + 1) * pw.panels / workers; ++p) {
          const int64_t j0 = p * pw.units, nu = std::min(pw.units, pw.H - j0);
          for (int64_t blk = 0; blk < blocks; ++blk) {
            // rows spread evenly over the blocks (8 rows as 4 + 4, not 6 + 2)
            const int64_t b0 = blk * B / blocks, rows = (blk + 1) * B / blocks - b0;
            if (a.h != nullptr) {
              pw.kern.fns[rows - 1](a.x == nullptr ? nullptr : a.x + b0 * a.ldx, a.ldx, pw.K1, a.h + b0 * a.ldh, a.ldh,
                                    pw.panel(p), pw.K, tile);
            } else {
              std::fill(tile, tile + rows * pw.width, C(0));
            }
            epi(s, b0, rows, j0, nu, static_cast<const C*>(tile), pw.width);
          }
        }
      }
      if (workers > 1) barrier.arrive_and_wait(w1 - w0, s);
    }
  };
  if (workers == 1) {
    run(0, 1);
  } else {
    at::parallel_for(0, workers, 1, run);
  }
}

// out[M, N] = a[M, K] @ w[N, K]^T: the input projection of every step at once, on the same
// kernels. Rows are cut into chunks (48: of 48/96/240 measured on the 2-core EPYC, the best at every
// shape tried) that stay in L1/L2 while every panel of W passes over them; the chunks are shared
// among threads.
template <typename T>
void linear(const PackedWeight<T>& pw, const T* a, int64_t M, T* out) {
  const int64_t N = pw.H, K = pw.K;
  const int mr = pw.kern.mr;
  const int64_t chunk = std::max<int64_t>(mr, (48 / mr) * mr);
  const int64_t chunks = (M + chunk - 1) / chunk;
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    alignas(64) acc_t<T> tile[kMaxRows * 64];
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t r_end = std::min(M, (c + 1) * chunk);
      for (int64_t p = 0; p < pw.panels; ++p) {
        const int64_t j0 = p * pw.units, nu = std::min(pw.units, N - j0);
        for (int64_t r0 = c * chunk; r0 < r_end; r0 += mr) {
          const int64_t rows = std::min<int64_t>(mr, r_end - r0);
          pw.kern.fns[rows - 1](nullptr, 0, 0, a + r0 * K, K, pw.panel(p), K, tile);
          for (int64_t r = 0; r < rows; ++r) std::copy(tile + r * pw.width, tile + r * pw.width + nu, out + (r0 + r) * N + j0);
        }
      }
    }
  });
}

}  // namespace mmrnn
