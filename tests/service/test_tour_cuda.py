"""``stepd tour --backend cuda`` hands the optimizer device arrays (CuPy's contract): checked on
the CuPy stand-in (tests/support/fakecupy: host/device handling only, NOT a GPU run), where
every step must equal the NumPy reference's."""

from __future__ import annotations

import pytest
from stepd.service.tour import train


@pytest.mark.parametrize("algorithm", ["adamw", "sophia", "muon"])
def test_the_tour_trains_on_device_arrays(fake_cupy, algorithm) -> None:
    on_device = train(algorithm, 12, "cuda", seed=0)
    reference = train(algorithm, 12, "reference", seed=0)
    assert on_device[:3] == reference[:3]  # loss before, loss after, accuracy
    assert on_device[1] < on_device[0]
