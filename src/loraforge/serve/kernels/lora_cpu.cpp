// Every adapter of a decode step in one call per projection: out[rows of g] += (x · Aₛ) · Bₛ.
//
// The batch's rows are grouped by adapter into segments g = (start, end, s). For each segment
// the shrink is h[i, k] = x[i, :] · A[s, k, :] and the expand is
// out[i, c0:c1] += h[i, r0:r1] · B_p[s] for each part p (q, k, v; gate, up) of the projection.
// Adapter weights are fp16 (half the bytes of fp32; every decode step streams all of them),
// widened to fp32 with F16C and multiplied with FMA; activations and sums stay fp32.
// The segments' work is split over PyTorch's own thread pool (at::parallel_for), so no second
// OpenMP pool competes with the base model's matrix products.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "simd.h"

#include <cstdint>
#include <cstring>

namespace {

using loraforge::hsum;

inline __m256 load_half8(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

inline float half_to_float(at::Half v) { return static_cast<float>(v); }

// h[i, k] for M consecutive rows from i and ranks k in [k0, k1): dot products over `in` columns.
// M is a template argument so that the M accumulators stay in registers.
template <int M>
void shrink_rows(const float* x, const at::Half* a, float* h, int64_t i, int64_t k0, int64_t k1, int64_t in,
                 int64_t rank) {
  const int64_t vec_end = in - in % 8;
  for (int64_t k = k0; k < k1; ++k) {
    const at::Half* row = a + k * in;
    __m256 acc[M];
    for (int r = 0; r < M; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t c = 0; c < vec_end; c += 8) {
      const __m256 w = load_half8(row + c);
      for (int r = 0; r < M; ++r) acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(x + (i + r) * in + c), w, acc[r]);
    }
    for (int r = 0; r < M; ++r) {
      float sum = hsum(acc[r]);
      for (int64_t c = vec_end; c < in; ++c) sum += x[(i + r) * in + c] * half_to_float(row[c]);
      h[(i + r) * rank + k] = sum;
    }
  }
}

void shrink(const float* x, const at::Half* a, float* h, int64_t start, int64_t end, int64_t k0, int64_t k1,
            int64_t in, int64_t rank) {
  int64_t i = start;
  for (; i + 4 <= end; i += 4) shrink_rows<4>(x, a, h, i, k0, k1, in, rank);
  switch (end - i) {
    case 3: shrink_rows<3>(x, a, h, i, k0, k1, in, rank); break;
    case 2: shrink_rows<2>(x, a, h, i, k0, k1, in, rank); break;
    case 1: shrink_rows<1>(x, a, h, i, k0, k1, in, rank); break;
    default: break;
  }
}

// out[i + r, c0 + j] += Σₖ h[i + r, r0 + k] · b[k, j] for M rows from i, 16 columns from j.
template <int M>
void expand_rows(const float* h, const at::Half* b, float* out, int64_t i, int64_t r0, int64_t ranks, int64_t width,
                 int64_t c0, int64_t j, int64_t rank, int64_t out_dim) {
  __m256 acc0[M], acc1[M];
  for (int r = 0; r < M; ++r) acc0[r] = acc1[r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < ranks; ++k) {
    const __m256 b0 = load_half8(b + k * width + j), b1 = load_half8(b + k * width + j + 8);
    for (int r = 0; r < M; ++r) {
      const __m256 hv = _mm256_broadcast_ss(h + (i + r) * rank + r0 + k);
      acc0[r] = _mm256_fmadd_ps(hv, b0, acc0[r]);
      acc1[r] = _mm256_fmadd_ps(hv, b1, acc1[r]);
    }
  }
  for (int r = 0; r < M; ++r) {
    float* o = out + (i + r) * out_dim + c0 + j;
    _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), acc0[r]));
    _mm256_storeu_ps(o + 8, _mm256_add_ps(_mm256_loadu_ps(o + 8), acc1[r]));
  }
}

// out[i, c0 + j] += Σₖ h[i, r0 + k] · b[k, j] for rows i of one segment, columns j in [j0, j1).
void expand(const float* h, const at::Half* b, float* out, int64_t start, int64_t end, int64_t r0, int64_t ranks,
            int64_t width, int64_t c0, int64_t j0, int64_t j1, int64_t rank, int64_t out_dim) {
  int64_t j = j0;
  for (; j + 16 <= j1; j += 16) {
    int64_t i = start;
    for (; i + 4 <= end; i += 4) expand_rows<4>(h, b, out, i, r0, ranks, width, c0, j, rank, out_dim);
    switch (end - i) {
      case 3: expand_rows<3>(h, b, out, i, r0, ranks, width, c0, j, rank, out_dim); break;
      case 2: expand_rows<2>(h, b, out, i, r0, ranks, width, c0, j, rank, out_dim); break;
      case 1: expand_rows<1>(h, b, out, i, r0, ranks, width, c0, j, rank, out_dim); break;
      default: break;
    }
  }
  for (; j < j1; ++j) {  // a part whose width is not a multiple of 16
    for (int64_t i = start; i < end; ++i) {
      float sum = 0.f;
      for (int64_t k = 0; k < ranks; ++k) sum += h[i * rank + r0 + k] * half_to_float(b[k * width + j]);
      out[i * out_dim + c0 + j] += sum;
    }
  }
}

constexpr int64_t kColumnBlock = 64;

}  // namespace

// out (n, out_dim) f32, updated in place; x (n, in) f32; a (S, R, in) f16; b: every part's
// (S, ranks, width) block, flattened, f16; parts (P, 5) int64: r0, ranks, c0, width, offset of
// the part's block in b; segments (G, 3) int64: start, end, adapter index s.
void lora_delta(torch::Tensor out, torch::Tensor x, torch::Tensor a, torch::Tensor b, torch::Tensor parts,
                torch::Tensor segments) {
  TORCH_CHECK(out.device().is_cpu() && x.device().is_cpu() && a.device().is_cpu() && b.device().is_cpu() &&
                  parts.device().is_cpu() && segments.device().is_cpu(),
              "lora_delta needs tensors on the CPU");
  TORCH_CHECK(out.is_contiguous() && x.is_contiguous() && a.is_contiguous() && b.is_contiguous(),
              "lora_delta needs contiguous tensors");
  TORCH_CHECK(out.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat, "lora_delta needs fp32 activations");
  TORCH_CHECK(a.scalar_type() == at::kHalf && b.scalar_type() == at::kHalf, "lora_delta needs fp16 adapter weights");
  const int64_t n = x.size(0), in = x.size(1), out_dim = out.size(1);
  const int64_t stacked = a.size(0), rank = a.size(1);
  TORCH_CHECK(a.size(2) == in && out.size(0) == n, "lora_delta: shapes do not fit");
  const auto seg = segments.accessor<int64_t, 2>();
  const auto part = parts.accessor<int64_t, 2>();
  const int64_t groups = segments.size(0), nparts = parts.size(0);
  for (int64_t g = 0; g < groups; ++g) {
    TORCH_CHECK(seg[g][0] >= 0 && seg[g][0] <= seg[g][1] && seg[g][1] <= n && seg[g][2] >= 0 && seg[g][2] < stacked,
                "lora_delta: a segment is out of range");
  }
  for (int64_t p = 0; p < nparts; ++p) {
    TORCH_CHECK(part[p][0] >= 0 && part[p][1] >= 0 && part[p][0] + part[p][1] <= rank && part[p][2] >= 0 &&
                    part[p][3] >= 0 && part[p][2] + part[p][3] <= out_dim && part[p][4] >= 0 &&
                    part[p][4] + stacked * part[p][1] * part[p][3] <= b.numel(),
                "lora_delta: a part is out of range");
  }
  auto h = torch::zeros({n, rank}, x.options());
  const float* xp = x.data_ptr<float>();
  const at::Half* ap = a.data_ptr<at::Half>();
  const at::Half* bp = b.data_ptr<at::Half>();
  float* hp = h.data_ptr<float>();
  float* op = out.data_ptr<float>();
  // Shrink: one task per (segment, block of 8 ranks).
  const int64_t rank_blocks = (rank + 7) / 8;
  at::parallel_for(0, groups * rank_blocks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t g = t / rank_blocks, k0 = (t % rank_blocks) * 8;
      shrink(xp, ap + seg[g][2] * rank * in, hp, seg[g][0], seg[g][1], k0, std::min(rank, k0 + 8), in, rank);
    }
  });
  // Expand: one task per (segment, part, block of columns).
  std::vector<int64_t> task_part, task_start;
  for (int64_t p = 0; p < nparts; ++p) {
    for (int64_t j = 0; j < part[p][3]; j += kColumnBlock) {
      task_part.push_back(p);
      task_start.push_back(j);
    }
  }
  const int64_t blocks = static_cast<int64_t>(task_part.size());
  at::parallel_for(0, groups * blocks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t g = t / blocks, p = task_part[t % blocks], j0 = task_start[t % blocks];
      const int64_t ranks = part[p][1], width = part[p][3];
      const at::Half* block = bp + part[p][4] + seg[g][2] * ranks * width;
      expand(hp, block, op, seg[g][0], seg[g][1], part[p][0], ranks, width, part[p][2], j0,
             std::min(width, j0 + kColumnBlock), rank, out_dim);
    }
  });
}
