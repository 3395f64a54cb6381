// Muon's elementwise parts (the Newton–Schulz orthogonalisation in between is matrix code).
//   MuonMomentum: buf = lerp(buf, g, 1 - mu); u = lerp(buf, g, 1 - mu) if Nesterov else buf,
//                 the torch.optim.Muon / Keller Jordan form. `p` is the OUTPUT u, a scratch
//                 buffer whose incoming value is ignored (the caller's grad is read-only).
//   MuonApply:    p = p (1 - lr wd) - lr_adjusted O, with O the orthogonalised update passed
//                 in the grad position.
#pragma once
#include "common.cuh"

namespace stepd {

struct MuonMomentum {
  static constexpr int kSlots = 1;  // momentum_buffer
  struct Args { float one_minus_momentum, nesterov; };
  STEPD_HD static void apply(float& p, float g, float* s, const Args& a) {
    float& buf = s[0];
    buf = buf + a.one_minus_momentum * (g - buf);
    // Nesterov: g + mu (buf - g) written as buf + (1 - mu)(g - buf), one coefficient for both.
    p = a.nesterov != 0.0f ? buf + a.one_minus_momentum * (g - buf) : buf;
  }
};

struct MuonApply {
  static constexpr int kSlots = 0;
  struct Args { float decay, neg_lr; };
  STEPD_HD static void apply(float& p, float o, float*, const Args& a) {
    p = p * a.decay;
    p = p + a.neg_lr * o;
  }
};

}  // namespace stepd
