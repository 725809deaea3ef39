// Small internal helpers shared by the op files: typed dispatch and
// contiguous copies of strided views.
#pragma once
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "convcore/errors.h"
#include "convcore/shapes.h"
#include "convcore/tensor.h"
#include "scratch.h"

namespace convcore {
namespace detail {

// Calls fn(T{}) with T = float or double according to dtype.
template <typename Fn>
void dispatch_float(DType dtype, Fn&& fn) {
  if (dtype == DType::Float32)
    fn(float{});
  else if (dtype == DType::Float64)
    fn(double{});
  else
    throw TypeError(std::string("expected float32 or float64, got ") + dtype_name(dtype));
}

// Short runs of a frame's rows (a 14-float row of a 14x14 plane, a pad of
// one column) as fixed-size moves the compiler inlines: through std::copy
// and std::fill each was a library call, whose cost outweighed the bytes
// (docs/training.md, twenty-fifth session). Runs past 256 bytes take the
// library's copy. T is trivially copyable; src and dst do not overlap.
template <int Bytes>
inline void move_overlapping(char* d, const char* s, int64_t bytes) {
  std::memcpy(d, s, Bytes);
  std::memcpy(d + bytes - Bytes, s + bytes - Bytes, Bytes);
}
template <typename T>
inline void copy_run(const T* src, int64_t n, T* dst) {
  const int64_t bytes = n * static_cast<int64_t>(sizeof(T));
  const char* s = reinterpret_cast<const char*>(src);
  char* d = reinterpret_cast<char*>(dst);
  if (bytes > 256) {
    std::memcpy(d, s, static_cast<size_t>(bytes));
  } else if (bytes >= 32) {
    int64_t i = 0;
    for (; i + 32 <= bytes; i += 32) std::memcpy(d + i, s + i, 32);
    if (i < bytes) std::memcpy(d + bytes - 32, s + bytes - 32, 32);
  } else if (bytes >= 16) {
    move_overlapping<16>(d, s, bytes);
  } else if (bytes >= 8) {
    move_overlapping<8>(d, s, bytes);
  } else if (bytes >= 4) {
    move_overlapping<4>(d, s, bytes);
  } else {
    for (int64_t i = 0; i < bytes; ++i) d[i] = s[i];
  }
}
template <int Bytes>
inline void zero_overlapping(char* d, int64_t bytes) {
  std::memset(d, 0, Bytes);
  std::memset(d + bytes - Bytes, 0, Bytes);
}
template <typename T>
inline void zero_run(T* dst, int64_t n) {
  const int64_t bytes = n * static_cast<int64_t>(sizeof(T));
  char* d = reinterpret_cast<char*>(dst);
  if (bytes > 256) {
    std::memset(d, 0, static_cast<size_t>(bytes));
  } else if (bytes >= 32) {
    int64_t i = 0;
    for (; i + 32 <= bytes; i += 32) std::memset(d + i, 0, 32);
    if (i < bytes) std::memset(d + bytes - 32, 0, 32);
  } else if (bytes >= 16) {
    zero_overlapping<16>(d, bytes);
  } else if (bytes >= 8) {
    zero_overlapping<8>(d, bytes);
  } else if (bytes >= 4) {
    zero_overlapping<4>(d, bytes);
  } else {
    for (int64_t i = 0; i < bytes; ++i) d[i] = 0;
  }
}

// Copies a strided view of T into a C-contiguous buffer.
template <typename T>
void copy_to_contiguous(const TensorView& t, T* dst) {
  const int64_t n = t.numel();
  if (n == 0) return;
  if (t.ndim == 0) {
    dst[0] = *t.ptr<T>();
    return;
  }
  const int last = t.ndim - 1;
  const int64_t inner = t.shape[last], inner_stride = t.strides[last];
  int64_t idx[kMaxDims] = {};
  const T* src = t.ptr<const T>();
  for (int64_t done = 0; done < n; done += inner) {
    int64_t offset = 0;
    for (int d = 0; d < last; ++d) offset += idx[d] * t.strides[d];
    const T* row = src + offset;
    for (int64_t j = 0; j < inner; ++j) dst[done + j] = row[j * inner_stride];
    for (int d = last - 1; d >= 0; --d) {  // odometer over the outer dims
      if (++idx[d] < t.shape[d]) break;
      idx[d] = 0;
    }
  }
}

// Bytes of scratch memory the calling thread holds now; the peak is what
// workspace_peak_bytes() reports.
void workspace_acquired(int64_t bytes);
void workspace_released(int64_t bytes);

// Elements of a piece of scratch memory of count * per elements of
// elem_size bytes; MemoryError naming `what` and the bytes when that
// overflows or is above workspace_limit(). Called before allocating.
std::size_t workspace_bytes(int64_t count, int64_t per, std::size_t elem_size, const char* what);
// Throws MemoryError for an allocation of `bytes` that failed.
[[noreturn]] void workspace_failed(std::size_t bytes, const char* what);

// A C-contiguous version of a view: the view itself when it already is one,
// else a copy owned by this object.
template <typename T>
class Contiguous {
 public:
  explicit Contiguous(const TensorView& t) : view_(t) {
    if (!t.is_contiguous()) {
      const size_t n = workspace_bytes(1, t.numel(), sizeof(T), "a contiguous copy of a strided input");
      try {
        copy_.resize(n);
      } catch (const std::bad_alloc&) {
        workspace_failed(n * sizeof(T), "a contiguous copy of a strided input");
      }
      workspace_acquired(copy_bytes());  // a copy is scratch memory too
      copy_to_contiguous<T>(t, copy_.data());
      view_ = contiguous_view(copy_.data(), t.dtype, t.ndim, t.shape);
    }
  }
  ~Contiguous() { workspace_released(copy_bytes()); }
  Contiguous(const Contiguous&) = delete;
  Contiguous& operator=(const Contiguous&) = delete;
  Contiguous(Contiguous&& other) noexcept : view_(other.view_), copy_(std::move(other.copy_)) {
    if (!copy_.empty()) view_.data = copy_.data();
    other.copy_.clear();
  }
  const T* data() const { return view_.ptr<const T>(); }
  const TensorView& view() const { return view_; }

 private:
  int64_t copy_bytes() const { return static_cast<int64_t>(copy_.size() * sizeof(T)); }
  TensorView view_;
  std::vector<T> copy_;
};

// Of n outputs t = 0 .. n-1 that read input index first + t * stride, those
// with t in [*lo, *hi) fall inside [0, size): the rest read padding. (The
// window loops of conv, depthwise and pooling split rows this way so their
// inner loops need no bounds test.)
inline void inside_range(int64_t first, int64_t stride, int64_t n, int64_t size, int64_t* lo,
                         int64_t* hi) {
  const int64_t l = first >= 0 ? 0 : (-first + stride - 1) / stride;
  const int64_t h = first >= size ? 0 : (size - 1 - first) / stride + 1;
  *lo = std::min(l, n);
  *hi = std::max(std::min(h, n), *lo);
}

// sum of p[0:n] in double, in 8 partial sums (a single running sum is one
// long chain of dependent additions; these vectorise), then added in order.
template <typename T>
inline double sum_to_double(const T* p, int64_t n) {
  double part[8] = {};
  const int64_t main = n / 8 * 8;
  for (int64_t q = 0; q < main; q += 8)
    for (int l = 0; l < 8; ++l) part[l] += static_cast<double>(p[q + l]);
  double sum = 0;
  for (int l = 0; l < 8; ++l) sum += part[l];
  for (int64_t q = main; q < n; ++q) sum += static_cast<double>(p[q]);
  return sum;
}

// Threads for a parallel loop of `tasks` independent pieces of work: the
// core's thread count, shared among the calls in flight (calls from several
// caller threads split the cores instead of oversubscribing them).
// With `work` (roughly, element operations in total) it also keeps small
// calls on fewer threads: waking a thread costs more than ~32K operations.
int threads_for(int64_t tasks, int64_t work = -1);

// for (i = 0; i < n; ++i) f(i), split statically over `threads` OpenMP
// threads; on the calling thread alone, without entering an OpenMP region,
// when one thread would run it: a region costs a fraction of a microsecond
// even with one thread, as much as a small network's whole layer.
template <class F>
void parallel_for(int threads, int64_t n, F&& f) {
  if (threads <= 1 || n <= 1) {
    for (int64_t i = 0; i < n; ++i) f(i);
    return;
  }
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < n; ++i) f(i);
}

// dst[e] = (dst[e] +) copies[e] + copies[size + e] + ... for the `count`
// copies of `size` elements, added in that order whatever the thread count:
// the partial sums of a kernel that kept parts of its reduction apart.
template <typename T>
void add_copies_in_order(const T* copies, int64_t count, int64_t size, bool accumulate, T* dst) {
  parallel_for(threads_for(size, size * count), size, [&](int64_t e) {
    T sum = accumulate ? dst[e] + copies[e] : copies[e];
    for (int64_t r = 1; r < count; ++r) sum += copies[r * size + e];
    dst[e] = sum;
  });
}

// Hands out tasks [0, n) to the `team` threads of a parallel region, each
// calling next(its thread number) until -1. Thread t owns the contiguous range
// [n t / team, n (t + 1) / team) and takes its tasks from the front; a
// thread done with its own takes the others' last tasks from their back.
// Tasks laid out in order (an image's positions) then stay with the thread
// whose range they are in - the one that wrote its input, as the steps
// before split alike - unless a thread falls behind: a busy or slowed core
// (another process, a neighbour on the host) no longer holds the whole step
// as a static split does.
class StealingRanges {
 public:
  StealingRanges(int team, int64_t n) : ranges_(static_cast<std::size_t>(team)) {
    for (int t = 0; t < team; ++t)
      ranges_[static_cast<std::size_t>(t)].pack(n * t / team, n * (t + 1) / team);
  }
  // The next task for thread `me`, or -1 when none is left anywhere.
  int64_t next(int me) {
    const int team = static_cast<int>(ranges_.size());
    const int64_t own = ranges_[static_cast<std::size_t>(me)].take_front();
    if (own >= 0) return own;
    for (int k = 1; k < team; ++k) {
      Range& r = ranges_[static_cast<std::size_t>((me + k) % team)];
      const int64_t t = r.take_back();
      if (t >= 0) return t;
    }
    return -1;
  }

 private:
  struct alignas(64) Range {
    std::atomic<uint64_t> bounds{0};  // front << 32 | back (tasks < 2^32)
    void pack(int64_t front, int64_t back) {
      bounds.store(static_cast<uint64_t>(front) << 32 | static_cast<uint64_t>(back));
    }
    int64_t take_front() {
      uint64_t b = bounds.load(std::memory_order_relaxed);
      while (true) {
        const uint64_t front = b >> 32, back = b & 0xffffffffu;
        if (front >= back) return -1;
        if (bounds.compare_exchange_weak(b, (front + 1) << 32 | back, std::memory_order_acq_rel))
          return static_cast<int64_t>(front);
      }
    }
    int64_t take_back() {
      uint64_t b = bounds.load(std::memory_order_relaxed);
      while (true) {
        const uint64_t front = b >> 32, back = b & 0xffffffffu;
        if (front >= back) return -1;
        if (bounds.compare_exchange_weak(b, front << 32 | (back - 1), std::memory_order_acq_rel))
          return static_cast<int64_t>(back - 1);
      }
    }
  };
  std::vector<Range> ranges_;
};

// Marks a public op call in flight, for threads_for's sharing.
class CallScope {
 public:
  CallScope();
  ~CallScope();
  CallScope(const CallScope&) = delete;
  CallScope& operator=(const CallScope&) = delete;
};

// Sets the core's thread count for the calling thread while it lives, over
// set_num_threads: a compiled network runs its steps, eager ops included, on
// its own thread count.
class ThreadsOverride {
 public:
  explicit ThreadsOverride(int threads);
  ~ThreadsOverride();
  ThreadsOverride(const ThreadsOverride&) = delete;
  ThreadsOverride& operator=(const ThreadsOverride&) = delete;

 private:
  int previous_;
};

// Scratch buffers (one slice per thread), allocated before a parallel region
// so that an allocation failure throws std::bad_alloc to the caller instead
// of terminating inside OpenMP. All scratch memory of the core goes through
// here, so that it is counted.
// allocate_scratch / free_scratch: scratch.h.

template <typename T>
class Workspace {
 public:
  // Uninitialised (the kernels write before they read): no memset of
  // megabytes per call.
  // Sizes are checked (overflow, workspace_limit()) before allocating, and a
  // failed allocation is a MemoryError saying how much was asked for.
  Workspace(int threads, int64_t per_thread)
      : per_thread_(per_thread),
        size_(workspace_bytes(threads, per_thread, sizeof(T), "a call's workspace")),
        buf_(allocate(size_)) {
    workspace_acquired(bytes());
  }
  ~Workspace() { workspace_released(bytes()); }
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  T* get(int thread = 0) {
    return buf_.get() + static_cast<size_t>(thread) * static_cast<size_t>(per_thread_);
  }

 private:
  int64_t bytes() const { return static_cast<int64_t>(size_ * sizeof(T)); }
  static T* allocate(size_t n) {
    try {
      return static_cast<T*>(allocate_scratch((n ? n : 1) * sizeof(T)));
    } catch (const std::bad_alloc&) {
      workspace_failed(n * sizeof(T), "a call's workspace");
    }
  }
  int64_t per_thread_;
  size_t size_;
  struct Free {
    void operator()(T* p) const { free_scratch(p); }
  };
  std::unique_ptr<T, Free> buf_;
};

// Output views are written in full and must be C-contiguous.
inline void check_output(const TensorView& out, const char* name, const TensorView& ref,
                         int ndim, const int64_t* shape) {
  if (out.dtype != ref.dtype)
    throw TypeError(std::string(name) + " must have dtype " + dtype_name(ref.dtype));
  if (!out.is_contiguous()) throw ValueError(std::string(name) + " must be C-contiguous");
  int64_t expected[kMaxDims];
  for (int i = 0; i < ndim; ++i) expected[i] = shape[i];
  check_shape(out, name, ndim, expected);
}

}  // namespace detail
}  // namespace convcore
