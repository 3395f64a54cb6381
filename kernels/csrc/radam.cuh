// RAdam (torch.optim.RAdam): while the variance is intractable (rho_t <= 5) the step is
// SGD with bias-corrected momentum; afterwards the rectified adaptive step. The branch is a
// host-side property of t (rectify = 0 or 1), uniform across the launch.
#pragma once
#include "common.cuh"

namespace stepd {

struct RAdam {
  static constexpr int kSlots = 2;  // exp_avg, exp_avg_sq
  struct Args {
    float decay, l2, one_minus_beta1, beta2, one_minus_beta2;
    float bias_correction1, lr, bias_correction2_sqrt, eps, rect, rectify;
  };
  STEPD_HD static void apply(float& p, float g, float* s, const Args& a) {
    float& m = s[0];
    float& v = s[1];
    p = p * a.decay;
    g = g + a.l2 * p;
    m = m + a.one_minus_beta1 * (g - m);
    v = v * a.beta2 + a.one_minus_beta2 * g * g;
    const float m_hat = m / a.bias_correction1;
    if (a.rectify != 0.0f) {
      const float adaptive = a.bias_correction2_sqrt / (sqrtf(v) + a.eps);
      p = p - m_hat * a.lr * adaptive * a.rect;
    } else {
      p = p - m_hat * a.lr;
    }
  }
};

}  // namespace stepd
