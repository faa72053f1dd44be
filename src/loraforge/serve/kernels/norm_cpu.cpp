// RMSNorm of the serving engine's residual stream, in one call (PyTorch's CPU rms_norm is about
// nine operations: a decode step at batch 1 spent ~4 ms of its ~19 in 61 of them).
//
//   rms_norm(x, w, eps)          → x / sqrt(mean(x²) + eps) · w, a new tensor
//   add_rms_norm(h, d, w, eps)   → h += d in place, then rms_norm(h, w, eps)
//
// x, h, d: (M, H) contiguous float32; w: (H,) float32. Rows are split over PyTorch's thread pool
// when there are many (prompts).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "simd.h"

#include <cmath>
#include <cstdint>

namespace {

using loraforge::hsum;

void normalize_rows(float* h, const float* d, const float* w, float* out, int64_t m0, int64_t m1, int64_t H,
                    float eps) {
  const int64_t vec_end = H - H % 8;
  for (int64_t m = m0; m < m1; ++m) {
    float* row = h + m * H;
    if (d != nullptr) {
      const float* add = d + m * H;
      int64_t c = 0;
      for (; c < vec_end; c += 8) _mm256_storeu_ps(row + c, _mm256_add_ps(_mm256_loadu_ps(row + c), _mm256_loadu_ps(add + c)));
      for (; c < H; ++c) row[c] += add[c];
    }
    __m256 acc = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c < vec_end; c += 8) {
      const __m256 v = _mm256_loadu_ps(row + c);
      acc = _mm256_fmadd_ps(v, v, acc);
    }
    float squares = hsum(acc);
    for (; c < H; ++c) squares += row[c] * row[c];
    const float scale = 1.f / std::sqrt(squares / static_cast<float>(H) + eps);
    const __m256 s = _mm256_set1_ps(scale);
    float* o = out + m * H;
    for (c = 0; c < vec_end; c += 8) {
      _mm256_storeu_ps(o + c, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(row + c), s), _mm256_loadu_ps(w + c)));
    }
    for (; c < H; ++c) o[c] = row[c] * scale * w[c];
  }
}

torch::Tensor normalize(torch::Tensor h, const torch::Tensor* d, const torch::Tensor& w, double eps, const char* name) {
  TORCH_CHECK(h.device().is_cpu() && w.device().is_cpu() && (d == nullptr || d->device().is_cpu()), name,
              ": tensors must be on the CPU");
  TORCH_CHECK(h.dim() == 2 && h.scalar_type() == at::kFloat && h.is_contiguous(), name,
              ": x must be a contiguous (M, H) float32 tensor");
  const int64_t M = h.size(0), H = h.size(1);
  TORCH_CHECK(w.dim() == 1 && w.size(0) == H && w.scalar_type() == at::kFloat && w.is_contiguous(), name,
              ": the weight must be a contiguous (H,) float32 tensor");
  TORCH_CHECK(d == nullptr || (d->sizes() == h.sizes() && d->scalar_type() == at::kFloat && d->is_contiguous()),
              name, ": the added tensor must be like x");
  auto out = torch::empty_like(h);
  float* hp = h.data_ptr<float>();
  const float* dp = d == nullptr ? nullptr : d->data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float e = static_cast<float>(eps);
  if (M < 16) {
    normalize_rows(hp, dp, wp, op, 0, M, H, e);  // a decode step: not worth waking the pool
  } else {
    at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) { normalize_rows(hp, dp, wp, op, m0, m1, H, e); });
  }
  return out;
}

}  // namespace

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  return normalize(x, nullptr, w, eps, "rms_norm");
}

torch::Tensor add_rms_norm(torch::Tensor h, torch::Tensor d, torch::Tensor w, double eps) {
  return normalize(h, &d, w, eps, "add_rms_norm");
}
