// QHAdamW (Ma & Yarats 2019, decoupled decay): quasi-hyperbolic mixes of the raw gradient
// and the bias-corrected moments,
//   p -= lr ((1 - nu1) g + nu1 m_hat) / (sqrt((1 - nu2) g^2 + nu2 v_hat) + eps).
#pragma once
#include "common.cuh"

namespace stepd {

struct QHAdamW {
  static constexpr int kSlots = 2;  // exp_avg, exp_avg_sq
  struct Args {
    float decay, one_minus_beta1, beta2, one_minus_beta2;
    float bias_correction1, bias_correction2;
    float nu1, one_minus_nu1, nu2, one_minus_nu2, neg_lr, eps;
  };
  STEPD_HD static void apply(float& p, float g, float* s, const Args& a) {
    float& m = s[0];
    float& v = s[1];
    p = p * a.decay;
    m = m + a.one_minus_beta1 * (g - m);
    v = v * a.beta2 + a.one_minus_beta2 * g * g;
    const float num = a.one_minus_nu1 * g + a.nu1 * (m / a.bias_correction1);
    const float den = sqrtf(a.one_minus_nu2 * (g * g) + a.nu2 * (v / a.bias_correction2)) + a.eps;
    p = p + a.neg_lr * (num / den);
  }
};

}  // namespace stepd
