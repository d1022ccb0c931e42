// The register-blocked micro-kernels and their tables, compiled once per ISA. Each compile unit
// micro_<isa>.cpp includes this file once, inside its own namespace (mmrnn::<isa>) and under its
// own target pragma, so that every function here (lambdas included) is compiled for that ISA, after
// defining
//   kVectorBytes     the vector width it runs: 64 (AVX-512), 32 (AVX2 + FMA), 16 (the portable path)
//   MMRNN_BF16_DOT   1 where the bfloat16 kernels run the bf16 dot instruction (avx512_bf16), else 0
// It includes nothing itself: its headers (micro.h, <cstring>, <utility>, <immintrin.h>) come before
// the pragma, so no inline function of theirs is compiled for an ISA the CPU may lack. It ends with
// the explicit instantiations micro.h declares (bfloat16 only with MMRNN_BF16_DOT).
// No include guard: included exactly once per compile unit, each time in another namespace.

// Small tiles (B = 1, 2: MR x NV < 8 accumulators) would wait on the multiply-add's latency (4-6
// cycles) rather than its throughput, so KU = 8 / (MR x NV) sets of accumulators take consecutive
// k in turn and are summed at the end. Measured on the 2-core EPYC, LSTM recurrence at
// (1, 512, ., 256): float32 71 -> 85 GF/s, bfloat16 55 -> 146 (with the 6 x 4 tile; bench/NOTES.md).
template <int MR, int NV>
constexpr int k_unroll() {
  return MR * NV >= 8 ? 1 : (8 + MR * NV - 1) / (MR * NV);
}

// The accumulator sets: zeroed, then summed into the tile (row r of the panel at tile + r * NV * VW).
template <typename V, int KU, int MR, int NV>
__attribute__((always_inline)) inline void zero_acc(V (&acc)[KU][MR][NV]) {
#pragma GCC unroll 8
  for (int q = 0; q < KU; ++q)
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[q][r][v] = V{};
}

template <int VW, typename V, int KU, int MR, int NV, typename C>
__attribute__((always_inline)) inline void store_acc(V (&acc)[KU][MR][NV], C* __restrict tile) {
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      V s = acc[0][r][v];
#pragma GCC unroll 8
      for (int q = 1; q < KU; ++q) s += acc[q][r][v];
      *reinterpret_cast<V*>(tile + r * (NV * VW) + v * VW) = s;
    }
}

// Asks for the ROW_BYTES bytes at p in L2 (one prefetch per 64-byte line): a row of the panel the
// caller works on next, fetched while this one computes (see run_steps in engine.h).
template <int ROW_BYTES>
__attribute__((always_inline)) inline void prefetch_row(const void* p) {
#pragma GCC unroll 8
  for (int l = 0; l < ROW_BYTES; l += 64) __builtin_prefetch(static_cast<const char*>(p) + l, 0, 2);
}

// tile[r, c] = sum_k A[r, k] * w[k, c] for MR rows and one panel of NV vectors of VW values, where
// A = [x | h]: its first K1 columns come from x (row stride ldx), the other K - K1 from h (row
// stride ldh). K1 = 0 is a plain product with h; K1 > 0 fuses a step's input projection into its
// recurrent product (W' holds W_ih's K1 rows above W_hh's). pf (or null): a panel laid out as w,
// prefetched row for row as w's rows are read.
// SPLIT (the GRU's fused input product, NV = 3 gate blocks of one vector each): the last vector's
// sum over x's rows is stored apart, at tile + MR * NV * VW + r * VW, and that vector then sums h's
// rows only (the reset gate scales W_hn h_{t-1} + b_hn, not W_in x_t).
template <typename T, int VW, int NV, int MR, bool SPLIT = false>
void micro(const T* __restrict x, int64_t ldx, int64_t K1, const T* __restrict h, int64_t ldh, const T* __restrict w,
           int64_t K, T* __restrict tile, const T* pf) {
  typedef T vec __attribute__((vector_size(VW * sizeof(T))));
  constexpr int KU = k_unroll<MR, NV>();
  vec acc[KU][MR][NV];
  zero_acc(acc);
  const std::ptrdiff_t pf_delta = pf == nullptr ? 0 : pf - w;
  for (int part = 0; part < 2; ++part) {
    const T* a = part == 0 ? x : h;
    const int64_t lda = part == 0 ? ldx : ldh, k0 = part == 0 ? 0 : K1;
    const int64_t k1 = part == 0 ? K1 : K;
    int64_t k = k0;
    auto row = [&](int64_t kk, vec(*ac)[NV]) __attribute__((always_inline)) {
      const vec* wk = reinterpret_cast<const vec*>(w + kk * (NV * VW));
      if (pf_delta != 0) prefetch_row<NV * VW * sizeof(T)>(w + kk * (NV * VW) + pf_delta);
      vec wv[NV];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) wv[v] = wk[v];
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) {
        // a broadcast written x - 0: that is x for every x (-0 and NaN included), so the compiler
        // broadcasts straight from memory (vbroadcastss [mem]). 0 + x, as it read before, is not x
        // for x = -0: it kept a scalar add and a register broadcast per row and k, two more FP
        // operations beside the row's FMAs (single core on the 2-core Zen 1 EPYC, AVX2 6 x 2
        // tile, K = 256-512: 27 GF/s with them, 37-38 without; bench/NOTES.md, "Training")
        const vec s = a[r * lda + kk - k0] - vec{};
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) ac[r][v] += wv[v] * s;
      }
    };
    for (; k + KU <= k1; k += KU) {
#pragma GCC unroll 8
      for (int q = 0; q < KU; ++q) row(k + q, acc[q]);
    }
    for (; k < k1; ++k) row(k, acc[0]);
    if constexpr (SPLIT) {
      if (part == 0) {
#pragma GCC unroll 16
        for (int r = 0; r < MR; ++r) {
          vec s = acc[0][r][NV - 1];
          acc[0][r][NV - 1] = vec{};
#pragma GCC unroll 8
          for (int q = 1; q < KU; ++q) {
            s += acc[q][r][NV - 1];
            acc[q][r][NV - 1] = vec{};
          }
          *reinterpret_cast<vec*>(tile + MR * (NV * VW) + r * VW) = s;
        }
      }
    }
  }
  store_acc<VW>(acc, tile);
}

// The weight gradient's tile: tile[r, c] = sum_{k < K} a[k * lda + r] * z[k * ldz + c] for MR rows
// (gate units: MR adjacent columns of dA, row k of dA holding step-and-row k's gate gradients) and
// NV vectors of columns (features of x or of h_{t-1}, row k of z). Both operands are read where they
// lie, one contiguous run of each per k: MR broadcasts from dA's row, NV vector loads (unaligned)
// from z's. The tile's rows are NV * VW apart.
template <typename T, int VW, int NV, int MR>
void wgrad_micro(const T* __restrict a, int64_t lda, const T* __restrict z, int64_t ldz, int64_t K,
                 T* __restrict tile) {
  typedef T vec __attribute__((vector_size(VW * sizeof(T))));
  constexpr int KU = k_unroll<MR, NV>();
  vec acc[KU][MR][NV];
  zero_acc(acc);
  auto row = [&](int64_t k, vec(*ac)[NV]) __attribute__((always_inline)) {
    const T* zk = z + k * ldz;
    vec zv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) std::memcpy(&zv[v], zk + v * VW, sizeof(vec));
    const T* ak = a + k * lda;
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const vec s = ak[r] - vec{};  // a broadcast (see micro)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) ac[r][v] += zv[v] * s;
    }
  };
  int64_t k = 0;
  for (; k + KU <= K; k += KU) {
#pragma GCC unroll 8
    for (int q = 0; q < KU; ++q) row(k + q, acc[q]);
  }
  for (; k < K; ++k) row(k, acc[0]);
  store_acc<VW>(acc, tile);
}

// The weight-gradient family: wg[r - 1][n - 1] = the kernel for r rows and n vectors.
template <typename S, int VW, int MR, int... N>
void wgrad_row(Kernels<S>& k, std::integer_sequence<int, N...>) {
  ((k.wg[MR - 1][N] = &wgrad_micro<S, VW, N + 1, MR>), ...);
}
template <typename S, int VW, int NV, int... R>
void wgrad_table(Kernels<S>& k, std::integer_sequence<int, R...>) {
  static_assert(sizeof...(R) <= kMaxRows && NV <= kMaxWgradVectors && NV * VW <= kMaxPanelWidth,
                "a weight-gradient tile must fit the callers' tile buffers (micro.h)");
  k.wg_mr = static_cast<int>(sizeof...(R));
  k.wg_nv = NV;
  (wgrad_row<S, VW, R + 1>(k, std::make_integer_sequence<int, NV>{}), ...);
}

inline float bf16_bits_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// The bfloat16 forms' walk over the pair rows: w holds bf16 pairs (see the top of engine.h): pair
// row q of a panel is NV vectors of VW 32-bit lanes, lane c holding column c's rows 2q (low half)
// and 2q + 1 (high half). Part 0 (x, K1 rows) takes pair rows [0, ceil(K1/2)), part 1 (h) the ones
// after; a part's odd last row is paired with a zero row (its A value with 0).
// pair(a, lda, wp, kk, q, full) accumulates pair row kk / 2 of panel part wp into accumulator set q:
// A's values at kk and kk + 1 (full), or at kk and a zero.
template <int VW, int NV, int KU, class Pair>
__attribute__((always_inline)) inline void bf16_pair_rows(const uint16_t* xs, int64_t ldx, int64_t K1,
                                                          const uint16_t* hs, int64_t ldh, const uint16_t* ws,
                                                          int64_t K, Pair&& pair) {
  const int64_t kp1 = (K1 + 1) & ~int64_t(1);
  for (int part = 0; part < 2; ++part) {
    const uint16_t* a = part == 0 ? xs : hs;
    const int64_t lda = part == 0 ? ldx : ldh, n = part == 0 ? K1 : K - K1;
    const uint16_t* wp = ws + (part == 0 ? 0 : kp1) * (NV * VW);
    int64_t k = 0;
    for (; k + 2 * KU <= n; k += 2 * KU) {
#pragma GCC unroll 8
      for (int q = 0; q < KU; ++q) pair(a, lda, wp, k + 2 * q, q, true);
    }
    for (; k + 2 <= n; k += 2) pair(a, lda, wp, k, 0, true);
    if (k < n) pair(a, lda, wp, k, 0, false);
  }
}

#if MMRNN_BF16_DOT
// The bfloat16 product on the bf16 dot instruction: per pair row, one broadcast of each row's two A
// values (one 32-bit lane, straight from memory) and one vdpbf16ps per accumulator (32
// multiply-adds).
template <int VW, int NV, int MR>
void micro_bf16(const c10::BFloat16* __restrict x, int64_t ldx, int64_t K1, const c10::BFloat16* __restrict h,
                int64_t ldh, const c10::BFloat16* __restrict w, int64_t K, float* __restrict tile,
                const c10::BFloat16* pf) {
  const std::ptrdiff_t pf_delta = pf == nullptr ? 0 : pf - w;
  static_assert(VW == 16, "the bf16 dot kernel runs 512-bit vectors");
  constexpr int KU = k_unroll<MR, NV>();
  __m512 acc[KU][MR][NV];
  zero_acc(acc);
  auto pair = [&](const uint16_t* a, int64_t lda, const uint16_t* wp, int64_t kk, int q, bool full)
                  __attribute__((always_inline)) {
    const __m512i* wk = reinterpret_cast<const __m512i*>(wp + kk * (NV * VW));
    if (pf_delta != 0) prefetch_row<NV * VW * 4>(wp + kk * (NV * VW) + pf_delta);
    __m512i wv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) wv[v] = _mm512_load_si512(wk + v);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      int two;
      if (full) std::memcpy(&two, a + r * lda + kk, sizeof(two));
      else two = a[r * lda + kk];
      const __m512i s = _mm512_set1_epi32(two);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[q][r][v] = _mm512_dpbf16_ps(acc[q][r][v], (__m512bh)wv[v], (__m512bh)s);
    }
  };
  bf16_pair_rows<VW, NV, KU>(reinterpret_cast<const uint16_t*>(x), ldx, K1, reinterpret_cast<const uint16_t*>(h), ldh,
                             reinterpret_cast<const uint16_t*>(w), K, pair);
  store_acc<VW>(acc, tile);
}
#else
// The bfloat16 product without the dot instruction: each pair lane widened to two float32 lanes in
// registers (shifted left by 16: the low bf16; masked to its high half: the high one), two FMAs per
// lane.
template <int VW, int NV, int MR>
void micro_bf16(const c10::BFloat16* __restrict x, int64_t ldx, int64_t K1, const c10::BFloat16* __restrict h,
                int64_t ldh, const c10::BFloat16* __restrict w, int64_t K, float* __restrict tile,
                const c10::BFloat16* pf) {
  const std::ptrdiff_t pf_delta = pf == nullptr ? 0 : pf - w;
  typedef float vec __attribute__((vector_size(VW * 4)));
  typedef uint32_t uvec __attribute__((vector_size(VW * 4)));
  constexpr int KU = k_unroll<MR, NV>();
  vec acc[KU][MR][NV];
  zero_acc(acc);
  auto pair = [&](const uint16_t* a, int64_t lda, const uint16_t* wp, int64_t kk, int q, bool full)
                  __attribute__((always_inline)) {
    const uvec* wk = reinterpret_cast<const uvec*>(wp + kk * (NV * VW));
    if (pf_delta != 0) prefetch_row<NV * VW * 4>(wp + kk * (NV * VW) + pf_delta);
    vec lo[NV], hi[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      lo[v] = reinterpret_cast<vec>(wk[v] << 16);
      hi[v] = reinterpret_cast<vec>(wk[v] & 0xffff0000u);
    }
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const vec s0 = bf16_bits_to_float(a[r * lda + kk]) - vec{};  // a broadcast (see micro)
      const vec s1 = (full ? bf16_bits_to_float(a[r * lda + kk + 1]) : 0.f) - vec{};
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[q][r][v] += lo[v] * s0 + hi[v] * s1;
    }
  };
  bf16_pair_rows<VW, NV, KU>(reinterpret_cast<const uint16_t*>(x), ldx, K1, reinterpret_cast<const uint16_t*>(h), ldh,
                             reinterpret_cast<const uint16_t*>(w), K, pair);
  store_acc<VW>(acc, tile);
}
#endif  // MMRNN_BF16_DOT

// The family of one panel shape: fns[r - 1] = the kernel for r rows.
template <typename S, int VW, int NV, int MR, int... R>
Kernels<S> table(std::integer_sequence<int, R...>) {
  static_assert(MR <= kMaxRows && NV * VW <= kMaxPanelWidth,
                "a tile must fit the callers' tile buffers (acc_t tile[kMaxRows * kMaxPanelWidth], micro.h)");
  Kernels<S> k;
  k.vw = VW;
  k.nv = NV;
  k.mr = MR;
  if constexpr (kIsBf16<S>) {
    ((k.fns[R] = &micro_bf16<VW, NV, R + 1>), ...);
  } else {
    ((k.fns[R] = &micro<S, VW, NV, R + 1>), ...);
    if constexpr (NV == 3) {
      static_assert(MR * (NV + 1) * VW <= kMaxRows * kMaxPanelWidth, "a split tile must fit the callers' tile buffers");
      ((k.split[R] = &micro<S, VW, NV, R + 1, true>), ...);
    }
  }
  return k;
}

// The panel shape for `groups` gate blocks: NV vectors per K row and MR rows per tile, as many
// accumulators as the register file holds with room for the panel's row (32 vector registers with
// AVX-512, 16 otherwise). groups must divide NV*VW (units = NV*VW / groups). Four gates (or one)
// with AVX-512: 6 rows x 4 vectors at every batch size. (A 12 x 2 tile for batches up to 12, one
// pass over each panel a step, lost once small tiles got their split accumulators: on the 2-core
// EPYC the LSTM forward at (8, 256, ., 1024) runs 188 GF/s with 6 x 4 against 167, at B = 12 199
// against 135; in bfloat16 372 against 209 — bench/NOTES.md.) bfloat16 takes the same shapes
// (float32 accumulators).
//
// The weight gradient's tile (float32, float64): 6 rows x 4 vectors with AVX-512, 6 x 2 otherwise,
// the recurrent product's own register budget.
template <typename S>
Kernels<S> kernels(int groups) {
  constexpr int VW = kVectorBytes / static_cast<int>(sizeof(acc_t<S>));
  Kernels<S> k;
  if constexpr (kVectorBytes == 64) {
    k = groups == 3 ? table<S, VW, 3, 8>(std::make_integer_sequence<int, 8>{})
                    : table<S, VW, 4, 6>(std::make_integer_sequence<int, 6>{});
  } else {
    k = groups == 3 ? table<S, VW, 3, 4>(std::make_integer_sequence<int, 4>{})
                    : table<S, VW, 2, 6>(std::make_integer_sequence<int, 6>{});
  }
  if constexpr (!kIsBf16<S>) wgrad_table<S, VW, kVectorBytes == 64 ? 4 : 2>(k, std::make_integer_sequence<int, 6>{});
  return k;
}

#if MMRNN_BF16_DOT
template Kernels<c10::BFloat16> kernels<c10::BFloat16>(int);
#else
template Kernels<float> kernels<float>(int);
template Kernels<double> kernels<double>(int);
template Kernels<c10::BFloat16> kernels<c10::BFloat16>(int);
#endif
