#pragma once
#include <cstdint>

namespace convcore {

// Number of OpenMP threads used by the core's parallel regions. Global (not
// per calling thread); defaults to OpenMP's maximum (OMP_NUM_THREADS).
void set_num_threads(int n);
int get_num_threads();

// Scratch memory: the most bytes the calling thread's core calls have held at
// once since reset_workspace_peak() (workspace is freed when a call returns).
int64_t workspace_peak_bytes();
void reset_workspace_peak();

// The most scratch bytes one piece of workspace may take (default, and with
// 0: the machine's physical memory). A call that would need more raises
// MemoryError (convcore::MemoryError) naming the size before allocating
// anything: with Linux's overcommit, a larger allocation may "succeed" and
// the process be killed later when it touches the memory.
void set_workspace_limit(int64_t bytes);
int64_t workspace_limit();
// Scratch blocks of 256 KB and more (and the arrays the Python bindings
// return) freed by a call are kept for the next calls, up to this many bytes
// in all (default: an eighth of the physical memory, within [256 MB, 4 GB];
// 0 frees them and keeps none): a fresh block costs the kernel a zeroing of
// every page it touches.
void set_scratch_cache_limit(int64_t bytes);
int64_t scratch_cache_limit();
// Bytes of scratch blocks kept idle now.
int64_t scratch_cache_bytes();
// The machine's physical memory in bytes (INT64_MAX when unknown).
int64_t physical_memory_bytes();

}  // namespace convcore

namespace convcore {
// Instruction set the GEMM microkernel runs with ("avx512", "avx2" or
// "generic"); CONVCORE_ISA caps it.
const char* gemm_isa();
// Whether that instruction set is AVX-512 running on 512-bit FMA units. AMD's
// Zen 4 runs each 512-bit operation as two 256-bit halves, at AVX2's FMA
// peak, which moves the point where an algorithm that saves products pays.
bool gemm_avx512_full_width();
}  // namespace convcore
