#include "convcore/threading.h"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <new>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include <unistd.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "convcore/errors.h"
#include "strided.h"

namespace convcore {

namespace {
std::atomic<int> g_num_threads{0};  // 0: not set yet, use OpenMP's default
std::atomic<int> g_calls_in_flight{0};
thread_local int t_threads_override = 0;  // 0: none (detail::ThreadsOverride)
}

void set_num_threads(int n) {
  if (n < 1) throw ValueError("set_num_threads: n must be at least 1, got " + std::to_string(n));
  g_num_threads.store(n);
}

int get_num_threads() {
  if (t_threads_override > 0) return t_threads_override;
  int n = g_num_threads.load();
  return n > 0 ? n : omp_get_max_threads();
}

namespace {
thread_local int64_t t_workspace_now = 0;
thread_local int64_t t_workspace_peak = 0;
}  // namespace

int64_t workspace_peak_bytes() { return t_workspace_peak; }
void reset_workspace_peak() { t_workspace_peak = t_workspace_now; }

namespace {
std::atomic<int64_t> g_workspace_limit{0};  // 0: physical memory
}  // namespace

int64_t physical_memory_bytes() {
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  if (pages <= 0 || page <= 0) return INT64_MAX;  // unknown: only the allocator decides
  return static_cast<int64_t>(pages) * page;
}

void set_workspace_limit(int64_t bytes) {
  if (bytes < 0)
    throw ValueError("set_workspace_limit: bytes must be non-negative, got " + std::to_string(bytes));
  g_workspace_limit.store(bytes);
}

int64_t workspace_limit() {
  const int64_t limit = g_workspace_limit.load();
  return limit > 0 ? limit : physical_memory_bytes();
}

namespace {
constexpr size_t kHugePage = size_t(2) << 20;  // x86-64's transparent huge page
constexpr size_t kPage = size_t(4) << 10;

// Freed scratch blocks (kCachedScratchBytes and more), kept for the next
// call: a fresh block's pages are zeroed by the kernel at first touch, so a
// training step of ResNet-18 at batch 16 (about 20 blocks of 9-38 MB) spent
// a quarter of its CPU time zeroing pages. Blocks are handed out best fit
// (at most twice the size asked for); the least recently freed go first
// past the limit. The default limit, an eighth of the machine's memory
// within [256 MB, 4 GB], holds what a training step at batch 16 frees by
// its end for the next step to find (docs/training.md, tenth session).
size_t default_scratch_cache_limit() {
  constexpr int64_t kLeast = int64_t(256) << 20, kMost = int64_t(4) << 30;
  const int64_t memory = physical_memory_bytes();  // INT64_MAX when unknown
  if (memory == INT64_MAX) return static_cast<size_t>(kLeast);
  return static_cast<size_t>(std::clamp(memory / 8, kLeast, kMost));
}

struct ScratchCache {
  std::mutex mutex;
  std::unordered_map<void*, size_t> sizes;     // every large block alive
  std::vector<std::pair<void*, size_t>> idle;  // freed, oldest first
  size_t idle_bytes = 0;
  size_t limit = default_scratch_cache_limit();

  void trim_locked() {
    while (idle_bytes > limit) {
      const auto [p, bytes] = idle.front();
      idle.erase(idle.begin());
      idle_bytes -= bytes;
      sizes.erase(p);
      std::free(p);
    }
  }
};

ScratchCache& scratch_cache() {
  static ScratchCache* cache = new ScratchCache;  // never destroyed: frees may run at exit
  return *cache;
}
}  // namespace

void set_scratch_cache_limit(int64_t bytes) {
  if (bytes < 0)
    throw ValueError("set_scratch_cache_limit: bytes must be non-negative, got " +
                     std::to_string(bytes));
  ScratchCache& c = scratch_cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  c.limit = static_cast<size_t>(bytes);
  c.trim_locked();
}

int64_t scratch_cache_limit() {
  ScratchCache& c = scratch_cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  return static_cast<int64_t>(c.limit);
}

int64_t scratch_cache_bytes() {
  ScratchCache& c = scratch_cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  return static_cast<int64_t>(c.idle_bytes);
}

namespace detail {
std::size_t workspace_bytes(int64_t count, int64_t per, std::size_t elem_size, const char* what) {
  int64_t n = 0, bytes = 0;
  const bool overflow = count < 0 || per < 0 || __builtin_mul_overflow(count, per, &n) ||
                        __builtin_mul_overflow(n, static_cast<int64_t>(elem_size), &bytes);
  const int64_t limit = workspace_limit();
  if (overflow || bytes > limit)
    throw MemoryError(std::string("convcore: ") + what + " needs " +
                      (overflow ? std::string("more than 2^63") : std::to_string(bytes)) +
                      " bytes of scratch memory, more than the workspace limit of " +
                      std::to_string(limit) +
                      " bytes (set_workspace_limit: convcore._core in Python, convcore:: in C++)");
  return static_cast<std::size_t>(n);
}

[[noreturn]] void workspace_failed(std::size_t bytes, const char* what) {
  throw MemoryError(std::string("convcore: ") + what + " could not allocate " +
                    std::to_string(bytes) + " bytes of scratch memory");
}

void workspace_acquired(int64_t bytes) {
  t_workspace_now += bytes;
  t_workspace_peak = std::max(t_workspace_peak, t_workspace_now);
}
void workspace_released(int64_t bytes) { t_workspace_now -= bytes; }

void* allocate_scratch(size_t bytes, ScratchUse use) {
  if (bytes < kCachedScratchBytes) {
    void* p = std::malloc(bytes);
    if (!p) throw std::bad_alloc();
    return p;
  }
  const bool large = use == ScratchUse::Workspace || bytes >= kLargeScratchBytes;
  const size_t align = large ? kHugePage : kPage;
  const size_t rounded = (bytes + align - 1) / align * align;
  ScratchCache& c = scratch_cache();
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    size_t best = c.idle.size();
    for (size_t i = 0; i < c.idle.size(); ++i) {
      const size_t have = c.idle[i].second;
      const bool huge = reinterpret_cast<uintptr_t>(c.idle[i].first) % kHugePage == 0;
      if (have >= rounded && have / 2 <= rounded && (huge || !large) &&
          (best == c.idle.size() || have < c.idle[best].second))
        best = i;
    }
    if (best < c.idle.size()) {
      void* p = c.idle[best].first;
      c.idle_bytes -= c.idle[best].second;
      c.idle.erase(c.idle.begin() + static_cast<std::ptrdiff_t>(best));
      return p;
    }
  }
  void* p = std::aligned_alloc(align, rounded);
  if (!p) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (large) madvise(p, rounded, MADV_HUGEPAGE);  // advice only: failure leaves 4 KB pages
#endif
  std::lock_guard<std::mutex> lock(c.mutex);
  c.sizes.emplace(p, rounded);
  return p;
}

void free_scratch(void* p) {
  if (!p) return;
  ScratchCache& c = scratch_cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  const auto it = c.sizes.find(p);
  if (it == c.sizes.end()) {  // a small block, from malloc
    std::free(p);
    return;
  }
  c.idle.emplace_back(p, it->second);
  c.idle_bytes += it->second;
  c.trim_locked();
}

CallScope::CallScope() { g_calls_in_flight.fetch_add(1); }
CallScope::~CallScope() { g_calls_in_flight.fetch_sub(1); }

ThreadsOverride::ThreadsOverride(int threads) : previous_(t_threads_override) {
  t_threads_override = threads;
}
ThreadsOverride::~ThreadsOverride() { t_threads_override = previous_; }

int threads_for(int64_t tasks, int64_t work) {
  constexpr int64_t kMinWorkPerThread = 32768;
  const int calls = std::max(1, g_calls_in_flight.load());
  const int share = std::max(1, get_num_threads() / calls);
  int64_t n = std::min<int64_t>(share, tasks);
  if (work >= 0) n = std::min<int64_t>(n, work / kMinWorkPerThread);
  return static_cast<int>(std::max<int64_t>(1, n));
}
}  // namespace detail

}  // namespace convcore
