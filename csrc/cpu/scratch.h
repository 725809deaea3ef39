#pragma once
// Memory blocks for the core's scratch buffers and for the arrays the Python
// bindings return. Large blocks (8 MB and more) are 2 MB aligned and advised
// to use transparent huge pages: glibc maps anything over 32 MB afresh on
// every call, and faulting in 4 KB pages cost 15 ms per call for the 38 MB
// of F(4x4, 3x3) filters at 512 x 512 channels (measured), against about
// 1 ms in 2 MB pages. A freed large block is kept for the next request of
// about its size (set_scratch_cache_limit in convcore/threading.h): even in
// 2 MB pages, the kernel zeroes every page of a fresh block at first touch.
#include <cstddef>

namespace convcore {
namespace detail {

// Blocks of at least this many bytes are the large ones (cached); smaller
// ones come from malloc.
constexpr std::size_t kLargeScratchBytes = std::size_t(8) << 20;

// Throws std::bad_alloc when the memory cannot be had.
void* allocate_scratch(std::size_t bytes);
void free_scratch(void* p);

}  // namespace detail
}  // namespace convcore
