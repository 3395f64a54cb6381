// Lion (Chen et al. 2023): p = p (1 - lr wd) - lr sign(b1 m + (1 - b1) g);
// m = b2 m + (1 - b2) g.
#pragma once
#include "common.cuh"

namespace stepd {

struct Lion {
  static constexpr int kSlots = 1;  // exp_avg
  struct Args { float decay, neg_lr, beta1, one_minus_beta1, beta2, one_minus_beta2; };
  STEPD_HD static void apply(float& p, float g, float* s, const Args& a) {
    float& m = s[0];
    const float c = a.beta1 * m + a.one_minus_beta1 * g;
    p = p * a.decay;
    p = p + a.neg_lr * sign(c);
    m = a.beta2 * m + a.one_minus_beta2 * g;
  }
};

}  // namespace stepd
