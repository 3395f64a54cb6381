// LAMB's elementwise parts (You et al. 2020), in optax.lamb's formulation. The per-tensor
// trust ratio ||p|| / ||u|| between them is a reduction, done by the array module.
//   LambMoments: m = (1 - b1) g + b1 m;  v = (1 - b2) g g + b2 v.  p is left as it is.
//   LambApply:   u = (m / bc1) / (sqrt(v / bc2) + eps) + wd p;  p = p + neg_step u, with
//                neg_step = -lr * trust_ratio. m and v are read only (written back unchanged).
// lamb_direction is the one definition of u: LambApply and the host-side norm of u (which
// recomputes u with the same float32 operations) must agree.
#pragma once
#include "common.cuh"

namespace stepd {

struct LambMoments {
  static constexpr int kSlots = 2;  // exp_avg, exp_avg_sq
  struct Args { float beta1, one_minus_beta1, beta2, one_minus_beta2; };
  STEPD_HD static void apply(float&, float g, float* s, const Args& a) {
    s[0] = a.one_minus_beta1 * g + a.beta1 * s[0];
    s[1] = a.one_minus_beta2 * g * g + a.beta2 * s[1];
  }
};

struct LambApplyArgs {
  float bias_correction1, bias_correction2, eps, weight_decay;
  float neg_step;  // -lr * trust_ratio
};

STEPD_HD float lamb_direction(float p, float m, float v, const LambApplyArgs& a) {
  const float denom = sqrtf(v / a.bias_correction2) + a.eps;
  return (m / a.bias_correction1) / denom + a.weight_decay * p;
}

struct LambApply {
  static constexpr int kSlots = 2;  // exp_avg, exp_avg_sq (read only)
  using Args = LambApplyArgs;
  STEPD_HD static void apply(float& p, float, float* s, const Args& a) {
    p = p + a.neg_step * lamb_direction(p, s[0], s[1], a);
  }
};

}  // namespace stepd
