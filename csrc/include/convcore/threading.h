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

}  // namespace convcore

namespace convcore {
// Instruction set the GEMM microkernel runs with ("avx512", "avx2" or
// "generic"); CONVCORE_ISA caps it.
const char* gemm_isa();
}  // namespace convcore
