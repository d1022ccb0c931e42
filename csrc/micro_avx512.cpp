// The engine's micro-kernels (micro_kernels.h) compiled for AVX-512 (F, VL, DQ). The interface is
// micro.h.
#include "micro.h"

#if MMRNN_X86
#include <cstring>
#include <utility>

MMRNN_TARGET_PUSH("avx512f,avx512vl,avx512dq,avx2,fma")

namespace mmrnn {
namespace avx512 {

constexpr int kVectorBytes = 64;
#define MMRNN_BF16_DOT 0
#include "micro_kernels.h"
#undef MMRNN_BF16_DOT

}  // namespace avx512
}  // namespace mmrnn

MMRNN_TARGET_POP()
#endif  // MMRNN_X86
