// The list of blockwise 8-bit ops: STEPD_BLOCKWISE_OP(kernel name, op struct), an X-macro
// like ops.cuh; each entry file defines the macro to emit its entry points.
#include "blockwise8.cuh"

STEPD_BLOCKWISE_OP(adam8, stepd::Adam8)
STEPD_BLOCKWISE_OP(lion8, stepd::Lion8)
STEPD_BLOCKWISE_OP(sgd_momentum8, stepd::SgdMomentum8)
