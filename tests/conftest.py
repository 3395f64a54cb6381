"""Suite-wide settings."""

from __future__ import annotations

# The oracles run in the same process as NumPy's BLAS and our OpenMP kernels; on small
# machines torch's own thread pool then fights them for the cores (steps measured 10-70x
# slower). The oracles are tiny: one thread is plenty.
try:
    import torch
except ImportError:  # the service tests do not need it
    pass
else:
    torch.set_num_threads(1)
