#pragma once
// Memory blocks for the core's scratch buffers and for the arrays the Python
// bindings return. Large blocks (workspaces of 256 KB and more, arrays of
// 8 MB and more) are 2 MB aligned and advised to use transparent huge
// pages: glibc maps anything over 32 MB afresh on every call, and faulting
// in 4 KB pages cost 15 ms per call for the 38 MB of F(4x4, 3x3) filters at
// 512 x 512 channels (measured), against about 1 ms in 2 MB pages. A freed
// large block is kept for the next request of about its size
// (set_scratch_cache_limit in convcore/threading.h): even in 2 MB pages, the
// kernel zeroes every page of a fresh block at first touch.
#include <cstddef>

namespace convcore {
namespace detail {

// Blocks of at least kCachedScratchBytes are kept when freed (smaller ones
// come from malloc): glibc returns freed blocks of a few MB to the kernel,
// and a batch-1 training step's workspaces and arrays (0.2-4 MB) were
// faulted in afresh on every call, half a millisecond of a 1 ms
// convolution. The large blocks, 2 MB aligned in huge pages: arrays of at
// least kLargeScratchBytes and workspaces of at least kCachedScratchBytes
// (ScratchUse, below).
constexpr std::size_t kCachedScratchBytes = std::size_t(256) << 10;
constexpr std::size_t kLargeScratchBytes = std::size_t(8) << 20;

// What a block is for. A workspace, which the kernels re-read from L2
// (packed panels, frames), is a large block from kCachedScratchBytes on:
// in 4 KB pages, where the kernel picks each page's L2 sets (its physical
// address), a layer ran 1.5 times as long in some processes as in others,
// most likely from pages crowding a few sets; huge pages ended it
// (docs/training.md, sixteenth session). An array handed to the caller keeps 4 KB pages below
// kLargeScratchBytes: callers may hold many of them.
enum class ScratchUse { Workspace, Array };

// Throws std::bad_alloc when the memory cannot be had.
void* allocate_scratch(std::size_t bytes, ScratchUse use = ScratchUse::Workspace);
void free_scratch(void* p);

}  // namespace detail
}  // namespace convcore
