// Paged decode attention for CPUs: each single-token query reads its K/V rows where they lie in the
// block pool, instead of gathering them into a contiguous copy first (the torch reference's cost:
// the gather writes every row once and SDPA reads it again). Built on first use by
// tandem/kernels/cpu.py; its torch twins are paged_decode_attention_ref (the tests') and
// TorchAttention._decode (the engine's gather-and-SDPA path).
//
// Layout (tandem/engine/attention.py): cache [2, num_blocks, block_size, num_kv_heads, head_dim].
// A task is one row's KV heads [h0, h1): all of them when there are enough rows to keep every thread
// busy (a block's memory is then read front to back), one each otherwise. Scores are float32 whatever
// the cache dtype, kept per task for a two-pass softmax. Vectors are 16 floats: AVX-512 registers where
// the compiler targets it, a plain array (auto-vectorized) elsewhere; head_dim is a multiple of 16.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_common.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

namespace {

#if defined(__AVX512F__)
using Vec = __m512;
inline Vec zero() { return _mm512_setzero_ps(); }
inline Vec splat(float x) { return _mm512_set1_ps(x); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline float vsum(Vec a) { return _mm512_reduce_add_ps(a); }
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline Vec vload(const c10::BFloat16* p) {  // bf16 is the high half of a float32
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
inline Vec vload(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline void vstore(float* p, Vec a) { _mm512_storeu_ps(p, a); }
// The scores' maximum, 16 lanes at a time: a scalar max chain (which compilers keep for NaN's sake)
// cost a sixth of the kernel's time.
inline float max_of(const float* x, int64_t n) {
  __m512 m = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(x + i));
  const __mmask16 tail = static_cast<__mmask16>((1u << (n - i)) - 1);
  m = _mm512_mask_max_ps(m, tail, m, _mm512_maskz_loadu_ps(tail, x + i));
  return _mm512_reduce_max_ps(m);
}
#else
struct Vec {
  float v[16];
};
inline Vec zero() { return Vec{}; }
inline Vec splat(float x) {
  Vec r;
  for (float& e : r.v) e = x;
  return r;
}
inline Vec vfma(Vec a, Vec b, Vec c) {
  for (int i = 0; i < 16; ++i) c.v[i] += a.v[i] * b.v[i];
  return c;
}
inline float vsum(Vec a) {
  float s = 0.f;
  for (float e : a.v) s += e;
  return s;
}
template <typename T>
inline Vec vload(const T* p) {
  Vec r;
  for (int i = 0; i < 16; ++i) r.v[i] = static_cast<float>(p[i]);
  return r;
}
inline void vstore(float* p, Vec a) { std::memcpy(p, a.v, sizeof a.v); }
inline float max_of(const float* x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) m = std::max(m, x[i]);
  return m;
}
#endif

// Denormal floats as zero while a thread runs the kernel, as they were: keys far below a row's maximum
// score (by more than ~87) give weights near float32's smallest normal, whose products with V are
// denormal, and each such multiply-add took a microcode assist (decode attention 5x slower with
// scores spread over a few hundred). The result moves by less than 1e-38 per term.
struct FlushDenormals {
#if defined(__SSE2__)
  const unsigned int saved = _mm_getcsr();
  FlushDenormals() { _mm_setcsr(saved | 0x8040); }  // flush-to-zero and denormals-are-zero
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

constexpr int kMaxChunks = 16;  // head_dim <= 256

struct Geometry {
  int64_t rows, table_width, num_blocks, block_size, num_kv, num_q, dim;
};

// Per-thread scratch, reused across the thread's tasks.
struct Scratch {
  std::vector<float> q, acc, total, scores;
};

// Calls visit(block's first slot at head h0, first slot, end slot, index of the block's first slot in
// [0, n)) for each block of the row in order. With `prefetch`, the next block's lines are requested while
// this one is visited, and those of `also` too (the V cache while walking K, so the V pass finds V in L2).
// The requests go out a few at a time between visits of kPrefetchSlots slots: a whole block's worth at
// once waited on the line-fill buffers with nothing to overlap (decode step, 64 rows x ~300 tokens,
// scattered blocks: attention ~36.6 -> ~32.7 ms).
constexpr int64_t kPrefetchSlots = 4;

template <typename T, typename Visit>
void walk_blocks(const T* base, const int32_t* table, int64_t start, int64_t ctx, int64_t h0, int64_t dim,
                 const Geometry& g, bool prefetch, const T* also, Visit&& visit) {
  const int64_t bs = g.block_size, block_elems = bs * g.num_kv * dim;
  const int64_t lines = block_elems * int64_t(sizeof(T)) / 64;
  for (int64_t b = start / bs, t = start; t < ctx; ++b) {
    const int64_t first = t - b * bs, end = std::min(bs, ctx - b * bs), i0 = t - start - first;
    const T* block = base + int64_t(table[b]) * block_elems + h0 * dim;
    t += end - first;
    if (!prefetch || t >= ctx) {
      visit(block, first, end, i0);
      continue;
    }
    const char* next = reinterpret_cast<const char*>(base + int64_t(table[b + 1]) * block_elems);
    const char* other = also ? reinterpret_cast<const char*>(also + int64_t(table[b + 1]) * block_elems) : nullptr;
    const int64_t pieces = (end - first + kPrefetchSlots - 1) / kPrefetchSlots;
    for (int64_t k = 0; k < pieces; ++k) {
      for (int64_t l = lines * k / pieces; l < lines * (k + 1) / pieces; ++l) {
        __builtin_prefetch(next + l * 64);
        if (other) __builtin_prefetch(other + l * 64);
      }
      const int64_t s0 = first + k * kPrefetchSlots;
      visit(block, s0, std::min(end, s0 + kPrefetchSlots), i0);
    }
  }
}

// A panel is up to kPanel query heads of one KV head, handled together: each K/V row is converted once
// per panel and the panel's q (or accumulators) stay in registers across the block's slots. P and the
// chunk count are template constants so the loops unroll (D == 0: head_dim known only at run time).
constexpr int64_t kPanel = 4;

template <typename T, int D, int P>
void score_panel(const T* block, int64_t first, int64_t end, int64_t stride, int64_t chunks, const float* q,
                 float* scores, int64_t n) {
  constexpr int64_t C = D ? D / 16 : kMaxChunks;
  if constexpr (D) chunks = C;
  Vec qv[P][C];
  for (int p = 0; p < P; ++p)
    for (int64_t c = 0; c < chunks; ++c) qv[p][c] = vload(q + p * chunks * 16 + c * 16);
  for (int64_t s = first; s < end; ++s) {
    const T* k = block + s * stride;
    Vec kv[C];
    for (int64_t c = 0; c < chunks; ++c) kv[c] = vload(k + c * 16);
    for (int p = 0; p < P; ++p) {
      Vec a = zero();
      for (int64_t c = 0; c < chunks; ++c) a = vfma(qv[p][c], kv[c], a);
      scores[p * n + s] = vsum(a);
    }
  }
}

template <typename T, int D, int P>
void value_panel(const T* block, int64_t first, int64_t end, int64_t stride, int64_t chunks, const float* probs,
                 int64_t n, float* acc) {
  constexpr int64_t C = D ? D / 16 : kMaxChunks;
  if constexpr (D) chunks = C;
  Vec a[P][C];
  for (int p = 0; p < P; ++p)
    for (int64_t c = 0; c < chunks; ++c) a[p][c] = vload(acc + p * chunks * 16 + c * 16);
  for (int64_t s = first; s < end; ++s) {
    const T* v = block + s * stride;
    Vec vv[C];
    for (int64_t c = 0; c < chunks; ++c) vv[c] = vload(v + c * 16);
    for (int p = 0; p < P; ++p) {
      const Vec w = splat(probs[p * n + s]);
      for (int64_t c = 0; c < chunks; ++c) a[p][c] = vfma(w, vv[c], a[p][c]);
    }
  }
  for (int p = 0; p < P; ++p)
    for (int64_t c = 0; c < chunks; ++c) vstore(acc + p * chunks * 16 + c * 16, a[p][c]);
}

template <typename F>
void by_panel(int64_t size, F&& f) {  // f(std::integral_constant<int, size>)
  switch (size) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    default: return f(std::integral_constant<int, 4>{});
  }
}

template <typename T, int D>
void attend_task(T* out, const T* q, const T* k_cache, const T* v_cache, const int32_t* table, int64_t ctx,
                 int64_t h0, int64_t h1, const Geometry& g, float scale, int64_t window, Scratch& w) {
  const int64_t dim = D ? D : g.dim, chunks = dim / 16, group = g.num_q / g.num_kv;
  const int64_t stride = g.num_kv * dim, heads = h1 - h0, width = heads * group;  // query heads of the task
  const int64_t start = window > 0 ? std::max<int64_t>(0, ctx - window) : 0, n = ctx - start;
  const T* qh = q + h0 * group * dim;
  w.q.resize(width * dim);
  w.acc.assign(width * dim, 0.f);
  w.total.resize(width);
  w.scores.resize(width * n);
  for (int64_t i = 0; i < width * dim; ++i) w.q[i] = static_cast<float>(qh[i]) * scale;
  walk_blocks(k_cache, table, start, ctx, h0, dim, g, true, v_cache, [&](const T* block, int64_t first, int64_t end, int64_t i0) {
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t j = h * group; j < (h + 1) * group; j += kPanel)
        by_panel(std::min(kPanel, (h + 1) * group - j), [&](auto panel) {
          score_panel<T, D, decltype(panel)::value>(block + h * dim, first, end, stride, chunks,
                                                   w.q.data() + j * dim, w.scores.data() + j * n + i0, n);
        });
  });
  for (int64_t j = 0; j < width; ++j) {
    float* sj = w.scores.data() + j * n;
    const float m = max_of(sj, n);
    float total = 0.f;
#pragma omp simd reduction(+ : total)
    for (int64_t i = 0; i < n; ++i) {
      sj[i] = exp_approx(sj[i] - m);
      total += sj[i];
    }
    w.total[j] = total;
  }
  walk_blocks(v_cache, table, start, ctx, h0, dim, g, false, static_cast<const T*>(nullptr), [&](const T* block, int64_t first, int64_t end, int64_t i0) {
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t j = h * group; j < (h + 1) * group; j += kPanel)
        by_panel(std::min(kPanel, (h + 1) * group - j), [&](auto panel) {
          value_panel<T, D, decltype(panel)::value>(block + h * dim, first, end, stride, chunks,
                                                   w.scores.data() + j * n + i0, n, w.acc.data() + j * dim);
        });
  });
  T* oh = out + h0 * group * dim;
  for (int64_t j = 0; j < width; ++j)
    for (int64_t x = 0; x < dim; ++x)  // nothing to attend to (an empty window): zeros, as the twin
      oh[j * dim + x] = static_cast<T>(n > 0 ? w.acc[j * dim + x] / w.total[j] : 0.f);
}

template <typename T, int D>
void decode_attention(T* out, const T* q, const T* cache, const int32_t* tables, const int64_t* ctx_lens,
                      const Geometry& g, float scale, int64_t window) {
  const int64_t split = g.rows >= 4 * at::get_num_threads() ? 1 : g.num_kv, heads = g.num_kv / split;
  const int64_t row_elems = g.num_q * g.dim, v_offset = g.num_blocks * g.block_size * g.num_kv * g.dim;
  // Rows differ in length, so a static split of the tasks leaves a thread idle; instead each thread
  // takes the next task, longest rows first.
  const int64_t tasks = g.rows * split;
  std::vector<int64_t> order(g.rows);
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return ctx_lens[a] > ctx_lens[b]; });
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    const FlushDenormals flush;
    Scratch w;
    for (int64_t task; (task = next.fetch_add(1, std::memory_order_relaxed)) < tasks;) {
      const int64_t r = order[task / split], h0 = task % split * heads;
      attend_task<T, D>(out + r * row_elems, q + r * row_elems, cache, cache + v_offset,
                        tables + r * g.table_width, ctx_lens[r], h0, h0 + heads, g, scale, window, w);
    }
  });
}

void paged_decode_attention(at::Tensor& out, const at::Tensor& q, const at::Tensor& cache,
                            const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                            int64_t sliding_window) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous() && out.sizes() == q.sizes() && out.is_contiguous() &&
                  out.scalar_type() == q.scalar_type(),
              "q and out: contiguous [rows, heads, dim] of one dtype");
  TORCH_CHECK(cache.dim() == 5 && cache.size(0) == 2 && cache.is_contiguous() && cache.scalar_type() == q.scalar_type(),
              "cache: contiguous [2, blocks, block_size, kv_heads, dim] of q's dtype");
  TORCH_CHECK(cache.size(4) == q.size(2) && q.size(1) % cache.size(3) == 0, "head_dim or GQA ratio mismatch");
  TORCH_CHECK(q.size(2) % 16 == 0 && q.size(2) <= 16 * kMaxChunks, "head_dim: a multiple of 16, at most 256");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.is_contiguous() &&
                  block_tables.dim() == 2 && block_tables.size(0) == q.size(0),
              "block_tables: contiguous int32 [rows, width]");
  TORCH_CHECK(context_lens.scalar_type() == at::kLong && context_lens.numel() == q.size(0) &&
                  context_lens.is_contiguous(),
              "context_lens: int64 [rows]");
  const Geometry g{q.size(0), block_tables.size(1), cache.size(1), cache.size(2), cache.size(3), q.size(1),
                   q.size(2)};
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  for (int64_t r = 0; r < g.rows; ++r) {  // every block a row reads lies in the pool (checked before the loop)
    const int64_t used = (lens[r] + g.block_size - 1) / g.block_size;
    TANDEM_CHECK(lens[r] >= 0 && used <= g.table_width,
                 "paged_decode_attention: row %lld has %lld tokens, more than its table's %lld blocks hold",
                 (long long)r, (long long)lens[r], (long long)g.table_width);
    for (int64_t b = 0; b < used; ++b)
      TANDEM_CHECK(tables[r * g.table_width + b] >= 0 && tables[r * g.table_width + b] < g.num_blocks,
                   "paged_decode_attention: block %d outside the pool of %lld", tables[r * g.table_width + b],
                   (long long)g.num_blocks);
  }
  const auto run = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const auto call = [&](auto kernel) {
      kernel(out.data_ptr<T>(), q.data_ptr<T>(), cache.data_ptr<T>(), block_tables.data_ptr<int32_t>(),
             context_lens.data_ptr<int64_t>(), g, static_cast<float>(scale), sliding_window);
    };
    if (g.dim == 64) return call(decode_attention<T, 64>);
    if (g.dim == 128) return call(decode_attention<T, 128>);
    return call(decode_attention<T, 0>);
  };
  switch (q.scalar_type()) {
    case at::kFloat: return run(static_cast<float*>(nullptr));
    case at::kBFloat16: return run(static_cast<c10::BFloat16*>(nullptr));
    case at::kHalf: return run(static_cast<c10::Half*>(nullptr));
    default:
      TANDEM_CHECK(false, "paged_decode_attention: float32, bfloat16 or float16, not %s", c10::toString(q.scalar_type()));
  }
}

}  // namespace

TORCH_LIBRARY(tandem_cpu, m) {
  m.def("paged_decode_attention(Tensor(a!) out, Tensor q, Tensor cache, Tensor block_tables, "
        "Tensor context_lens, float scale, int sliding_window) -> ()");
  m.impl("paged_decode_attention", c10::DispatchKey::CPU, TORCH_FN(paged_decode_attention));
}
