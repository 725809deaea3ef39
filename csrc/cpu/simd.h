// GCC/Clang vector types for the kernels compiled per instruction set
// (function attributes target("avx2,fma") etc.), and unaligned loads and
// stores of them. One body template serves every level: V is a vector of
// sizeof(V) / sizeof(T) lanes.
#pragma once
#include <cstring>

namespace convcore {
namespace simd {

#if defined(__GNUC__) || defined(__clang__)
#define CONVCORE_HAVE_VECTOR_TYPES 1

typedef float f32x4 __attribute__((vector_size(16)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x16 __attribute__((vector_size(64)));
typedef double f64x2 __attribute__((vector_size(16)));
typedef double f64x4 __attribute__((vector_size(32)));
typedef double f64x8 __attribute__((vector_size(64)));
typedef int i32x4 __attribute__((vector_size(16)));
typedef int i32x8 __attribute__((vector_size(32)));
typedef int i32x16 __attribute__((vector_size(64)));
typedef long long i64x2 __attribute__((vector_size(16)));
typedef long long i64x4 __attribute__((vector_size(32)));
typedef long long i64x8 __attribute__((vector_size(64)));

// r[i] = lane IDX[i] of the concatenation of a and b; IDX_T the integer
// vector of as many lanes (GCC spells the indices as a vector, Clang as
// arguments).
#if defined(__clang__)
#define CONVCORE_SHUFFLE(IDX_T, a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define CONVCORE_SHUFFLE(IDX_T, a, b, ...) __builtin_shuffle(a, b, (IDX_T){__VA_ARGS__})
#endif
#endif

#if defined(__GNUC__) || defined(__clang__)
#define CONVCORE_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define CONVCORE_ALWAYS_INLINE inline
#endif
// (by reference: a vector passed by value outside a target function changes
// the ABI; always inlined, so that a kernel compiled for AVX2 never calls a
// baseline copy)
template <typename V>
CONVCORE_ALWAYS_INLINE void load_vec(V& v, const void* p) {
  std::memcpy(&v, p, sizeof(V));
}
template <typename V>
CONVCORE_ALWAYS_INLINE void store_vec(void* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

}  // namespace simd
}  // namespace convcore
