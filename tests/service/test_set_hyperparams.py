"""PATCH /v1/runs/{run}/groups/{id}/hyperparams: hyperparameters other than the lr change
between steps (a scheduler cycling momentum), the state stays, checkpoints keep them."""

from __future__ import annotations

import numpy as np
import torch

from tests.support.app import assert_same_snapshot, full_state, make_client, register


def _step(c, name: str, grad: np.ndarray) -> np.ndarray:
    r = c.post(f"/v1/runs/t/params/{name}/step", content=grad.astype(np.float32).tobytes())
    assert r.status_code == 200, r.text
    return np.frombuffer(r.content, np.float32)


def test_betas_changed_mid_run_equal_torch(tmp_path) -> None:
    rng = np.random.default_rng(0)
    init = rng.standard_normal(6).astype(np.float32)
    theirs = torch.nn.Parameter(torch.from_numpy(init.copy()))
    oracle = torch.optim.AdamW([theirs], lr=1e-2, weight_decay=0.1)
    with make_client(tmp_path) as c:
        assert register(c, "w", (6,), value=init, lr=1e-2, weight_decay=0.1).status_code == 201
        gid = c.get("/v1/runs/t/groups").json()[0]["id"]
        for t in range(30):
            if t % 10 == 5:  # what OneCycleLR does to beta1, and a weight-decay change
                betas, wd = (0.85 + 0.01 * t / 10, 0.99), 0.1 / (1 + t)
                r = c.patch(
                    f"/v1/runs/t/groups/{gid}/hyperparams",
                    json={"betas": list(betas), "weight_decay": wd},
                )
                assert r.status_code == 200, r.text
                assert r.json()["betas"] == list(betas)
                oracle.param_groups[0].update(betas=betas, weight_decay=wd)
            g = rng.standard_normal(6).astype(np.float32)
            theirs.grad = torch.from_numpy(g.copy())
            oracle.step()
            ours = _step(c, "w", g)
            c.post("/v1/runs/t/iteration/end")
            np.testing.assert_allclose(ours, theirs.detach().numpy(), rtol=1e-5, atol=1e-6)
        [group] = c.get("/v1/runs/t/groups").json()
        assert group["id"] == gid  # the id names the configuration it was made with
        assert group["hyperparams"]["betas"] == [0.9, 0.999]
        assert group["current_hyperparams"]["betas"] == [0.85 + 0.01 * 2.5, 0.99]


def test_a_checkpoint_keeps_the_changed_hyperparams(tmp_path) -> None:
    with make_client(tmp_path) as c:
        assert register(c, "w", (4,), "sgd", lr=0.1, momentum=0.9).status_code == 201
        gid = c.get("/v1/runs/t/groups").json()[0]["id"]
        _step(c, "w", np.ones(4))
        r = c.patch(f"/v1/runs/t/groups/{gid}/hyperparams", json={"momentum": 0.5})
        assert r.status_code == 200
        assert c.post("/v1/runs/t/checkpoints", json={"name": "c"}).status_code == 201
        saved = full_state(c)
        after_save = _step(c, "w", np.ones(4))
        c.patch(f"/v1/runs/t/groups/{gid}/hyperparams", json={"momentum": 0.1})
        assert c.post("/v1/runs/t/checkpoints/c/restore").status_code == 200
        assert_same_snapshot(full_state(c), saved)
        [group] = c.get("/v1/runs/t/groups").json()
        assert (group["id"], group["current_hyperparams"]["momentum"]) == (gid, 0.5)
        np.testing.assert_array_equal(_step(c, "w", np.ones(4)), after_save)  # same step


def test_refusals_change_nothing(tmp_path) -> None:
    with make_client(tmp_path) as c:
        assert register(c, "w", (4,), "adamw").status_code == 201
        gid = c.get("/v1/runs/t/groups").json()[0]["id"]
        _step(c, "w", np.ones(4))
        before = full_state(c)
        url = f"/v1/runs/t/groups/{gid}/hyperparams"
        cases = [
            ({"amsgrad": True}, 422, "changes the state"),  # a third slot: not in the state
            ({"lr": 0.5}, 422, "set_lr"),
            ({"betas": [1.5, 0.9]}, 422, "Invalid beta parameter at index 0: 1.5"),
            ({"momentum": 0.9}, 422, "unknown hyperparameter"),
            ({}, 422, "non-empty"),
        ]
        for body, status, detail in cases:
            r = c.patch(url, json=body)
            assert (r.status_code, detail in r.json()["detail"]) == (status, True), r.text
        assert c.patch("/v1/runs/t/groups/nope/hyperparams", json={"eps": 1.0}).status_code == 404
        assert_same_snapshot(full_state(c), before)


def test_group_ids_are_those_of_earlier_releases(tmp_path) -> None:
    """Options added later (maximize, step_count, amsgrad) leave ids unchanged at their
    defaults, so checkpoints written before them find their groups."""
    with make_client(tmp_path) as c:
        assert register(c, "w", (4,), "adamw").status_code == 201
        assert c.get("/v1/runs/t/groups").json()[0]["id"] == "adamw-319486cfe9"
        assert register(c, "v", (4,), "adamw", maximize=True).status_code == 201
        ids = {g["id"] for g in c.get("/v1/runs/t/groups").json()}
        assert len(ids) == 2
