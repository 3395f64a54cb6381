"""Comparing optimizer state, and a transport that records what passes through it."""

from __future__ import annotations

from typing import Any

import numpy as np
from stepd.client import Transport


class Spy(Transport):
    """Wraps a transport and records every op handed to it."""

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self.ops: list[Any] = []

    def handle(self, op: Any) -> Any:
        self.ops.append(op)
        return self.inner.handle(op)

    def close(self) -> None:
        self.inner.close()


def assert_same_state(a: dict, b: dict) -> None:
    """Two ``state_dict()``s are equal, arrays bit for bit."""
    for key in ("algorithm", "hyperparams", "global_step", "lr", "lr_scales"):
        assert a[key] == b[key], key
    assert a["state"].keys() == b["state"].keys()
    for name, sa in a["state"].items():
        sb = b["state"][name]
        assert list(sa["shape"]) == list(sb["shape"]), name
        assert sa["count"] == sb["count"], name
        assert sa["slots"].keys() == sb["slots"].keys(), name
        for slot, arr in sa["slots"].items():
            assert arr.shape == sb["slots"][slot].shape, (name, slot)
            np.testing.assert_array_equal(arr, sb["slots"][slot], err_msg=f"{name}/{slot}")
