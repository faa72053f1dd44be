// Matrix products with weights held in ggml's block formats, activations and sums in fp32.
//
// A weight row of K inputs is K/32 blocks of 32 values. GGUF files store most projections of
// small models in one of two such formats, and a model loaded from one of them is exactly these
// values once dequantized, so the products below compute what the float32 model computes (up to
// the order of the sums) while reading 5 or 8.5 bits per weight instead of 32:
//
//   Q4_1  w = d·q + m, q in 0..15:  qs (N, K/2) uint8, byte j of a block holding q[j] in its low
//         nibble and q[j + 16] in its high one; d, m (N, K/32) fp16.
//   Q8_0  w = d·q, q in -127..127:   qs (N, K) int8; d (N, K/32) fp16.
//
// y[i, n] = Σ_b d[n, b]·(q[n, b, :]·x[i, b, :]) (+ m[n, b]·Σ x[i, b, :] for Q4_1): each block's
// codes are widened to fp32 once and multiplied with up to 8 rows of x while in registers. Output
// rows are split over PyTorch's own thread pool (at::parallel_for).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "simd.h"

#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kBlock = 32;
constexpr int64_t kFusedRows = 3;  // up to this many rows of x: codes widened in registers, no scratch
constexpr int64_t kTile = 24;      // weight rows dequantized at a time for more rows of x
constexpr int kMR = 3, kNR = 3;    // the register tile of the larger products: rows of x × weight rows

using loraforge::hsum;

inline float half(at::Half h) { return _cvtsh_ss(h.x); }

// The 32 codes of a block as four vectors of 8, in *lane order*: Q4_1 codes come out of each
// 32-bit word of the block by eight shifts, so lane l of vector c holds element
// 4c + l/2 + 16·(l % 2). The activations are permuted to match once per call (see lane_order).
struct Codes {
  __m256 w[4];
};

inline Codes q4_codes(const uint8_t* block) {
  const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  const __m256i nibble = _mm256_set1_epi32(0x0f);
  Codes c;
  for (int j = 0; j < 4; ++j) {
    // _mm_loadu_si32 may read any bytes (no aliasing of the buffer as int32); the broadcast folds it in.
    const __m256i word = _mm256_broadcastd_epi32(_mm_loadu_si32(block + 4 * j));
    c.w[j] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(word, shifts), nibble));
  }
  return c;
}

inline Codes q8_codes(const int8_t* block) {
  Codes c;
  for (int j = 0; j < 4; ++j) {
    c.w[j] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(block + 8 * j))));
  }
  return c;
}

template <bool Q4>
inline Codes codes(const void* qs, int64_t block) {
  if (Q4) return q4_codes(static_cast<const uint8_t*>(qs) + block * (kBlock / 2));
  return q8_codes(static_cast<const int8_t*>(qs) + block * kBlock);
}

// Weight row n as float32, in the codes' order.
template <bool Q4>
void dequantize_row(const void* qs, const at::Half* d, const at::Half* mins, int64_t n, int64_t K, float* out) {
  const int64_t blocks = K / kBlock;
  for (int64_t b = 0; b < blocks; ++b) {
    const Codes c = codes<Q4>(qs, n * blocks + b);
    const __m256 scale = _mm256_set1_ps(half(d[n * blocks + b]));
    const __m256 low = _mm256_set1_ps(Q4 ? half(mins[n * blocks + b]) : 0.f);
    for (int j = 0; j < 4; ++j) _mm256_storeu_ps(out + b * kBlock + 8 * j, _mm256_fmadd_ps(c.w[j], scale, low));
  }
}

// Few rows of x: y[m0 + r, n] = Σ_b d·(codes·x) (+ m·Σx) for output rows n in [n0, n1).
template <int R, bool Q4>
void fused(const float* x, const float* xsum, const void* qs, const at::Half* d, const at::Half* mins, float* y,
           int64_t n0, int64_t n1, int64_t K, int64_t N, int64_t m0) {
  const int64_t blocks = K / kBlock;
  for (int64_t n = n0; n < n1; ++n) {
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
      const Codes c = codes<Q4>(qs, n * blocks + b);
      const __m256 scale = _mm256_set1_ps(half(d[n * blocks + b]));
      for (int r = 0; r < R; ++r) {
        const float* xr = x + (m0 + r) * K + b * kBlock;
        __m256 t = _mm256_mul_ps(c.w[0], _mm256_loadu_ps(xr));
        t = _mm256_fmadd_ps(c.w[1], _mm256_loadu_ps(xr + 8), t);
        t = _mm256_fmadd_ps(c.w[2], _mm256_loadu_ps(xr + 16), t);
        t = _mm256_fmadd_ps(c.w[3], _mm256_loadu_ps(xr + 24), t);
        acc[r] = _mm256_fmadd_ps(t, scale, acc[r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      float sum = hsum(acc[r]);
      if (Q4) {
        const float* xs = xsum + (m0 + r) * blocks;
        for (int64_t b = 0; b < blocks; ++b) sum += half(mins[n * blocks + b]) * xs[b];
      }
      y[(m0 + r) * N + n] = sum;
    }
  }
}

// More rows: y[m0 + i, n0 + j] = x[m0 + i]·w[j] for an MR × NR tile, w dequantized (tile, K).
template <int MR, int NR>
void tile(const float* x, const float* w, float* y, int64_t K, int64_t N, int64_t m0, int64_t n0, int64_t j0) {
  __m256 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8) {
    __m256 wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = _mm256_loadu_ps(w + (j0 + j) * K + k);
    for (int i = 0; i < MR; ++i) {
      const __m256 xv = _mm256_loadu_ps(x + (m0 + i) * K + k);
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) y[(m0 + i) * N + n0 + j0 + j] = hsum(acc[i][j]);
}

template <int MR>
void tile_row(const float* x, const float* w, float* y, int64_t K, int64_t N, int64_t m0, int64_t n0, int64_t rows) {
  int64_t j = 0;
  for (; j + kNR <= rows; j += kNR) tile<MR, kNR>(x, w, y, K, N, m0, n0, j);
  for (; j < rows; ++j) tile<MR, 1>(x, w, y, K, N, m0, n0, j);
}

template <bool Q4, int R>
void fused_rows(const float* x, const float* xsum, const void* qs, const at::Half* d, const at::Half* mins, float* y,
                int64_t K, int64_t N, int64_t M) {
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) { fused<R, Q4>(x, xsum, qs, d, mins, y, n0, n1, K, N, 0); });
  (void)M;
}

void check(const torch::Tensor& x, const torch::Tensor& qs, const torch::Tensor& d, int64_t codes_per_row,
           at::ScalarType code_type, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && qs.device().is_cpu() && d.device().is_cpu(), name,
              ": tensors must be on the CPU");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              name, ": x must be a contiguous (M, K) float32 tensor");
  const int64_t K = x.size(1), N = qs.size(0);
  TORCH_CHECK(K % kBlock == 0, name, ": K = ", K, " is not a multiple of ", kBlock);
  TORCH_CHECK(qs.dim() == 2 && qs.scalar_type() == code_type && qs.is_contiguous() && qs.size(1) == codes_per_row,
              name, ": codes must be a contiguous (N, ", codes_per_row, ") tensor of ", c10::toString(code_type));
  TORCH_CHECK(d.dim() == 2 && d.scalar_type() == at::kHalf && d.is_contiguous() && d.size(0) == N &&
                  d.size(1) == K / kBlock,
              name, ": scales must be a contiguous (N, K/32) float16 tensor");
}

// x in the codes' lane order, and each block's sum (Q4_1 only: Q8_0 codes are in order, and x is
// used as it is).
std::vector<float> lane_order(const float* x, int64_t count, std::vector<float>* xsum) {
  std::vector<float> out(count * kBlock);
  xsum->resize(count);
  for (int64_t b = 0; b < count; ++b) {
    const float* src = x + b * kBlock;
    float* dst = out.data() + b * kBlock;
    float sum = 0.f;
    for (int c = 0; c < 4; ++c)
      for (int l = 0; l < 8; ++l) dst[8 * c + l] = src[4 * c + l / 2 + 16 * (l % 2)];
    for (int e = 0; e < kBlock; ++e) sum += src[e];
    (*xsum)[b] = sum;
  }
  return out;
}

template <bool Q4>
torch::Tensor block_linear(const torch::Tensor& x, const torch::Tensor& qs, const torch::Tensor& d,
                           const torch::Tensor& mins) {
  const int64_t M = x.size(0), K = x.size(1), N = qs.size(0);
  auto y = torch::empty({M, N}, x.options());
  std::vector<float> xsum, xl;
  if (Q4) xl = lane_order(x.data_ptr<float>(), M * K / kBlock, &xsum);
  const float* xp = Q4 ? xl.data() : x.data_ptr<float>();
  const float* xs = xsum.data();
  const void* qp = qs.data_ptr();
  const at::Half* dp = d.data_ptr<at::Half>();
  const at::Half* mp = Q4 ? mins.data_ptr<at::Half>() : nullptr;
  float* yp = y.data_ptr<float>();
  if (M <= kFusedRows) {
    switch (M) {
      case 3: fused_rows<Q4, 3>(xp, xs, qp, dp, mp, yp, K, N, M); break;
      case 2: fused_rows<Q4, 2>(xp, xs, qp, dp, mp, yp, K, N, M); break;
      case 1: fused_rows<Q4, 1>(xp, xs, qp, dp, mp, yp, K, N, M); break;
      default: break;
    }
    return y;
  }
  const int64_t tiles = (N + kTile - 1) / kTile;
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> w(kTile * K);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * kTile, rows = std::min(kTile, N - n0);
      for (int64_t j = 0; j < rows; ++j) dequantize_row<Q4>(qp, dp, mp, n0 + j, K, w.data() + j * K);
      int64_t m = 0;
      for (; m + kMR <= M; m += kMR) tile_row<kMR>(xp, w.data(), yp, K, N, m, n0, rows);
      for (; m < M; ++m) tile_row<1>(xp, w.data(), yp, K, N, m, n0, rows);
    }
  });
  return y;
}


// Weight rows [n0, n1) as float32 in their own order (not the codes' lane order), for products
// with many rows of x, which PyTorch's GEMM does better once the weights are dequantized.
template <bool Q4>
void dequantize_rows(const void* qs, const at::Half* d, const at::Half* mins, int64_t n0, int64_t n1, int64_t K,
                     float* out) {
  const int64_t blocks = K / kBlock;
  const __m128i nibble = _mm_set1_epi8(0x0f);
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t i = n * blocks + b;
      __m256 w[4];
      if (Q4) {
        const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint8_t*>(qs) + i * 16));
        const __m128i lo = _mm_and_si128(raw, nibble), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), nibble);
        w[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
        w[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
        w[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
        w[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
      } else {
        const Codes c = q8_codes(static_cast<const int8_t*>(qs) + i * kBlock);
        for (int j = 0; j < 4; ++j) w[j] = c.w[j];
      }
      // d·q + m rounded twice, as ggml and gguf-py compute it: the model's own float32 values.
      const __m256 scale = _mm256_set1_ps(half(d[i]));
      const __m256 low = _mm256_set1_ps(Q4 ? half(mins[i]) : 0.f);
      float* o = out + n * K + b * kBlock;
      for (int j = 0; j < 4; ++j) _mm256_storeu_ps(o + 8 * j, _mm256_add_ps(_mm256_mul_ps(w[j], scale), low));
    }
  }
}

}  // namespace

// x (M, K) f32 @ W.T for W in Q4_1 blocks: qs (N, K/2) uint8, d and m (N, K/32) f16 → (M, N) f32.
torch::Tensor q4_1_linear(torch::Tensor x, torch::Tensor qs, torch::Tensor d, torch::Tensor m) {
  check(x, qs, d, x.size(1) / 2, at::kByte, "q4_1_linear");
  TORCH_CHECK(m.device().is_cpu() && m.sizes() == d.sizes() && m.scalar_type() == at::kHalf && m.is_contiguous(),
              "q4_1_linear: mins must be like the scales");
  return block_linear<true>(x, qs, d, m);
}

// x (M, K) f32 @ W.T for W in Q8_0 blocks: qs (N, K) int8, d (N, K/32) f16 → (M, N) f32.
torch::Tensor q8_0_linear(torch::Tensor x, torch::Tensor qs, torch::Tensor d) {
  check(x, qs, d, x.size(1), at::kChar, "q8_0_linear");
  return block_linear<false>(x, qs, d, torch::Tensor());
}

// The float32 weight of Q4_1 (mins given) or Q8_0 (mins empty) blocks, into `out` (N, K) f32.
void dequantize_blocks(torch::Tensor qs, torch::Tensor d, torch::Tensor mins, torch::Tensor out) {
  const bool q4 = mins.numel() > 0;
  const int64_t N = qs.size(0), K = d.size(1) * kBlock;
  TORCH_CHECK(out.dim() == 2 && out.size(0) == N && out.size(1) == K && out.scalar_type() == at::kFloat &&
                  out.is_contiguous(), "dequantize_blocks: out must be a contiguous (N, K) float32 tensor");
  check(out, qs, d, q4 ? K / 2 : K, q4 ? at::kByte : at::kChar, "dequantize_blocks");
  TORCH_CHECK(!q4 || (mins.device().is_cpu() && mins.sizes() == d.sizes() && mins.scalar_type() == at::kHalf &&
                      mins.is_contiguous()),
              "dequantize_blocks: mins must be like the scales");
  const void* qp = qs.data_ptr();
  const at::Half* dp = d.data_ptr<at::Half>();
  const at::Half* mp = q4 ? mins.data_ptr<at::Half>() : nullptr;
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    if (q4) dequantize_rows<true>(qp, dp, mp, n0, n1, K, op);
    else dequantize_rows<false>(qp, dp, mp, n0, n1, K, op);
  });
}
