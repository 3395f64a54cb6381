// MARS-AdamW's elementwise parts (Yuan et al. 2024), in pytorch_optimizer.MARS's formulation.
// The per-tensor clip of c to norm <= 1 between them is a reduction, done by the array module.
//   MarsCorrect: c = (g - g_prev) coef + g with coef = gamma b1 / (1 - b1), written INTO the
//                last_grad slot (the caller's grad is read only; no scratch buffer).
//   MarsAdamW:   c = c / clip (clip = ||c|| if > 1, else 1); AdamW on c; last_grad = g.
//   MarsAdamW1d: AdamW on g itself (1-D parameters when optimize_1d is off); no last_grad.
// AdamW step as pytorch_optimizer: denom = (sqrt(v + v_eps) + eps) / sqrt(bc2) * bc1;
// p = p (1 - lr wd) - lr m / denom.
#pragma once
#include "common.cuh"

namespace stepd {

struct MarsCorrect {
  static constexpr int kSlots = 1;  // last_grad, overwritten by c
  struct Args { float coef; };
  STEPD_HD static void apply(float&, float g, float* s, const Args& a) {
    s[0] = (g - s[0]) * a.coef + g;
  }
};

struct MarsArgs {
  float decay, neg_lr, one_minus_beta1, beta2, one_minus_beta2;
  float bias_correction1, bias_correction2_sqrt, eps, v_eps;
  float clip;  // MarsAdamW only: ||c|| when it exceeds 1, else 1
};

STEPD_HD void mars_adamw(float& p, float c, float& m, float& v, const MarsArgs& a) {
  m = m + a.one_minus_beta1 * (c - m);
  v = v * a.beta2 + a.one_minus_beta2 * c * c;
  const float denom = (sqrtf(v + a.v_eps) + a.eps) / a.bias_correction2_sqrt * a.bias_correction1;
  p = p * a.decay;
  p = p + a.neg_lr * (m / denom);
}

struct MarsAdamW {
  static constexpr int kSlots = 3;  // exp_avg, exp_avg_sq, last_grad (holding c on entry)
  using Args = MarsArgs;
  STEPD_HD static void apply(float& p, float g, float* s, const Args& a) {
    mars_adamw(p, s[2] / a.clip, s[0], s[1], a);
    s[2] = g;
  }
};

struct MarsAdamW1d {
  static constexpr int kSlots = 2;  // exp_avg, exp_avg_sq
  using Args = MarsArgs;
  STEPD_HD static void apply(float& p, float g, float* s, const Args& a) {
    mars_adamw(p, g, s[0], s[1], a);
  }
};

}  // namespace stepd
