"""stepd's numeric core: optimizer algorithms, fused step kernels and the NumPy reference.

No I/O lives here; the service and the client's ``local://`` transport both wrap
:func:`create_optimizer`.
"""

from __future__ import annotations

from .algorithms import ALGORITHMS
from .backends import KernelBuildError, get_backend
from .norms import global_grad_clip_scale, l2_norm
from .optimizer import Optimizer, ParamState, create_optimizer

__all__ = [
    "ALGORITHMS",
    "KernelBuildError",
    "Optimizer",
    "ParamState",
    "create_optimizer",
    "get_backend",
    "global_grad_clip_scale",
    "l2_norm",
]
