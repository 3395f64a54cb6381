"""What the server reports of a group's hyperparameters can be registered back, over HTTP.

JSON has no Infinity: Adafactor's ``d = inf`` (no update clipping) is reported as ``null``,
and ``null`` is accepted as "no clipping", so the echo round-trips."""

from __future__ import annotations

import json
import math

import httpx
import pytest
from stepd.kernels import create_optimizer
from stepd.kernels.algorithms import ALGORITHMS

from tests.support.server import Server

pytestmark = pytest.mark.e2e  # starts a real server process


def _group(c: httpx.Client, group_id: str) -> dict:
    (group,) = (g for g in c.get("/v1/runs/t/groups").json() if g["id"] == group_id)
    return group


def _register(c: httpx.Client, name: str, algorithm: str, hyperparams: str) -> httpx.Response:
    body = (
        f'{{"name": "{name}", "shape": [2, 3], "group": {{"algorithm": "{algorithm}", '
        f'"hyperparams": {hyperparams}}}}}'
    )  # written by hand: an Infinity literal is what a Python client's json.dumps sends
    return c.post("/v1/runs/t/params", content=body, headers={"content-type": "application/json"})


def test_every_reported_group_registers_back_to_the_same_group(tmp_path) -> None:
    cases = {a: "{}" for a in ALGORITHMS}
    cases["adafactor-inf"] = '{"d": Infinity}'
    cases["adafactor-null"] = '{"d": null}'
    with Server(tmp_path) as server, httpx.Client(base_url=server.url, timeout=10) as c:
        for case, hyperparams in cases.items():
            algorithm = case.split("-")[0]
            r = _register(c, f"{case}.first", algorithm, hyperparams)
            assert r.status_code == 201, (case, r.text)
            group = r.json()["group"]
            echoed = _group(c, group)
            assert echoed["id"] == group
            again = _register(c, f"{case}.again", algorithm, json.dumps(echoed["hyperparams"]))
            assert again.status_code == 201, (case, again.text)
            assert again.json()["group"] == group, case
        inf, null = (
            c.get("/v1/runs/t/params/adafactor-" + k + ".first").json()["group"]
            for k in ("inf", "null")
        )
        assert inf == null  # one group: null is inf
        assert _group(c, inf)["hyperparams"]["d"] is None
        r = _register(c, "nan", "adafactor", '{"d": NaN}')
        assert r.status_code == 422, r.text
        assert "Clipping threshold" in r.text


def test_d_none_is_no_clipping_in_process() -> None:
    opt = create_optimizer("adafactor", d=None)
    assert opt.hyperparams.d == math.inf
    assert opt.hyperparams.to_dict()["d"] is None
    assert create_optimizer("adafactor", d=math.inf).hyperparams == opt.hyperparams
    assert create_optimizer("adafactor", d=1.0).hyperparams.to_dict()["d"] == 1.0
