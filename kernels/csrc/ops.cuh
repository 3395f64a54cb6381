// The list of fused ops: STEPD_OP(kernel name, op struct). Each entry file defines STEPD_OP
// to emit its entry points, then includes this list (an X-macro: one list, two compilers).
#include "adam.cuh"
#include "lion.cuh"
#include "nadam.cuh"
#include "qhadam.cuh"
#include "radam.cuh"
#include "sgd.cuh"

STEPD_OP(sgd, stepd::Sgd)
STEPD_OP(sgd_momentum, stepd::SgdMomentum)
STEPD_OP(adam, stepd::Adam)
STEPD_OP(nadamw, stepd::NAdamW)
STEPD_OP(radam, stepd::RAdam)
STEPD_OP(qhadamw, stepd::QHAdamW)
STEPD_OP(lion, stepd::Lion)
