// Which machine family this compile is for. The x86 micro-kernels (one compile unit per ISA,
// intrinsics) exist only on x86; elsewhere (aarch64 Linux, macOS arm64) the engine runs its portable
// 128-bit path (NEON on aarch64).
#pragma once

#if defined(__x86_64__) || defined(__i386__)
#define MMRNN_X86 1
#else
#define MMRNN_X86 0
#endif
