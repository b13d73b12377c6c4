// The small operations of a Llama-family decoder layer for fp32 tokens on the CPU, each one call:
// RMSNorm (with the residual add folded in), rotary embedding in place, SiLU-and-multiply, and
// decode attention straight over the paged KV cache.
//
// A decode step of a small model at batch 1 runs ~30 torch operations per layer between its four
// GEMVs; each costs microseconds of dispatch, more than its arithmetic. These kernels replace
// ~25 of them with 4 calls. Decode attention reads each sequence's keys and values where they sit
// in the block pool (no gathered copy, no mask tensors) and only the rows inside its context,
// so no value another request left in a block can reach it.
//
// Plain C++ with OpenMP and no torch headers (built and loaded as csrc/lora_cpu.cpp is, by
// decoder_cpu.py, which checks every argument first). Parallel regions open only when a call has
// enough work to pay for the threads: batch-1 calls run on the calling thread.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <type_traits>
#include <utility>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(_OPENMP)
#include <omp.h>
#endif

#include "quant_cpu.h"  // GGUF-quantized projections inside the decode step

namespace {

constexpr int kLanes = 16;  // accumulator width, mapped to SIMD registers by the compiler
constexpr int64_t kParallelWork = 1 << 15;  // elements below which a call stays on one thread

inline float dot(const float* a, const float* b, int64_t n) {
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  if (i < n) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (n - i)) - 1);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, a + i), _mm512_maskz_loadu_ps(tail, b + i), acc);
  }
  return _mm512_reduce_add_ps(acc);
#else
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) acc[l] += a[i + l] * b[i + l];
  }
  float sum = 0.f;
  for (; i < n; ++i) sum += a[i] * b[i];
  for (int l = 0; l < kLanes; ++l) sum += acc[l];
  return sum;
#endif
}

#if defined(__AVX512F__)
// exp of 16 floats (Cephes' expf: 2^k * e^r with |r| <= ln2/2, r's exp by a degree-6 polynomial;
// ~1 ulp), where the C library's expf runs one value at a time: softmax and SiLU call it per
// element, and it was most of decode attention's time at batch 64.
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.f)), _mm512_set1_ps(89.f));  // 0 and inf beyond
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);  // x - k ln2, ln2 in two parts
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, k);  // p * 2^k, to 0 or inf where that under- or overflows
}
#endif

// v[i] = exp(v[i] - shift) in place for n values; returns their sum
inline float exp_shifted(float* v, int64_t n, float shift) {
  int64_t i = 0;
  float total = 0.f;
#if defined(__AVX512F__)
  __m512 sum = _mm512_setzero_ps();
  const __m512 s = _mm512_set1_ps(shift);
  for (; i + 16 <= n; i += 16) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(v + i), s));
    _mm512_storeu_ps(v + i, e);
    sum = _mm512_add_ps(sum, e);
  }
  total = _mm512_reduce_add_ps(sum);
#endif
  for (; i < n; ++i) total += (v[i] = std::exp(v[i] - shift));
  return total;
}

// y[m] = x[m] . w for M tokens and one weight row of k_len values, read once front to back.
// One row at a time, not several interleaved: a single sequential stream is what the hardware
// prefetcher serves at full memory speed (several rows read side by side measured 30% slower).
template <int M>
inline void dot_row(const float* w, const float* x, int64_t sx, int64_t k_len, float* y) {
#if defined(__AVX512F__)
  __m512 acc[M][2];
  for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= k_len; k += 32) {
    const __m512 w0 = _mm512_loadu_ps(w + k), w1 = _mm512_loadu_ps(w + k + 16);
    for (int m = 0; m < M; ++m) {
      acc[m][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + m * sx + k), acc[m][0]);
      acc[m][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + m * sx + k + 16), acc[m][1]);
    }
  }
  for (; k + 16 <= k_len; k += 16) {
    const __m512 w0 = _mm512_loadu_ps(w + k);
    for (int m = 0; m < M; ++m) acc[m][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + m * sx + k), acc[m][0]);
  }
  for (int m = 0; m < M; ++m) {
    float tail = 0.f;
    for (int64_t i = k; i < k_len; ++i) tail += w[i] * x[m * sx + i];
    y[m] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1])) + tail;
  }
#else
  for (int m = 0; m < M; ++m) y[m] = dot(w, x + m * sx, k_len);
#endif
}

template <int M>
void gemv_rows(const float* w, int64_t k_len, const float* x, int64_t sx, const float* bias, float* y, int64_t sy,
               int64_t n0, int64_t n1) {
  float part[M];
  for (int64_t n = n0; n < n1; ++n) {
    dot_row<M>(w + n * k_len, x, sx, k_len, part);
    for (int m = 0; m < M; ++m) y[m * sy + n] = part[m] + (bias != nullptr ? bias[n] : 0.f);
  }
}

// y [tokens, N] rows n0..n1 of x [tokens, K] @ w [N, K]^T (+ bias), tokens in groups of 4.
inline void gemv_range(const float* w, int64_t k_len, const float* bias, const float* x, int64_t sx, int64_t tokens,
                       float* y, int64_t sy, int64_t n0, int64_t n1) {
  for (int64_t m = 0; m < tokens; m += 4) {
    const float* xm = x + m * sx;
    float* ym = y + m * sy;
    switch (std::min<int64_t>(tokens - m, 4)) {
      case 1: gemv_rows<1>(w, k_len, xm, sx, bias, ym, sy, n0, n1); break;
      case 2: gemv_rows<2>(w, k_len, xm, sx, bias, ym, sy, n0, n1); break;
      case 3: gemv_rows<3>(w, k_len, xm, sx, bias, ym, sy, n0, n1); break;
      default: gemv_rows<4>(w, k_len, xm, sx, bias, ym, sy, n0, n1); break;
    }
  }
}

inline void rms_norm_row(const float* x, float* residual, const float* w, float* out, int64_t n, float eps) {
  const float* v = x;
  if (residual != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) residual[i] += x[i];
    v = residual;
  }
  const float inv = 1.f / std::sqrt(dot(v, v, n) / static_cast<float>(n) + eps);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = w[i] * (v[i] * inv);
}

// heads [H, D] of one token rotated in place by that token's cos, sin [D]
inline void rotary_heads(float* x, int64_t heads, int64_t d, const float* c, const float* s) {
  const int64_t half = d / 2;
  for (int64_t h = 0; h < heads; ++h) {
    float* v = x + h * d;
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) {
      const float lo = v[i], hi = v[i + half];
      v[i] = lo * c[i] + (-hi) * s[i];
      v[i + half] = hi * c[i + half] + lo * s[i + half];
    }
  }
}

inline void silu_and_mul_row(const float* g, const float* u, float* o, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) {
    const __m512 gv = _mm512_loadu_ps(g + i);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv));  // exp(-g)
    const __m512 silu = _mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.f), e));
    _mm512_storeu_ps(o + i, _mm512_mul_ps(silu, _mm512_loadu_ps(u + i)));
  }
#endif
  for (; i < n; ++i) o[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
}

// One sequence's single-token query heads of KV heads [h0, h1) (their `group` query heads each,
// contiguous from q), over keys [lo, len) of its paged context (see loraplex_decode_attention);
// `scores` and `acc` are the caller's scratch. Each key position's rows of those heads are
// adjacent in the cache, so taking all heads of a sequence at once reads one stretch per key.
inline void attend(const float* q, const float* k_cache, const float* v_cache, const int64_t* table, int64_t len,
                   int64_t window, int64_t block_size, int64_t kv_heads, int64_t h0, int64_t h1, int64_t group,
                   int64_t d, float scale, std::vector<float>& scores, std::vector<float>& acc, float* o) {
  const int64_t lo = window > 0 ? std::max<int64_t>(0, len - window) : 0;
  const int64_t n = len - lo, rows = (h1 - h0) * group;  // keys, query heads
  const int64_t stride = kv_heads * d;  // from one position's key to the next one's in a block
  // calls fn(j, offset of key j's head-h0 row in the caches) for j = 0 .. n-1, block by block
  const auto for_each_key = [&](auto&& fn) {
    for (int64_t pos = lo; pos < len;) {
      const int64_t in_block = pos % block_size, run = std::min(block_size - in_block, len - pos);
      const int64_t first = (table[pos / block_size] * block_size + in_block) * stride + h0 * d;
      for (int64_t r = 0; r < run; ++r) fn(pos - lo + r, first + r * stride);
      pos += run;
    }
  };
  scores.resize(rows * n);  // [query head, key]
  acc.assign(rows * d, 0.f);  // [query head, D]
  for_each_key([&](int64_t j, int64_t at) {
    for (int64_t r = 0; r < rows; ++r) scores[r * n + j] = dot(q + r * d, k_cache + at + r / group * d, d) * scale;
  });
  for (int64_t r = 0; r < rows; ++r) {
    float* sc = scores.data() + r * n;
    const float top = *std::max_element(sc, sc + n);
    const float inv = 1.f / exp_shifted(sc, n, top);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) sc[j] *= inv;
  }
  for_each_key([&](int64_t j, int64_t at) {
    for (int64_t r = 0; r < rows; ++r) {
      const float p = scores[r * n + j];
      const float* v = v_cache + at + r / group * d;
      float* a = acc.data() + r * d;
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) a[i] += p * v[i];
    }
  });
  std::copy(acc.begin(), acc.end(), o);
}

// KV heads per attention work item: a sequence's all when there are sequences enough to keep
// every thread busy, else one (a single stream's heads then spread over the threads)
inline int64_t heads_per_item(int64_t seqs, int64_t kv_heads, int threads) {
  return seqs >= 2 * threads ? kv_heads : 1;
}

// ---- the decode step: every decoder layer, the final norm and the LM head in one call -----------
//
// At batch 1 a step of this model is ~120 GEMVs of 0.1-3 ms between ~150 small operations; called
// one by one from Python, the calls and the threads' fork/join around each cost milliseconds, a
// quarter of the step. Here one parallel region runs the whole step: the GEMVs split their rows
// between the threads, the small operations run on one thread, and barriers order them.

enum : int64_t { kFloat32 = 0, kQ4_1 = 1, kQ8_0 = 2 };

struct LinearDesc {  // y = x @ W^T (+ bias) for W [n, k]
  int64_t kind;  // kFloat32: W float32, rows contiguous; kQ4_1, kQ8_0: W repacked as quant_cpu.h lays it out
  const void* weight;
  const float* bias;  // [n] or NULL
  int64_t n, k;
};

// A projection's LoRA adapters where the LoRA manager keeps them (core/lora/slot_layout.py): per
// slot, A [n_slices * rank, k] and B transposed, [rank, n], the scaling folded into B; a padded
// rank's rows are zero. `a` is NULL for a projection no adapter can touch.
struct LoRADesc {
  const void* a;  // slot 0's A; slot s's is slot_stride elements on
  const void* b;  // slot 0's B^T
  int64_t slot_stride, n_slices, rank;
  int64_t dtype;  // 0: float32, 1: bfloat16
  const int64_t* offsets;  // [n_slices + 1] the output rows of each slice
};

struct LayerDesc {
  const float* input_norm;  // [H]
  const float* post_norm;   // [H]
  LinearDesc qkv, o, gate_up, down;  // gate_up: the gate rows, then the up rows
  LoRADesc qkv_lora, o_lora, gate_up_lora, down_lora;
  float* k_cache;  // [slots, Hkv, D]
  float* v_cache;
  int64_t window;  // sliding window of this layer, 0 for none
};

struct ModelDesc {
  const LayerDesc* layers;
  int64_t num_layers, hidden, q_heads, kv_heads, head_dim, inner;
  float eps, scale;
  const float* final_norm;  // [H]
  LinearDesc lm_head;
};

// rows [n0, n1) of x [T, k] @ L^T for T tokens (x row stride = k, y row stride = sy); a quantized
// weight reads the activations quantized into xq (quantize_for) instead
inline void linear_range(const LinearDesc& L, const float* x, const uint8_t* xq, int64_t tokens, float* y, int64_t sy,
                         int64_t n0, int64_t n1) {
  if (L.kind == kFloat32) {
    gemv_range(static_cast<const float*>(L.weight), L.k, L.bias, x, L.k, tokens, y, sy, n0, n1);
  } else {
    const auto kind = L.kind == kQ4_1 ? loraplex_quant::Kind::kQ4_1 : loraplex_quant::Kind::kQ8_0;
    loraplex_quant::gemv_part(kind, static_cast<const uint8_t*>(L.weight), L.k, xq, tokens, L.bias, y, sy, false, n0,
                              n1);
  }
}

inline float widen(float v) { return v; }
inline float widen(uint16_t bf16) {
  const uint32_t bits = static_cast<uint32_t>(bf16) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

template <typename W>
inline float dot_widened(const W* a, const float* x, int64_t n) {
  if constexpr (std::is_same_v<W, float>) {
    return dot(a, x, n);
  } else {
    float acc[kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) {
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) acc[l] += widen(a[i + l]) * x[i + l];
    }
    float sum = 0.f;
    for (; i < n; ++i) sum += widen(a[i]) * x[i];
    for (int l = 0; l < kLanes; ++l) sum += acc[l];
    return sum;
  }
}

// shrink, per thread: u[m] [n_slices * rank] = A[slot_m] x[m] for the tokens with an adapter
template <typename W>
void lora_shrink(const LoRADesc& L, const float* x, int64_t k, int64_t tokens, const int64_t* slots, float* u) {
  const int64_t rows = L.n_slices * L.rank;
  for (int64_t m = 0; m < tokens; ++m) {
    if (slots[m] < 0) continue;
    const W* a = static_cast<const W*>(L.a) + slots[m] * L.slot_stride;
    for (int64_t j = 0; j < rows; ++j) u[m * rows + j] = dot_widened(a + j * k, x + m * k, k);
  }
}

// expand, on rows [n0, n1) only: y[m, n] += B[slot_m][n] . u[m][slice of n]
template <typename W>
void lora_expand(const LoRADesc& L, int64_t n, const float* u, int64_t tokens, const int64_t* slots, float* y,
                 int64_t sy, int64_t n0, int64_t n1) {
  const int64_t rows = L.n_slices * L.rank;
  for (int64_t m = 0; m < tokens; ++m) {
    if (slots[m] < 0) continue;
    const W* bt = static_cast<const W*>(L.b) + slots[m] * L.slot_stride;
    float* ym = y + m * sy;
    for (int64_t s = 0; s < L.n_slices; ++s) {
      const int64_t lo = std::max(n0, L.offsets[s]), hi = std::min(n1, L.offsets[s + 1]);
      for (int64_t r = 0; r < L.rank && lo < hi; ++r) {
        const float coef = u[m * rows + s * L.rank + r];
        if (coef == 0.f) continue;  // a padded rank's row, or nothing to add
        const W* row = bt + r * n;
#pragma omp simd
        for (int64_t i = lo; i < hi; ++i) ym[i] += widen(row[i]) * coef;
      }
    }
  }
}

// The LoRA delta of projection L (input x [T, k], output y [T, n]) on this thread's rows [n0, n1),
// each range in `ranges`; the shrink is repeated by every thread (it is ~1% of the step's reads)
// rather than shared through another barrier. `u` is the thread's scratch.
inline void add_lora(const LoRADesc& L, const LinearDesc& W, const float* x, int64_t tokens, const int64_t* slots,
                     std::vector<float>& u, float* y, int64_t sy,
                     std::initializer_list<std::pair<int64_t, int64_t>> ranges) {
  if (L.a == nullptr || slots == nullptr) return;
  u.resize(tokens * L.n_slices * L.rank);
  if (L.dtype == 1) {
    lora_shrink<uint16_t>(L, x, W.k, tokens, slots, u.data());
    for (const auto& [n0, n1] : ranges) lora_expand<uint16_t>(L, W.n, u.data(), tokens, slots, y, sy, n0, n1);
  } else {
    lora_shrink<float>(L, x, W.k, tokens, slots, u.data());
    for (const auto& [n0, n1] : ranges) lora_expand<float>(L, W.n, u.data(), tokens, slots, y, sy, n0, n1);
  }
}

// the activations x [T, k] quantized into xq when L reads them so (one thread)
inline void quantize_for(const LinearDesc& L, const float* x, int64_t tokens, uint8_t* xq) {
  if (L.kind != kFloat32) loraplex_quant::quantize_activations(x, L.k, tokens, L.k, xq, 1);
}

// thread t's share [first, second) of n rows: one contiguous stretch each
inline std::pair<int64_t, int64_t> share(int64_t n, int t, int nt) { return {n * t / nt, n * (t + 1) / nt}; }

}  // namespace

extern "C" {

// y [tokens, n_len] = x [tokens, k_len] @ w [n_len, k_len]^T (+ bias): every weight read once, for
// any number of tokens (in groups of up to 4 sharing each row's read); rows split between threads.
void loraplex_gemv(const float* w, int64_t n_len, int64_t k_len, const float* bias, const float* x, int64_t sx,
                   int64_t tokens, float* y, int64_t sy, int threads) {
  const bool parallel = threads > 1 && n_len * k_len > kParallelWork;
#pragma omp parallel num_threads(threads) if (parallel)
  {
#if defined(_OPENMP)
    const int t = parallel ? omp_get_thread_num() : 0, nt = parallel ? omp_get_num_threads() : 1;
#else
    const int t = 0, nt = 1;
#endif
    // one contiguous stretch of rows each
    gemv_range(w, k_len, bias, x, sx, tokens, y, sy, n_len * t / nt, n_len * (t + 1) / nt);
  }
}

// residual (when not NULL): residual[r] += x[r], then the sum is normalised (vLLM's fused add).
// out[r] = w * (v * 1/sqrt(mean(v^2) + eps)), v = x[r] or the updated residual[r].
void loraplex_rms_norm(const float* x, int64_t sx, float* residual, int64_t sr, const float* w, float* out,
                       int64_t so, int64_t rows, int64_t n, float eps, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && rows * n > kParallelWork)
  for (int64_t r = 0; r < rows; ++r)
    rms_norm_row(x + r * sx, residual != nullptr ? residual + r * sr : nullptr, w, out + r * so, n, eps);
}

// Neox rotary (rotate-half) in place on x [T, H, D] (token stride sx, heads contiguous):
// x = x * cos[t] + rotate_half(x) * sin[t], cos/sin [T, D] gathered for the step's positions.
void loraplex_rotary(float* x, int64_t sx, int64_t tokens, int64_t heads, int64_t d, const float* cos,
                     const float* sin, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && tokens * heads * d > kParallelWork)
  for (int64_t t = 0; t < tokens; ++t) rotary_heads(x + t * sx, heads, d, cos + t * d, sin + t * d);
}

// out[t] = silu(gate_up[t, :I]) * gate_up[t, I:]
void loraplex_silu_and_mul(const float* gate_up, int64_t sg, float* out, int64_t so, int64_t tokens, int64_t inner,
                           int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && tokens * inner > kParallelWork)
  for (int64_t t = 0; t < tokens; ++t) silu_and_mul_row(gate_up + t * sg, gate_up + t * sg + inner, out + t * so, inner);
}

// Decode attention of `seqs` single-token queries over their paged keys and values.
// q [seqs, Hq, D] (token stride sq), out [seqs, Hq, D] (token stride so); caches [slots, Hkv, D];
// block_tables [seqs, table_stride]; context_lens [seqs]: keys at positions [lo, len) are read,
// lo = max(0, len - window) with a sliding window (window > 0), else 0.
void loraplex_decode_attention(const float* q, int64_t sq, const float* k_cache, const float* v_cache,
                               const int64_t* block_tables, int64_t table_stride, const int64_t* context_lens,
                               int64_t block_size, int64_t seqs, int64_t q_heads, int64_t kv_heads, int64_t d,
                               int64_t window, float scale, float* out, int64_t so, int threads) {
  const int64_t group = q_heads / kv_heads;
  int64_t keys = 0;
  for (int64_t b = 0; b < seqs; ++b) keys += context_lens[b];
  const bool parallel = threads > 1 && keys * q_heads * d > kParallelWork;
#pragma omp parallel num_threads(threads) if (parallel)
  {
    std::vector<float> scores, acc;  // [group, context], [group, D]
    const int64_t per = heads_per_item(seqs, kv_heads, threads), parts = kv_heads / per;
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < seqs * parts; ++item) {
      const int64_t b = item / parts, h = item % parts * per;
      attend(q + b * sq + h * group * d, k_cache, v_cache, block_tables + b * table_stride, context_lens[b], window,
             block_size, kv_heads, h, h + per, group, d, scale, scores, acc, out + b * so + h * group * d);
    }
  }
}

// One decode step of `tokens` sequences (one new token each): residual [T, H] holds the tokens'
// embeddings (overwritten); cos, sin [T, D] their rotary rows; slots [T] where their K/V go;
// block_tables [T, table_stride] and context_lens [T] (the new token included) as for
// loraplex_decode_attention; lora_slots [T] each token's LoRA slot (-1: none; NULL: no token has
// one). Writes logits [T, vocab].
void loraplex_decode_step(const ModelDesc* m, int64_t tokens, float* residual, const float* cos, const float* sin,
                          const int64_t* slots, const int64_t* block_tables, int64_t table_stride,
                          const int64_t* context_lens, int64_t block_size, const int64_t* lora_slots, float* logits,
                          int threads) {
  const int64_t H = m->hidden, D = m->head_dim, I = m->inner, T = tokens;
  const int64_t q_size = m->q_heads * D, kv_size = m->kv_heads * D, qkv_size = q_size + 2 * kv_size;
  const int64_t group = m->q_heads / m->kv_heads;
  // activations [T, width] each, shared by the threads; xq: the input of a quantized projection
  std::vector<float> x(T * H), hidden(T * H), qkv(T * qkv_size), attn(T * q_size), gate_up(T * 2 * I), act(T * I);
  std::vector<uint8_t> xq_buffer(T * loraplex_quant::activation_row_bytes(std::max({H, q_size, I})) + 64);
  uint8_t* xq = xq_buffer.data() + (64 - reinterpret_cast<uintptr_t>(xq_buffer.data()) % 64) % 64;
#pragma omp parallel num_threads(threads)
  {
#if defined(_OPENMP)
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
#else
    const int t = 0, nt = 1;
#endif
    std::vector<float> scores, acc, u;  // attention and LoRA scratch, this thread's
    const auto [i0, i1] = share(I, t, nt);  // this thread's inner units: their gate and up rows
    const int64_t per = heads_per_item(T, m->kv_heads, nt), parts = m->kv_heads / per;  // attention items
    for (int64_t l = 0; l < m->num_layers; ++l) {
      const LayerDesc& L = m->layers[l];
#pragma omp single
      {
        for (int64_t r = 0; r < T; ++r)  // layer 0 normalises the embeddings; later ones add the MLP output first
          rms_norm_row(l == 0 ? residual + r * H : hidden.data() + r * H, l == 0 ? nullptr : residual + r * H,
                       L.input_norm, x.data() + r * H, H, m->eps);
        quantize_for(L.qkv, x.data(), T, xq);
      }
      const auto [q0, q1] = share(qkv_size, t, nt);
      linear_range(L.qkv, x.data(), xq, T, qkv.data(), qkv_size, q0, q1);
      add_lora(L.qkv_lora, L.qkv, x.data(), T, lora_slots, u, qkv.data(), qkv_size, {{q0, q1}});
#pragma omp barrier
#pragma omp single
      for (int64_t r = 0; r < T; ++r) {  // q and k rotated, then k and v written to the cache
        float* row = qkv.data() + r * qkv_size;
        rotary_heads(row, m->q_heads + m->kv_heads, D, cos + r * D, sin + r * D);
        std::copy(row + q_size, row + q_size + kv_size, L.k_cache + slots[r] * kv_size);
        std::copy(row + q_size + kv_size, row + qkv_size, L.v_cache + slots[r] * kv_size);
      }
#pragma omp for schedule(dynamic, 1)
      for (int64_t item = 0; item < T * parts; ++item) {
        const int64_t b = item / parts, h = item % parts * per;
        attend(qkv.data() + b * qkv_size + h * group * D, L.k_cache, L.v_cache, block_tables + b * table_stride,
               context_lens[b], L.window, block_size, m->kv_heads, h, h + per, group, D, m->scale, scores, acc,
               attn.data() + b * q_size + h * group * D);
      }
      if (L.o.kind != kFloat32) {  // the same test on every thread: all or none enter (and wait)
#pragma omp single
        quantize_for(L.o, attn.data(), T, xq);
      }
      const auto [h0, h1] = share(H, t, nt);
      linear_range(L.o, attn.data(), xq, T, hidden.data(), H, h0, h1);
      add_lora(L.o_lora, L.o, attn.data(), T, lora_slots, u, hidden.data(), H, {{h0, h1}});
#pragma omp barrier
#pragma omp single
      {
        for (int64_t r = 0; r < T; ++r)
          rms_norm_row(hidden.data() + r * H, residual + r * H, L.post_norm, x.data() + r * H, H, m->eps);
        quantize_for(L.gate_up, x.data(), T, xq);
      }
      // each thread computes the gate and up rows of its share of the inner units, then their product
      linear_range(L.gate_up, x.data(), xq, T, gate_up.data(), 2 * I, i0, i1);
      linear_range(L.gate_up, x.data(), xq, T, gate_up.data(), 2 * I, I + i0, I + i1);
      add_lora(L.gate_up_lora, L.gate_up, x.data(), T, lora_slots, u, gate_up.data(), 2 * I, {{i0, i1}, {I + i0, I + i1}});
      for (int64_t r = 0; r < T; ++r) {
        const float* g = gate_up.data() + r * 2 * I;
        silu_and_mul_row(g + i0, g + I + i0, act.data() + r * I + i0, i1 - i0);
      }
#pragma omp barrier
      if (L.down.kind != kFloat32) {
#pragma omp single
        quantize_for(L.down, act.data(), T, xq);
      }
      linear_range(L.down, act.data(), xq, T, hidden.data(), H, h0, h1);
      add_lora(L.down_lora, L.down, act.data(), T, lora_slots, u, hidden.data(), H, {{h0, h1}});
#pragma omp barrier
    }
#pragma omp single
    {
      for (int64_t r = 0; r < T; ++r)
        rms_norm_row(hidden.data() + r * H, residual + r * H, m->final_norm, x.data() + r * H, H, m->eps);
      quantize_for(m->lm_head, x.data(), T, xq);
    }
    const auto [v0, v1] = share(m->lm_head.n, t, nt);
    linear_range(m->lm_head, x.data(), xq, T, logits, m->lm_head.n, v0, v1);
  }
}

}  // extern "C"
