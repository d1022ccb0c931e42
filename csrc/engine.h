// The recurrence engine shared by the three cells' CPU kernels: the per-step product
// C[B, N] = A[B, K] @ W' run by our own register-blocked micro-kernels on W' packed once per call,
// with each cell's elementwise pass (gates, state update, lengths mask) fused onto every output
// tile while it is still in L1, and every thread of a step working at once (one barrier per step).
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
// ISA. AVX-512, AVX2+FMA and a portable 128-bit path are compiled into every build, one compile unit
// per ISA (micro_<isa>.cpp: the GCC vector-extension templates of micro_kernels.h under that ISA's
// target pragma; the interface is micro.h) and chosen at run time from the CPU's flags;
// MMRNN_CPU_ISA=avx512_bf16|avx512|avx2|generic caps the choice (tests force each path on one machine).
//
// bfloat16. Storage S = bfloat16 computes in float32 (acc_t<S>): W' holds bf16 pairs (rows k and
// k + 1 of a column side by side, each part's odd last row paired with a zero), so that one 32-bit
// lane holds what the CPU's bf16 dot instruction (vdpbf16ps, avx512_bf16) multiplies into one
// float32 lane; without that instruction the same panels are widened to float32 in registers (a
// shift and a mask per pair) and run through FMAs. The operands A (x, h, gradients) stay bf16 in
// memory; the tile, the gate pass and the carried state are float32.
#pragma once

#include "common.h"
#include "micro.h"

#if MMRNN_X86
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace mmrnn {

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

// The micro-kernel family of an ISA for panels of `groups` gate blocks, from that ISA's compile unit
// (micro.h): the bf16 dot instruction serves bfloat16 only, float32/64 take the AVX-512 family there.
template <typename S>
Kernels<S> kernels_for(Isa isa, int groups) {
  switch (isa) {
#if MMRNN_X86
    case Isa::kAvx512Bf16:
      if constexpr (kIsBf16<S>) return avx512_bf16::kernels<S>(groups);
      return avx512::kernels<S>(groups);
    case Isa::kAvx512: return avx512::kernels<S>(groups);
    case Isa::kAvx2: return avx2::kernels<S>(groups);
#endif
    default: return generic::kernels<S>(groups);
  }
}

// W' packed into panels (see the top of this file), with the kernels that read it. A panel holds
// `stride` values: K rows of `width` (bfloat16: ceil(K1/2) + ceil((K - K1)/2) pair rows of 2 x width).
// split: the tiles run the split kernels (Kernels::split; the GRU's fused input product), whose
// last gate block's sum over x's rows follows the tile's rows (at tile + rows * width + r * units).
template <typename S>
struct PackedWeight {
  Kernels<S> kern;
  // K1: the rows whose operand is the step's first part (x): W_ih's in a fused input product, the
  // r and z rows in the GRU's BPTT (gru_cpu.cpp)
  int64_t K = 0, K1 = 0, H = 0, groups = 1, units = 0, width = 0, panels = 0, stride = 0;
  bool split = false;
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
  // Pause-spins before yielding. A step's wait for the other threads is usually a few microseconds;
  // 4000 pauses outlast that on every CPU (a pause takes from a few to ~140 cycles, by vendor and
  // generation), and past them the thread yields, so that a core shared with another call is given up.
  static constexpr int kSpinsBeforeYield = 4000;

  explicit StepBarrier(int64_t workers) : workers_(workers) {}
  void arrive_and_wait(int64_t count, int64_t generation) {
    arrived_.fetch_add(count, std::memory_order_acq_rel);
    const int64_t target = workers_ * (generation + 1);
    for (int spins = 0; arrived_.load(std::memory_order_acquire) < target; ++spins) {
      if (spins < kSpinsBeforeYield) {
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

// The smallest step worth splitting over threads: 2^18 FLOPs are ~1-2 us on one core (100-200
// GF/s), about what a barrier between the threads costs; a smaller step runs on one thread.
constexpr int64_t kMinParallelStepFlops = int64_t(1) << 18;

// How many workers share a step: one per thread, fewer when a step is too small to repay a barrier,
// never more than there are panels (the worker counts measured; run_steps splits the tiles).
inline int64_t step_workers(int64_t flops_per_step, int64_t panels) {
  int64_t n = parallel_threads();
  if (flops_per_step < kMinParallelStepFlops) n = 1;
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

// A thread's L2 as run_steps' prefetch plans it (512 KB on Zen 1-3, 1-2 MB on Intel's server cores:
// the smaller serves both), and the largest panel prefetched (two side by side fit in it).
constexpr int64_t kL2Bytes = int64_t(512) << 10;
constexpr int64_t kPrefetchMaxPanelBytes = kL2Bytes / 2;

// Runs `steps` dependent products with the epilogue fused: for s in [0, steps), every tile of
//   tile = [x_s | h_s] @ W'  (Operands a_of(s); a null h_s means a zero product)
// is handed to epi(s, b0, rows, j0, units, tile, ld_tile) (tile in acc_t<T>) — rows [b0, b0 + rows) and hidden units
// [j0, j0 + units) (fewer than pw.units in the last panel), gate g of unit j0 + u at
// tile[r * ld_tile + g * pw.units + u]. Step s + 1 starts after every tile of step s is through
// its epilogue. Called with the GIL released.
template <typename T, class AOf, class Epi>
void run_steps(const PackedWeight<T>& pw, int64_t steps, int64_t B, AOf a_of, Epi epi) {
  if (steps == 0 || B == 0 || pw.H == 0) return;
  const int mr = pw.kern.mr;
  const int64_t blocks = (B + mr - 1) / mr, tiles = pw.panels * blocks;
  const int64_t workers = step_workers(2 * B * pw.K * pw.groups * pw.H, pw.panels);
  StepBarrier barrier(workers);
  // Weights that outgrow a thread's L2 (LSTM W_hh at H = 1024 is 16 MB) are read from L3 or memory
  // every step; two habits keep that stream from stalling the kernels (LSTM at (8, 512, ., 1024),
  // 2-core Zen 1 EPYC, AVX2: forward 795 -> 640 ms, BPTT 736 -> 636 ms; bench/NOTES.md, "Training"):
  //  - a thread walks its tiles in alternating directions (even steps up, odd steps down), so the
  //    panels it read last in one step, still in its caches, are the first it reads in the next;
  //  - during a panel's last tile the kernel prefetches the thread's next panel into L2
  //    (row for row, at the pace of the product), so the next panel's first block finds it there.
  //    Only where a thread's panels exceed L2 (512 KB: Zen's), two panels fit in it and a panel
  //    takes two row blocks or more: with one block (B <= 6 on AVX2) the product reads each panel
  //    once, the hardware's own stream prefetch already overlaps it, and a prefetch per row costs
  //    a load slot of a load-bound kernel (B = 1, (1, 512, 128, 64, 256) inference: 13.1 -> 16.3 ms).
  //    The alternating walk too only where a thread's panels exceed L2: where they fit it gains
  //    nothing and cost 1.5-3.5% (2-layer bidirectional LSTM (16,200,80,64,256) inference, two A/B runs).
  const int64_t panel_bytes = pw.stride * static_cast<int64_t>(sizeof(T));
  const bool streamed = pw.panels / workers * panel_bytes > kL2Bytes;
  const bool prefetch = streamed && blocks >= 2 && panel_bytes <= kPrefetchMaxPanelBytes;
  // A worker takes a contiguous run of the step's tiles (panel-major: every row block of a panel,
  // then the next panel), not whole panels, so that the work splits evenly where the panels do not:
  // a BPTT at H = 320 has 5 panels of 64 columns (AVX-512), 2 + 3 between two threads, and at B = 24
  // 20 tiles, 10 + 10 (LSTM BPTT at (24, 100, ., 320) 14.0 -> 11.7 ms, the RNN's training step
  // 12.2 -> 11.2 ms, 2-core Zen 4 EPYC). A tile is computed whole by whichever worker takes it, so
  // the results do not depend on the split (nor on the thread count).
  auto run = [&](int64_t w0, int64_t w1) {
    using C = acc_t<T>;
    alignas(64) C tile[kMaxRows * kMaxPanelWidth];
    const int64_t ta = w0 * tiles / workers, tb = w1 * tiles / workers;
    for (int64_t s = 0; s < steps; ++s) {
      const Operands<T> a = a_of(s);
      const bool rev = streamed && (s & 1) != 0;
      for (int64_t i = ta; i < tb; ++i) {
        const int64_t it = rev ? ta + tb - 1 - i : i, p = it / blocks, blk = it % blocks;
        // the panel this worker reads next: fetched during this panel's last tile (in walk order)
        const int64_t nxt = rev ? it - 1 : it + 1;
        const T* pf = prefetch && nxt >= ta && nxt < tb && nxt / blocks != p ? pw.panel(nxt / blocks) : nullptr;
        const int64_t j0 = p * pw.units, nu = std::min(pw.units, pw.H - j0);
        // rows spread evenly over the blocks (8 rows as 4 + 4, not 6 + 2)
        const int64_t b0 = blk * B / blocks, rows = (blk + 1) * B / blocks - b0;
        if (a.h != nullptr) {
          (pw.split ? pw.kern.split : pw.kern.fns)[rows - 1](a.x == nullptr ? nullptr : a.x + b0 * a.ldx, a.ldx, pw.K1,
                                                             a.h + b0 * a.ldh, a.ldh, pw.panel(p), pw.K, tile, pf);
        } else {
          std::fill(tile, tile + rows * (pw.width + (pw.split ? pw.units : 0)), C(0));
        }
        epi(s, b0, rows, j0, nu, static_cast<const C*>(tile), pw.width);
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
    alignas(64) acc_t<T> tile[kMaxRows * kMaxPanelWidth];
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t r_end = std::min(M, (c + 1) * chunk);
      for (int64_t p = 0; p < pw.panels; ++p) {
        const int64_t j0 = p * pw.units, nu = std::min(pw.units, N - j0);
        for (int64_t r0 = c * chunk; r0 < r_end; r0 += mr) {
          const int64_t rows = std::min<int64_t>(mr, r_end - r0);
          pw.kern.fns[rows - 1](nullptr, 0, 0, a + r0 * K, K, pw.panel(p), K, tile, nullptr);
          for (int64_t r = 0; r < rows; ++r) std::copy(tile + r * pw.width, tile + r * pw.width + nu, out + (r0 + r) * N + j0);
        }
      }
    }
  });
}

// The weight gradient dW = sum_k dA[k, :]^T Z[k, :] over the K = T * B rows of a layer's step
// gradients dA [K, M] (rows lda apart; M gate units, possibly a column slice of a wider tensor) and
// Z = [x | h_{t-1}], each column block of Z (a WgradPart) read where it lies: row k of a part at
// first + k * ld for k < split, else at rest + (k - split) * ld (h_{t-1}: h0's B rows, then out's),
// its gradient written to out [M, width]. Nothing is packed but the columns past a part's last full
// vector. A thread owns a run of row blocks of dW (no reduction between threads, so the results do
// not depend on the thread count); K is cut into chunks whose Z rows fit half of a thread's L2,
// each chunk's tile added to dW in chunk order (the first one stored). A part may read its own dA
// for the rows of dW from tail_row on (tail: their row k at tail + k * ld_tail): the GRU's dW_hh,
// whose n rows read d(W_hn h + b_hn) where its dW_ih reads dn, in the same pass as dW_ih.
template <typename T>
struct WgradPart {
  const T* first;
  const T* rest;
  int64_t split, ld, width;
  T* out;
  const T* tail = nullptr;
  int64_t ld_tail = 0, tail_row = 0;
};

template <typename T>
void weight_grad(const Kernels<T>& kern, const T* a, int64_t lda, int64_t M, int64_t K,
                 const std::vector<WgradPart<T>>& parts) {
  if (M == 0) return;
  if (K == 0) {
    for (const auto& part : parts) std::fill(part.out, part.out + M * part.width, T(0));
    return;
  }
  const int mr = kern.wg_mr, nv = kern.wg_nv, vw = kern.vw, pw = nv * vw;
  int64_t row_bytes = 0;
  for (const auto& part : parts) row_bytes += part.width * static_cast<int64_t>(sizeof(T));
  // Chunks of K: Z's rows of a chunk in half a thread's L2, and at least 128 rows (shorter ones add
  // their tiles to dW too often). Where a thread's share of dW is several times L2, every chunk
  // reads and writes that share again from further out: 384 rows or more there. Measured on the
  // 2-core Zen 4 EPYC (GF/s by rows per chunk): LSTM (32,128,128,.,256) 207 at 128, 189 at 384;
  // (24,100,96,.,320) 208 / 203; (64,256,256,.,512) 188 / 185; (8,512,128,.,1024) 175 / 187.
  int64_t kc = std::clamp<int64_t>(kL2Bytes / 2 / std::max<int64_t>(row_bytes, 1), 128, 1024);
  const int64_t share = (M + parallel_threads() - 1) / parallel_threads() * row_bytes;
  if (share > 4 * kL2Bytes) kc = std::max<int64_t>(kc, 384);
  // row blocks of mr rows, cut where a part's tail rows begin (a block reads one dA)
  std::vector<int64_t> starts;
  {
    std::vector<int64_t> cuts = {0, M};
    for (const auto& part : parts)
      if (part.tail != nullptr && part.tail_row > 0 && part.tail_row < M) cuts.push_back(part.tail_row);
    std::sort(cuts.begin(), cuts.end());
    cuts.erase(std::unique(cuts.begin(), cuts.end()), cuts.end());
    for (size_t c = 0; c + 1 < cuts.size(); ++c)
      for (int64_t m = cuts[c]; m < cuts[c + 1]; m += mr) starts.push_back(m);
    starts.push_back(M);
  }
  const int64_t blocks = static_cast<int64_t>(starts.size()) - 1;
  // a part's rows from row k0 on (a chunk never crosses a part's split)
  auto rows_at = [](const WgradPart<T>& part, int64_t k0) {
    return k0 < part.split ? part.first + k0 * part.ld : part.rest + (k0 - part.split) * part.ld;
  };
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    alignas(64) T tile[kMaxRows * kMaxPanelWidth];
    // each part's columns past its last full vector, padded to one vector (room only where there are some)
    const bool any_tail = std::any_of(parts.begin(), parts.end(), [&](const auto& p) { return p.width % vw != 0; });
    std::vector<T> tails(any_tail ? parts.size() * kc * vw : 0);
    for (int64_t k0 = 0; k0 < K;) {
      int64_t k1 = std::min(K, k0 + kc);
      for (const auto& part : parts)
        if (part.split > k0 && part.split < k1) k1 = part.split;
      const int64_t kn = k1 - k0;
      for (size_t q = 0; q < parts.size(); ++q) {
        const auto& part = parts[q];
        const int64_t c0 = part.width / vw * vw, tw = part.width - c0;
        if (tw == 0) continue;
        const T* z = rows_at(part, k0);
        T* dst = tails.data() + q * kc * vw;
        for (int64_t k = 0; k < kn; ++k) {
          std::copy(z + k * part.ld + c0, z + k * part.ld + part.width, dst + k * vw);
          std::fill(dst + k * vw + tw, dst + (k + 1) * vw, T(0));
        }
      }
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t m0 = starts[blk], rows = std::min<int64_t>(mr, starts[blk + 1] - m0);
        for (size_t q = 0; q < parts.size(); ++q) {
          const auto& part = parts[q];
          const bool in_tail = part.tail != nullptr && m0 >= part.tail_row;
          const int64_t ld_a = in_tail ? part.ld_tail : lda;
          const T* ab = in_tail ? part.tail + k0 * ld_a + (m0 - part.tail_row) : a + k0 * lda + m0;
          const T* z = rows_at(part, k0);
          for (int64_t c = 0; c < part.width; c += pw) {
            const int64_t w = std::min<int64_t>(pw, part.width - c), full = w / vw * vw;
            int n = static_cast<int>(full / vw);
            auto add = [&](int64_t cc, int64_t ww, int64_t ld_tile) {  // dW[m0.., cc..cc + ww] (+)= tile
              for (int64_t r = 0; r < rows; ++r) {
                T* o = part.out + (m0 + r) * part.width + cc;
                const T* t = tile + r * ld_tile;
                if (k0 == 0) std::copy(t, t + ww, o);
                else
                  for (int64_t u = 0; u < ww; ++u) o[u] += t[u];
              }
            };
            if (n > 0) {
              kern.wg[rows - 1][n - 1](ab, ld_a, z + c, part.ld, kn, tile);
              add(c, full, n * vw);
            }
            if (full < w) {  // the padded columns past the last full vector
              kern.wg[rows - 1][0](ab, ld_a, tails.data() + q * kc * vw, vw, kn, tile);
              add(c + full, w - full, vw);
            }
          }
        }
      }
      k0 = k1;
    }
  });
}

}  // namespace mmrnn
