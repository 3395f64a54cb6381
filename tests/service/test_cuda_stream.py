"""A CUDA store orders its device work on the backend's explicit stream, never on the legacy
default stream, whichever thread calls it; host reads and the Hessian upload wait for that
stream. Checked on the CuPy stand-in (tests/support/fakecupy), which records the stream of
every launch, copy and synchronisation: host/device handling only, NOT a GPU run."""

from __future__ import annotations

import threading

import numpy as np
from stepd.service.store import ParamStore


def _exercise(store: ParamStore) -> None:
    rng = np.random.default_rng(3)
    store.register("w", (4, 3), rng.standard_normal((4, 3)).astype(np.float32), "sophia", {})
    store.register("b", (3,), None, "sophia", {})
    for _ in range(3):
        grads = {"w": rng.standard_normal((4, 3)).astype(np.float32), "b": np.ones(3, np.float32)}
        store.step(grads, read_back=True)  # one multi-tensor launch
        store.step({"w": grads["w"]})  # the single-tensor kernel
        store.update_hessian("w", np.ones((4, 3), np.float32))
        store.end_iteration()
    store.set_value("b", np.zeros(3, np.float32))
    store.read("w")
    store.current(["w", "b"])
    store.inspect("w")
    store.read_slot("w", next(iter(store.slots("w"))))
    store.group_state(store.entry("w").group.id)
    store.write_snapshot(lambda tensors, meta: None)


def test_a_cuda_store_works_on_its_own_stream(fake_cupy) -> None:
    store = ParamStore("cuda")
    stream = store.backend.stream
    assert stream is not fake_cupy.cuda.Stream.null
    assert not stream.non_blocking  # a stray default-stream read still waits for it
    fake_cupy.EVENTS.clear()
    failed: list[BaseException] = []

    def run() -> None:  # on another thread than the one that made the store
        try:
            _exercise(store)
        except BaseException as exc:
            failed.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    assert not failed, failed[0]
    kinds = {what for what, _ in fake_cupy.EVENTS}
    assert {"launch", "h2d", "d2h", "sync"} <= kinds
    elsewhere = [what for what, s in fake_cupy.EVENTS if s is not stream]
    assert elsewhere == [], f"device work outside the store's stream: {elsewhere}"
    # every Hessian upload is followed by a wait for that stream before the call returns
    syncs = [s for what, s in fake_cupy.EVENTS if what == "sync"]
    assert len(syncs) >= 3
    assert set(syncs) == {stream}
    assert fake_cupy.cuda.get_current_stream() is fake_cupy.cuda.Stream.null  # context left


def test_in_process_launches_use_the_stream_too(fake_cupy) -> None:
    from stepd.kernels import create_optimizer

    opt = create_optimizer("adamw", backend="cuda", lr=1e-2)
    p = fake_cupy.asarray(np.ones(5, np.float32))
    fake_cupy.EVENTS.clear()
    opt.step("p", (5,), p, fake_cupy.asarray(np.ones(5, np.float32)))
    launches = [s for what, s in fake_cupy.EVENTS if what == "launch"]
    assert launches == [opt.backend.stream]
