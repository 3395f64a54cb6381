// Sophia (Liu et al. 2023) in pytorch-optimizer SophiaH's formulation, with the Hessian
// diagonal estimate supplied by the caller.
//   Sophia:        p = p (1 - lr wd); m = lerp(m, g, 1 - b1);
//                  p -= lr clamp(m / max(h, eps), -rho, rho).
//   SophiaHessian: h = lerp(h, hhat, 1 - b2). `p` is the slot h itself and `g` the estimate
//                  hhat (an EMA has nothing else to touch).
// max and clamp are written so that a NaN in h or m propagates, as torch.clamp does.
#pragma once
#include "common.cuh"

namespace stepd {

struct Sophia {
  static constexpr int kSlots = 2;  // exp_avg, hessian
  struct Args { float decay, one_minus_beta1, neg_lr, rho, neg_rho, eps; };
  STEPD_HD static void apply(float& p, float g, float* s, const Args& a) {
    float& m = s[0];
    const float h = s[1];
    p = p * a.decay;
    m = m + a.one_minus_beta1 * (g - m);
    const float d = h < a.eps ? a.eps : h;
    float u = m / d;
    u = u < a.neg_rho ? a.neg_rho : u;
    u = u > a.rho ? a.rho : u;
    p = p + a.neg_lr * u;
  }
};

struct SophiaHessian {
  static constexpr int kSlots = 0;
  struct Args { float one_minus_beta2; };
  STEPD_HD static void apply(float& h, float hhat, float*, const Args& a) {
    h = h + a.one_minus_beta2 * (hhat - h);
  }
};

}  // namespace stepd
