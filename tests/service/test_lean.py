"""The step endpoints' bare ASGI front (``service/api/lean.py``) answers exactly as the
FastAPI routes that document them do: same status, headers (in order) and body, whatever
pieces the body arrives in; a large parameter goes back in slices of its own memory."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient
from stepd.service.api import lean

from stepd.wire import dump, parse
from tests.support.app import make_client

N = 3000


@pytest.fixture
def pair(tmp_path):
    """The served app (lean front) and FastAPI alone (its routes), over one state, each with
    its own parameter of the same history, so that the same requests must answer the same."""
    with make_client(tmp_path) as served:
        for name in ("a", "b"):
            body = {"name": name, "shape": [N], "group": {"algorithm": "adamw"}}
            assert served.post("/v1/runs/t/params", json=body).status_code == 201
        yield served, TestClient(served.app.api)


def same(r1, r2) -> None:
    assert r1.status_code == r2.status_code
    # Starlette's Response and the lean front write the same headers in the same order
    assert r1.headers.multi_items() == r2.headers.multi_items()
    if r1.status_code < 400:
        assert r1.content == r2.content
    else:  # the same refusal, of its own parameter
        assert r1.json()["detail"].replace("'a'", "'b'") == r2.json()["detail"]


def grad(seed: int) -> bytes:
    return np.random.default_rng(seed).standard_normal(N).astype(np.float32).tobytes()


def pieces(body: bytes, n: int):
    step = -(-len(body) // n)
    return iter([body[i : i + step] for i in range(0, len(body), step)])


def body_sizes(monkeypatch) -> list[int]:
    """The size of each body message the lean front sends from now on, in order."""
    sent: list[int] = []
    real = lean.send_reply

    async def counting(reply, send):
        async def count(message):
            if message["type"] == "http.response.body":
                sent.append(len(message["body"]))
            await send(message)

        await real(reply, count)

    monkeypatch.setattr(lean, "send_reply", counting)
    return sent


@pytest.mark.parametrize("declared", [True, False])
def test_a_body_in_pieces_steps_as_one_piece_does(pair, declared) -> None:
    served, api = pair
    for seed in range(3):
        g = grad(seed)
        headers = {"content-length": str(len(g))} if declared else {}
        r1 = served.post("/v1/runs/t/params/a/step", content=pieces(g, 5), headers=headers)
        r2 = api.post("/v1/runs/t/params/b/step", content=g)
        assert r1.status_code == 200
        assert r1.content == r2.content  # the same parameter back
        assert r1.headers["x-stepd-version"] == r2.headers["x-stepd-version"]


def test_replies_and_refusals_match_the_documented_routes(pair) -> None:
    served, api = pair
    cases = [
        ("/v1/runs/t/params/{p}/step", grad(1), {}),
        ("/v1/runs/t/params/{p}/step?return_param=false", grad(2), {}),
        ("/v1/runs/t/params/{p}/step?return_dtype=bfloat16", grad(3), {}),
        ("/v1/runs/t/params/{p}/step", grad(4)[:-4], {}),  # a short body: 422
        ("/v1/runs/t/params/{p}/step", grad(6), {"x-stepd-dtype": "float64"}),  # 422
        ("/v1/runs/t/params/nope/step", grad(7), {}),  # 404
        ("/v1/runs/nope/step", grad(7), {}),  # 404
        ("/v1/runs/t/step", b"not safetensors", {}),  # 422
    ]
    for path, body, headers in cases:
        same(
            served.post(path.format(p="a"), content=body, headers=headers),
            api.post(path.format(p="b"), content=body, headers=headers),
        )
    for query in ("version=x", "last=maybe"):  # 422 from both, FastAPI's in its own words
        path = f"/v1/runs/t/params/{{p}}/step?{query}"
        r1 = served.post(path.format(p="a"), content=grad(5))
        r2 = api.post(path.format(p="b"), content=grad(5))
        assert r1.status_code == r2.status_code == 422
        assert query.split("=")[0] in r1.json()["detail"]
    for return_params in ("true", "false"):  # a batch: safetensors or JSON back
        path = f"/v1/runs/t/step?return_params={return_params}"
        g = np.frombuffer(grad(8), np.float32)
        r1 = served.post(path, content=dump({"a": g}))
        r2 = api.post(path, content=dump({"b": g}))
        assert r1.status_code == r2.status_code == 200
        assert r1.headers["content-type"] == r2.headers["content-type"]
        if return_params == "true":
            np.testing.assert_array_equal(parse(r1.content)[0]["a"], parse(r2.content)[0]["b"])


def test_a_large_parameter_goes_back_in_slices_of_its_memory(pair, monkeypatch) -> None:
    served, api = pair
    monkeypatch.setattr(lean, "SEND_SLICE", 1000)  # N floats: 12 slices
    sent = body_sizes(monkeypatch)
    r1 = served.post("/v1/runs/t/params/a/step", content=grad(9))
    r2 = api.post("/v1/runs/t/params/b/step", content=grad(9))
    same(r1, r2)
    assert sent == [1000] * 12


def test_reply_parts_go_as_joined_runs_of_small_ones_and_slices_of_large_ones(
    monkeypatch,
) -> None:
    monkeypatch.setattr(lean, "SEND_SLICE", 1000)
    big = memoryview(bytes(range(256)) * 47).cast("B")  # 12032 bytes: 13 slices
    parts = [b"h" * 16, memoryview(b"s" * 100), big, b"t" * 50, memoryview(b"u" * 60)]
    pieces = list(lean._pieces(parts))
    assert [len(p) for p in pieces] == [116, *[1000] * 12, 32, 110]
    assert b"".join(bytes(p) for p in pieces) == b"".join(bytes(p) for p in parts)
    assert list(lean._pieces([])) == [b""]  # an empty body is still one message


def test_a_batch_reply_is_sent_from_the_parameters_memory(pair, monkeypatch) -> None:
    """POST {run}/step?return_params=true: the safetensors reply goes as its header and the
    parameters' own bytes (in slices), and says what the documented route says."""
    served, api = pair
    monkeypatch.setattr(lean, "SEND_SLICE", 1000)
    sent = body_sizes(monkeypatch)
    g = np.frombuffer(grad(11), np.float32)
    r1 = served.post("/v1/runs/t/step?return_params=true", content=dump({"a": g}))
    r2 = api.post("/v1/runs/t/step?return_params=true", content=dump({"b": g}))
    assert r1.status_code == r2.status_code == 200
    assert r1.headers.multi_items() == r2.headers.multi_items()
    (p1, m1), (p2, m2) = parse(r1.content), parse(r2.content)
    assert p1["a"].tobytes() == p2["b"].tobytes()
    assert m1["versions"].replace('"a"', '"b"') == m2["versions"]
    assert sent[1:] == [1000] * 12  # after the header, the parameter in slices
    assert sum(sent) == len(r1.content)
