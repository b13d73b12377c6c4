// GGUF Q4_1 and Q8_0 weights used in place on the CPU: activation quantization, GEMV against the
// quantized weight, and dequantization to fp32 (whole weights for prefill, chosen rows for the
// embedding lookup).
//
// Header-only, everything inline in namespace loraplex_quant: csrc/quant_cpu.cpp wraps it for
// ctypes (kernels/quant_cpu.py), and csrc/decoder_cpu.cpp may include it to call the GEMV inside
// a fused decode step. Plain C++17 with OpenMP and no torch headers; no state outside the calls.
//
// The arithmetic is llama.cpp's Q4_1 x Q8_1 and Q8_0 x Q8_1: activations are quantized per
// 32-value block to int8, qx = rint(x * (1 / dx)) (nearest even) with dx = max|x| / 127 (0 for an
// all-zero block), and the block's sum sx = dx * sum(qx) is kept; one block of the weight adds
//   Q4_1 (w = d * q + m, q in 0..15):     d * dx * sum(q * qx) + m * sx
//   Q8_0 (w = d * q,     q in -128..127): d * dx * sum(q * qx)
// Each block's integer sum is exact (int32, summed whole before it meets a float); the rest is
// fp32. Activations must be finite (a NaN or Inf spoils its block, as in llama.cpp).
//
// ISA: AVX-512 VNNI (F, BW, VL, VNNI: Zen 4, Ice Lake and later) runs 16 blocks at a time with
// _mm512_dpbusd_epi32 (unsigned weight bytes x signed activation bytes); AVX2 + FMA + F16C uses
// maddubs/madd for the same sums; anything else runs plain loops (slow: ~2 GB/s of weights per
// core on x86-64 baseline, for completeness only). All three give the same integer sums; the fp32
// accumulation order differs between them (~1e-7 relative).
//
// Threads: gemv splits the rows into one contiguous stretch per thread (OpenMP, num_threads) when
// the weight is over kParallelBytes, else it runs on the calling thread without entering OpenMP.
// Called inside a parallel region, its region is nested (single-threaded by default): a fused
// step running its own region calls gemv_part with each thread's rows instead.
//
// ---------------------------------------------------------------------------------------------
// The repacked layout (the same number of bytes as GGUF: 20 per Q4_1 block, 34 per Q8_0 block).
//
// A weight [N, K] is N rows of row_bytes each, back to back, no padding (K a multiple of 32; the
// rows are not aligned beyond 1 byte; every load is unaligned-safe). A row of nb = K / 32 blocks
// is cut into regions, in this order:
//   nb / 16 super-blocks of 16 blocks, then (nb % 16) / 2 pairs of blocks, then one single block
//   if nb is odd.
// Inside a region of n blocks (n = 16, 2 or 1) the 32 * n values sit in "slot" order:
//   super-block: slot 64 * r + 4 * b + j holds value 4 * r + j of block b (r = 0..7, j = 0..3):
//                64 bytes of slots are a 512-bit register whose 32-bit lane b is block b's
//                r-th group of 4 values, so 8 dpbusd leave block b's dot product in lane b;
//   pair, single: slot = value index (block 0's 32 values, then block 1's).
// Q4_1 region: 16 * n bytes of nibbles, then n fp16 scales d, then n fp16 minimums m.
//   A nibble byte packs two slots H apart, H = 64 (super-block), 32 (pair), 16 (single): slot s
//   sits in byte H * (s / 2H) + s % H, in the low nibble when (s / H) is even, else the high one.
//   (Super-block: each 64-byte chunk c holds slot chunks 2c (low) and 2c+1 (high), so one load,
//   an and and a shift give two 512-bit registers of weights; pair: byte j holds value j of
//   block 0 low and value j of block 1 high.) Super-block = 256 + 32 + 32 = 320 bytes.
// Q8_0 region: 32 * n bytes u = q + 128 (unsigned, so dpbusd takes them as they are; the kernel
//   subtracts 128 * sum(qx) exactly in int32), then n fp16 scales d. Super-block = 544 bytes.
//
// Quantized activations, one row per token, activation_row_bytes(K) apart (a multiple of 64):
//   int8 qx[K] in the same slot order as a Q8_0 weight row's values, then float dx[nb],
//   float sx[nb] (= dx * sum(qx)) and int32 qsum[nb] (= sum(qx)) in block order.
// The buffer must be 4-byte aligned (for the float and int32 arrays); 64-byte aligned is ~10%
// faster (torch's allocations are; `linear` aligns its scratch).
// ---------------------------------------------------------------------------------------------

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#include <immintrin.h>
#endif
#if defined(_OPENMP)
#include <omp.h>
#endif

// undefined again at the end of this file
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define LORAPLEX_QUANT_512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define LORAPLEX_QUANT_256 1
#endif

namespace loraplex_quant {

#if defined(LORAPLEX_QUANT_512)
inline constexpr const char* kIsa = "avx512-vnni";
#elif defined(LORAPLEX_QUANT_256)
inline constexpr const char* kIsa = "avx2";
#else
inline constexpr const char* kIsa = "scalar";
#endif

enum class Kind { kQ4_1, kQ8_0 };

inline constexpr int64_t kBlock = 32;         // values per GGUF block
inline constexpr int64_t kSuper = 16;         // blocks per super-block
inline constexpr int64_t kQ41Bytes = 20;      // bytes per Q4_1 block: 16 of nibbles, fp16 d, fp16 m
inline constexpr int64_t kQ80Bytes = 34;      // bytes per Q8_0 block: 32 values, fp16 d
inline constexpr int64_t kParallelBytes = 1 << 16;  // weight bytes below which a GEMV stays on one thread
inline constexpr int64_t kParallelValues = 1 << 16;  // values below which (de)quantization does

inline int64_t block_bytes(Kind kind) { return kind == Kind::kQ4_1 ? kQ41Bytes : kQ80Bytes; }
inline int64_t row_bytes(Kind kind, int64_t k) { return k / kBlock * block_bytes(kind); }
inline int64_t activation_row_bytes(int64_t k) { return (k + 12 * (k / kBlock) + 63) / 64 * 64; }

struct Activations {  // one token's row of the quantized activations
  const int8_t* q;        // [K], slot order
  const float* d;         // [nb]
  const float* s;         // [nb]
  const int32_t* qsum;    // [nb]
};

inline Activations activations(const uint8_t* row, int64_t k) {
  const int64_t nb = k / kBlock;
  return {reinterpret_cast<const int8_t*>(row), reinterpret_cast<const float*>(row + k),
          reinterpret_cast<const float*>(row + k + 4 * nb), reinterpret_cast<const int32_t*>(row + k + 8 * nb)};
}

inline float half_to_float(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);  // inf, nan
  } else if (exp == 0) {  // zero, subnormal: mant * 2^-24, exact in fp32
    const float v = std::ldexp(static_cast<float>(mant), -24);
    return sign ? -v : v;
  } else {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#endif
}

// ---------------------------------------------------------------------------------------------
// activation quantization

// x [K] fp32 -> one row of quantized activations (see the layout above)
inline void quantize_row(const float* x, int64_t k, uint8_t* row) {
  const int64_t nb = k / kBlock, in_super = nb / kSuper * kSuper;
  int8_t* q = reinterpret_cast<int8_t*>(row);
  float* d = reinterpret_cast<float*>(row + k);
  float* s = d + nb;
  int32_t* qsum = reinterpret_cast<int32_t*>(s + nb);
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x + b * kBlock;
    alignas(64) int8_t qb[kBlock];
    int32_t sum = 0;
#if defined(LORAPLEX_QUANT_512)
    const __m512 x0 = _mm512_loadu_ps(xb), x1 = _mm512_loadu_ps(xb + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
    const float db = amax / 127.f, id = db != 0.f ? 1.f / db : 0.f;
    const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, _mm512_set1_ps(id)));  // nearest even
    const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, _mm512_set1_ps(id)));
    _mm_store_si128(reinterpret_cast<__m128i*>(qb), _mm512_cvtepi32_epi8(q0));
    _mm_store_si128(reinterpret_cast<__m128i*>(qb + 16), _mm512_cvtepi32_epi8(q1));
    sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
#else
    float amax = 0.f;
    for (int i = 0; i < kBlock; ++i) amax = std::max(amax, std::fabs(xb[i]));
    const float db = amax / 127.f, id = db != 0.f ? 1.f / db : 0.f;
    for (int i = 0; i < kBlock; ++i) {
      const int v = static_cast<int>(std::nearbyint(xb[i] * id));  // nearest even, as cvtps_epi32
      qb[i] = static_cast<int8_t>(v);
      sum += v;
    }
#endif
    d[b] = db;
    s[b] = db * static_cast<float>(sum);
    qsum[b] = sum;
    if (b < in_super) {  // group r of block b to slot 64 r + 4 b of its super-block
      int8_t* dst = q + (b / kSuper) * kSuper * kBlock + 4 * (b % kSuper);
      for (int r = 0; r < 8; ++r) std::memcpy(dst + 64 * r, qb + 4 * r, 4);
    } else {
      std::memcpy(q + b * kBlock, qb, kBlock);
    }
  }
}

// x [T, K] fp32 (row stride sx) -> xq [T, activation_row_bytes(K)]
inline void quantize_activations(const float* x, int64_t sx, int64_t tokens, int64_t k, uint8_t* xq, int threads) {
  const int64_t sxq = activation_row_bytes(k);
  if (threads > 1 && tokens > 1 && tokens * k > kParallelValues) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t t = 0; t < tokens; ++t) quantize_row(x + t * sx, k, xq + t * sxq);
    return;
  }
  for (int64_t t = 0; t < tokens; ++t) quantize_row(x + t * sx, k, xq + t * sxq);  // no OpenMP entry: cheaper
}

// ---------------------------------------------------------------------------------------------
// dot products of one weight row with M tokens' quantized activations: out[m] = w . x[m]

#if defined(LORAPLEX_QUANT_256)
// sum of u8 x s8 products in groups of 4 (no saturation for |u| <= 128 or u <= 15)
inline __m256i dot4(__m256i acc, __m256i u, __m256i s) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}
#endif

#if defined(LORAPLEX_QUANT_512) || defined(LORAPLEX_QUANT_256)
inline int32_t hsum(__m256i v) {
  const __m128i a = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  const __m128i b = _mm_add_epi32(a, _mm_shuffle_epi32(a, 0x4e));
  return _mm_cvtsi128_si32(_mm_add_epi32(b, _mm_shuffle_epi32(b, 0xb1)));
}
inline float hsum(__m256 v) {
  const __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 b = _mm_add_ps(a, _mm_movehl_ps(a, a));
  return _mm_cvtss_f32(_mm_add_ss(b, _mm_movehdup_ps(b)));
}
#endif

#if defined(LORAPLEX_QUANT_512)
// lanes 0-7 and 8-15 each summed (in int32, exactly) into lanes 0 and 8: a pair's two blocks
inline __m512i pair_sums(__m512i v) {
  v = _mm512_add_epi32(v, _mm512_shuffle_epi32(v, _MM_PERM_BADC));
  v = _mm512_add_epi32(v, _mm512_shuffle_epi32(v, _MM_PERM_CDAB));
  return _mm512_add_epi32(v, _mm512_shuffle_i64x2(v, v, _MM_SHUFFLE(2, 3, 0, 1)));
}
#endif

// The portable form of both kinds, written as plain loops that compilers vectorize: one region of
// n blocks at p (its values start at value e0 of the row, its blocks at block b0); adds each
// token's part to acc[m].
template <Kind kind, int M>
inline void region_scalar(const uint8_t* p, int64_t n, int64_t e0, int64_t b0, const Activations* a, float* acc) {
  int32_t isum[M][kSuper] = {};
  for (int m = 0; m < M; ++m) {
    const int8_t* x = a[m].q + e0;
    int32_t* sum = isum[m];
    if (n == kSuper) {
      for (int c = 0; c < (kind == Kind::kQ4_1 ? 4 : 8); ++c) {  // 64 bytes: lane (4 bytes) i / 4 = block
        int32_t part[64];
        if (kind == Kind::kQ4_1) {  // low nibbles slots 128 c + i, high 128 c + 64 + i
          for (int i = 0; i < 64; ++i) {
            const int32_t byte = p[64 * c + i];
            part[i] = (byte & 0x0f) * x[128 * c + i] + (byte >> 4) * x[128 * c + 64 + i];
          }
        } else {
          for (int i = 0; i < 64; ++i) part[i] = (static_cast<int32_t>(p[64 * c + i]) - 128) * x[64 * c + i];
        }
        for (int b = 0; b < kSuper; ++b) sum[b] += part[4 * b] + part[4 * b + 1] + part[4 * b + 2] + part[4 * b + 3];
      }
    } else if (kind == Kind::kQ4_1) {  // pair: byte j = value j of both blocks; single: values j, j + 16
      const int half = 16 * static_cast<int>(n);
      for (int j = 0; j < half; ++j) {
        const int32_t lo = (p[j] & 0x0f) * x[j], hi = (p[j] >> 4) * x[half + j];
        sum[0] += n == 2 ? lo : lo + hi;
        sum[1] += n == 2 ? hi : 0;
      }
    } else {
      for (int64_t b = 0; b < n; ++b)
        for (int j = 0; j < kBlock; ++j) sum[b] += (static_cast<int32_t>(p[kBlock * b + j]) - 128) * x[kBlock * b + j];
    }
  }
  const uint8_t* scales = p + (kind == Kind::kQ4_1 ? 16 * n : 32 * n);
  for (int64_t b = 0; b < n; ++b) {
    const float d = half_to_float(scales + 2 * b);
    for (int m = 0; m < M; ++m) acc[m] += d * a[m].d[b0 + b] * static_cast<float>(isum[m][b]);
    if (kind == Kind::kQ4_1) {
      const float mn = half_to_float(scales + 2 * n + 2 * b);
      for (int m = 0; m < M; ++m) acc[m] += mn * a[m].s[b0 + b];
    }
  }
}

template <Kind kind, int M>
inline void dot_row_scalar(const uint8_t* w, int64_t k, const Activations* a, float* out) {
  const int64_t nb = k / kBlock, bytes = block_bytes(kind);
  float acc[M] = {};
  int64_t b = 0;
  for (; b + kSuper <= nb; b += kSuper, w += kSuper * bytes) region_scalar<kind, M>(w, kSuper, b * kBlock, b, a, acc);
  for (; b + 2 <= nb; b += 2, w += 2 * bytes) region_scalar<kind, M>(w, 2, b * kBlock, b, a, acc);
  if (b < nb) region_scalar<kind, M>(w, 1, b * kBlock, b, a, acc);
  for (int m = 0; m < M; ++m) out[m] = acc[m];
}

#if defined(LORAPLEX_QUANT_512)
// One row with M tokens (several rows side by side were faster from cache but ~20% slower from
// memory: one sequential stream is what the prefetchers serve best).
template <int M>
inline void q4_1_row_512(const uint8_t* w, int64_t k, const Activations* a, float* out) {
  const int64_t nb = k / kBlock;
  const __m512i low = _mm512_set1_epi8(0x0f);
  __m512 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
  int64_t b = 0;
  for (; b + kSuper <= nb; b += kSuper, w += kSuper * kQ41Bytes) {
    __m512i sum[M];  // lane = block
    for (int m = 0; m < M; ++m) sum[m] = _mm512_setzero_si512();
    for (int c = 0; c < 4; ++c) {  // 64 bytes = slots 128 c .. 128 c + 127
      const __m512i v = _mm512_loadu_si512(w + 64 * c);
      const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      for (int m = 0; m < M; ++m) {
        const int8_t* x = a[m].q + b * kBlock + 128 * c;
        sum[m] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(sum[m], lo, _mm512_loadu_si512(x)), hi,
                                     _mm512_loadu_si512(x + 64));
      }
    }
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 256)));
    const __m512 mn = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 288)));
    for (int m = 0; m < M; ++m) {
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[m]), _mm512_mul_ps(d, _mm512_loadu_ps(a[m].d + b)), acc[m]);
      acc[m] = _mm512_fmadd_ps(mn, _mm512_loadu_ps(a[m].s + b), acc[m]);
    }
  }
  const __m256i low256 = _mm256_set1_epi8(0x0f);
  const __m512i spread = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  __m128 tail[M];  // lanes 0, 1: the pairs' m * sx; lane 2: the single block
  for (int m = 0; m < M; ++m) tail[m] = _mm_setzero_ps();
  for (; b + 2 <= nb; b += 2, w += 2 * kQ41Bytes) {  // lanes 0-7 block b, 8-15 block b + 1
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
    const __m512i q = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(v, low256)),
                                         _mm256_and_si256(_mm256_srli_epi16(v, 4), low256), 1);
    const __m128 dm = _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + 32)));  // d0 d1 m0 m1
    const __m128 mn = _mm_movehl_ps(_mm_setzero_ps(), dm);  // m0 m1 0 0
    for (int m = 0; m < M; ++m) {
      // each block's sum whole before it meets a float: the lanes' partial sums may cancel
      const __m512i sum = pair_sums(_mm512_dpbusd_epi32(_mm512_setzero_si512(), q, _mm512_loadu_si512(a[m].q + b * kBlock)));
      const __m128 dd = _mm_mul_ps(dm, _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(a[m].d + b))));
      const __m512 scale = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(dd));
      acc[m] = _mm512_mask3_fmadd_ps(_mm512_cvtepi32_ps(sum), scale, acc[m], 0x0101);
      tail[m] = _mm_fmadd_ps(mn, _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(a[m].s + b))), tail[m]);
    }
  }
  if (b < nb) {  // one block: low nibbles values 0-15, high 16-31
    const __m128i low128 = _mm_set1_epi8(0x0f);
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
    const __m256i q = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), low128), _mm_and_si128(v, low128));
    const float d = half_to_float(w + 16), mn = half_to_float(w + 18);
    for (int m = 0; m < M; ++m) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a[m].q + b * kBlock));
      const int32_t sum = hsum(_mm256_dpbusd_epi32(_mm256_setzero_si256(), q, x));
      const float part = d * a[m].d[b] * static_cast<float>(sum) + mn * a[m].s[b];
      tail[m] = _mm_add_ps(tail[m], _mm_set_ps(0.f, part, 0.f, 0.f));
    }
  }
  for (int m = 0; m < M; ++m) out[m] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m], _mm512_zextps128_ps512(tail[m])));
}

template <int M>
inline void q8_0_row_512(const uint8_t* w, int64_t k, const Activations* a, float* out) {
  const int64_t nb = k / kBlock;
  __m512 acc[M];
  float tail[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps(), tail[m] = 0.f;
  int64_t b = 0;
  for (; b + kSuper <= nb; b += kSuper, w += kSuper * kQ80Bytes) {
    __m512i s0[M], s1[M];  // lane = block: sum(u * qx), two chains
    for (int m = 0; m < M; ++m) s0[m] = s1[m] = _mm512_setzero_si512();
    for (int c = 0; c < 8; c += 2) {
      const __m512i v0 = _mm512_loadu_si512(w + 64 * c), v1 = _mm512_loadu_si512(w + 64 * c + 64);
      for (int m = 0; m < M; ++m) {
        const int8_t* x = a[m].q + b * kBlock + 64 * c;
        s0[m] = _mm512_dpbusd_epi32(s0[m], v0, _mm512_loadu_si512(x));
        s1[m] = _mm512_dpbusd_epi32(s1[m], v1, _mm512_loadu_si512(x + 64));
      }
    }
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 512)));
    for (int m = 0; m < M; ++m) {  // sum(q * qx) = sum(u * qx) - 128 sum(qx)
      const __m512i sum = _mm512_sub_epi32(_mm512_add_epi32(s0[m], s1[m]),
                                           _mm512_slli_epi32(_mm512_loadu_si512(a[m].qsum + b), 7));
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(d, _mm512_loadu_ps(a[m].d + b)), acc[m]);
    }
  }
  const __m512i spread = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  for (; b + 2 <= nb; b += 2, w += 2 * kQ80Bytes) {  // lanes 0-7 block b, 8-15 block b + 1
    const __m512i v = _mm512_loadu_si512(w);
    int32_t halves;  // d0, d1
    std::memcpy(&halves, w + 64, 4);
    const __m128 d = _mm_cvtph_ps(_mm_cvtsi32_si128(halves));  // d0 d1 0 0
    for (int m = 0; m < M; ++m) {
      const __m128i qsum = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(a[m].qsum + b));
      const __m512i bias = _mm512_permutexvar_epi32(spread, _mm512_castsi128_si512(_mm_slli_epi32(qsum, 7)));
      const __m512i sum = _mm512_sub_epi32(  // lanes 0, 8: the blocks' sum(u qx) - 128 sum(qx)
          pair_sums(_mm512_dpbusd_epi32(_mm512_setzero_si512(), v, _mm512_loadu_si512(a[m].q + b * kBlock))), bias);
      const __m128 dd = _mm_mul_ps(d, _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(a[m].d + b))));
      const __m512 scale = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(dd));
      acc[m] = _mm512_mask3_fmadd_ps(_mm512_cvtepi32_ps(sum), scale, acc[m], 0x0101);
    }
  }
  if (b < nb) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
    const float d = half_to_float(w + 32);
    for (int m = 0; m < M; ++m) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a[m].q + b * kBlock));
      const int32_t sum = hsum(_mm256_dpbusd_epi32(_mm256_setzero_si256(), v, x)) - 128 * a[m].qsum[b];
      tail[m] += d * a[m].d[b] * static_cast<float>(sum);
    }
  }
  for (int m = 0; m < M; ++m) out[m] = _mm512_reduce_add_ps(acc[m]) + tail[m];
}
#endif

template <int M>
inline void q4_1_row(const uint8_t* w, int64_t k, const Activations* a, float* out) {
#if defined(LORAPLEX_QUANT_512)
  q4_1_row_512<M>(w, k, a, out);
#elif defined(LORAPLEX_QUANT_256)
  const int64_t nb = k / kBlock;
  const __m256i low = _mm256_set1_epi8(0x0f);
  __m256 acc[M];
  float tail[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps(), tail[m] = 0.f;
  int64_t b = 0;
  for (; b + kSuper <= nb; b += kSuper, w += kSuper * kQ41Bytes) {
    __m256i sa[M], sb[M];  // lane = block: blocks 0-7, 8-15
    for (int m = 0; m < M; ++m) sa[m] = sb[m] = _mm256_setzero_si256();
    for (int c = 0; c < 4; ++c) {
      const __m256i va = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 64 * c));
      const __m256i vb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 64 * c + 32));
      const __m256i loa = _mm256_and_si256(va, low), hia = _mm256_and_si256(_mm256_srli_epi16(va, 4), low);
      const __m256i lob = _mm256_and_si256(vb, low), hib = _mm256_and_si256(_mm256_srli_epi16(vb, 4), low);
      for (int m = 0; m < M; ++m) {
        const int8_t* x = a[m].q + b * kBlock + 128 * c;
        sa[m] = dot4(dot4(sa[m], loa, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))), hia,
                     _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 64)));
        sb[m] = dot4(dot4(sb[m], lob, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32))), hib,
                     _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 96)));
      }
    }
    const __m256 da = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 256)));
    const __m256 db = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 272)));
    const __m256 ma = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 288)));
    const __m256 mb = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 304)));
    for (int m = 0; m < M; ++m) {
      acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sa[m]), _mm256_mul_ps(da, _mm256_loadu_ps(a[m].d + b)), acc[m]);
      acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sb[m]), _mm256_mul_ps(db, _mm256_loadu_ps(a[m].d + b + 8)), acc[m]);
      acc[m] = _mm256_fmadd_ps(ma, _mm256_loadu_ps(a[m].s + b), acc[m]);
      acc[m] = _mm256_fmadd_ps(mb, _mm256_loadu_ps(a[m].s + b + 8), acc[m]);
    }
  }
  for (; b + 2 <= nb; b += 2, w += 2 * kQ41Bytes) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
    const __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
    const float d0 = half_to_float(w + 32), d1 = half_to_float(w + 34);
    const float m0 = half_to_float(w + 36), m1 = half_to_float(w + 38);
    for (int m = 0; m < M; ++m) {
      const int8_t* x = a[m].q + b * kBlock;
      const int32_t s0 = hsum(dot4(_mm256_setzero_si256(), lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))));
      const int32_t s1 = hsum(dot4(_mm256_setzero_si256(), hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32))));
      tail[m] += d0 * a[m].d[b] * static_cast<float>(s0) + m0 * a[m].s[b];
      tail[m] += d1 * a[m].d[b + 1] * static_cast<float>(s1) + m1 * a[m].s[b + 1];
    }
  }
  if (b < nb) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
    const __m128i low128 = _mm_set1_epi8(0x0f);
    const __m256i q = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), low128), _mm_and_si128(v, low128));
    const float d = half_to_float(w + 16), mn = half_to_float(w + 18);
    for (int m = 0; m < M; ++m) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a[m].q + b * kBlock));
      tail[m] += d * a[m].d[b] * static_cast<float>(hsum(dot4(_mm256_setzero_si256(), q, x))) + mn * a[m].s[b];
    }
  }
  for (int m = 0; m < M; ++m) out[m] = hsum(acc[m]) + tail[m];
#else
  dot_row_scalar<Kind::kQ4_1, M>(w, k, a, out);
#endif
}

template <int M>
inline void q8_0_row(const uint8_t* w, int64_t k, const Activations* a, float* out) {
#if defined(LORAPLEX_QUANT_512)
  q8_0_row_512<M>(w, k, a, out);
#elif defined(LORAPLEX_QUANT_256)
  // maddubs would saturate on u * qx; |q| * (qx with q's sign) does not
  const int64_t nb = k / kBlock;
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  __m256 acc[M];
  float tail[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps(), tail[m] = 0.f;
  int64_t b = 0;
  for (; b + kSuper <= nb; b += kSuper, w += kSuper * kQ80Bytes) {
    __m256i sa[M], sb[M];  // lane = block: blocks 0-7, 8-15
    for (int m = 0; m < M; ++m) sa[m] = sb[m] = _mm256_setzero_si256();
    for (int r = 0; r < 8; ++r) {
      const __m256i qa = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 64 * r)), flip);
      const __m256i qb = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 64 * r + 32)), flip);
      const __m256i aa = _mm256_abs_epi8(qa), ab = _mm256_abs_epi8(qb);
      for (int m = 0; m < M; ++m) {
        const int8_t* x = a[m].q + b * kBlock + 64 * r;
        sa[m] = dot4(sa[m], aa, _mm256_sign_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)), qa));
        sb[m] = dot4(sb[m], ab, _mm256_sign_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32)), qb));
      }
    }
    const __m256 da = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 512)));
    const __m256 db = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 528)));
    for (int m = 0; m < M; ++m) {
      acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sa[m]), _mm256_mul_ps(da, _mm256_loadu_ps(a[m].d + b)), acc[m]);
      acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sb[m]), _mm256_mul_ps(db, _mm256_loadu_ps(a[m].d + b + 8)), acc[m]);
    }
  }
  for (; b + 2 <= nb; b += 2, w += 2 * kQ80Bytes) {  // block b's values at w, b + 1's at w + 32
    const float d0 = half_to_float(w + 64), d1 = half_to_float(w + 66);
    for (int h = 0; h < 2; ++h) {
      const __m256i q = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * h)), flip);
      const __m256i aq = _mm256_abs_epi8(q);
      const float d = h ? d1 : d0;
      for (int m = 0; m < M; ++m) {
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a[m].q + (b + h) * kBlock));
        const int32_t sum = hsum(dot4(_mm256_setzero_si256(), aq, _mm256_sign_epi8(x, q)));
        tail[m] += d * a[m].d[b + h] * static_cast<float>(sum);
      }
    }
  }
  if (b < nb) {
    const __m256i q = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)), flip);
    const __m256i aq = _mm256_abs_epi8(q);
    const float d = half_to_float(w + 32);
    for (int m = 0; m < M; ++m) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a[m].q + b * kBlock));
      tail[m] += d * a[m].d[b] * static_cast<float>(hsum(dot4(_mm256_setzero_si256(), aq, _mm256_sign_epi8(x, q))));
    }
  }
  for (int m = 0; m < M; ++m) out[m] = hsum(acc[m]) + tail[m];
#else
  dot_row_scalar<Kind::kQ8_0, M>(w, k, a, out);
#endif
}

template <Kind kind, int M>
inline void gemv_rows(const uint8_t* w, int64_t k, const uint8_t* xq, const float* bias, float* y, int64_t sy,
                      bool accumulate, int64_t n0, int64_t n1) {
  const int64_t rb = row_bytes(kind, k), sxq = activation_row_bytes(k);
  Activations a[M];
  for (int m = 0; m < M; ++m) a[m] = activations(xq + m * sxq, k);
  float part[M];
  for (int64_t n = n0; n < n1; ++n) {
    // no software prefetch: the rows are one sequential stream, which the hardware prefetchers
    // serve; _mm_prefetch 1-4 KB ahead measured 10-30% slower here (Zen 4, 1 and 2 threads)
    const uint8_t* row = w + n * rb;
    if (kind == Kind::kQ4_1) {
      q4_1_row<M>(row, k, a, part);
    } else {
      q8_0_row<M>(row, k, a, part);
    }
    const float add = bias != nullptr ? bias[n] : 0.f;
    for (int m = 0; m < M; ++m) y[m * sy + n] = (accumulate ? y[m * sy + n] : 0.f) + part[m] + add;
  }
}

// rows [n0, n1) of gemv's product for all tokens, in groups of up to 4 tokens, on this thread
inline void gemv_part(Kind kind, const uint8_t* w, int64_t k, const uint8_t* xq, int64_t tokens, const float* bias,
                      float* y, int64_t sy, bool accumulate, int64_t n0, int64_t n1) {
  const int64_t sxq = activation_row_bytes(k);
  for (int64_t m = 0; m < tokens; m += 4) {
    const uint8_t* xm = xq + m * sxq;
    float* ym = y + m * sy;
    const int group = static_cast<int>(std::min<int64_t>(tokens - m, 4));
    if (kind == Kind::kQ4_1) {
      switch (group) {
        case 1: gemv_rows<Kind::kQ4_1, 1>(w, k, xm, bias, ym, sy, accumulate, n0, n1); break;
        case 2: gemv_rows<Kind::kQ4_1, 2>(w, k, xm, bias, ym, sy, accumulate, n0, n1); break;
        case 3: gemv_rows<Kind::kQ4_1, 3>(w, k, xm, bias, ym, sy, accumulate, n0, n1); break;
        default: gemv_rows<Kind::kQ4_1, 4>(w, k, xm, bias, ym, sy, accumulate, n0, n1); break;
      }
    } else {
      switch (group) {
        case 1: gemv_rows<Kind::kQ8_0, 1>(w, k, xm, bias, ym, sy, accumulate, n0, n1); break;
        case 2: gemv_rows<Kind::kQ8_0, 2>(w, k, xm, bias, ym, sy, accumulate, n0, n1); break;
        case 3: gemv_rows<Kind::kQ8_0, 3>(w, k, xm, bias, ym, sy, accumulate, n0, n1); break;
        default: gemv_rows<Kind::kQ8_0, 4>(w, k, xm, bias, ym, sy, accumulate, n0, n1); break;
      }
    }
  }
}

// y [T, N] (row stride sy) = (y if accumulate) + xq [T, K] . w [N, K]^T (+ bias [N] when not NULL),
// xq from quantize_activations, w repacked (see the layout above). Each weight row is read once
// for every 4 tokens. With threads > 1 and a weight over kParallelBytes, the rows are split into
// one contiguous stretch per thread; otherwise the call runs on the calling thread without
// entering OpenMP at all. y must not overlap w or xq.
inline void gemv(Kind kind, const uint8_t* w, int64_t n_len, int64_t k, const uint8_t* xq, int64_t tokens,
                 const float* bias, float* y, int64_t sy, bool accumulate, int threads) {
#if defined(_OPENMP)
  if (threads > 1 && n_len * row_bytes(kind, k) > kParallelBytes) {
#pragma omp parallel num_threads(threads)
    {
      const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
      const int64_t n0 = n_len * t / nt, n1 = n_len * (t + 1) / nt;
      gemv_part(kind, w, k, xq, tokens, bias, y, sy, accumulate, n0, n1);
    }
    return;
  }
#endif
  (void)threads;
  gemv_part(kind, w, k, xq, tokens, bias, y, sy, accumulate, 0, n_len);
}

// quantize_activations into `scratch` (resized; 64 bytes more than the activations, to align them),
// then gemv: a linear layer in one call
inline void linear(Kind kind, const uint8_t* w, int64_t n_len, int64_t k, const float* x, int64_t sx, int64_t tokens,
                   const float* bias, float* y, int64_t sy, bool accumulate, int threads,
                   std::vector<uint8_t>& scratch) {
  scratch.resize(static_cast<size_t>(tokens * activation_row_bytes(k) + 64));
  uint8_t* xq = scratch.data() + (64 - reinterpret_cast<uintptr_t>(scratch.data()) % 64) % 64;  // 64-byte aligned
  quantize_activations(x, sx, tokens, k, xq, threads);
  gemv(kind, w, n_len, k, xq, tokens, bias, y, sy, accumulate, threads);
}

// ---------------------------------------------------------------------------------------------
// dequantization: exactly gguf's values (d * q + m and d * q in fp32; d * q is exact, so fused
// or not the one rounding is the same)

inline void dequantize_region_scalar(Kind kind, const uint8_t* p, int64_t n, float* out) {
  const uint8_t* scales = p + (kind == Kind::kQ4_1 ? 16 * n : 32 * n);
  float d[kSuper], mn[kSuper] = {};
  for (int64_t b = 0; b < n; ++b) {
    d[b] = half_to_float(scales + 2 * b);
    if (kind == Kind::kQ4_1) mn[b] = half_to_float(scales + 2 * n + 2 * b);
  }
  if (n == kSuper) {  // byte i of chunk c: block i / 4, values 8 c + i % 4 (low) and + 4 (high) for Q4_1,
    for (int c = 0; c < (kind == Kind::kQ4_1 ? 4 : 8); ++c) {  // value 4 c + i % 4 for Q8_0
      for (int i = 0; i < 64; ++i) {
        const int b = i / 4, j = i % 4;
        const int32_t byte = p[64 * c + i];
        if (kind == Kind::kQ4_1) {
          out[kBlock * b + 8 * c + j] = d[b] * static_cast<float>(byte & 0x0f) + mn[b];
          out[kBlock * b + 8 * c + 4 + j] = d[b] * static_cast<float>(byte >> 4) + mn[b];
        } else {
          out[kBlock * b + 4 * c + j] = d[b] * static_cast<float>(byte - 128);
        }
      }
    }
  } else if (kind == Kind::kQ4_1) {  // pair: byte j = value j of both blocks; single: values j, j + 16
    const int half = 16 * static_cast<int>(n);
    for (int j = 0; j < half; ++j) {
      out[j] = d[0] * static_cast<float>(p[j] & 0x0f) + mn[0];
      out[half + j] = d[n - 1] * static_cast<float>(p[j] >> 4) + mn[n - 1];
    }
  } else {
    for (int64_t b = 0; b < n; ++b)
      for (int j = 0; j < kBlock; ++j) out[kBlock * b + j] = d[b] * static_cast<float>(static_cast<int32_t>(p[kBlock * b + j]) - 128);
  }
}

#if defined(LORAPLEX_QUANT_512)
// 4x4 transpose of 32-bit lanes inside each 128-bit lane: r_i lane L = (a, b, c, d)[4 L + i]
inline void transpose4(__m512i& a, __m512i& b, __m512i& c, __m512i& d) {
  const __m512i t0 = _mm512_unpacklo_epi32(a, b), t1 = _mm512_unpackhi_epi32(a, b);
  const __m512i t2 = _mm512_unpacklo_epi32(c, d), t3 = _mm512_unpackhi_epi32(c, d);
  a = _mm512_unpacklo_epi64(t0, t2);
  b = _mm512_unpackhi_epi64(t0, t2);
  c = _mm512_unpacklo_epi64(t1, t3);
  d = _mm512_unpackhi_epi64(t1, t3);
}

// 16 nibbles (one per byte) -> 16 floats d * q + m
inline void store16(__m128i q, __m512 d, __m512 mn, float* out) {
  _mm512_storeu_ps(out, _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q)), mn));
}
#endif

inline void dequantize_row(Kind kind, const uint8_t* w, int64_t k, float* out) {
  const int64_t nb = k / kBlock, bytes = block_bytes(kind);
  int64_t b = 0;
#if defined(LORAPLEX_QUANT_512)
  const __m512i low = _mm512_set1_epi8(0x0f);
  for (; b + kSuper <= nb; b += kSuper, w += kSuper * bytes, out += kSuper * kBlock) {
    alignas(64) float d[kSuper], mn[kSuper];
    const uint8_t* scales = w + (kind == Kind::kQ4_1 ? 256 : 512);
    _mm512_store_ps(d, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales))));
    if (kind == Kind::kQ4_1) {
      _mm512_store_ps(mn, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 288))));
      // chunk c lane j = block j's bytes 4c..4c+3 (values 8c + i low, 8c + 4 + i high)
      __m512i c0 = _mm512_loadu_si512(w), c1 = _mm512_loadu_si512(w + 64);
      __m512i c2 = _mm512_loadu_si512(w + 128), c3 = _mm512_loadu_si512(w + 192);
      transpose4(c0, c1, c2, c3);  // c_i lane L: the 16 bytes of block 4 L + i
      const __m512i rows[4] = {c0, c1, c2, c3};
      for (int i = 0; i < 4; ++i) {
        const __m512i lo = _mm512_and_si512(rows[i], low), hi = _mm512_and_si512(_mm512_srli_epi16(rows[i], 4), low);
        const __m512i first = _mm512_unpacklo_epi32(lo, hi), second = _mm512_unpackhi_epi32(lo, hi);  // values 0-15, 16-31
        alignas(64) uint8_t f[64], s[64];
        _mm512_store_si512(f, first);
        _mm512_store_si512(s, second);
        for (int lane = 0; lane < 4; ++lane) {
          const int64_t j = 4 * lane + i;
          const __m512 dj = _mm512_set1_ps(d[j]), mj = _mm512_set1_ps(mn[j]);
          store16(_mm_load_si128(reinterpret_cast<const __m128i*>(f + 16 * lane)), dj, mj, out + kBlock * j);
          store16(_mm_load_si128(reinterpret_cast<const __m128i*>(s + 16 * lane)), dj, mj, out + kBlock * j + 16);
        }
      }
    } else {
      // chunk r lane j = block j's values 4r..4r+3 (u = q + 128)
      __m512i r[8];
      for (int i = 0; i < 8; ++i) r[i] = _mm512_loadu_si512(w + 64 * i);
      transpose4(r[0], r[1], r[2], r[3]);  // r_i lane L: values 0-15 of block 4 L + i
      transpose4(r[4], r[5], r[6], r[7]);  // r_{4+i} lane L: values 16-31
      for (int i = 0; i < 8; ++i) {
        alignas(64) uint8_t u[64];
        _mm512_store_si512(u, r[i]);
        for (int lane = 0; lane < 4; ++lane) {
          const int64_t j = 4 * lane + i % 4;
          const __m512 dj = _mm512_set1_ps(d[j]);
          const __m512i q = _mm512_sub_epi32(
              _mm512_cvtepu8_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(u + 16 * lane))), _mm512_set1_epi32(128));
          _mm512_storeu_ps(out + kBlock * j + 16 * (i / 4), _mm512_mul_ps(dj, _mm512_cvtepi32_ps(q)));
        }
      }
    }
  }
  const __m128i low128 = _mm_set1_epi8(0x0f);
  for (; b + 2 <= nb; b += 2, w += 2 * bytes, out += 2 * kBlock) {  // pairs: values in order
    if (kind == Kind::kQ4_1) {  // byte j: value j of block b (low), of block b + 1 (high)
      alignas(16) float dm[4];  // d0 d1 m0 m1
      _mm_store_ps(dm, _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + 32))));
      for (int h = 0; h < 2; ++h) {
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 16 * h));
        const __m128i q[2] = {_mm_and_si128(v, low128), _mm_and_si128(_mm_srli_epi16(v, 4), low128)};
        for (int blk = 0; blk < 2; ++blk) {
          store16(q[blk], _mm512_set1_ps(dm[blk]), _mm512_set1_ps(dm[2 + blk]), out + kBlock * blk + 16 * h);
        }
      }
    } else {  // block b's 32 values, then block b + 1's
      const float d[2] = {half_to_float(w + 64), half_to_float(w + 66)};
      for (int i = 0; i < 4; ++i) {
        const __m512i q = _mm512_sub_epi32(
            _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 16 * i))), _mm512_set1_epi32(128));
        _mm512_storeu_ps(out + 16 * i, _mm512_mul_ps(_mm512_set1_ps(d[i / 2]), _mm512_cvtepi32_ps(q)));
      }
    }
  }
#endif
  for (; b + kSuper <= nb; b += kSuper, w += kSuper * bytes, out += kSuper * kBlock) {
    dequantize_region_scalar(kind, w, kSuper, out);
  }
  for (; b + 2 <= nb; b += 2, w += 2 * bytes, out += 2 * kBlock) dequantize_region_scalar(kind, w, 2, out);
  if (b < nb) dequantize_region_scalar(kind, w, 1, out);
}

// out [n_rows, K] (row stride so) = the weight's rows rows[i] (rows 0..n_rows-1 when rows is NULL)
inline void dequantize(Kind kind, const uint8_t* w, int64_t k, const int64_t* rows, int64_t n_rows, float* out,
                       int64_t so, int threads) {
  const int64_t rb = row_bytes(kind, k);
  if (threads > 1 && n_rows > 1 && n_rows * k > kParallelValues) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < n_rows; ++i) dequantize_row(kind, w + (rows != nullptr ? rows[i] : i) * rb, k, out + i * so);
    return;
  }
  for (int64_t i = 0; i < n_rows; ++i) dequantize_row(kind, w + (rows != nullptr ? rows[i] : i) * rb, k, out + i * so);
}

}  // namespace loraplex_quant

#undef LORAPLEX_QUANT_512
#undef LORAPLEX_QUANT_256
