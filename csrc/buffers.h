// The engine's large [T, B, .] buffers (outputs, what training saves, BPTT's gradients, the input
// product) come from a small cache of blocks instead of straight from the system.
//
// Why: torch's CPU allocator hands every large request to the system fresh (glibc maps it, and
// unmaps it on free), so each of a training step's buffers is first-touch page faulted again every
// step: 134 MB of 4 KB pages cost ~40 ms to fault on the 2-core Zen 4 EPYC, ~9 ms with transparent
// huge pages (madvise). Huge pages were the engine's answer until they were seen to stall now and
// then: the LSTM forward at (64, 256, ., ., 512) took 205-215 ms on most calls but 340-560 ms on
// some (the kernel assembling 2 MB pages out of memory freed as 4 KB pages by other allocations),
// which made whole training steps swing between 0.77 and 1.0 s beside torch's steady 1.03 s
// (bench/NOTES.md, "Training on AVX-512"). A block kept here is reused warm: no fault, no zeroing.
//
// The cache holds blocks freed by tensors that die (a block is in use exactly as long as its
// tensor's storage lives) up to a limit, MMRNN_CPU_CACHE_MB (default: the smaller of 1024 MB and a
// sixteenth of the machine's memory; 0 turns the cache off); mmrnn_ext.empty_cache() gives every
// cached block back. Requests under 2 MB go to torch's allocator. Storage made here is resizable
// (the allocator is registered with it), so a tensor from the engine behaves as any other.
#pragma once

#include <ATen/ATen.h>

#include <cstddef>

namespace mmrnn {

// An uninitialised CPU tensor; large ones from the block cache.
at::Tensor empty_huge(at::IntArrayRef sizes, const at::TensorOptions& options);

// The bytes cached now (blocks not in use), the bytes in use, and the limit.
struct BufferCacheStats {
  size_t cached = 0, in_use = 0, limit = 0;
};
BufferCacheStats buffer_cache_stats();

// Frees every cached block (blocks in use are freed when their tensors die).
void buffer_cache_release();

}  // namespace mmrnn
