// Adam (L2 weight decay folded into the gradient) and AdamW (decoupled decay), in
// torch.optim's formulation: m = lerp(m, g, 1 - b1); v = b2 v + (1 - b2) g g;
// p -= step_size * m / (sqrt(v) / sqrt(bc2) + eps); AMSGrad uses max(v) over time instead.
#pragma once
#include "common.cuh"

namespace stepd {

struct AdamArgs {
  float decay;  // AdamW: 1 - lr wd applied to p first; Adam: 1
  float l2;     // Adam: wd added to the gradient as wd * p; AdamW: 0
  float one_minus_beta1, beta2, one_minus_beta2;
  float step_size;  // lr / (1 - b1^t)
  float bias_correction2_sqrt, eps;
};

STEPD_HD void adam_moments(float g, float& m, float& v, const AdamArgs& a) {
  m = m + a.one_minus_beta1 * (g - m);
  v = v * a.beta2 + a.one_minus_beta2 * g * g;
}

struct Adam {
  static constexpr int kSlots = 2;  // exp_avg, exp_avg_sq
  using Args = AdamArgs;
  STEPD_HD static void apply(float& p, float g, float* s, const Args& a) {
    p = p * a.decay;
    g = g + a.l2 * p;
    adam_moments(g, s[0], s[1], a);
    const float denom = sqrtf(s[1]) / a.bias_correction2_sqrt + a.eps;
    p = p - a.step_size * s[0] / denom;
  }
};

// AMSGrad (Reddi et al. 2018) as torch.optim's amsgrad=True: the denominator uses the
// running maximum of v (not bias-corrected), kept in a third slot.
struct AdamAmsgrad {
  static constexpr int kSlots = 3;  // exp_avg, exp_avg_sq, max_exp_avg_sq
  using Args = AdamArgs;
  STEPD_HD static void apply(float& p, float g, float* s, const Args& a) {
    p = p * a.decay;
    g = g + a.l2 * p;
    adam_moments(g, s[0], s[1], a);
    s[2] = s[2] < s[1] ? s[1] : s[2];  // v and its max are finite (gradients are screened)
    const float denom = sqrtf(s[2]) / a.bias_correction2_sqrt + a.eps;
    p = p - a.step_size * s[0] / denom;
  }
};

}  // namespace stepd
