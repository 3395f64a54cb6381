"""Elastic sync membership, global gradient-norm clipping and unused parameters, on the
engine (each worker a thread, as the shm:// adapter runs them); the HTTP routes are in
test_workers.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from stepd.service.config import Settings
from stepd.service.engine import Engine
from stepd.service.errors import Conflict, StragglerTimeout
from stepd.service.workers import parse_workers

HP = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}


@pytest.fixture
def engine(tmp_path) -> Engine:
    e = Engine(Settings(checkpoint_dir=tmp_path, device="cpu"), "cpu")
    e.open_run("t")
    return e


def _register(engine: Engine, shapes: dict[str, tuple[int, ...]], workers: dict) -> None:
    for name, shape in shapes.items():
        engine.register("t", name, shape, None, "adamw", HP, workers=workers)


def _threads(work: Callable[[str], Any], workers: list[str]) -> dict[str, Any]:
    """Run ``work(worker)`` in a thread each; their results (or the exception raised)."""
    out: dict[str, Any] = {}

    def guarded(w: str) -> None:
        try:
            out[w] = work(w)
        except Exception as exc:  # returned for the test to look at
            out[w] = exc

    threads = [threading.Thread(target=guarded, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a worker hung"
    return out


def _grad(worker: str, it: int, name: str, shape: tuple[int, ...]) -> np.ndarray:
    seed = abs(hash((worker, it, name))) % 2**32  # same process: a stable seed is enough
    return (np.random.default_rng(seed).standard_normal(shape) * 3).astype(np.float32)


def _torch_adamw(shapes: dict[str, tuple[int, ...]]) -> tuple[dict, torch.optim.Optimizer]:
    params = {n: torch.zeros(s, dtype=torch.float32, requires_grad=True) for n, s in shapes.items()}
    opt = torch.optim.AdamW(list(params.values()), **HP)
    return params, opt


def test_workers_config_count_optional_and_ids_unchanged() -> None:
    assert parse_workers({"mode": "sync", "count": 4}) == {
        "mode": "sync",
        "count": 4,
        "timeout_s": 60.0,
    }  # the canonical form (a group's id) of existing configs is as it was
    assert parse_workers({"mode": "sync"}) == {"mode": "sync", "timeout_s": 60.0}
    assert parse_workers({"mode": "sync", "lease_s": 10, "clip_grad_norm": 1}) == {
        "mode": "sync",
        "timeout_s": 60.0,
        "lease_s": 10.0,
        "clip_grad_norm": 1.0,
    }
    for bad in ({"lease_s": 0}, {"clip_grad_norm": -1.0}, {"clip_grad_norm": True}, {"count": 0}):
        with pytest.raises(ValueError, match=r"Invalid|count"):
            parse_workers({"mode": "sync", **bad})


def test_global_clipping_equals_ddp_then_clip_grad_norm_then_adamw(engine) -> None:
    shapes = {"w": (6, 5), "b": (5,), "c": (3,)}
    workers = ["w0", "w1", "w2"]
    max_norm = 0.5
    _register(engine, shapes, {"mode": "sync", "count": 3, "clip_grad_norm": max_norm})
    params, ref = _torch_adamw(shapes)
    norms = []
    for it in range(4):
        grads = {w: {n: _grad(w, it, n, s) for n, s in shapes.items()} for w in workers}
        if it == 3:  # one iteration under the bound: no scaling at all
            grads = {w: {n: g * 1e-3 for n, g in gs.items()} for w, gs in grads.items()}

        def work(w: str, grads: dict = grads) -> list:
            out = engine.step("t", grads[w], worker=w, read_back=True)
            engine.end_iteration("t", w)
            return out

        replies = _threads(work, workers)
        # the reference: DDP's average, torch's global clip, torch's AdamW
        for n, p in params.items():
            p.grad = torch.from_numpy(np.mean([grads[w][n] for w in workers], axis=0))
        norms.append(float(torch.nn.utils.clip_grad_norm_(list(params.values()), max_norm)))
        ref.step()
        for w in workers:
            assert not isinstance(replies[w], Exception), replies[w]
            for o in replies[w]:
                np.testing.assert_allclose(
                    o.param.reshape(-1), params[o.name].detach().numpy().reshape(-1), atol=1e-6
                )
    assert max(norms[:3]) > max_norm > norms[3]  # both branches were taken


def test_clipping_needs_one_step_per_worker_and_iteration(engine) -> None:
    _register(engine, {"a": (2,), "b": (2,)}, {"mode": "sync", "count": 2, "clip_grad_norm": 1.0})
    g = np.ones(2, np.float32)
    # w0 steps a alone: that is all it sends this iteration; a second step is refused
    waiting = engine.start_step("t", {"a": g}, worker="w0", read_back=True)
    with pytest.raises(Conflict, match="in one step"):
        engine.start_step("t", {"b": g}, worker="w0")
    # w1 sends both: b averages over w1 alone, and the global norm covers a and b
    [a, _] = engine.step("t", {"a": 3 * g, "b": g}, worker="w1", read_back=True)
    assert waiting.wait()[0].param.tolist() == a.param.tolist()
    assert engine.read("t", "b").tolist() != [0.0, 0.0]


def test_unused_parameters_average_over_their_senders(engine) -> None:
    """w0 uses every parameter, w1 never uses ``c``, w2 never ``b``; ``last`` (w2) or
    end_iteration (w1) tells the rounds not to wait for them."""
    shapes = {"a": (4,), "b": (3, 2), "c": (5,)}
    uses = {"w0": ["a", "b", "c"], "w1": ["a", "b"], "w2": ["a", "c"]}
    _register(engine, shapes, {"mode": "sync", "count": 3})
    params, ref = _torch_adamw(shapes)
    for it in range(3):
        grads = {w: {n: _grad(w, it, n, shapes[n]) for n in names} for w, names in uses.items()}

        def work(w: str, grads: dict = grads) -> list:
            if w == "w1":  # one parameter at a time, then end_iteration
                out = [
                    engine.step("t", {n: g}, worker=w, read_back=True)[0]
                    for n, g in grads[w].items()
                ]
            else:  # all at once, saying so
                out = engine.step("t", grads[w], worker=w, read_back=True, last=True)
            engine.end_iteration("t", w)
            return out

        replies = _threads(work, list(uses))
        for n, p in params.items():  # the mean over the workers that sent it
            senders = [grads[w][n] for w in uses if n in grads[w]]
            p.grad = torch.from_numpy(np.mean(senders, axis=0))
        ref.step()
        for w in uses:
            assert not isinstance(replies[w], Exception), replies[w]
            for o in replies[w]:
                np.testing.assert_allclose(
                    o.param, params[o.name].detach().numpy(), rtol=1e-6, atol=1e-7
                )
    assert engine.global_step("t") == 3


def test_members_join_and_leave_between_iterations(engine) -> None:
    _register(engine, {"p": (2,)}, {"mode": "sync", "lease_s": 5})
    one = np.ones(2, np.float32)
    assert engine.join("t", "a").wait().member_from == 1
    assert engine.join("t", "b").wait().members == ("a", "b")  # not started: joins it now
    first = engine.start_step("t", {"p": one}, worker="a")  # iteration 1 starts with a, b
    late = engine.join("t", "c")  # a member from iteration 2: waits until it begins
    with pytest.raises(Conflict, match="member from iteration 2"):
        engine.start_step("t", {"p": one}, worker="c")
    engine.step("t", {"p": 3 * one}, worker="b")
    assert first.wait()[0].version == 1  # averaged over a and b
    np.testing.assert_allclose(engine.read("t", "p"), -1e-2 * np.ones(2), rtol=1e-5)
    ends = [engine.start_end_iteration("t", w) for w in ("a", "b")]
    assert [e.wait().step for e in ends] == [1, 1]
    assert late.wait().member_from == 2
    assert engine.membership("t").members == ("a", "b", "c")
    # b leaves mid-iteration 2, after its gradient: it counts, nothing waits for b any more
    waits = [engine.start_step("t", {"p": one}, worker=w) for w in ("a", "b")]
    engine.leave("t", "b")
    engine.step("t", {"p": one}, worker="c")
    assert {w.wait()[0].version for w in waits} == {2}
    ends = [engine.start_end_iteration("t", w) for w in ("a", "c")]
    assert [e.wait().step for e in ends] == [2, 2]
    assert engine.membership("t").members == ("a", "c")
    engine.leave("t", "b")  # leaving twice is harmless


def test_joiners_take_over_an_iteration_its_members_left_before_it_began(engine) -> None:
    # Iteration 2 starts with a alone the moment iteration 1 ends; b joins for iteration 3.
    # a then leaves (its training is over) before iteration 2 saw any activity: nobody could
    # end it, so b is a member of it at once instead of waiting for ever.
    _register(engine, {"p": (2,)}, {"mode": "sync", "lease_s": 5})
    one = np.ones(2, np.float32)
    engine.join("t", "a").wait()
    engine.step("t", {"p": one}, worker="a")
    assert engine.end_iteration("t", "a").step == 1
    late = engine.join("t", "b")
    assert engine.membership("t").joining == ("b",)
    engine.leave("t", "a")
    assert late.wait().member_from == 2
    assert engine.membership("t").members == ("b",)
    engine.step("t", {"p": one}, worker="b")
    assert engine.end_iteration("t", "b").step == 2


def test_a_member_whose_lease_runs_out_is_dropped_and_may_rejoin(engine) -> None:
    # a 1 s lease: heartbeats every 0.2 s below keep a member in with room for a slow machine
    _register(engine, {"p": (2,)}, {"mode": "sync", "count": 2, "lease_s": 1.0})
    one = np.ones(2, np.float32)
    for w in ("a", "b", "c"):
        engine.join("t", w).wait()
    start = time.monotonic()
    # c never sends: after its lease the round completes with a and b (waiting keeps their
    # leases), and the replies name c
    grads = {"a": one, "b": 3 * one}
    outcomes = _threads(lambda w: engine.step("t", {"p": grads[w]}, worker=w)[0], ["a", "b"])
    assert 0.9 < time.monotonic() - start < 6
    assert {o.dropped for o in outcomes.values()} == {("c",)}
    np.testing.assert_allclose(engine.read("t", "p"), -1e-2 * one, rtol=1e-5)  # Adam: sign
    ends = _threads(lambda w: engine.end_iteration("t", w), ["a", "b"])
    assert {(e.step, e.dropped) for e in ends.values()} == {(1, ("c",))}
    with pytest.raises(Conflict, match="was dropped from iteration 1"):
        engine.start_step("t", {"p": one}, worker="c")
    with pytest.raises(Conflict, match="dropped"):
        engine.heartbeat("t", "c")
    # c joins again: iteration 2 started with a and b (count 2), so c is in from iteration 3
    joined: dict[str, Any] = {}
    rejoin = threading.Thread(target=lambda: joined.update(c=engine.join("t", "c").wait()))
    rejoin.start()
    _threads(
        lambda w: (engine.step("t", {"p": one}, worker=w), engine.end_iteration("t", w)), ["a", "b"]
    )
    rejoin.join(10)
    assert joined["c"].member_from == 3
    # a heartbeat keeps an idle member in; the round then needs all three
    for _ in range(4):
        time.sleep(0.2)
        for w in ("a", "b", "c"):
            engine.heartbeat("t", w)
    outcomes = _threads(lambda w: engine.step("t", {"p": one}, worker=w)[0], ["a", "b", "c"])
    assert {o.dropped for o in outcomes.values()} == {()}
    assert engine.membership("t").members == ("a", "b", "c")


def test_count_is_a_minimum_and_stragglers_still_time_out(engine) -> None:
    _register(engine, {"p": (2,)}, {"mode": "sync", "count": 2, "timeout_s": 0.5})
    one = np.ones(2, np.float32)
    with pytest.raises(StragglerTimeout, match="1 of 2 workers sent a gradient"):
        engine.step("t", {"p": one}, worker="a")
    assert engine.membership("t").started is False  # 1 member of the 2 it needs
    assert engine.read("t", "p").tolist() == [0.0, 0.0]
