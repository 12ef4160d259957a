// 16 floats as one GCC vector (one AVX-512 register, or two AVX2 ones) and its unaligned load and
// store, for the compiled layers' vector code.
#pragma once

#include <cstdint>

namespace manynets {

typedef float lanes16 __attribute__((vector_size(64)));
typedef int32_t ilanes16 __attribute__((vector_size(64)));
// The same vector at a float's alignment: rows of a tensor start anywhere.
typedef float lanes16_unaligned __attribute__((vector_size(64), aligned(4)));

inline lanes16 load(const float* p) { return *reinterpret_cast<const lanes16_unaligned*>(p); }
inline void store(float* p, lanes16 x) { *reinterpret_cast<lanes16_unaligned*>(p) = x; }

}  // namespace manynets
