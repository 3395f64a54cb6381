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


# Fixtures that start a real `stepd serve` process: a test that uses one is end-to-end.
SERVER_FIXTURES = {"server", "shared_server", "shm_server", "srv", "twin"}


def pytest_collection_modifyitems(config, items) -> None:
    """``e2e``: every test that starts server processes (a server fixture, or a module or
    test marked so because it starts them itself); ``pytest -m "not e2e"`` is the fast loop."""
    import pytest

    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)
