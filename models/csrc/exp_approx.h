// exp for the compiled layers (recurrent gates, attention's softmax), one float or 16 lanes at a time.
#pragma once

#include <cstdint>

#include "lanes16.h"

namespace manynets {

// exp by Cephes' range reduction and polynomial, in plain arithmetic so that the compiler vectorizes
// the loops calling it: rounding is done by adding and taking away 1.5 * 2^23 (floorf does not
// vectorize without -ffast-math, which would also assume NaN away). Checked every 1e-4 against double
// precision: exp within 1 ulp over [-87, 88], tanh and sigmoid below within 1.8e-7 and 8.9e-8
// (tests/test_native.py holds them to it through `activations`). NaN stays NaN: a comparison with
// NaN is false, so the clamps pass it through, and a network that diverges keeps showing NaN for the
// engine to isolate. T is float, or lanes16 with I = ilanes16 (the same operations on 16 lanes).
template <typename T, typename I>
inline T exp_poly(T x) {
  x = x > 88.0f ? T{} + 88.0f : x;
  x = x < -87.0f ? T{} - 87.0f : x;
  const T n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  x = x - n * 0.693359375f + n * 2.12194440e-4f;
  T y = T{} + 1.9875691500e-4f;
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * x * x + x + 1.0f;
  if constexpr (sizeof(T) == sizeof(float)) {
    return y * __builtin_bit_cast(float, (static_cast<int32_t>(n) + 127) << 23);
  } else {
    return y * reinterpret_cast<T>((__builtin_convertvector(n, I) + 127) << 23);
  }
}

inline float exp_approx(float x) { return exp_poly<float, int32_t>(x); }
inline lanes16 exp_approx(lanes16 x) { return exp_poly<lanes16, ilanes16>(x); }

}  // namespace manynets
