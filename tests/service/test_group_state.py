"""PUT /v1/runs/t/groups/{id}/state on the store: the loaded state is the optimizer's, the global
step is server-wide, and parameter values and versions are left alone."""

from __future__ import annotations

import json

import numpy as np
from safetensors.numpy import save as st_save
from stepd.kernels import create_optimizer

from tests.support.app import make_client, register


def test_loaded_state_replaces_the_group_and_sets_the_step_everywhere(tmp_path) -> None:
    with make_client(tmp_path) as c:
        assert register(c, "w", (2, 3), value=np.arange(6, dtype=np.float32)).status_code == 201
        assert register(c, "u", (2,)).status_code == 201
        assert register(c, "s", (2,), "sgd", lr=0.1, momentum=0.9).status_code == 201
        for name, n in (("w", 6), ("u", 2), ("s", 2)):
            c.post(f"/v1/runs/t/params/{name}/step", content=np.ones(n, np.float32).tobytes())
        store = c.store
        gid = store.entry("w").group.id
        oracle = create_optimizer("adamw", backend="cpu")  # bit-identical to every store device
        slots = {
            "exp_avg": np.full((2, 3), 0.5, np.float32),
            "exp_avg_sq": np.ones((2, 3), np.float32),
        }
        meta = {
            "algorithm": "adamw",
            "hyperparams": oracle.hyperparams.to_dict(),
            "global_step": 7,
            "lr": 0.5,
            "lr_scales": {"w": 0.25},
            "counts": {"w": 4},
            "shapes": {"w": [2, 3]},
        }
        body = st_save(
            {f"w/{k}": v for k, v in slots.items()},
            metadata={k: json.dumps(v) for k, v in meta.items()},
        )
        before = c.get("/v1/runs/t/params/w/value").content
        r = c.put(f"/v1/runs/t/groups/{gid}/state", content=body)
        assert r.status_code == 204, r.text
        assert c.get("/v1/runs/t").json()["global_step"] == 7
        assert {g: o.global_step for g, o in store._groups.items()} == dict.fromkeys(
            store._groups, 7
        )
        assert (
            c.get("/v1/runs/t/params/w/value").content == before
        )  # values are not optimizer state
        assert c.get("/v1/runs/t/params/w").json()["version"] == 1
        stats = c.get("/v1/runs/t/params/w/stats").json()
        assert stats["count"] == 4
        assert c.get("/v1/runs/t/params/u/stats").json()["count"] is None  # absent: state dropped
        assert c.get("/v1/runs/t/params/s/stats").json()["count"] == 1  # another group: untouched
        assert c.get("/v1/runs/t/params/w/lr_scale").json()["lr_scale"] == 0.25
        got = np.frombuffer(c.get("/v1/runs/t/params/w/state/exp_avg").content, np.float32)
        np.testing.assert_array_equal(got, slots["exp_avg"].reshape(-1))
        # The next step continues from exactly that state, as the in-process optimizer does.
        oracle.load_state_dict(
            {**meta, "state": {"w": {"shape": [2, 3], "count": 4, "slots": slots}}}
        )
        want = np.frombuffer(before, np.float32).copy()
        grad = np.linspace(-1, 1, 6, dtype=np.float32)
        oracle.step("w", (2, 3), want, grad)
        r = c.post("/v1/runs/t/params/w/step", content=grad.tobytes())
        np.testing.assert_array_equal(np.frombuffer(r.content, np.float32), want)
