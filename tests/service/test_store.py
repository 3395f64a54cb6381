"""One run's store in process: registration, validated steps, snapshots and restores."""

from __future__ import annotations

import numpy as np
import pytest
from stepd.service.errors import Conflict, Invalid, NotFound, Stale
from stepd.service.store import ParamStore


def ones(*shape: int) -> np.ndarray:
    return np.ones(shape, np.float32)


def snapshot(store: ParamStore) -> tuple[dict, dict]:
    return store.write_snapshot(lambda t, m: ({k: np.array(v) for k, v in t.items()}, m))


def same(a: tuple[dict, dict], b: tuple[dict, dict]) -> None:
    assert a[1] == b[1]
    assert a[0].keys() == b[0].keys()
    for k in a[0]:
        np.testing.assert_array_equal(a[0][k], b[0][k], err_msg=k)


@pytest.fixture
def store() -> ParamStore:
    s = ParamStore("cpu")
    s.register("w", (2, 3), ones(2, 3), "adamw", {"lr": 0.1})
    s.register("b", (3,), ones(3), "sgd", {"lr": 0.5, "momentum": 0.9})
    s.step({"w": ones(2, 3), "b": ones(3)})
    s.end_iteration()
    return s


def test_registration_is_idempotent_and_conflicts_are_refused(store) -> None:
    entry, created = store.register("w", (2, 3), None, "adamw", {"lr": 0.1})
    assert not created
    assert entry.version == 1
    with pytest.raises(Conflict, match="registered with shape"):
        store.register("w", (3, 2), None, "adamw", {"lr": 0.1})
    with pytest.raises(Conflict, match="registered with shape"):
        store.register("w", (2, 3), None, "adamw", {"lr": 0.2})
    with pytest.raises(Conflict, match="lr_scale"):
        store.register("w", (2, 3), None, "adamw", {"lr": 0.1}, lr_scale=0.5)
    with pytest.raises(Invalid, match="invalid parameter name"):
        store.register("a/b", (2,), None, "sgd", {})


def test_a_refused_step_changes_nothing(store) -> None:
    before = snapshot(store)
    with pytest.raises(Invalid, match="non-finite"):
        store.step({"w": ones(2, 3), "b": np.full(3, np.nan, np.float32)})
    with pytest.raises(Invalid, match="gradient has 5 elements"):
        store.step({"w": ones(2, 3), "b": ones(5)})
    with pytest.raises(NotFound):
        store.step({"w": ones(2, 3), "nope": ones(1)})
    same(snapshot(store), before)


def test_staleness_is_checked_against_the_version(tmp_path) -> None:
    s = ParamStore("cpu")
    s.register(
        "a", (2,), ones(2), "sgd", {"lr": 0.1}, workers={"mode": "async", "max_staleness": 1}
    )
    for _ in range(3):
        s.step({"a": ones(2)})
    [o] = s.step({"a": ones(2)}, based_on={"a": 2})
    assert o.staleness == 1
    with pytest.raises(Stale, match="stale gradient"):
        s.step({"a": ones(2)}, based_on={"a": 1})
    with pytest.raises(Invalid, match="ahead of"):
        s.step({"a": ones(2)}, based_on={"a": 99})


def test_restore_brings_back_the_snapshot_and_refuses_a_bad_one(store) -> None:
    saved = snapshot(store)
    store.step({"w": ones(2, 3)})
    store.end_iteration()
    store.restore(*saved)
    same(snapshot(store), saved)
    tensors, meta = saved
    broken = dict(tensors)
    broken["param/w"] = ones(3, 2)  # a shape the metadata does not claim
    before = snapshot(store)
    with pytest.raises(Invalid, match="inconsistent"):
        store.restore(broken, meta)
    same(snapshot(store), before)


def test_clear_drops_everything(store) -> None:
    with store.lock.exclusive():
        store.clear()
    assert store.names() == []
    assert store.device_bytes() == 0


@pytest.mark.parametrize(
    ("corrupt", "match"),
    [
        (lambda t, m: t.__setitem__("param/w", np.full((2, 3), np.nan, np.float32)), "non-finite"),
        (lambda t, m: m.__setitem__("global_step", -1), "global_step"),
        (lambda t, m: m.__setitem__("global_step", 2.5), "global_step"),
        (lambda t, m: m["groups"][next(iter(m["groups"]))].__setitem__("lr", 1e308), "float32"),
    ],
)
def test_a_restore_checks_what_it_brings_back(store, corrupt, match) -> None:
    """Each was accepted: NaN parameters, a negative step, an lr a step would overflow."""
    import copy

    tensors, meta = snapshot(store)
    tensors, meta = dict(tensors), copy.deepcopy(meta)
    corrupt(tensors, meta)
    before = snapshot(store)
    with pytest.raises(Invalid, match=match):
        store.restore(tensors, meta)
    same(snapshot(store), before)
