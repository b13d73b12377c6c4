// Shrink and expand for fp32 tokens on the CPU, one parallel region per call; the adapter weights
// are fp32 or bf16 (`lora_dtype`: half the bytes to stream, widened to fp32 as they are read).
//
// A decode step's LoRA work is matrix-vector products: each token reads its adapter's A and B
// once and does 2 flops per weight. GEMM libraries pack their operands and pay a call per slot,
// so on these shapes they run well below memory speed. This kernel streams the weights straight
// from the slot buffers: work items are (run, block of A rows) for shrink and (run, chunk of a
// slice's output columns) for expand, and the tokens of a run share each weight load.
//
// Plain C++ with OpenMP and no torch headers, so it compiles in about a second; loaded into a
// process that imported torch, it runs in the OpenMP runtime torch loaded (same soname).
// Built, loaded and called by native_cpu.py, which checks every argument first.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

struct BFloat16 {  // the top half of a float32
  uint16_t bits;
};

inline float widen(float v) { return v; }
inline float widen(BFloat16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Reading bf16 weights for 1 or 2 tokens is bound by how many cache lines are in flight, not by
// the memory's bandwidth (fp32 weights are): ask early for the line `ahead` elements on, the
// rows read next, once per line of `p`. A no-op for fp32 weights, where it measured slower.
template <typename W>
inline void prefetch_ahead(const W* p, int64_t i, int64_t ahead) {
  if constexpr (std::is_same_v<W, BFloat16>)
    if (i % (64 / sizeof(W)) == 0) __builtin_prefetch(p + i + ahead);
}

constexpr int kRowBlock = 8;        // rows of A per shrink item, read as that many streams at once
constexpr int kTokenBlock = 4;      // tokens of a run that share each weight load
constexpr int kRegisterRows = 4;    // rows of A whose accumulators fit the registers with kTokenBlock tokens
constexpr int kRankBlock = 8;       // rows of B streamed at once by expand
constexpr int64_t kMaxColChunk = 1024;  // output columns per expand item, at most
constexpr int64_t kItemsPerThread = 8;  // expand items per thread, for balance
constexpr int64_t kColBlock = 64;   // output columns held in registers for a block of kTokenBlock tokens
constexpr int kLanes = 16;          // accumulator width, mapped to SIMD registers by the compiler
constexpr int64_t kWidenOnceTokens = 3;  // bf16 weights serving this many tokens are widened first
constexpr int64_t kWidenCols = 128;      // columns of B widened at a time

struct Run {  // batch rows [start, end) use adapter slot `slot`
  int64_t start, end, slot;
};

// ys[t][r] = rows[r] . xs[t] for NR rows of A and NT tokens; the rows read next are `ahead` on.
template <typename W, int NR, int NT>
inline void shrink_block(const W* const* rows, const float* const* xs, int64_t k_len, float* const* ys,
                         int64_t ahead) {
  float acc[NR][NT][kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= k_len; k += kLanes) {
    for (int r = 0; r < NR; ++r) prefetch_ahead(rows[r], k, ahead);
    for (int t = 0; t < NT; ++t) {
      const float* x = xs[t] + k;
      for (int r = 0; r < NR; ++r) {
        const W* w = rows[r] + k;
#pragma omp simd
        for (int l = 0; l < kLanes; ++l) acc[r][t][l] += widen(w[l]) * x[l];
      }
    }
  }
  for (int t = 0; t < NT; ++t) {
    for (int r = 0; r < NR; ++r) {
      float sum = 0.f;
      for (int l = 0; l < kLanes; ++l) sum += acc[r][t][l];
      for (int64_t kk = k; kk < k_len; ++kk) sum += widen(rows[r][kk]) * xs[t][kk];
      ys[t][r] = sum;
    }
  }
}

// y[t, 0:NR] = rows . x[t] for the n_tokens rows of one run (x rows sx apart, y rows sy apart).
template <typename W, int NR>
inline void shrink_run(const W* const* rows, const float* x, int64_t sx, int64_t k_len, float* y, int64_t sy,
                       int64_t n_tokens, int64_t ahead) {
  const float* xs[kTokenBlock];
  float* ys[kTokenBlock];
  int64_t t = 0;
  for (; t + kTokenBlock <= n_tokens; t += kTokenBlock) {
    for (int i = 0; i < kTokenBlock; ++i) xs[i] = x + (t + i) * sx, ys[i] = y + (t + i) * sy;
    shrink_block<W, NR, kTokenBlock>(rows, xs, k_len, ys, ahead);
  }
  const int rest = static_cast<int>(n_tokens - t);
  for (int i = 0; i < rest; ++i) xs[i] = x + (t + i) * sx, ys[i] = y + (t + i) * sy;
  if (rest == 1) shrink_block<W, NR, 1>(rows, xs, k_len, ys, ahead);
  if (rest == 2) shrink_block<W, NR, 2>(rows, xs, k_len, ys, ahead);
  if (rest == 3) shrink_block<W, NR, 3>(rows, xs, k_len, ys, ahead);
}

// outs[t][0:w] += sum_r ys[t][r] * b[r * sbr : r * sbr + w] for NT tokens, w <= kColBlock.
template <typename W, int NT>
inline void expand_block(const W* b, int64_t sbr, int64_t rank, const float* const* ys, float* const* outs,
                         int64_t w) {
  float acc[NT][kColBlock] = {};
  if (w == kColBlock) {  // the common case, with a trip count the compiler unrolls into registers
    for (int64_t r = 0; r < rank; ++r) {
      const W* row = b + r * sbr;
      for (int t = 0; t < NT; ++t) {
        const float yv = ys[t][r];
#pragma omp simd
        for (int64_t c = 0; c < kColBlock; ++c) acc[t][c] += yv * widen(row[c]);
      }
    }
  } else {
    for (int64_t r = 0; r < rank; ++r) {
      const W* row = b + r * sbr;
      for (int t = 0; t < NT; ++t)
        for (int64_t c = 0; c < w; ++c) acc[t][c] += ys[t][r] * widen(row[c]);
    }
  }
  for (int t = 0; t < NT; ++t)
    for (int64_t c = 0; c < w; ++c) outs[t][c] += acc[t][c];
}

// outs[t][0:w] += sum_r ys[t][r] * b[r * sbr : r * sbr + w] for NT tokens: kRankBlock rows of B
// are read side by side along the columns, each value loaded once for the NT tokens, and the
// outputs (in L1) updated once per block of rows. Reading whole row segments keeps the prefetchers
// ahead where column blocks of all rows would make rank short streams.
template <typename W, int NT>
inline void expand_tokens(const W* b, int64_t sbr, int64_t rank, const float* const* ys, float* const* outs,
                          int64_t w) {
  int64_t r0 = 0;
  for (; r0 + kRankBlock <= rank; r0 += kRankBlock) {
    const W* rows[kRankBlock];
    float yv[NT][kRankBlock];
    for (int i = 0; i < kRankBlock; ++i) {
      rows[i] = b + (r0 + i) * sbr;
      for (int t = 0; t < NT; ++t) yv[t][i] = ys[t][r0 + i];
    }
    int64_t c = 0;
    for (; c + kLanes <= w; c += kLanes) {
      for (int i = 0; i < kRankBlock; ++i) prefetch_ahead(rows[i], c, kRankBlock * sbr);
      for (int t = 0; t < NT; ++t) {
        float* o = outs[t] + c;
#pragma omp simd
        for (int l = 0; l < kLanes; ++l) {
          float sum = o[l];
          for (int i = 0; i < kRankBlock; ++i) sum += yv[t][i] * widen(rows[i][c + l]);
          o[l] = sum;
        }
      }
    }
    for (; c < w; ++c)
      for (int t = 0; t < NT; ++t)
        for (int i = 0; i < kRankBlock; ++i) outs[t][c] += yv[t][i] * widen(rows[i][c]);
  }
  for (; r0 < rank; ++r0)  // ranks that are not a multiple of kRankBlock
    for (int t = 0; t < NT; ++t)
      for (int64_t c = 0; c < w; ++c) outs[t][c] += ys[t][r0] * widen(b[r0 * sbr + c]);
}

// rows x cols bf16 values (rows `stride` apart) widened into this thread's [rows, out_stride]
// buffer, valid until its next call.
inline const float* widened(const BFloat16* src, int64_t stride, int64_t rows, int64_t cols, int64_t out_stride) {
  thread_local std::vector<float> wide;
  wide.resize(rows * out_stride);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) wide[r * out_stride + c] = widen(src[r * stride + c]);
  return wide.data();
}

// One shrink item: y[t, 0:n] = A rows [0, n) (sa1 apart) . x[t] for the n_tokens of a run.
template <typename W>
void shrink_item(const W* a, int64_t sa1, int64_t n, const float* x, int64_t sx, int64_t k_len, float* y, int64_t sy,
                 int64_t n_tokens) {
  if constexpr (std::is_same_v<W, BFloat16>) {
    if (n_tokens >= kWidenOnceTokens)  // rows shared by several tokens: widened once, not per token
      return shrink_item<float>(widened(a, sa1, n, k_len, k_len), k_len, n, x, sx, k_len, y, sy, n_tokens);
  }
  const W* rows[kRowBlock];
  for (int r = 0; r < kRowBlock; ++r) rows[r] = a + std::min<int64_t>(r, n - 1) * sa1;
  if constexpr (std::is_same_v<W, float>) {
    if (n == kRowBlock && n_tokens <= 2) {  // decode: more fp32 loads in flight
      const float* xs[2] = {x, x + sx};
      float* ys[2] = {y, y + sy};
      if (n_tokens == 1) shrink_block<W, kRowBlock, 1>(rows, xs, k_len, ys, kRowBlock * sa1);
      if (n_tokens == 2) shrink_block<W, kRowBlock, 2>(rows, xs, k_len, ys, kRowBlock * sa1);
      return;
    }
  }
  int64_t r = 0;  // blocks of rows whose accumulators fit the registers with kTokenBlock tokens
  for (; r + kRegisterRows <= n; r += kRegisterRows)
    shrink_run<W, kRegisterRows>(rows + r, x, sx, k_len, y + r, sy, n_tokens, kRegisterRows * sa1);
  for (; r < n; ++r) shrink_run<W, 1>(rows + r, x, sx, k_len, y + r, sy, n_tokens, sa1);
}

// One expand item: out[t, 0:w] += y[t, 0:rank] . B[0:rank, 0:w] (rows sbr apart) for a run's tokens.
template <typename W>
void expand_item(const W* b, int64_t sbr, int64_t rank, int64_t w, const float* y, int64_t sy, float* out, int64_t so,
                 int64_t n_tokens) {
  if constexpr (std::is_same_v<W, BFloat16>) {
    if (n_tokens >= kWidenOnceTokens) {  // as in shrink_item, a part of the columns at a time (in L1)
      for (int64_t c = 0; c < w; c += kWidenCols) {
        const int64_t wc = std::min(kWidenCols, w - c);
        expand_item<float>(widened(b + c, sbr, rank, wc, wc), wc, rank, wc, y, sy, out + c, so, n_tokens);
      }
      return;
    }
  }
  const float* ys[kTokenBlock];
  float* outs[kTokenBlock];
  int64_t t = 0;
  for (; t + kTokenBlock <= n_tokens; t += kTokenBlock) {
    for (int i = 0; i < kTokenBlock; ++i) ys[i] = y + (t + i) * sy, outs[i] = out + (t + i) * so;
    for (int64_t c = 0; c < w; c += kColBlock) {
      float* block_outs[kTokenBlock];
      for (int i = 0; i < kTokenBlock; ++i) block_outs[i] = outs[i] + c;
      expand_block<W, kTokenBlock>(b + c, sbr, rank, ys, block_outs, std::min(kColBlock, w - c));
    }
  }
  const int rest = static_cast<int>(n_tokens - t);
  for (int i = 0; i < rest; ++i) ys[i] = y + (t + i) * sy, outs[i] = out + (t + i) * so;
  if (rest == 1) expand_tokens<W, 1>(b, sbr, rank, ys, outs, w);
  if (rest == 2) expand_tokens<W, 2>(b, sbr, rank, ys, outs, w);
  if (rest == 3) expand_tokens<W, 3>(b, sbr, rank, ys, outs, w);
}

template <typename W>
void lora(const float* x, int64_t sx, int64_t k_len, const W* a, int64_t sa0, int64_t sa1, const W* b, int64_t sb0,
          int64_t sbr, const int64_t* runs_flat, int64_t n_runs, float* y, int64_t sy, float* out, int64_t so,
          const int64_t* offsets, int64_t n_slices, int64_t rank, int stages, int num_threads) {
  const Run* runs = reinterpret_cast<const Run*>(runs_flat);
  const int64_t n_rows = n_slices * rank;  // nR: y's width
  int64_t last_row = 0, n_tokens = 0;
  for (int64_t i = 0; i < n_runs; ++i)
    last_row = std::max(last_row, runs[i].end), n_tokens += runs[i].end - runs[i].start;
  std::vector<float> y_buf;
  if (y == nullptr) {
    y_buf.resize(last_row * n_rows);  // [T', nR]
    y = y_buf.data(), sy = n_rows;
  }
  const bool do_shrink = stages & 1, do_expand = stages & 2;

  const int64_t row_blocks = (n_rows + kRowBlock - 1) / kRowBlock;
  // expand items: equal chunks of one slice's columns, about kItemsPerThread for every thread
  const int64_t spread = offsets[n_slices] * n_runs / (kItemsPerThread * std::max(num_threads, 1));
  const int64_t target = std::clamp<int64_t>(spread, kColBlock, kMaxColChunk);
  std::vector<int64_t> col_start, col_end, col_slice;
  for (int64_t i = 0; i < n_slices; ++i) {
    const int64_t width = offsets[i + 1] - offsets[i], chunks = (width + target - 1) / target;
    for (int64_t j = 0; j < chunks; ++j) {
      col_start.push_back(offsets[i] + width * j / chunks / kLanes * kLanes);
      col_end.push_back(j + 1 == chunks ? offsets[i + 1] : offsets[i] + width * (j + 1) / chunks / kLanes * kLanes);
      col_slice.push_back(i);
    }
  }
  const int64_t col_blocks = static_cast<int64_t>(col_start.size());
  // a fork and two barriers cost a few microseconds: not worth it for a single short token
  const int64_t flops = n_tokens * (n_rows * k_len + offsets[n_slices] * rank);
  const bool parallel = num_threads > 1 && flops > (1 << 16);

#pragma omp parallel num_threads(num_threads) if (parallel)
  {
    if (do_shrink) {
#pragma omp for schedule(static)
      for (int64_t item = 0; item < n_runs * row_blocks; ++item) {
        const Run& run = runs[item / row_blocks];
        const int64_t j0 = (item % row_blocks) * kRowBlock;
        shrink_item(a + run.slot * sa0 + j0 * sa1, sa1, std::min<int64_t>(kRowBlock, n_rows - j0), x + run.start * sx,
                    sx, k_len, y + run.start * sy + j0, sy, run.end - run.start);
      }
    }  // the implicit barrier of `omp for`: y is complete before expand reads it
    if (do_expand) {
#pragma omp for schedule(static)
      for (int64_t item = 0; item < n_runs * col_blocks; ++item) {
        const Run& run = runs[item / col_blocks];
        const int64_t block = item % col_blocks, c0 = col_start[block], slice = col_slice[block];
        expand_item(b + run.slot * sb0 + c0, sbr, rank, col_end[block] - c0,
                    y + run.start * sy + slice * rank, sy, out + run.start * so + c0, so, run.end - run.start);
      }
    }
  }
}

}  // namespace

extern "C" {

// One wrapped linear's adapter weights, fixed for the model's life (element strides; the
// innermost stride is 1): A [S, nR, K] strides (sa0, sa1, 1), nR = n_slices * rank; B stored
// [S, rank, N] strides (sb0, sbr, 1), i.e. lora_b [S, N, rank] transposed; both fp32
// (weight_dtype 0) or bf16 (1); offsets [n_slices + 1], the output slices' column offsets.
struct LoRAWeights {
  const void* a;
  int64_t sa0, sa1;
  const void* b;
  int64_t sb0, sbr;
  int64_t k_len, n_slices, rank, weight_dtype;
  const int64_t* offsets;
};

// x [T, K] fp32 rows sx apart; y [T, nR] fp32 rows sy apart (nullptr: a buffer of this call);
// out [T, N] fp32 rows so apart; runs [n_runs, 3] int64 (start, end, slot), non-empty, disjoint.
// stages: 1 = shrink (y = x A^T on the runs' rows), 2 = expand (out += y B^T on them), 3 = both.
void loraplex_lora_cpu(const LoRAWeights* w, const float* x, int64_t sx, float* y, int64_t sy, float* out, int64_t so,
                       const int64_t* runs, int64_t n_runs, int stages, int num_threads) {
  if (n_runs <= 0) return;
  if (w->weight_dtype == 1)
    lora<BFloat16>(x, sx, w->k_len, static_cast<const BFloat16*>(w->a), w->sa0, w->sa1,
                   static_cast<const BFloat16*>(w->b), w->sb0, w->sbr, runs, n_runs, y, sy, out, so, w->offsets,
                   w->n_slices, w->rank, stages, num_threads);
  else
    lora<float>(x, sx, w->k_len, static_cast<const float*>(w->a), w->sa0, w->sa1, static_cast<const float*>(w->b),
                w->sb0, w->sbr, runs, n_runs, y, sy, out, so, w->offsets, w->n_slices, w->rank, stages, num_threads);
}

}  // extern "C"
