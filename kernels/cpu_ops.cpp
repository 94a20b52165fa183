// The model's elementwise steps for CPUs, one pass each where torch makes several: RMSNorm (with the
// residual add), SiLU-and-multiply, and RoPE fused with the KV-cache write. Built with cpu_attention.cpp
// by tandem/kernels/cpu.py; the twins are in kernels/reference.py.
//
// Rounding follows the twins (and Hugging Face): every op torch would round to the tensor's dtype is
// rounded here too (to nearest even), and floating-point contraction is off (-ffp-contract=off). In
// float32 two things still differ by about an ulp: the order of RMSNorm's sum and SiLU's polynomial exp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_common.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__GNUC__) && !defined(__clang__)
// 16-float vectors for these loops (GCC's default on AVX-512 is 8): SiLU's exp and divide are
// instruction-bound, so twice the lanes is about twice the speed.
#pragma GCC target("prefer-vector-width=512")
#endif

namespace {

// Loads and stores through the raw bits, which the compiler vectorizes: c10's bf16 conversions branch
// on NaN and its struct type keeps loops scalar. Same results (round to nearest even; NaN stays NaN).
inline uint32_t bf16_rounded_bits(float x) {  // the float32 bits of x rounded to bf16
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return (bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u;
}
template <typename T>
inline float load_f(const T* p, int64_t i) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const uint32_t bits = static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(p)[i]) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
  } else {
    return static_cast<float>(p[i]);
  }
}
template <typename T>
inline void store_f(T* p, int64_t i, float x) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    reinterpret_cast<uint16_t*>(p)[i] = static_cast<uint16_t>(bf16_rounded_bits(x) >> 16);
  } else {
    p[i] = static_cast<T>(x);
  }
}
template <typename T>
inline float rnd(float x) {  // x rounded to T, back in float32
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const uint32_t bits = bf16_rounded_bits(x);
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
  } else {
    return static_cast<float>(static_cast<T>(x));
  }
}

template <typename T>
void rms_norm_rows(T* out, T* total, const T* x, const T* residual, const T* weight, int64_t rows, int64_t size,
                   int64_t x_stride, int64_t r_stride, float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> buffer(size);
    float* __restrict h = buffer.data();  // plain restrict pointers: the loops below vectorize
    for (int64_t r = begin; r < end; ++r) {
      const T* __restrict xr = x + r * x_stride;
      float squares = 0.f;
      if (residual) {  // the residual stream is rounded to T before the norm reads it
        const T* __restrict rr = residual + r * r_stride;
        T* __restrict tr = total + r * size;
        for (int64_t i = 0; i < size; ++i) {
          const float sum = rnd<T>(load_f(xr, i) + load_f(rr, i));
          store_f(tr, i, sum);
          h[i] = sum;
        }
      } else {
        for (int64_t i = 0; i < size; ++i) h[i] = load_f(xr, i);
      }
#pragma omp simd reduction(+ : squares)
      for (int64_t i = 0; i < size; ++i) squares += h[i] * h[i];
      const float inv = 1.f / std::sqrt(squares / static_cast<float>(size) + eps);
      T* __restrict o = out + r * size;
      const T* __restrict wr = weight;
      for (int64_t i = 0; i < size; ++i) store_f(o, i, load_f(wr, i) * rnd<T>(h[i] * inv));
    }
  });
}

template <typename T>
void silu_and_mul_rows(T* out, const T* x, int64_t rows, int64_t size, int64_t x_stride) {
  // Work units of up to kSpan elements of one row, so that one long row (the feature-major MLP's)
  // is shared by all threads too.
  constexpr int64_t kSpan = 2048;
  const int64_t spans = (size + kSpan - 1) / kSpan;
  at::parallel_for(0, rows * spans, 4, [&](int64_t begin, int64_t end) {
    float g[kSpan];
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t r = unit / spans, first = unit % spans * kSpan, n = std::min(kSpan, size - first);
      const T* __restrict gate = x + r * x_stride + first;
      const T* __restrict up = x + r * x_stride + size + first;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        const float v = load_f(gate, i);
        g[i] = v / (1.f + exp_approx(-v));
      }
      T* __restrict o = out + r * size + first;
      for (int64_t i = 0; i < n; ++i) store_f(o, i, rnd<T>(g[i]) * load_f(up, i));
    }
  });
}

// Hugging Face's rotate_half: out = x * cos + cat(-x2, x1) * sin, each product rounded to T.
template <typename T>
inline void rotate(T* out, const T* x, const float* c, const float* s, int64_t dim) {
  const int64_t half = dim / 2;
  for (int64_t i = 0; i < half; ++i)
    store_f(out, i, rnd<T>(load_f(x, i) * c[i]) + rnd<T>(-load_f(x, i + half) * s[i]));
  for (int64_t i = half; i < dim; ++i)
    store_f(out, i, rnd<T>(load_f(x, i) * c[i]) + rnd<T>(load_f(x, i - half) * s[i]));
}

template <typename T, typename Table>
void rope_and_cache_rows(T* q_out, const T* q, const T* k, const T* v, int64_t q_stride, int64_t k_stride,
                         int64_t v_stride, const int64_t* positions, const Table* cos, const Table* sin, T* cache,
                         const int64_t* slots, int64_t tokens, int64_t num_q, int64_t num_kv, int64_t dim,
                         int64_t cache_slots, int64_t table_rows) {
  for (int64_t t = 0; t < tokens; ++t) {  // before the parallel loop: nothing may throw inside it
    TANDEM_CHECK(positions[t] >= 0 && positions[t] < table_rows, "rope_and_cache: position %lld outside the tables' %lld",
                 (long long)positions[t], (long long)table_rows);
    TANDEM_CHECK(slots[t] < cache_slots, "rope_and_cache: slot %lld past the cache's %lld", (long long)slots[t],
                 (long long)cache_slots);
  }
  at::parallel_for(0, tokens, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> c(dim), s(dim);
    for (int64_t t = begin; t < end; ++t) {
      const Table* ct = cos + positions[t] * dim;
      const Table* st = sin + positions[t] * dim;
      for (int64_t i = 0; i < dim; ++i) {  // the twin rounds the tables to T first
        c[i] = rnd<T>(load_f(ct, i));
        s[i] = rnd<T>(load_f(st, i));
      }
      for (int64_t h = 0; h < num_q; ++h)
        rotate(q_out + (t * num_q + h) * dim, q + t * q_stride + h * dim, c.data(), s.data(), dim);
      const int64_t slot = slots[t];
      if (slot < 0) continue;  // padding: writes nothing
      T* k_dst = cache + slot * num_kv * dim;
      T* v_dst = k_dst + cache_slots * num_kv * dim;
      for (int64_t h = 0; h < num_kv; ++h) rotate(k_dst + h * dim, k + t * k_stride + h * dim, c.data(), s.data(), dim);
      std::memcpy(v_dst, v + t * v_stride, num_kv * dim * sizeof(T));
    }
  });
}

template <typename F>
void dispatch(at::ScalarType dtype, const char* name, F&& run) {
  switch (dtype) {
    case at::kFloat: return run(static_cast<float*>(nullptr));
    case at::kBFloat16: return run(static_cast<c10::BFloat16*>(nullptr));
    case at::kHalf: return run(static_cast<c10::Half*>(nullptr));
    default: TANDEM_CHECK(false, "%s: float32, bfloat16 or float16, not %s", name, c10::toString(dtype));
  }
}

// Rows are the last dim, contiguous; rows `stride(0)` apart (views of a fused projection are fine).
void check_rows(const at::Tensor& t, const char* what) {
  TANDEM_CHECK(t.dim() == 2 && t.stride(1) == 1, "%s: [rows, size] with contiguous rows", what);
}

void rms_norm(at::Tensor& out, at::Tensor& total, const at::Tensor& x, const std::optional<at::Tensor>& residual,
              const at::Tensor& weight, double eps) {
  check_rows(x, "x");
  TORCH_CHECK(out.is_contiguous() && out.sizes() == x.sizes() && weight.is_contiguous() &&
                  weight.numel() == x.size(1) && weight.scalar_type() == x.scalar_type() &&
                  out.scalar_type() == x.scalar_type(),
              "rms_norm: out like x, contiguous; weight [size] of x's dtype");
  if (residual) {
    check_rows(*residual, "residual");
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type() &&
                    total.is_contiguous() && total.sizes() == x.sizes() && total.scalar_type() == x.scalar_type(),
                "rms_norm: residual and total like x");
  }
  dispatch(x.scalar_type(), "rms_norm", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    rms_norm_rows<T>(out.data_ptr<T>(), residual ? total.data_ptr<T>() : nullptr, x.data_ptr<T>(),
                     residual ? residual->data_ptr<T>() : nullptr, weight.data_ptr<T>(), x.size(0), x.size(1),
                     x.stride(0), residual ? residual->stride(0) : 0, static_cast<float>(eps));
  });
}

void silu_and_mul(at::Tensor& out, const at::Tensor& x) {
  check_rows(x, "x");
  TORCH_CHECK(x.size(1) % 2 == 0 && out.is_contiguous() && out.size(0) == x.size(0) && out.size(1) * 2 == x.size(1) &&
                  out.scalar_type() == x.scalar_type(),
              "silu_and_mul: x [rows, 2 * size] -> out [rows, size], one dtype");
  dispatch(x.scalar_type(), "silu_and_mul", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    silu_and_mul_rows<T>(out.data_ptr<T>(), x.data_ptr<T>(), x.size(0), out.size(1), x.stride(0));
  });
}

void rope_and_cache(at::Tensor& q_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& cache,
                    const at::Tensor& slots) {
  for (const auto* t : {&q, &k, &v})
    TORCH_CHECK(t->dim() == 3 && t->stride(2) == 1 && t->stride(1) == t->size(2) && t->scalar_type() == cache.scalar_type(),
                "rope_and_cache: q, k, v [tokens, heads, dim], heads contiguous, of the cache's dtype");
  TORCH_CHECK(q_out.is_contiguous() && q_out.sizes() == q.sizes() && q_out.scalar_type() == q.scalar_type(),
              "rope_and_cache: q_out contiguous like q");
  TORCH_CHECK(cache.dim() == 5 && cache.size(0) == 2 && cache.is_contiguous() && cache.size(3) == k.size(1) &&
                  cache.size(4) == k.size(2) && v.sizes() == k.sizes() && q.size(2) == k.size(2) && q.size(2) % 2 == 0,
              "rope_and_cache: cache [2, blocks, block_size, kv_heads, dim] matching k and v");
  TORCH_CHECK((cos.scalar_type() == at::kFloat || cos.scalar_type() == q.scalar_type()) &&
                  sin.scalar_type() == cos.scalar_type() && cos.is_contiguous() && sin.is_contiguous() &&
                  cos.dim() == 2 && cos.size(1) == q.size(2) && sin.sizes() == cos.sizes(),
              "rope_and_cache: cos/sin [positions, dim], float32 or q's dtype");
  TORCH_CHECK(positions.scalar_type() == at::kLong && slots.scalar_type() == at::kLong && positions.is_contiguous() &&
                  slots.is_contiguous() && positions.numel() == q.size(0) && slots.numel() == q.size(0),
              "rope_and_cache: positions and slots int64 [tokens]");
  const int64_t cache_slots = cache.size(1) * cache.size(2);
  dispatch(q.scalar_type(), "rope_and_cache", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const auto run = [&](auto* table_tag) {
      using Table = std::remove_pointer_t<decltype(table_tag)>;
      rope_and_cache_rows<T, Table>(q_out.data_ptr<T>(), q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(),
                                    q.stride(0), k.stride(0), v.stride(0), positions.data_ptr<int64_t>(),
                                    cos.data_ptr<Table>(), sin.data_ptr<Table>(), cache.data_ptr<T>(),
                                    slots.data_ptr<int64_t>(), q.size(0), q.size(1), k.size(1), q.size(2),
                                    cache_slots, cos.size(0));
    };
    if (cos.scalar_type() == at::kFloat) return run(static_cast<float*>(nullptr));
    run(static_cast<T*>(nullptr));
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tandem_cpu, m) {
  m.def("rms_norm(Tensor(a!) out, Tensor(b!) total, Tensor x, Tensor? residual, Tensor weight, float eps) -> ()");
  m.impl("rms_norm", c10::DispatchKey::CPU, TORCH_FN(rms_norm));
  m.def("silu_and_mul(Tensor(a!) out, Tensor x) -> ()");
  m.impl("silu_and_mul", c10::DispatchKey::CPU, TORCH_FN(silu_and_mul));
  m.def("rope_and_cache(Tensor(a!) q_out, Tensor q, Tensor k, Tensor v, Tensor positions, Tensor cos, Tensor sin, "
        "Tensor(b!) cache, Tensor slots) -> ()");
  m.impl("rope_and_cache", c10::DispatchKey::CPU, TORCH_FN(rope_and_cache));
}
