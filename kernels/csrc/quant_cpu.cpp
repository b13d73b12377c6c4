// The C entry points of the quantized-weight kernels (quant_cpu.h, where the layouts and the
// arithmetic are described) for ctypes: kernels/quant_cpu.py builds this file with
// native_cpu.build_library and checks every argument before calling.

#include "quant_cpu.h"

namespace {

using loraplex_quant::Kind;

inline Kind kind_of(int kind) { return kind == 0 ? Kind::kQ4_1 : Kind::kQ8_0; }

}  // namespace

extern "C" {

// which code path this build runs: "avx512-vnni", "avx2" or "scalar"
const char* loraplex_quant_isa() { return loraplex_quant::kIsa; }

// bytes per token of quantized activations for in_features k
int64_t loraplex_quant_activation_row_bytes(int64_t k) { return loraplex_quant::activation_row_bytes(k); }

// x [T, K] fp32 (row stride sx) -> xq [T, loraplex_quant_activation_row_bytes(K)]
void loraplex_quantize_activations(const float* x, int64_t sx, int64_t tokens, int64_t k, uint8_t* xq, int threads) {
  loraplex_quant::quantize_activations(x, sx, tokens, k, xq, threads);
}

// y [T, N] (row stride sy) = (y if accumulate) + xq [T, K] . w [N, K]^T (+ bias [N] when not NULL)
void loraplex_q4_1_gemv(const uint8_t* w, int64_t n, int64_t k, const uint8_t* xq, int64_t tokens, const float* bias,
                        float* y, int64_t sy, int accumulate, int threads) {
  loraplex_quant::gemv(Kind::kQ4_1, w, n, k, xq, tokens, bias, y, sy, accumulate != 0, threads);
}

void loraplex_q8_0_gemv(const uint8_t* w, int64_t n, int64_t k, const uint8_t* xq, int64_t tokens, const float* bias,
                        float* y, int64_t sy, int accumulate, int threads) {
  loraplex_quant::gemv(Kind::kQ8_0, w, n, k, xq, tokens, bias, y, sy, accumulate != 0, threads);
}

// the two above with the activations quantized inside: x [T, K] fp32 (row stride sx); kind 0 = Q4_1, 1 = Q8_0
void loraplex_quant_linear(int kind, const uint8_t* w, int64_t n, int64_t k, const float* x, int64_t sx,
                           int64_t tokens, const float* bias, float* y, int64_t sy, int accumulate, int threads) {
  std::vector<uint8_t> scratch;
  loraplex_quant::linear(kind_of(kind), w, n, k, x, sx, tokens, bias, y, sy, accumulate != 0, threads, scratch);
}

// out [n_rows, K] (row stride so) = rows rows[i] of w dequantized (rows 0..n_rows-1 when rows is NULL)
void loraplex_dequantize_q4_1(const uint8_t* w, int64_t k, const int64_t* rows, int64_t n_rows, float* out, int64_t so,
                              int threads) {
  loraplex_quant::dequantize(Kind::kQ4_1, w, k, rows, n_rows, out, so, threads);
}

void loraplex_dequantize_q8_0(const uint8_t* w, int64_t k, const int64_t* rows, int64_t n_rows, float* out, int64_t so,
                              int threads) {
  loraplex_quant::dequantize(Kind::kQ8_0, w, k, rows, n_rows, out, so, threads);
}

}  // extern "C"
