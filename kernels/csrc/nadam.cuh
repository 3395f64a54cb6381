// NAdam with decoupled weight decay (torch.optim.NAdam(decoupled_weight_decay=True)):
// p -= c_g g / d + c_m m / d, d = sqrt(v / bc2) + eps; the Nesterov coefficients c_g, c_m
// come from the host (momentum schedule and mu products).
#pragma once
#include "common.cuh"

namespace stepd {

struct NAdamW {
  static constexpr int kSlots = 2;  // exp_avg, exp_avg_sq
  struct Args {
    float decay, one_minus_beta1, beta2, one_minus_beta2;
    float bias_correction2, eps;
    float grad_coef, avg_coef;  // -lr (1 - mu_t) / (1 - prod mu), -lr mu_{t+1} / (1 - prod mu next)
  };
  STEPD_HD static void apply(float& p, float g, float* s, const Args& a) {
    float& m = s[0];
    float& v = s[1];
    p = p * a.decay;
    m = m + a.one_minus_beta1 * (g - m);
    v = v * a.beta2 + a.one_minus_beta2 * g * g;
    const float denom = sqrtf(v / a.bias_correction2) + a.eps;
    p = p + a.grad_coef * g / denom;
    p = p + a.avg_coef * m / denom;
  }
};

}  // namespace stepd
