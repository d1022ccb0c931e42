// The block cache behind empty_huge (see buffers.h).
#include "buffers.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <unordered_map>

#include <unistd.h>
#ifdef __linux__
#include <sys/mman.h>
#endif

namespace mmrnn {
namespace {

constexpr size_t kBlock = size_t(2) << 20;  // blocks are whole 2 MB pages (and aligned to them)

size_t default_limit() {
  size_t limit = size_t(1024) << 20;
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  if (pages > 0 && page > 0) limit = std::min(limit, static_cast<size_t>(pages) * static_cast<size_t>(page) / 16);
  const char* env = std::getenv("MMRNN_CPU_CACHE_MB");
  if (env != nullptr && *env != '\0') {
    char* end = nullptr;
    const long long mb = std::strtoll(env, &end, 10);
    TORCH_CHECK(end != env && *end == '\0' && mb >= 0, "MMRNN_CPU_CACHE_MB: expected a whole number of MB >= 0, got '",
                env, "'");
    limit = static_cast<size_t>(mb) << 20;
  }
  return limit;
}

class BlockCache {
 public:
  static BlockCache& get() {
    static BlockCache* cache = new BlockCache();  // never destroyed: tensors may die after static destruction
    return *cache;
  }

  void* take(size_t bytes) {
    const size_t size = (bytes + kBlock - 1) / kBlock * kBlock;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      // the smallest cached block that holds it, unless it would waste more than a quarter
      auto it = free_.lower_bound(size);
      if (it != free_.end() && it->first <= size + size / 4) {
        void* p = it->second;
        cached_ -= it->first;
        in_use_ += it->first;
        free_.erase(it);
        return p;
      }
    }
    void* p = nullptr;
    TORCH_CHECK(posix_memalign(&p, kBlock, size) == 0 && p != nullptr, "mmrnn_ext: out of memory allocating ",
                size, " bytes");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(p, size, MADV_HUGEPAGE);  // advisory: where it fails, 4 KB pages serve
#endif
    std::lock_guard<std::mutex> lock(mutex_);
    sizes_[p] = size;
    in_use_ += size;
    return p;
  }

  void give(void* p) {
    std::unique_lock<std::mutex> lock(mutex_);
    const size_t size = sizes_.at(p);
    in_use_ -= size;
    if (cached_ + size > limit_) {
      sizes_.erase(p);
      lock.unlock();
      std::free(p);
      return;
    }
    free_.emplace(size, p);
    cached_ += size;
  }

  void release() {
    std::multimap<size_t, void*> blocks;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      blocks.swap(free_);
      for (const auto& b : blocks) sizes_.erase(b.second);
      cached_ = 0;
    }
    for (const auto& b : blocks) std::free(b.second);
  }

  BufferCacheStats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {cached_, in_use_, limit_};
  }

  size_t limit() const { return limit_; }

 private:
  BlockCache() : limit_(default_limit()) {}

  std::mutex mutex_;
  std::multimap<size_t, void*> free_;       // cached blocks by size
  std::unordered_map<void*, size_t> sizes_;  // every block made here and not freed: its size
  size_t cached_ = 0, in_use_ = 0;
  const size_t limit_;
};

void give_back(void* p) {
  if (p != nullptr) BlockCache::get().give(p);
}

struct CachedAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t bytes) override {
    void* p = bytes == 0 ? nullptr : BlockCache::get().take(bytes);
    return {p, p, &give_back, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &give_back; }
  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }
};

CachedAllocator& allocator() {
  static CachedAllocator* a = new CachedAllocator();
  return *a;
}

}  // namespace

at::Tensor empty_huge(at::IntArrayRef sizes, const at::TensorOptions& options) {
  TORCH_CHECK(options.device().is_cpu(), "empty_huge: expected a CPU tensor");
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  const size_t bytes = static_cast<size_t>(numel) * options.dtype().itemsize();
  if (bytes < kBlock || BlockCache::get().limit() == 0) return at::empty(sizes, options);
  return at::detail::empty_generic(sizes, &allocator(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   options.dtype().toScalarType(), std::nullopt);
}

BufferCacheStats buffer_cache_stats() { return BlockCache::get().stats(); }

void buffer_cache_release() { BlockCache::get().release(); }

}  // namespace mmrnn
