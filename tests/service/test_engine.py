"""The engine in process: runs (join, fresh, anonymous, delete, reap) and the rules every
adapter shares (worker modes, request ids, unknown names' lr_scale, metrics per run)."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import generate_latest
from stepd.service.config import Settings
from stepd.service.engine import Engine
from stepd.service.errors import Conflict, Invalid, NotFound, OverBudget
from stepd.service.rwlock import WouldBlock


@pytest.fixture
def engine(tmp_path) -> Engine:
    return Engine(Settings(checkpoint_dir=tmp_path, device="cpu", anonymous_run_ttl=10), "cpu")


def ones(*shape: int) -> np.ndarray:
    return np.ones(shape, np.float32)


def test_named_runs_are_joined_and_fresh_starts_anew(engine) -> None:
    run, created = engine.open_run("exp")
    assert created
    again, created = engine.open_run("exp")
    assert again is run
    assert not created
    engine.register("exp", "w", (2,), ones(2), "sgd", {"lr": 0.5})
    engine.step("exp", {"w": ones(2)})
    assert engine.end_iteration("exp").step == 1
    new, created = engine.open_run("exp", fresh=True)
    assert created
    assert new is not run
    assert new.store.names() == []
    assert new.store.global_step == 0


def test_run_names_and_groups_are_checked_before_anything_is_made(engine) -> None:
    for bad in ("", "../x", ".hidden", "-x", "a/b", "x" * 65, "spa ce"):
        with pytest.raises(Invalid, match="invalid run name"):
            engine.open_run(bad)
    with pytest.raises(Invalid, match="unknown algorithm"):
        engine.open_run("ok", group={"algorithm": "nope"})
    with pytest.raises(Invalid, match="beta"):
        engine.open_run(None, group={"algorithm": "adamw", "hyperparams": {"betas": [2, 0.9]}})
    assert engine.runs() == []


def test_anonymous_runs_are_private(engine) -> None:
    run, created = engine.open_run(None)
    assert created
    assert run.anonymous
    assert run.name.startswith("anon-")
    with pytest.raises(Conflict, match="anonymous"):
        engine.open_run(run.name)
    other, _ = engine.open_run(None)
    assert other.name != run.name


def test_the_same_names_in_two_runs_are_two_parameters(engine) -> None:
    engine.open_run("g")
    engine.open_run("d")
    engine.register("g", "w", (3,), ones(3), "sgd", {"lr": 0.5})
    engine.register("d", "w", (3,), ones(3), "adamw", {"lr": 0.1})  # no conflict
    engine.step("g", {"w": ones(3)})
    assert engine.end_iteration("g").step == 1
    assert engine.run("d").store.global_step == 0
    np.testing.assert_array_equal(engine.read("g", "w"), np.full(3, 0.5, np.float32))
    np.testing.assert_array_equal(engine.read("d", "w"), ones(3))


def test_delete_frees_memory_and_forgets_metrics(engine) -> None:
    engine.open_run("keep")
    engine.open_run("gone")
    engine.register("keep", "w", (4,), ones(4), "sgd", {"lr": 0.1})
    engine.register("gone", "w", (1000,), ones(1000), "adamw", {})
    engine.step("gone", {"w": ones(1000)})
    engine.end_iteration("gone")
    assert engine.device_bytes() == 16 + 3 * 4000
    engine.delete_run("gone")
    assert engine.device_bytes() == 16
    with pytest.raises(NotFound, match="run 'gone' does not exist"):
        engine.step("gone", {"w": ones(1000)})
    with pytest.raises(NotFound):
        engine.delete_run("gone")
    from prometheus_client import generate_latest

    assert b'run="gone"' not in generate_latest(engine.metrics.registry)


def test_reap_takes_idle_anonymous_runs_only(engine) -> None:
    named, _ = engine.open_run("named")
    idle, _ = engine.open_run(None)
    held, _ = engine.open_run(None)
    held.holders += 1  # an shm:// connection is bound to it
    busy, _ = engine.open_run(None)
    later = idle.last_used + 11  # past the 10 s TTL
    busy.last_used = later - 1
    assert engine.reap(now=later) == [idle.name]
    assert {r["name"] for r in engine.runs()} == {named.name, held.name, busy.name}


def test_unknown_names_and_worker_rules_are_the_engines(engine) -> None:
    engine.open_run("r")
    with pytest.raises(NotFound, match="'nope' is not registered"):
        engine.step("r", {"nope": ones(2)})
    engine.register("r", "s", (2,), ones(2), "sgd", {}, workers={"mode": "sync", "count": 2})
    engine.register("r", "a", (2,), ones(2), "sgd", {}, workers={"mode": "async"})
    with pytest.raises(Invalid, match="sync group: name this worker"):
        engine.step("r", {"s": ones(2)})
    with pytest.raises(Invalid, match="async group: pass the parameter version"):
        engine.step("r", {"a": ones(2)})
    with pytest.raises(Invalid, match="invalid worker id"):
        engine.step("r", {"a": ones(2)}, worker="a b", versions={"a": 0})
    with pytest.raises(WouldBlock):  # a round waits for the others: never on the event loop
        engine.step("r", {"s": ones(2)}, worker="w0", blocking=False)
    [o] = engine.step("r", {"a": ones(2)}, worker="w0", versions={"a": 0})
    assert (o.version, o.staleness) == (1, 0)


def test_a_request_id_applies_once(engine) -> None:
    engine.open_run("r")
    engine.register("r", "w", (2,), ones(2), "sgd", {"lr": 1.0})
    rid = "0123456789abcdef-1"
    first = engine.step("r", {"w": ones(2)}, request_id=rid, read_back=True)
    again = engine.step("r", {"w": ones(2)}, request_id=rid, read_back=True)
    assert again[0].replayed
    assert again[0].version == first[0].version == 1
    np.testing.assert_array_equal(engine.read("r", "w"), np.zeros(2, np.float32))
    with pytest.raises(Invalid, match="X-Stepd-Request-Id"):
        engine.step("r", {"w": ones(2)}, request_id="short")


def test_an_lr_one_group_refuses_changes_no_group(engine) -> None:
    engine.open_run("r")
    engine.register("r", "a", (2,), ones(2), "sgd", {"lr": 0.1})
    engine.register("r", "b", (2,), ones(2), "adamw", {"lr": 0.1}, lr_scale=1e30)
    with pytest.raises(Invalid, match="× lr_scale"):
        engine.set_lr("r", 1e10)  # fine for sgd, 1e40 for b
    assert [g["lr"] for g in engine.groups("r")] == [0.1, 0.1]
    with pytest.raises(Invalid, match="beyond float32"):
        engine.register("r", "c", (2,), ones(2), "adamw", {"lr": 0.1}, lr_scale=4e38)
    with pytest.raises(Invalid, match="× lr_scale"):  # each fits, their product does not
        engine.register("r", "d", (2,), ones(2), "sgd", {"lr": 10.0}, lr_scale=1e38)
    assert [p["name"] for p in engine.params("r")] == ["a", "b"]
    assert len(engine.groups("r")) == 2  # no group was made for the refused one


def test_only_cheap_steps_run_when_blocking_is_not_allowed(engine) -> None:
    """The HTTP adapter tries blocking=False on its event loop: a step whose cost is not
    linear in its elements (SOAP, Kron, Muon) or that is large must refuse before anything."""
    engine.open_run("r")
    engine.register("r", "soap", (64, 8), ones(64, 8), "soap", {"lr": 1e-3})
    engine.register("r", "adam", (8,), ones(8), "adamw", {"lr": 1e-3})
    engine.register("r", "big", (1 << 17,), ones(1 << 17), "adamw", {"lr": 1e-3})
    for grads in (
        {"soap": ones(64, 8)},
        {"big": ones(1 << 17)},
        {"adam": ones(8), "soap": ones(64, 8)},
    ):
        with pytest.raises(WouldBlock):
            engine.step("r", grads, blocking=False)
    assert {p["name"]: p["version"] for p in engine.params("r")} == {"soap": 0, "adam": 0, "big": 0}
    [o] = engine.step("r", {"adam": ones(8)}, blocking=False)
    assert o.version == 1


def test_registrations_are_counted_against_the_budget_and_the_quota(tmp_path) -> None:
    """Kron [1, 40000] with max_size_triangular=1e9 registered, and its first step allocated
    a 40000x40000 factor (6 GiB) and the server was OOM-killed; now the registration counts
    every slot, factors included, before allocating anything."""
    # history=0: the bytes below are the tensors' alone (test_history.py counts histories)
    settings = Settings(checkpoint_dir=tmp_path, device="cpu", memory_budget=1 << 30, history=0)
    engine = Engine(settings, "cpu")
    engine.open_run("r")
    with pytest.raises(OverBudget, match="commits 6,400,320,004 bytes") as err:
        engine.register("r", "k", (1, 40000), None, "kron", {"max_size_triangular": 10**9})
    assert "1,073,741,824-byte budget" in str(err.value)
    assert engine.params("r") == []
    engine.register("r", "w", (1000,), None, "adamw", {})
    assert engine.status()["memory"]["committed_bytes"] == 12_000  # param + two slots
    engine.register("r", "w", (1000,), None, "adamw", {})  # again: nothing more committed
    assert engine.run("r").committed == 12_000
    engine.open_run("small", quota=10_000)
    engine.register("small", "a", (500,), None, "sgd", {"momentum": 0.9})  # 4,000 bytes
    with pytest.raises(OverBudget, match="10,000-byte quota"):
        engine.register("small", "b", (1000,), None, "sgd", {"momentum": 0.9})
    engine.delete_run("r")
    assert engine.status()["memory"]["committed_bytes"] == 4_000
    with pytest.raises(Invalid, match="quota"):
        engine.open_run("bad", quota=0)


def test_a_failed_autosave_ends_the_iteration_and_says_so(tmp_path, monkeypatch) -> None:
    """On a full disk the iteration ended with a 500, so a retrying client ended it twice;
    now the iteration ends once and the reply reports the autosave that was not written."""
    import errno

    from stepd.service.checkpoints import CheckpointDir
    from stepd.service.errors import StorageFull

    engine = Engine(Settings(checkpoint_dir=tmp_path, device="cpu", autosave_every=1), "cpu")
    engine.open_run("r")
    engine.register("r", "w", (4,), ones(4), "sgd", {"lr": 0.1})
    assert engine.end_iteration("r").autosaved == "auto-00000001"

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("stepd.service.checkpoints.write_safetensors", full)
    end = engine.end_iteration("r")
    assert (end.step, end.autosaved) == (2, None)
    assert "No space left on device" in end.autosave_error
    assert engine.run("r").store.global_step == 2
    with pytest.raises(StorageFull, match="intact"):  # a manual save: 507, nothing changed
        engine.save_checkpoint("r", "manual")
    assert [c.name for c in CheckpointDir(tmp_path / "r").list()] == ["auto-00000001"]


def test_autosave_names_say_what_the_file_holds(tmp_path) -> None:
    """Three clients ending iterations: 17 of 45 auto-N files held step N+1."""
    import threading

    engine = Engine(
        Settings(checkpoint_dir=tmp_path, device="cpu", autosave_every=1, autosave_keep=100),
        "cpu",
    )
    engine.open_run("r")
    engine.register("r", "w", (1000,), ones(1000), "adamw", {})

    def client() -> None:
        for _ in range(15):
            engine.end_iteration("r")

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    infos = engine.checkpoints("r")
    assert infos
    for info in infos:
        assert info.name == f"auto-{info.global_step:08d}", info


def test_the_worker_registry_keeps_the_newest() -> None:
    from stepd.service.workers import WorkerRegistry

    reg = WorkerRegistry(capacity=3)
    for w in ("a", "b", "c", "a", "d"):
        reg.touch(w, 1)
    assert [w["id"] for w in reg.list()] == ["c", "a", "d"]
    assert {w["id"]: w["gradients"] for w in reg.list()}["a"] == 2


def test_a_stale_gradient_is_answered_with_the_current_value_and_nothing_applied(engine) -> None:
    engine.open_run("r")
    mode = {"mode": "async", "max_staleness": 1}
    engine.register("r", "a", (2,), ones(2), "adamw", {"lr": 0.1}, workers=mode)
    engine.register("r", "b", (3,), ones(3), "adamw", {"lr": 0.1}, workers=mode)
    for v in range(3):  # both at version 3, with moments
        engine.step("r", {"a": ones(2), "b": ones(3)}, versions={"a": v, "b": v})
    before = {n: engine.inspect("r", n) for n in ("a", "b")}
    rid = "0123456789abcdef-stale"
    # a from version 1 is 2 behind (bound 1): neither a nor the current b is applied
    outcomes = engine.step(
        "r",
        {"a": ones(2), "b": ones(3)},
        versions={"a": 1, "b": 3},
        read_back=True,
        request_id=rid,
    )
    assert [(o.name, o.version, o.applied, o.stale) for o in outcomes] == [
        ("a", 3, False, True),
        ("b", 3, False, True),
    ]
    np.testing.assert_array_equal(outcomes[0].param, before["a"][0])
    np.testing.assert_array_equal(outcomes[1].param, before["b"][0])
    assert before["a"][1]  # adamw's moments: there is state to compare
    for n, (param, slots, counters) in before.items():  # the full state is untouched
        p, s, c = engine.inspect("r", n)
        np.testing.assert_array_equal(p, param)
        assert s.keys() == slots.keys()
        assert c == counters
        for k in s:
            np.testing.assert_array_equal(s[k], slots[k])
    text = generate_latest(engine.metrics.registry).decode()
    assert 'stepd_stale_rejected_total{run="r"} 1.0' in text  # counted once, not as skipped
    assert 'stepd_nonfinite_skipped_total{run="r"}' not in text
    # the id was not recorded: sent again from the fresh version, it applies
    [o] = engine.step("r", {"a": ones(2)}, versions={"a": 3}, read_back=True)
    assert (o.version, o.applied, o.stale) == (4, True, False)
    out = engine.step("r", {"a": ones(2), "b": ones(3)}, versions={"a": 4, "b": 3}, request_id=rid)
    assert [(o.version, o.applied, o.replayed) for o in out] == [(5, True, False), (4, True, False)]


def test_pull_reads_each_value_with_its_version(engine) -> None:
    engine.open_run("r")
    engine.register("r", "a", (2, 2), ones(2, 2), "sgd", {"lr": 0.5})
    engine.register("r", "b", (1,), ones(1), "sgd", {"lr": 0.5})
    engine.step("r", {"a": ones(2, 2)})
    [(va, a), (vb, b)] = engine.pull("r", ["a", "b"])
    assert (va, vb) == (1, 0)
    np.testing.assert_array_equal(a, np.full((2, 2), 0.5, np.float32))
    np.testing.assert_array_equal(b, ones(1))
    with pytest.raises(NotFound):
        engine.pull("r", ["a", "nope"])
    with pytest.raises(Invalid, match="each parameter once"):
        engine.pull("r", ["a", "a"])
    with pytest.raises(Invalid, match="at least one"):
        engine.pull("r", [])
