"""Histories of measured statistics, a run's statistics in one call, per-run metrics with
bounded labels, and what each worker got accepted or refused."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from prometheus_client import generate_latest
from stepd.service.config import Settings
from stepd.service.engine import Engine
from stepd.service.errors import Invalid, NotFound, OverBudget
from stepd.service.history import PARAM_FIELDS, RUN_FIELDS, History, StepRate, history_bytes

from tests.support.app import make_client, register


def ones(*shape: int) -> np.ndarray:
    return np.ones(shape, np.float32)


def make_engine(tmp_path, **settings) -> Engine:
    return Engine(Settings(checkpoint_dir=tmp_path, device="cpu", **settings), "cpu")


def test_a_history_keeps_the_newest_samples_oldest_first() -> None:
    h = History(3, ("version", "x"))
    for v in range(1, 6):
        h.append(v, None if v == 4 else v / 10)
    assert h.samples() == [
        {"version": 3, "x": 0.3},
        {"version": 4, "x": None},
        {"version": 5, "x": 0.5},
    ]
    assert h.samples(after=4) == [{"version": 5, "x": 0.5}]
    assert h.nbytes == history_bytes(3, ("version", "x")) == 48
    empty = History(0, PARAM_FIELDS)
    empty.append(*range(len(PARAM_FIELDS)))
    assert empty.samples() == []


def test_the_step_rate_is_recent_and_drops_to_zero_when_steps_stop() -> None:
    rate = StepRate()
    assert rate.per_second(0.0) == 0.0
    for i in range(11):
        rate.tick(100 + i * 0.1)
    assert rate.per_second(101.1) == pytest.approx(10.0)
    assert rate.per_second(200.0) == 0.0  # nothing for 99 s: not 10 steps/s


def test_each_measurement_is_kept_with_the_lr_it_used(tmp_path) -> None:
    engine = make_engine(tmp_path, stats_every=2, history=3)
    engine.open_run("r")
    engine.register("r", "w", (4,), ones(4), "sgd", {"lr": 0.5}, lr_scale=0.1)
    for i in range(7):  # the last step is measured: its parameter norm is the current one
        engine.step("r", {"w": np.full(4, 2.0, np.float32)})
        engine.end_iteration("r")
        if i == 5:
            engine.set_lr("r", 0.25)
    h = engine.param_history("r", "w")
    assert h["capacity"] == 3
    # measured on every 2nd step (versions 1, 3, 5, 7), the newest 3 kept
    assert [s["version"] for s in h["samples"]] == [3, 5, 7]
    assert [s["step"] for s in h["samples"]] == [2, 4, 6]  # the iteration it was taken in
    assert [s["lr"] for s in h["samples"]] == pytest.approx([0.05, 0.05, 0.025])
    for s in h["samples"]:
        assert s["grad_norm"] == pytest.approx(4.0)  # ‖(2, 2, 2, 2)‖
        assert s["update_norm"] == pytest.approx(4.0 * s["lr"])  # plain SGD: lr × grad
        assert s["update_ratio"] == pytest.approx(s["update_norm"] / s["param_norm"])
        assert set(s) == {*PARAM_FIELDS, "update_ratio"}
    last = h["samples"][-1]
    value = engine.read("r", "w")
    assert last["param_norm"] == pytest.approx(float(np.linalg.norm(value)), rel=1e-6)
    assert engine.param_history("r", "w", after=5)["samples"] == [last]
    with pytest.raises(Invalid, match="after is a version or step >= 0, got -1"):
        engine.param_history("r", "w", after=-1)
    with pytest.raises(NotFound, match="not registered"):
        engine.param_history("r", "nope")


def test_a_run_samples_its_rate_lr_and_norms(tmp_path) -> None:
    engine = make_engine(tmp_path, stats_every=1, history=4)
    engine.open_run("r")
    engine.register("r", "a", (3,), ones(3), "sgd", {"lr": 0.1})
    engine.register("r", "b", (4,), ones(4), "sgd", {"lr": 0.1})
    assert engine.run_stats("r")["params"][0]["param_norm"] is None  # nothing measured yet
    for _ in range(6):
        engine.step("r", {"a": ones(3), "b": ones(4)})
        engine.end_iteration("r")
    h = engine.run_history("r")
    assert [s["step"] for s in h["samples"]] == [3, 4, 5, 6]
    last = h["samples"][-1]
    assert set(last) == {*RUN_FIELDS, "update_ratio"}
    assert last["lr"] == pytest.approx(0.1)
    assert last["steps_per_s"] > 0
    assert last["grad_norm"] == pytest.approx(math.sqrt(3 + 4))  # the parameters' together
    assert engine.run_history("r", after=5)["samples"] == [last]

    stats = engine.run_stats("r")
    assert stats["global_step"] == 6
    assert stats["grad_norm"] == pytest.approx(math.sqrt(7))
    by_name = {p["name"]: p for p in stats["params"]}
    assert list(by_name) == ["a", "b"]
    a = by_name["a"]
    assert (a["version"], a["norms_at_version"], a["shape"]) == (6, 6, [3])
    assert a["last_grad_norm"] == pytest.approx(math.sqrt(3))
    assert a["param_norm"] == pytest.approx(float(np.linalg.norm(engine.read("r", "a"))))
    assert a["update_ratio"] == pytest.approx(a["last_update_norm"] / a["param_norm"])
    assert a["lr"] == pytest.approx(0.1)


def test_histories_are_counted_in_the_budget_restores_included(tmp_path) -> None:
    per_sample = 8 * len(PARAM_FIELDS)
    engine = make_engine(tmp_path, history=100, memory_budget=40 + 100 * per_sample + 39)
    engine.open_run("r")
    engine.register("r", "w", (10,), ones(10), "sgd", {})  # 40 bytes, no slots
    assert engine.run("r").committed == 40 + 100 * per_sample
    with pytest.raises(OverBudget, match=f"commits {40 + 100 * per_sample:,} bytes"):
        engine.register("r", "v", (10,), ones(10), "sgd", {})
    # a restore rebuilds the parameters with histories of their own, counted the same
    engine.step("r", {"w": ones(10)})
    engine.save_checkpoint("r", "c")
    engine.restore_checkpoint("r", "c")
    assert engine.run("r").committed == 40 + 100 * per_sample
    assert engine.param_history("r", "w")["samples"] == []  # a restored parameter starts anew


def test_the_http_routes_give_the_engines_answers(tmp_path) -> None:
    with make_client(tmp_path, stats_every=1, history=8) as c:
        assert register(c, value=np.arange(6, dtype=np.float32)).status_code == 201
        for _ in range(3):
            assert c.post("/v1/runs/t/params/w/step", content=ones(6).tobytes()).status_code == 200
            assert c.post("/v1/runs/t/iteration/end").status_code == 200
        engine = c.app.state.engine
        assert c.get("/v1/runs/t/params/w/history").json() == engine.param_history("t", "w")
        assert c.get("/v1/runs/t/params/w/history?after=2").json()["samples"][0]["version"] == 3
        assert c.get("/v1/runs/t/history").json() == engine.run_history("t")
        stats = c.get("/v1/runs/t/stats").json()
        assert stats["params"][0]["name"] == "w"
        assert stats["params"][0]["version"] == 3
        assert stats["global_step"] == 3


def _series(text: str, name: str) -> dict[str, float]:
    return {
        m.group(1): float(m.group(2))
        for m in re.finditer(rf'^{name}\{{run="([^"]+)"\}} (\S+)$', text, re.M)
    }


def test_per_run_metrics_label_the_first_runs_only(tmp_path) -> None:
    engine = make_engine(tmp_path, metrics_runs=2, history=0)
    for run in ("a", "b", "c", "d"):
        engine.open_run(run)
        engine.register(run, "w", (5,), ones(5), "sgd", {})
        engine.step(run, {"w": ones(5)})
        engine.end_iteration(run)
    text = generate_latest(engine.metrics.registry).decode()
    assert _series(text, "stepd_run_params") == {"a": 1, "b": 1, "_other": 2}
    assert _series(text, "stepd_run_committed_bytes") == {"a": 20, "b": 20, "_other": 40}
    assert _series(text, "stepd_global_step") == {"a": 1, "b": 1}  # no step for _other
    assert "stepd_param_" not in text  # per-parameter series: only when asked for
    engine.delete_run("a")  # its label goes, and is free for the next run
    engine.open_run("e")
    text = generate_latest(engine.metrics.registry).decode()
    assert _series(text, "stepd_run_params") == {"b": 1, "e": 0, "_other": 2}


def test_per_parameter_metrics_behind_their_setting(tmp_path) -> None:
    engine = make_engine(tmp_path, metrics_params=True, stats_every=1)
    engine.open_run("r")
    engine.register("r", "w", (4,), ones(4), "sgd", {})
    engine.step("r", {"w": np.full(4, 3.0, np.float32)})
    text = generate_latest(engine.metrics.registry).decode()
    assert 'stepd_param_version{param="w",run="r"} 1.0' in text
    assert 'stepd_param_grad_norm{param="w",run="r"} 6.0' in text


def test_each_worker_has_its_accepted_and_refused_gradients(tmp_path) -> None:
    engine = make_engine(tmp_path)
    engine.open_run("r")
    mode = {"mode": "async", "max_staleness": 1}
    engine.register("r", "a", (2,), ones(2), "sgd", {}, workers=mode)
    for v in range(3):
        engine.step("r", {"a": ones(2)}, versions={"a": v}, worker="fast")
    engine.step("r", {"a": ones(2)}, versions={"a": 2}, worker="slow")  # one behind: applied
    engine.step("r", {"a": ones(2)}, versions={"a": 1}, worker="slow")  # three behind: refused
    got = {w["id"]: w for w in engine.workers("r")}
    assert {k: got["fast"][k] for k in ("accepted", "refused", "staleness")} == {
        "accepted": 3,
        "refused": 0,
        "staleness": 0,
    }
    assert {k: got["slow"][k] for k in ("accepted", "refused", "staleness", "gradients")} == {
        "accepted": 1,
        "refused": 1,
        "staleness": 1,
        "gradients": 2,
    }


def test_a_step_holds_copies_of_at_most_measure_bytes_of_old_values(tmp_path, monkeypatch) -> None:
    """Measuring an update norm needs the old value: a step copies those of its due
    parameters up to MEASURE_BYTES (one parameter always), and the rest are measured at their
    next step, so a whole model's measurement never doubles its memory at once."""
    from stepd.service import store

    monkeypatch.setattr(store, "MEASURE_BYTES", 40)  # ten float32 elements
    engine = make_engine(tmp_path, stats_every=4, history=8)
    engine.open_run("r")
    sizes = {"a": 8, "b": 8, "c": 20}  # c alone is over the bound: measured alone
    rng = np.random.default_rng(3)
    for name, n in sizes.items():
        engine.register(
            "r", name, (n,), rng.standard_normal(n).astype(np.float32), "sgd", {"lr": 0.1}
        )
    measured_at: dict[str, list[int]] = {name: [] for name in sizes}
    for step in range(1, 9):
        grads = {n: rng.standard_normal(k).astype(np.float32) for n, k in sizes.items()}
        old = {n: engine.read("r", n).copy() for n in sizes}
        engine.step("r", grads)
        engine.end_iteration("r")
        for p in engine.run_stats("r")["params"]:
            if p["norms_at_version"] == step:
                name = p["name"]
                measured_at[name].append(step)
                new = engine.read("r", name)
                assert p["last_grad_norm"] == pytest.approx(float(np.linalg.norm(grads[name])))
                assert p["last_update_norm"] == pytest.approx(
                    float(np.linalg.norm(new - old[name]))
                )
                assert p["param_norm"] == pytest.approx(float(np.linalg.norm(new)))
    # due at versions 0 and 4 (steps 1 and 5): a first; b one step later; c after b
    assert measured_at == {"a": [1, 5], "b": [2, 6], "c": [3, 7]}
