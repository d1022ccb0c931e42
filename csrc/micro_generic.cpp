// The engine's micro-kernels (micro_kernels.h) compiled for the portable path: 128-bit vectors on
// the compiler's own target (NEON on aarch64). The interface is micro.h.
#include "micro.h"

#include <cstring>
#include <utility>

namespace mmrnn {
namespace generic {

constexpr int kVectorBytes = 16;
#define MMRNN_BF16_DOT 0
#include "micro_kernels.h"
#undef MMRNN_BF16_DOT

}  // namespace generic
}  // namespace mmrnn
