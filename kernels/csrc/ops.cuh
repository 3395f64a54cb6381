// The list of fused ops: STEPD_OP(kernel name, op struct). Each entry file defines STEPD_OP
// to emit its entry points, then includes this list (an X-macro: one list, two compilers).
#include "adafactor.cuh"
#include "adam.cuh"
#include "kron.cuh"
#include "lamb.cuh"
#include "lion.cuh"
#include "mars.cuh"
#include "muon.cuh"
#include "nadam.cuh"
#include "qhadam.cuh"
#include "radam.cuh"
#include "sgd.cuh"
#include "soap.cuh"
#include "sophia.cuh"

STEPD_OP(sgd, stepd::Sgd)
STEPD_OP(sgd_momentum, stepd::SgdMomentum)
STEPD_OP(adam, stepd::Adam)
STEPD_OP(nadamw, stepd::NAdamW)
STEPD_OP(radam, stepd::RAdam)
STEPD_OP(qhadamw, stepd::QHAdamW)
STEPD_OP(lion, stepd::Lion)
STEPD_OP(muon_momentum, stepd::MuonMomentum)
STEPD_OP(muon_apply, stepd::MuonApply)
STEPD_OP(adafactor, stepd::Adafactor)
STEPD_OP(adafactor_momentum, stepd::AdafactorMomentum)
STEPD_OP(kron_momentum, stepd::KronMomentum)
STEPD_OP(sophia, stepd::Sophia)
STEPD_OP(sophia_hessian, stepd::SophiaHessian)
STEPD_OP(lamb_moments, stepd::LambMoments)
STEPD_OP(lamb_apply, stepd::LambApply)
STEPD_OP(mars_correct, stepd::MarsCorrect)
STEPD_OP(mars_adamw, stepd::MarsAdamW)
STEPD_OP(mars_adamw_1d, stepd::MarsAdamW1d)
STEPD_OP(soap_lerp, stepd::SoapLerp)
STEPD_OP(soap_precondition, stepd::SoapPrecondition)
STEPD_OP(soap_apply, stepd::SoapApply)
