// The engine's bfloat16 micro-kernels (micro_kernels.h) compiled for AVX-512 with the bf16 dot
// instruction (float32 and float64 take micro_avx512.cpp's). The interface is micro.h.
#include "micro.h"

#if MMRNN_X86
#include <cstring>
#include <utility>

#include <immintrin.h>

MMRNN_TARGET_PUSH("avx512f,avx512vl,avx512dq,avx512bf16,avx2,fma")

namespace mmrnn {
namespace avx512_bf16 {

constexpr int kVectorBytes = 64;
#define MMRNN_BF16_DOT 1
#include "micro_kernels.h"
#undef MMRNN_BF16_DOT

}  // namespace avx512_bf16
}  // namespace mmrnn

MMRNN_TARGET_POP()
#endif  // MMRNN_X86
