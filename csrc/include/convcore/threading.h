#pragma once

namespace convcore {

// Number of OpenMP threads used by the core's parallel regions. Global (not
// per calling thread); defaults to OpenMP's maximum (OMP_NUM_THREADS).
void set_num_threads(int n);
int get_num_threads();

}  // namespace convcore

namespace convcore {
// Instruction set the GEMM microkernel runs with ("avx512", "avx2" or
// "generic"); CONVCORE_ISA caps it.
const char* gemm_isa();
}  // namespace convcore
