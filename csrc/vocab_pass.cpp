// Per-chunk vocabulary passes of the CPU backend. The logits chunk [rows, V] (fp32, already divided by the
// temperature) comes from a matrix product done by torch; these passes replace the several elementwise torch ops
// (max, exp, sums, softmax, its gradient) by two passes over each row in the forward and one in the backward,
// with no temporaries of the chunk's size.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace {

// exp(x) for x <= 0, written so that gcc vectorises the loops that call it (std::exp does not vectorise without
// -ffast-math, whose finite-math assumptions would break the -inf and NaN handling below). Cody-Waite range
// reduction and Cephes' degree-5 polynomial: about 2 ulp. Below -87.3 the result is 0, so -inf logits add nothing;
// NaN propagates.
inline float exp_nonpositive(float x) {
  const float clamped = x < -87.3f ? -87.3f : x;
  const float k = std::floor(clamped * 1.44269504088896341f + 0.5f);
  const float r = clamped - k * 0.693359375f + k * 2.12194440e-4f;
  float poly = 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  const float value = poly * r * r + r + 1.0f;
  const int32_t exponent_bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &exponent_bits, sizeof(float));
  return x < -87.3f ? 0.0f : value * scale;
}

void check_chunk(const at::Tensor& logits, const at::Tensor& targets) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.is_contiguous(),
              "logits must be a contiguous float32 [rows, V] tensor");
  TORCH_CHECK(targets.dim() == 1 && targets.scalar_type() == at::kLong && targets.size(0) == logits.size(0),
              "targets must be int64 [rows]");
}

}  // namespace

// Returns (lse, target_logit, entropy), each [rows]: lse = logsumexp(z), target_logit = z[y],
// entropy = lse - sum softmax(z) z, computed as log(s) - sum(e (z - max)) / s with e = exp(z - max), s = sum e.
std::vector<at::Tensor> vocab_forward(const at::Tensor& logits, const at::Tensor& targets) {
  check_chunk(logits, targets);
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  auto lse = at::empty({rows}, logits.options());
  auto target_logit = at::empty({rows}, logits.options());
  auto entropy = at::empty({rows}, logits.options());
  const float* z_all = logits.data_ptr<float>();
  const int64_t* y = targets.data_ptr<int64_t>();
  float* lse_out = lse.data_ptr<float>();
  float* target_out = target_logit.data_ptr<float>();
  float* entropy_out = entropy.data_ptr<float>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const float* z = z_all + row * vocab;
      float row_max = -std::numeric_limits<float>::infinity();
      bool has_nan = false;
#pragma omp simd reduction(max : row_max) reduction(| : has_nan)
      for (int64_t v = 0; v < vocab; ++v) {
        row_max = z[v] > row_max ? z[v] : row_max;
        has_nan |= z[v] != z[v];
      }
      if (has_nan) row_max = std::numeric_limits<float>::quiet_NaN();
      float sum_exp = 0.0f, sum_exp_shifted = 0.0f;
#pragma omp simd reduction(+ : sum_exp, sum_exp_shifted)
      for (int64_t v = 0; v < vocab; ++v) {
        const float shifted = z[v] - row_max;
        const float e = exp_nonpositive(shifted);
        sum_exp += e;
        sum_exp_shifted += e > 0.0f ? e * shifted : 0.0f;
      }
      const float log_sum = std::log(sum_exp);
      lse_out[row] = row_max + log_sum;
      target_out[row] = z[y[row]];
      entropy_out[row] = log_sum - sum_exp_shifted / sum_exp;
    }
  });
  return {lse, target_logit, entropy};
}

// Overwrites the logits chunk z with the gradient of sum_t (grad_logp_t lp_t + grad_entropy_t H_t) with respect
// to the raw logits (before the division by the temperature):
//   (grad_logp (onehot(y) - p) - grad_entropy p (z - E_p[z])) * inv_temperature,  E_p[z] = lse - entropy.
void vocab_backward_(at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse, const at::Tensor& entropy,
                     const at::Tensor& grad_logp, const c10::optional<at::Tensor>& grad_entropy,
                     double inv_temperature) {
  check_chunk(logits, targets);
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  float* z_all = logits.data_ptr<float>();
  const int64_t* y = targets.data_ptr<int64_t>();
  const float* lse_in = lse.data_ptr<float>();
  const float* entropy_in = entropy.data_ptr<float>();
  const float* g_logp = grad_logp.data_ptr<float>();
  const float* g_entropy = grad_entropy.has_value() ? grad_entropy->data_ptr<float>() : nullptr;
  const float inv_t = static_cast<float>(inv_temperature);
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      float* z = z_all + row * vocab;
      const float row_lse = lse_in[row];
      const float coef_logp = g_logp[row] * inv_t;
      if (g_entropy != nullptr) {
        const float coef_entropy = g_entropy[row] * inv_t;
        const float mean_logit = row_lse - entropy_in[row];
#pragma omp simd
        for (int64_t v = 0; v < vocab; ++v) {
          const float p = exp_nonpositive(z[v] - row_lse);
          const float centred = p > 0.0f ? p * (z[v] - mean_logit) : 0.0f;
          z[v] = -coef_logp * p - coef_entropy * centred;
        }
      } else {
#pragma omp simd
        for (int64_t v = 0; v < vocab; ++v) z[v] = -coef_logp * exp_nonpositive(z[v] - row_lse);
      }
      z[y[row]] += coef_logp;
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("vocab_forward", &vocab_forward, "log-sum-exp, target logit and entropy of each row of a logits chunk");
  m.def("vocab_backward_", &vocab_backward_, "in place: the gradient of log-probs and entropies w.r.t. the logits");
}
