// SOAP's elementwise parts; the projections into and out of the eigenbasis, the Kronecker
// factors' outer products and the eigh / QR refreshes in between are matrix code.
//   SoapLerp:         p = lerp(p, g, w): the first moment (p = exp_avg, g = grad) and the
//                     factors (p = GG_k, g = the outer product).
//   SoapPrecondition: v = lerp(v, g^2, w2); p = p / (sqrt(v) + eps), with g the projected
//                     gradient and p the projected first moment (a scratch buffer, in/out).
//   SoapApply:        p = (p - step_size (u / norm)) * decay, with u the update projected back
//                     in the grad position (norm = 1 unless normalize_grads).
#pragma once
#include "common.cuh"

namespace stepd {

// torch.lerp's formula (w is 1 - beta, in (0, 1]): exact at both ends.
STEPD_HD float soap_lerp(float a, float b, float w) {
  return w < 0.5f ? a + w * (b - a) : b - (b - a) * (1.0f - w);
}

struct SoapLerp {
  static constexpr int kSlots = 0;
  struct Args { float weight; };
  STEPD_HD static void apply(float& p, float g, float*, const Args& a) {
    p = soap_lerp(p, g, a.weight);
  }
};

struct SoapPrecondition {
  static constexpr int kSlots = 1;  // exp_avg_sq (in the eigenbasis)
  struct Args { float weight, eps; };
  STEPD_HD static void apply(float& p, float g, float* s, const Args& a) {
    s[0] = soap_lerp(s[0], g * g, a.weight);
    p = p / (sqrtf(s[0]) + a.eps);
  }
};

struct SoapApply {
  static constexpr int kSlots = 0;
  struct Args { float neg_step_size, norm, decay; };
  STEPD_HD static void apply(float& p, float u, float*, const Args& a) {
    p = p + a.neg_step_size * (u / a.norm);
    p = p * a.decay;
  }
};

}  // namespace stepd
