// What both CPU kernel files use: checked errors and a vectorizable exp.
//
// TORCH_CHECK with several message parts builds a std::string and hands it
// to libtorch, which segfaulted on the GPU image (torch 2.11, an extension built by its system compiler);
// a single C string takes the other overload, which works everywhere. So messages are formatted here.
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>

#define TANDEM_CHECK(cond, ...)                                          \
  do {                                                                   \
    if (!(cond)) {                                                       \
      char tandem_check_message_[512];                                   \
      std::snprintf(tandem_check_message_, sizeof tandem_check_message_, __VA_ARGS__); \
      TORCH_CHECK(false, static_cast<const char*>(tandem_check_message_)); \
    }                                                                    \
  } while (0)

// exp(x) in plain arithmetic so `omp simd` loops vectorize it: 2^n * p(r), |r| <= ln2 / 2, p of degree 7
// (relative error ~1e-7). Infinity past 88.7 (float32's limit, so silu(-100) is -0 as in torch), and
// computed on [-87, 88], where float32 stays normal.
inline float exp_approx(float in) {
  const float x = std::min(std::max(in, -87.f), 88.f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = x - n * 0.693145751953125f - n * 1.428606765330187045e-06f;
  float p = 1.f / 5040;
  p = p * r + 1.f / 720;
  p = p * r + 1.f / 120;
  p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return in > 88.7f ? std::numeric_limits<float>::infinity() : p * scale;
}
