// SGD with momentum, dampening, Nesterov and L2 weight decay (torch.optim.SGD semantics).
// The first step of a fresh buffer copies the gradient (buf = g): the host passes
// buf_decay = 0 and grad_coef = 1 for it, momentum and 1 - dampening afterwards.
#pragma once
#include "common.cuh"

namespace stepd {

struct Sgd {
  static constexpr int kSlots = 0;
  struct Args { float neg_lr, weight_decay; };
  STEPD_HD static void apply(float& p, float g, float*, const Args& a) {
    g = g + a.weight_decay * p;
    p = p + a.neg_lr * g;
  }
};

struct SgdMomentum {
  static constexpr int kSlots = 1;  // momentum_buffer
  struct Args { float neg_lr, weight_decay, buf_decay, grad_coef, nesterov_momentum; };
  STEPD_HD static void apply(float& p, float g, float* s, const Args& a) {
    float& buf = s[0];
    g = g + a.weight_decay * p;
    buf = a.buf_decay * buf + a.grad_coef * g;
    // nesterov_momentum is 0 for plain momentum: d = buf exactly (g * 0 + buf would not be
    // exact for non-finite g, so keep the two forms apart).
    const float d = a.nesterov_momentum != 0.0f ? g + a.nesterov_momentum * buf : buf;
    p = p + a.neg_lr * d;
  }
};

}  // namespace stepd
