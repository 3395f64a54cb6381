// Adafactor's elementwise tail. The factored second moment, the preconditioned update
// U = G / sqrt(V) and its RMS (for the update clipping) are array code in
// kernels/algorithms/adafactor.py; U comes in the grad position (a scratch buffer) and
// `step` = alpha_t / max(1, RMS(U) / d) is a host scalar.
//   Adafactor:         p = p (1 - lr wd) - step U
//   AdafactorMomentum: m = m + (1 - b1)(step U - m); p = p (1 - lr wd) - m
//                      (the momentum averages the scaled, clipped update, as tensor2tensor).
#pragma once
#include "common.cuh"

namespace stepd {

struct Adafactor {
  static constexpr int kSlots = 0;
  struct Args { float decay, step; };
  STEPD_HD static void apply(float& p, float u, float*, const Args& a) {
    p = p * a.decay;
    p = p - a.step * u;
  }
};

struct AdafactorMomentum {
  static constexpr int kSlots = 1;  // exp_avg
  struct Args { float decay, step, one_minus_beta1; };
  STEPD_HD static void apply(float& p, float u, float* s, const Args& a) {
    float& m = s[0];
    m = m + a.one_minus_beta1 * (a.step * u - m);
    p = p * a.decay;
    p = p - m;
  }
};

}  // namespace stepd
