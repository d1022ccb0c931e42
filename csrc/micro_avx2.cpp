// The engine's micro-kernels (micro_kernels.h) compiled for AVX2 + FMA. The interface is micro.h.
#include "micro.h"

#if MMRNN_X86
#include <cstring>
#include <utility>

MMRNN_TARGET_PUSH("avx2,fma")

namespace mmrnn {
namespace avx2 {

constexpr int kVectorBytes = 32;
#define MMRNN_BF16_DOT 0
#include "micro_kernels.h"
#undef MMRNN_BF16_DOT

}  // namespace avx2
}  // namespace mmrnn

MMRNN_TARGET_POP()
#endif  // MMRNN_X86
