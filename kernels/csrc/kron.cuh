// Kron-PSGD's elementwise head (the Kronecker preconditioning after it is matrix code; the
// final decay-and-apply is the `sgd` op).
//   KronMomentum: buf = beta buf + (1 - beta) g (kron_torch's mul_/add_ form, not lerp);
//                 p = buf / (1 - beta^t), the debiased momentum. `p` is the OUTPUT, a scratch
//                 buffer whose incoming value is ignored (the caller's grad is read-only).
#pragma once
#include "common.cuh"

namespace stepd {

struct KronMomentum {
  static constexpr int kSlots = 1;  // momentum_buffer
  struct Args { float beta, one_minus_beta, bias_correction; };
  STEPD_HD static void apply(float& p, float g, float* s, const Args& a) {
    float& buf = s[0];
    buf = buf * a.beta + a.one_minus_beta * g;
    p = buf / a.bias_correction;
  }
};

}  // namespace stepd
