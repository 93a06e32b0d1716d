// Per-chunk vocabulary passes of the CPU backend. The logits chunk [rows, V] (fp32, already divided by the
// temperature) comes from a matrix product done by torch; these passes replace the several elementwise torch ops
// (max, exp, sums, softmax, its gradient) by one read of each row in the forward and one read and write in the
// gradient, with no temporaries of the chunk's size.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace {

// The forward pass reads a row in blocks of this many floats (2 KiB): a block's max is taken from memory, then its
// exponentials are summed from L1, so each row is read from memory once (256 to 2048 measured the same).
constexpr int64_t kBlock = 512;

// exp(x) for x <= 0, written so that gcc vectorises the loops that call it (std::exp does not vectorise without
// -ffast-math, whose finite-math assumptions would break the -inf and NaN handling below). Cody-Waite range
// reduction and Cephes' degree-5 polynomial: about 2 ulp. k = round(x log2 e) by the 1.5 * 2^23 trick, whose bits
// also give 2^k: no floor or float-to-int conversion, which gcc 12 does not vectorise once it has if-converted the
// loop (a floor-based version left the gradient loops scalar). Below -87.3 the result is 0, so -inf logits add
// nothing; NaN propagates. Never subnormal: the smallest nonzero result is about exp(-87.3) ~ 1.2e-38 > FLT_MIN.
inline float exp_nonpositive(float x) {
  constexpr float kRound = 12582912.0f;        // 1.5 * 2^23: adding it rounds |t| < 2^22 to an integer
  constexpr int32_t kRoundBits = 0x4B400000;   // its bits; bits(t + kRound) - kRoundBits = round(t)
  const float clamped = x < -87.3f ? -87.3f : x;
  const float k_rounded = clamped * 1.44269504088896341f + kRound;
  const float k = k_rounded - kRound;          // in [-126, 0]
  const float r = clamped - k * 0.693359375f + k * 2.12194440e-4f;
  float poly = 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  const float value = poly * r * r + r + 1.0f;
  int32_t k_bits;
  std::memcpy(&k_bits, &k_rounded, sizeof(float));
  const int32_t exponent_bits = (k_bits - kRoundBits + 127) << 23;
  float scale;
  std::memcpy(&scale, &exponent_bits, sizeof(float));
  return x < -87.3f ? 0.0f : value * scale;
}

// 0 where |g| < FLT_MIN (subnormals, which x86 multiplies about a hundred times slower, never leave these passes);
// NaN and everything else unchanged. A compare and a select: it stays in the vectorised loops.
inline float flush_subnormal(float g) { return std::fabs(g) < FLT_MIN ? 0.0f : g; }

void check_chunk(const at::Tensor& logits, const at::Tensor& targets) {
  TORCH_CHECK(logits.device().is_cpu() && logits.dim() == 2 && logits.scalar_type() == at::kFloat &&
                  logits.is_contiguous(),
              "logits must be a contiguous float32 [rows, V] CPU tensor, got ", logits.scalar_type(), " ",
              logits.sizes(), logits.is_contiguous() ? "" : " (not contiguous)", " on ", logits.device());
  TORCH_CHECK(targets.device().is_cpu() && targets.dim() == 1 && targets.scalar_type() == at::kLong &&
                  targets.size(0) == logits.size(0) && targets.is_contiguous(),
              "targets must be a contiguous int64 [rows] CPU tensor with rows = ", logits.size(0), ", got ",
              targets.scalar_type(), " ", targets.sizes(), " on ", targets.device());
  const int64_t vocab = logits.size(1);
  const int64_t* y = targets.data_ptr<int64_t>();
  for (int64_t row = 0; row < targets.size(0); ++row) {
    TORCH_CHECK(y[row] >= 0 && y[row] < vocab, "targets[", row, "] = ", y[row], " is outside [0, V = ", vocab, ")");
  }
}

void check_row_vector(const at::Tensor& tensor, const char* name, int64_t rows) {
  TORCH_CHECK(tensor.device().is_cpu() && tensor.dim() == 1 && tensor.scalar_type() == at::kFloat &&
                  tensor.size(0) == rows && tensor.is_contiguous(),
              name, " must be a contiguous float32 [rows] CPU tensor with rows = ", rows, ", got ",
              tensor.scalar_type(), " ", tensor.sizes(), " on ", tensor.device());
}

}  // namespace

// Returns (lse, target_logit, entropy), each [rows]: lse = logsumexp(z), target_logit = z[y],
// entropy = lse - sum softmax(z) z = log(s) - t / s with s = sum exp(z - m), t = sum exp(z - m) (z - m).
// One read of each row: online over blocks of kBlock floats, m the running max; when a block raises it to m',
// s and t are rescaled by c = exp(m - m'): s' = c s, t' = c (t + s (m - m')). A -inf logit adds nothing; a NaN
// logit, or a row of -inf only, makes the row's lse and entropy NaN (as the plain torch pass does).
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
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const float* z = z_all + row * vocab;
      float row_max = kNegInf, sum_exp = 0.0f, sum_exp_shifted = 0.0f;
      int has_nan = 0;
      for (int64_t start = 0; start < vocab; start += kBlock) {
        const float* block = z + start;
        const int64_t length = std::min(kBlock, vocab - start);
        float block_max = kNegInf;
        int block_nan = 0;
#pragma omp simd reduction(max : block_max) reduction(| : block_nan)
        for (int64_t v = 0; v < length; ++v) {
          block_max = block[v] > block_max ? block[v] : block_max;
          block_nan |= block[v] != block[v];
        }
        has_nan |= block_nan;
        if (block_max == kNegInf) continue;  // -inf logits (or NaN ones, flagged) only: nothing to add
        if (block_max > row_max) {
          if (row_max != kNegInf) {
            const float shift = row_max - block_max;
            const float scale = std::exp(shift);
            sum_exp_shifted = scale * (sum_exp_shifted + sum_exp * shift);
            sum_exp *= scale;
          }
          row_max = block_max;
        }
        float block_sum = 0.0f, block_sum_shifted = 0.0f;
#pragma omp simd reduction(+ : block_sum, block_sum_shifted)
        for (int64_t v = 0; v < length; ++v) {
          const float shifted = block[v] - row_max;
          const float e = exp_nonpositive(shifted);
          block_sum += e;
          block_sum_shifted += e > 0.0f ? e * shifted : 0.0f;  // 0, not 0 * -inf, where the logit is -inf
        }
        sum_exp += block_sum;
        sum_exp_shifted += block_sum_shifted;
      }
      target_out[row] = z[y[row]];
      if (has_nan || row_max == kNegInf) {
        lse_out[row] = kNaN;
        entropy_out[row] = kNaN;
      } else {
        const float log_sum = std::log(sum_exp);
        lse_out[row] = row_max + log_sum;
        entropy_out[row] = log_sum - sum_exp_shifted / sum_exp;
      }
    }
  });
  return {lse, target_logit, entropy};
}

// Overwrites the logits chunk z with
//   g = coef_logp (onehot(y) - p) - coef_entropy p (z - E_p[z]),  p = exp(z - lse),  E_p[z] = lse - entropy,
// the gradient of sum_r (coef_logp_r logp_r + coef_entropy_r H_r) with respect to z (the coefficients carry any
// 1/temperature factor). Every value of magnitude below FLT_MIN is written as exactly 0.
void vocab_gradient_(at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse, const at::Tensor& entropy,
                     const at::Tensor& coef_logp, const c10::optional<at::Tensor>& coef_entropy) {
  check_chunk(logits, targets);
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  check_row_vector(lse, "lse", rows);
  check_row_vector(entropy, "entropy", rows);
  check_row_vector(coef_logp, "coef_logp", rows);
  if (coef_entropy.has_value()) check_row_vector(*coef_entropy, "coef_entropy", rows);
  float* z_all = logits.data_ptr<float>();
  const int64_t* y = targets.data_ptr<int64_t>();
  const float* lse_in = lse.data_ptr<float>();
  const float* entropy_in = entropy.data_ptr<float>();
  const float* c_logp = coef_logp.data_ptr<float>();
  const float* c_entropy = coef_entropy.has_value() ? coef_entropy->data_ptr<float>() : nullptr;
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      float* z = z_all + row * vocab;
      const float row_lse = lse_in[row];
      const float cl = c_logp[row];
      const float z_target = z[y[row]];
      const float p_target = exp_nonpositive(z_target - row_lse);
      float g_target = cl * (1.0f - p_target);
      // A term below FLT_MIN is dropped before its product is made, not after: x86 is as slow at producing a
      // subnormal product as at consuming one (a peaked row has many p with |coef p| < FLT_MIN). |cl p| < FLT_MIN
      // exactly when p < FLT_MIN / |cl| (up to a rounding, which the final flush covers); cl = 0 gives inf: all 0.
      const float p_min = FLT_MIN / std::fabs(cl);
      if (c_entropy != nullptr) {
        const float ce = c_entropy[row];
        const float mean_logit = row_lse - entropy_in[row];
        const float centred_min = FLT_MIN / std::fabs(ce);
#pragma omp simd
        for (int64_t v = 0; v < vocab; ++v) {
          const float p = exp_nonpositive(z[v] - row_lse);
          const float centred = p > 0.0f ? p * (z[v] - mean_logit) : 0.0f;  // 0, not 0 * -inf
          const float p_kept = p < p_min ? 0.0f : p;
          const float centred_kept = std::fabs(centred) < centred_min ? 0.0f : centred;
          z[v] = flush_subnormal(-cl * p_kept - ce * centred_kept);
        }
        g_target -= ce * (p_target > 0.0f ? p_target * (z_target - mean_logit) : 0.0f);
      } else {
#pragma omp simd
        for (int64_t v = 0; v < vocab; ++v) {
          const float p = exp_nonpositive(z[v] - row_lse);
          z[v] = flush_subnormal(-cl * (p < p_min ? 0.0f : p));
        }
      }
      z[y[row]] = flush_subnormal(g_target);
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("vocab_forward", &vocab_forward, "log-sum-exp, target logit and entropy of each row of a logits chunk",
        py::arg("logits"), py::arg("targets"));
  m.def("vocab_gradient_", &vocab_gradient_,
        "in place: the logits chunk overwritten by the gradient of coef_logp * logp + coef_entropy * entropy",
        py::arg("logits"), py::arg("targets"), py::arg("lse"), py::arg("entropy"), py::arg("coef_logp"),
        py::arg("coef_entropy") = py::none());
}
