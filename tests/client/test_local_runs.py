"""local:// named runs: optimizers of one process that name a run share one optimizer."""

from __future__ import annotations

import numpy as np
import pytest
from stepd.client import ConflictError, InvalidRequestError, connect


def test_named_local_runs_share_state_and_fresh_starts_anew() -> None:
    a = connect("local://?backend=cpu", "sgd", run="local-shared", fresh=True, lr=0.5)
    b = connect("local://?backend=cpu", "sgd", run="local-shared", lr=0.5)
    assert a.run == b.run == "local-shared"
    a.end_iteration()
    assert b.state_dict()["global_step"] == 1  # one optimizer behind both
    c = connect("local://?backend=cpu", "sgd", run="local-shared", fresh=True, lr=0.5)
    assert c.state_dict()["global_step"] == 0
    with pytest.raises(ConflictError, match="one optimizer"):
        connect("local://?backend=cpu", "adamw", run="local-shared", lr=0.5)
    anon = connect("local://?backend=cpu", "sgd", lr=0.5)
    assert anon.run is None
    assert anon.state_dict()["global_step"] == 0


def test_local_refuses_what_a_server_refuses() -> None:
    opt = connect("local://?backend=cpu", "sgd", lr=0.5)
    p = np.ones(3, np.float32)
    with pytest.raises(InvalidRequestError, match="non-finite gradient values for 'w'"):
        opt.step("w", (3,), p, np.array([1, np.nan, 1], np.float32))
    np.testing.assert_array_equal(p, np.ones(3))  # nothing applied
    with pytest.raises(InvalidRequestError, match="initial value has non-finite"):
        opt.step("v", (2,), np.array([np.inf, 0], np.float32), np.ones(2, np.float32))
    assert opt.state_dict()["state"] == {}
