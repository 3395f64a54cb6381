"""Bad input on every endpoint of the OpenAPI schema, and access control.

Each bad request gets a 4xx whose ``detail`` names the problem, and the full server state
(every param and slot, the metadata, the checkpoint files) is byte-identical afterwards.
``test_api.py`` has the first bad-input table; this one covers every operation in the schema
(``test_every_operation_has_a_bad_input_case`` fails when an endpoint is added without one).
"""

from __future__ import annotations

import json
import re
import signal
import struct
from pathlib import Path
from urllib.parse import quote

import httpx
import numpy as np
import pytest
from safetensors.numpy import save as st_save
from stepd.kernels import create_optimizer
from stepd.service.store import Group

from tests.support.app import assert_same_snapshot as assert_same_state
from tests.support.app import b64, full_state, make_client, register
from tests.support.server import Server

J = {"content-type": "application/json"}


def f32(x) -> bytes:
    return np.asarray(x, np.float32).tobytes()


def _st(header: dict | list | str, data: bytes = b"", length: int | None = None) -> bytes:
    raw = header.encode() if isinstance(header, str) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def _entry(shape, begin, end, dtype="F32") -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def _prime(client, ckpt: Path) -> None:
    assert register(client, value=np.arange(6, dtype=np.float32)).status_code == 201
    assert register(client, name="v", shape=(3,)).status_code == 201
    assert register(client, name="h", shape=(3,), algorithm="sophia").status_code == 201
    assert client.post("/v1/runs/t/params/w/step", content=f32(np.ones(6))).status_code == 200
    assert client.post("/v1/runs/t/checkpoints", json={"name": "c"}).status_code == 201
    good = (ckpt / "c.safetensors").read_bytes()
    (ckpt / "trunc.safetensors").write_bytes(good[:-5])  # a torn copy: listed, never loaded
    (header_len,) = struct.unpack("<Q", good[:8])
    lying = bytearray(good)
    lying[8 : 8 + header_len] = good[8 : 8 + header_len].replace(b'"F32"', b'"F16"', 1)
    (ckpt / "lying.safetensors").write_bytes(bytes(lying))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


NAN_LR = b'{"lr": NaN}'
ADAMW = Group("adamw", create_optimizer("adamw").hyperparams.to_dict())  # w's group


def _state(tensors: dict, **meta) -> bytes:
    """A state upload for w's group: its metadata JSON-encoded, global_step moved on."""
    fields = {"algorithm": "adamw", "hyperparams": dict(ADAMW.hyperparams), "global_step": 99}
    return st_save(tensors, metadata={k: json.dumps(v) for k, v in {**fields, **meta}.items()})


W_STATE = {"w/exp_avg": np.ones((2, 3), np.float32), "w/exp_avg_sq": np.ones((2, 3), np.float32)}
# (operation it covers, id, method, url, request kwargs, status, text the detail must contain)
CASES = [
    # -- POST /v1/runs/t/params
    ("POST /v1/runs/t/params", "truncated json", "post", "/v1/runs/t/params",
     {"content": b'{"name": "x", "shape": [2', "headers": J}, 422, "JSON decode error"),
    ("POST /v1/runs/t/params", "non-utf8 body", "post", "/v1/runs/t/params",
     {"content": b"\xff\xfe\x00", "headers": J}, 400, "error parsing the body"),
    ("POST /v1/runs/t/params", "json array body", "post", "/v1/runs/t/params", {"json": []}, 422, None),
    ("POST /v1/runs/t/params", "name with NUL", "post", "/v1/runs/t/params",
     {"json": {"name": "a\x00b", "shape": [2], "group": {"algorithm": "sgd"}}},
     422, "invalid parameter name"),
    ("POST /v1/runs/t/params", "name with trailing newline", "post", "/v1/runs/t/params",
     {"json": {"name": "x\n", "shape": [2], "group": {"algorithm": "sgd"}}},
     422, "invalid parameter name 'x\\n'"),
    ("POST /v1/runs/t/params", "name with backslash", "post", "/v1/runs/t/params",
     {"json": {"name": "..\\x", "shape": [2], "group": {"algorithm": "sgd"}}},
     422, "invalid parameter name"),
    ("POST /v1/runs/t/params", "name too long", "post", "/v1/runs/t/params",
     {"json": {"name": "x" * 257, "shape": [2], "group": {"algorithm": "sgd"}}},
     422, "invalid parameter name"),
    ("POST /v1/runs/t/params", "name '..'", "post", "/v1/runs/t/params",
     {"json": {"name": "..", "shape": [2], "group": {"algorithm": "sgd"}}}, 422, "invalid parameter name"),
    ("POST /v1/runs/t/params", "name '.'", "post", "/v1/runs/t/params",
     {"json": {"name": ".", "shape": [2], "group": {"algorithm": "sgd"}}}, 422, "invalid parameter name"),
    ("POST /v1/runs/t/params", "empty name", "post", "/v1/runs/t/params",
     {"json": {"name": "", "shape": [2], "group": {"algorithm": "sgd"}}},
     422, "invalid parameter name ''"),
    ("POST /v1/runs/t/params", "17 dimensions", "post", "/v1/runs/t/params",
     {"json": {"name": "x", "shape": [1] * 17, "group": {"algorithm": "sgd"}}}, 422, None),
    ("POST /v1/runs/t/params", "huge shape (never allocated)", "post", "/v1/runs/t/params",
     {"json": {"name": "x", "shape": [1 << 20, 1 << 20], "group": {"algorithm": "sgd"}}},
     422, "needs more than the body limit"),
    ("POST /v1/runs/t/params", "shape beyond int64", "post", "/v1/runs/t/params",
     {"json": {"name": "x", "shape": [10**30], "group": {"algorithm": "sgd"}}},
     422, "needs more than the body limit"),
    ("POST /v1/runs/t/params", "zero-size shape with a negative dim", "post", "/v1/runs/t/params",
     {"json": {"name": "x", "shape": [0, -1], "group": {"algorithm": "sgd"}, "value": ""}},
     422, "invalid shape [0, -1]"),
    ("POST /v1/runs/t/params", "fractional dim", "post", "/v1/runs/t/params",
     {"json": {"name": "x", "shape": [2.5], "group": {"algorithm": "sgd"}}}, 422, None),
    ("POST /v1/runs/t/params", "float64 dtype", "post", "/v1/runs/t/params",
     {"json": {"name": "x", "shape": [2], "dtype": "float64", "group": {"algorithm": "sgd"}}},
     422, None),
    ("POST /v1/runs/t/params", "float64 value bytes", "post", "/v1/runs/t/params",
     {"json": {"name": "x", "shape": [2], "group": {"algorithm": "sgd"},
               "value": b64(np.ones(4))}}, 422, "value: body has 16 bytes"),
    ("POST /v1/runs/t/params", "NaN initial value", "post", "/v1/runs/t/params",
     {"json": {"name": "x", "shape": [2], "group": {"algorithm": "sgd"},
               "value": b64(np.array([np.nan, 1]))}}, 422, "non-finite"),
    ("POST /v1/runs/t/params", "lr beyond float32", "post", "/v1/runs/t/params",
     {"json": {"name": "big", "shape": [2], "group": {"algorithm": "sgd", "hyperparams": {"lr": 1e308}}}},
     422, "beyond float32"),
    ("POST /v1/runs/t/params", "lr_scale beyond float32", "post", "/v1/runs/t/params",
     {"json": {"name": "big", "shape": [2], "group": {"algorithm": "sgd"}, "lr_scale": 3.5e38}},
     422, "beyond float32"),
    ("POST /v1/runs/t/params", "NaN lr", "post", "/v1/runs/t/params",
     {"content": b'{"name":"x","shape":[2],"group":{"algorithm":"sgd","hyperparams":{"lr":NaN}}}',
      "headers": J}, 422, "Invalid learning rate: nan"),
    ("POST /v1/runs/t/params", "infinite eps", "post", "/v1/runs/t/params",
     {"content": b'{"name":"x","shape":[2],"group":{"algorithm":"adam",'
                 b'"hyperparams":{"eps":Infinity}}}', "headers": J}, 422, "inf"),
    ("POST /v1/runs/t/params", "lr past float range", "post", "/v1/runs/t/params",
     {"json": {"name": "x", "shape": [2], "group": {"algorithm": "sgd",
                                                    "hyperparams": {"lr": 10**400}}}},
     422, "too large"),
    ("POST /v1/runs/t/params", "momentum out of range", "post", "/v1/runs/t/params",
     {"json": {"name": "x", "shape": [2], "group": {"algorithm": "sgd",
                                                    "hyperparams": {"momentum": 2.0}}}},
     422, "Invalid momentum value: 2.0"),
    ("POST /v1/runs/t/params", "NaN lr_scale", "post", "/v1/runs/t/params",
     {"content": b'{"name":"x","shape":[2],"group":{"algorithm":"sgd"},"lr_scale":NaN}',
      "headers": J}, 422, "Invalid lr_scale"),
    ("POST /v1/runs/t/params", "algorithm with a path", "post", "/v1/runs/t/params",
     {"json": {"name": "x", "shape": [2], "group": {"algorithm": "../sgd"}}},
     422, "unknown algorithm"),
    ("POST /v1/runs/t/params", "unknown field", "post", "/v1/runs/t/params",
     {"json": {"name": "x", "shape": [2], "group": {"algorithm": "sgd"}, "owner": "me"}},
     422, None),
    # -- one parameter
    ("GET /v1/runs/t/params", "wrong method on the list", "delete", "/v1/runs/t/params", {}, 405,
     "Method Not Allowed"),
    ("GET /v1/runs/t/params/{name}", "unknown name", "get", "/v1/runs/t/params/nope", {}, 404,
     "'nope' is not registered"),
    ("GET /v1/runs/t/params/{name}", "encoded slash", "get", "/v1/runs/t/params/..%2Fw", {}, 404, None),
    ("GET /v1/runs/t/params/{name}", "control character", "get", "/v1/runs/t/params/w%00", {}, 404,
     "not registered"),
    ("PUT /v1/runs/t/params/{name}/value", "short value", "put", "/v1/runs/t/params/w/value",
     {"content": f32(np.ones(5))}, 422, "body has 20 bytes"),
    ("PUT /v1/runs/t/params/{name}/value", "NaN value", "put", "/v1/runs/t/params/w/value",
     {"content": f32([0, 1, np.nan, 3, 4, 5])}, 422, "non-finite"),
    ("PUT /v1/runs/t/params/{name}/value", "unknown name", "put", "/v1/runs/t/params/nope/value",
     {"content": f32(np.ones(6))}, 404, "not registered"),
    ("GET /v1/runs/t/params/{name}/value", "unknown format", "get", "/v1/runs/t/params/w/value?format=xml",
     {}, 422, None),
    ("GET /v1/runs/t/params/{name}/state/{slot}", "unknown slot", "get",
     "/v1/runs/t/params/w/state/nope", {}, 404, "no state slot 'nope'"),
    ("GET /v1/runs/t/params/{name}/state/{slot}", "slot with a path", "get",
     "/v1/runs/t/params/w/state/..%2F..%2Fparam", {}, 404, None),
    ("GET /v1/runs/t/params/{name}/state/{slot}", "unknown format", "get",
     "/v1/runs/t/params/w/state/exp_avg?format=pickle", {}, 422, None),
    ("POST /v1/runs/t/params/{name}/hessian", "NaN Hessian", "post", "/v1/runs/t/params/h/hessian",
     {"content": f32([1, np.nan, 1])}, 422, "non-finite"),
    ("POST /v1/runs/t/params/{name}/hessian", "wrong length", "post", "/v1/runs/t/params/h/hessian",
     {"content": f32([1, 1])}, 422, "body has 8 bytes"),
    ("GET /v1/runs/t/params/{name}/lr_scale", "unknown name", "get", "/v1/runs/t/params/nope/lr_scale", {},
     404, "not registered"),
    ("PUT /v1/runs/t/params/{name}/lr_scale", "lr_scale beyond float32", "put", "/v1/runs/t/params/w/lr_scale",
     {"json": {"lr_scale": 1e308}}, 422, "beyond float32"),
    ("PUT /v1/runs/t/params/{name}/lr_scale", "infinite lr_scale", "put", "/v1/runs/t/params/w/lr_scale",
     {"content": b'{"lr_scale": Infinity}', "headers": J}, 422, "Invalid lr_scale"),
    ("PUT /v1/runs/t/params/{name}/lr_scale", "string lr_scale", "put", "/v1/runs/t/params/w/lr_scale",
     {"json": {"lr_scale": "big"}}, 422, None),
    ("PUT /v1/runs/t/params/{name}/lr_scale", "no body", "put", "/v1/runs/t/params/w/lr_scale", {}, 422, None),
    ("GET /v1/runs/t/params/{name}/stats", "unknown name", "get", "/v1/runs/t/params/nope/stats", {}, 404,
     "not registered"),
    ("GET /v1/runs/t/params/{name}/history", "unknown name", "get", "/v1/runs/t/params/nope/history", {}, 404,
     "not registered"),
    ("GET /v1/runs/t/params/{name}/history", "negative after", "get", "/v1/runs/t/params/w/history?after=-1",
     {}, 422, "after is a version or step >= 0, got -1"),
    ("GET /v1/runs/t/params/{name}/history", "after not a number", "get", "/v1/runs/t/params/w/history?after=x",
     {}, 422, None),
    ("GET /v1/runs/t/stats", "unknown run", "get", "/v1/runs/nope/stats", {}, 404, "run 'nope' does not exist"),
    ("GET /v1/runs/t/history", "unknown run", "get", "/v1/runs/nope/history", {}, 404, "run 'nope' does not exist"),
    ("GET /v1/runs/t/history", "negative after", "get", "/v1/runs/t/history?after=-3", {}, 422,
     "after is a version or step >= 0, got -3"),
    # -- steps
    ("POST /v1/runs/t/params/{name}/step", "empty body", "post", "/v1/runs/t/params/w/step",
     {"content": b""}, 422, "body has 0 bytes"),
    ("POST /v1/runs/t/params/{name}/step", "-inf gradient", "post", "/v1/runs/t/params/w/step",
     {"content": f32([0, 0, -np.inf, 0, 0, 0])}, 422, "non-finite"),
    ("POST /v1/runs/t/params/{name}/step", "bad boolean", "post",
     "/v1/runs/t/params/w/step?return_param=maybe", {"content": f32(np.ones(6))}, 422,
     "must be a boolean"),
    ("POST /v1/runs/t/params/{name}/step", "unicode digit as a version", "post",
     "/v1/runs/t/params/w/step?version=%C2%B2", {"content": f32(np.ones(6))}, 422, "must be an integer"),
    ("POST /v1/runs/t/params/{name}/step", "negative version", "post",
     "/v1/runs/t/params/w/step?version=-1", {"content": f32(np.ones(6))}, 422, "versions are >= 0"),
    ("POST /v1/runs/t/params/{name}/step", "bad version", "post", "/v1/runs/t/params/w/step?version=abc",
     {"content": f32(np.ones(6))}, 422, "must be an integer"),
    ("POST /v1/runs/t/params/{name}/step", "worker id with a slash", "post",
     "/v1/runs/t/params/w/step?worker=a/b", {"content": f32(np.ones(6))}, 422, "invalid worker id"),
    ("POST /v1/runs/t/params/{name}/step", "worker id with a newline", "post",
     "/v1/runs/t/params/w/step?worker=a%0A", {"content": f32(np.ones(6))}, 422, "invalid worker id"),
    ("POST /v1/runs/t/params/{name}/step", "request id too short", "post", "/v1/runs/t/params/w/step",
     {"content": f32(np.ones(6)), "headers": {"x-stepd-request-id": "abc-1"}}, 422,
     "invalid X-Stepd-Request-Id"),
    ("POST /v1/runs/t/params/{name}/step", "request id with a slash", "post", "/v1/runs/t/params/w/step",
     {"content": f32(np.ones(6)), "headers": {"x-stepd-request-id": "0123456789abcdef/1"}},
     422, "invalid X-Stepd-Request-Id"),
    ("POST /v1/runs/t/step", "header length past the body", "post", "/v1/runs/t/step",
     {"content": _st("{}", length=1 << 62)}, 422, "exceeds the body"),
    ("POST /v1/runs/t/step", "header not JSON", "post", "/v1/runs/t/step", {"content": _st("{nope")}, 422,
     "header is not JSON"),
    ("POST /v1/runs/t/step", "gradient of another shape, same size", "post", "/v1/runs/t/step",
     {"content": st_save({"w": np.ones((3, 2), np.float32)})}, 422, "gradient of shape [3, 2]"),
    ("POST /v1/runs/t/step", "header past the request cap", "post", "/v1/runs/t/step",
     {"content": _st("{" + " " * (9 << 20) + "}")}, 422, "more than 8388608"),
    ("POST /v1/runs/t/step", "header nested too deeply", "post", "/v1/runs/t/step",
     {"content": _st("[" * 100000 + "]" * 100000)}, 422, "nested too deeply"),
    ("POST /v1/runs/t/step", "versions nested too deeply", "post", "/v1/runs/t/step",
     {"content": st_save({"w": np.ones((2, 3), np.float32)}, metadata={"versions": "[" * 100000 + "]" * 100000})},
     422, "'versions' must be a JSON object"),
    ("POST /v1/runs/t/step", "header a JSON list", "post", "/v1/runs/t/step", {"content": _st([1])}, 422,
     "not a JSON object"),
    ("POST /v1/runs/t/step", "negative shape in header", "post", "/v1/runs/t/step",
     {"content": _st({"w": _entry([-6], 0, 24)}, f32(np.ones(6)))}, 422, "invalid shape"),
    ("POST /v1/runs/t/step", "shape lies about the span", "post", "/v1/runs/t/step",
     {"content": _st({"w": _entry([7], 0, 24)}, f32(np.ones(6)))}, 422, "spans 24 bytes"),
    ("POST /v1/runs/t/step", "overlapping tensors", "post", "/v1/runs/t/step",
     {"content": _st({"w": _entry([6], 0, 24), "v": _entry([3], 8, 20)}, f32(np.ones(6)))},
     422, "overlap"),
    ("POST /v1/runs/t/step", "non-string metadata", "post", "/v1/runs/t/step",
     {"content": _st({"__metadata__": {"a": 1}, "w": _entry([6], 0, 24)}, f32(np.ones(6)))},
     422, "__metadata__"),
    ("POST /v1/runs/t/step", "no tensors", "post", "/v1/runs/t/step", {"content": st_save({})}, 422,
     "holds no gradients"),
    ("POST /v1/runs/t/step", "one NaN gradient spoils the batch", "post", "/v1/runs/t/step",
     {"content": st_save({"w": np.ones(6, np.float32), "v": np.array([1, np.nan, 1], "f4")})},
     422, "non-finite gradient values for 'v'"),
    ("POST /v1/runs/t/step", "name with a path", "post", "/v1/runs/t/step",
     {"content": st_save({"../w": np.ones(6, np.float32)})}, 404, "not registered"),
    ("POST /v1/runs/t/step", "float64 tensor", "post", "/v1/runs/t/step",
     {"content": st_save({"w": np.ones(6, np.float64)})}, 422, "only F32, BF16, F16"),
    ("POST /v1/runs/t/step", "float16 with a NaN", "post", "/v1/runs/t/step",
     {"content": st_save({"w": np.array([1, 2, 3, 4, 5, np.nan], np.float16)})}, 422,
     "non-finite"),
    ("POST /v1/runs/t/params/{name}/step", "bfloat16 body of float32 length", "post",
     "/v1/runs/t/params/w/step", {"content": np.ones(6, np.float32).tobytes(),
                                  "headers": {"x-stepd-dtype": "bfloat16"}}, 422,
     "of bfloat16 needs 12"),
    ("POST /v1/runs/t/params/{name}/step", "unknown dtype", "post", "/v1/runs/t/params/w/step",
     {"content": np.ones(6, np.float32).tobytes(), "headers": {"x-stepd-dtype": "int8"}}, 422,
     "unknown dtype 'int8'"),
    ("POST /v1/runs/t/params/{name}/step", "unknown return dtype", "post",
     "/v1/runs/t/params/w/step?return_dtype=half", {"content": np.ones(6, np.float32).tobytes()},
     422, "unknown dtype 'half'"),
    ("POST /v1/runs/t/step", "request id too long", "post", "/v1/runs/t/step",
     {"content": st_save({"w": np.ones(6, np.float32)}),
      "headers": {"x-stepd-request-id": "a" * 129}}, 422, "invalid X-Stepd-Request-Id"),
    # -- training state
    ("POST /v1/runs/t/iteration/end", "wrong method", "get", "/v1/runs/t/iteration/end", {}, 405,
     "Method Not Allowed"),
    ("PUT /v1/runs/t/lr", "NaN lr", "put", "/v1/runs/t/lr", {"content": NAN_LR, "headers": J}, 422,
     "Invalid learning rate: nan"),
    ("PUT /v1/runs/t/lr", "lr beyond float32", "put", "/v1/runs/t/lr", {"json": {"lr": 1e308}}, 422,
     "beyond float32"),
    ("PUT /v1/runs/t/lr", "NaN in a body that fails validation", "put", "/v1/runs/t/lr",
     {"content": b'{"lr": "x", "group": NaN}', "headers": J}, 422, "'nan'"),
    ("PUT /v1/runs/t/lr", "string lr", "put", "/v1/runs/t/lr", {"json": {"lr": "fast"}}, 422, None),
    ("PUT /v1/runs/t/lr", "group with a path", "put", "/v1/runs/t/lr", {"json": {"lr": 1.0, "group": "../x"}},
     404, "does not exist"),
    ("GET /v1/runs/t/workers", "wrong method", "post", "/v1/runs/t/workers", {}, 405, "Method Not Allowed"),
    ("GET /v1/runs/t/groups", "wrong method", "post", "/v1/runs/t/groups", {}, 405, "Method Not Allowed"),
    ("PUT /v1/runs/t/groups/{group_id}/state", "unknown group", "put", "/v1/runs/t/groups/nope/state",
     {"content": st_save({}, metadata={"counts": "{}"})}, 404, "group 'nope' does not exist"),
    ("PUT /v1/runs/t/groups/{group_id}/state", "slot of the wrong shape", "put",
     f"/v1/runs/t/groups/{ADAMW.id}/state",
     {"content": _state({**W_STATE, "w/exp_avg": np.ones((3, 2), np.float32)},
                        counts={"w": 1}, shapes={"w": [2, 3]})},
     422, "slot 'exp_avg' must be float32 (2, 3)"),
    ("PUT /v1/runs/t/groups/{group_id}/state", "unknown parameter", "put",
     f"/v1/runs/t/groups/{ADAMW.id}/state",
     {"content": _state({k.replace("w/", "ghost/"): v for k, v in W_STATE.items()},
                        counts={"ghost": 1}, shapes={"ghost": [2, 3]})},
     404, "'ghost' is not registered"),
    ("PUT /v1/runs/t/groups/{group_id}/state", "parameter of another group", "put",
     f"/v1/runs/t/groups/{ADAMW.id}/state", {"content": _state({}, counts={}, lr_scales={"h": 0.5})},
     409, "'h' belongs to group"),
    ("PUT /v1/runs/t/groups/{group_id}/state", "other hyperparams", "put",
     f"/v1/runs/t/groups/{ADAMW.id}/state",
     {"content": _state(W_STATE, counts={"w": 1}, shapes={"w": [2, 3]},
                        hyperparams={"lr": 0.5})}, 409, "differ from group"),
    ("PUT /v1/runs/t/groups/{group_id}/state", "not safetensors", "put", "/v1/runs/t/groups/nope/state",
     {"content": b"\x01\x02"}, 422, "safetensors"),
    ("PUT /v1/runs/t/groups/{group_id}/state", "metadata nested too deeply", "put",
     f"/v1/runs/t/groups/{ADAMW.id}/state", {"content": st_save({}, metadata={"counts": "[" * 100000 + "]" * 100000})},
     422, "'counts' is not JSON"),
    ("PUT /v1/runs/t/groups/{group_id}/state", "metadata not JSON", "put", "/v1/runs/t/groups/nope/state",
     {"content": st_save({}, metadata={"counts": "{"})}, 422, "'counts' is not JSON"),
    ("GET /v1/status", "wrong method", "delete", "/v1/status", {}, 405, "Method Not Allowed"),
    ("GET /v1/runs", "wrong method", "put", "/v1/runs", {}, 405, "Method Not Allowed"),
    ("POST /v1/runs", "run name with a path", "post", "/v1/runs", {"json": {"name": "../x"}},
     422, "invalid run name"),
    ("POST /v1/runs", "run name with a leading dot", "post", "/v1/runs", {"json": {"name": ".x"}},
     422, "invalid run name"),
    ("POST /v1/runs", "unknown field", "post", "/v1/runs", {"json": {"nme": "x"}}, 422, None),
    ("POST /v1/runs", "fresh not a bool", "post", "/v1/runs",
     {"json": {"name": "x", "fresh": "sometimes"}}, 422, None),
    ("GET /v1/runs/{run}", "unknown run", "get", "/v1/runs/nope", {}, 404,
     "run 'nope' does not exist"),
    ("DELETE /v1/runs/{run}", "unknown run", "delete", "/v1/runs/nope", {}, 404,
     "run 'nope' does not exist"),
    ("GET /v1/runs/{run}/params", "unknown run", "get", "/v1/runs/nope/params", {}, 404,
     "run 'nope' does not exist"),
    ("POST /v1/runs/{run}/params/{name}/step", "unknown run", "post",
     "/v1/runs/nope/params/w/step", {"content": b"\0" * 24}, 404, "run 'nope' does not exist"),
    ("POST /v1/runs/{run}/step", "unknown run", "post", "/v1/runs/nope/step",
     {"content": b"\0" * 8}, 404, None),
    ("GET /metrics", "wrong method", "post", "/metrics", {}, 405, "Method Not Allowed"),
    ("GET /healthz", "wrong method", "post", "/healthz", {}, 405, "Method Not Allowed"),
    # -- checkpoints
    ("GET /v1/runs/t/checkpoints", "wrong method", "put", "/v1/runs/t/checkpoints", {}, 405,
     "Method Not Allowed"),
    ("PATCH /v1/runs/t/groups/{group_id}/hyperparams", "not an object", "patch",
     "/v1/runs/t/groups/nope/hyperparams", {"json": [1]}, 422, None),
    ("GET /v1/runs/t/membership", "unknown run", "get", "/v1/runs/nope/membership", {}, 404,
     "run 'nope' does not exist"),
    ("POST /v1/runs/t/pull", "unknown name", "post", "/v1/runs/t/pull",
     {"json": {"names": ["nope"]}}, 404, "not registered"),
    ("POST /v1/runs/t/pull", "not an object", "post", "/v1/runs/t/pull",
     {"content": b"xx", "headers": J}, 422, None),
    ("POST /v1/runs/t/workers/{worker}/join", "worker id with a space", "post",
     "/v1/runs/t/workers/a b/join", {}, 422, "invalid worker id 'a b'"),
    ("POST /v1/runs/t/workers/{worker}/leave", "worker id too long", "post",
     "/v1/runs/t/workers/" + "x" * 129 + "/leave", {}, 422, "invalid worker id"),
    ("POST /v1/runs/t/workers/{worker}/heartbeat", "unknown run", "post",
     "/v1/runs/nope/workers/w0/heartbeat", {}, 404, "run 'nope' does not exist"),
    ("GET /v1/runs/t/checkpoints/invalid", "unknown run", "get",
     "/v1/runs/nope/checkpoints/invalid", {}, 404, "run 'nope' does not exist"),
    ("GET /v1/runs/t/checkpoints/activity", "unknown run", "get",
     "/v1/runs/nope/checkpoints/activity", {}, 404, "run 'nope' does not exist"),
    ("POST /v1/runs/t/checkpoints", "dot-dot", "post", "/v1/runs/t/checkpoints", {"json": {"name": ".."}},
     422, "invalid checkpoint name"),
    ("POST /v1/runs/t/checkpoints", "absolute path", "post", "/v1/runs/t/checkpoints",
     {"json": {"name": "/tmp/x"}}, 422, "invalid checkpoint name"),
    ("POST /v1/runs/t/checkpoints", "trailing newline", "post", "/v1/runs/t/checkpoints",
     {"json": {"name": "x\n"}}, 422, "invalid checkpoint name 'x\\n'"),
    ("POST /v1/runs/t/checkpoints", "suffix in the name", "post", "/v1/runs/t/checkpoints",
     {"json": {"name": "c.safetensors"}}, 422, "invalid checkpoint name"),
    ("POST /v1/runs/t/checkpoints", "name not a string", "post", "/v1/runs/t/checkpoints",
     {"json": {"name": 12}}, 422, None),
    ("POST /v1/runs/t/checkpoints/{name}/restore", "truncated checkpoint", "post",
     "/v1/runs/t/checkpoints/trunc/restore", {}, 422, "invalid data_offsets"),
    ("POST /v1/runs/t/checkpoints/{name}/restore", "checkpoint lying about its dtype", "post",
     "/v1/runs/t/checkpoints/lying/restore", {}, 422, "only F32"),
    ("POST /v1/runs/t/checkpoints/{name}/restore", "hidden name", "post",
     "/v1/runs/t/checkpoints/.c/restore", {}, 422, "invalid checkpoint name"),
    ("POST /v1/runs/t/checkpoints/{name}/restore", "encoded separators", "post",
     "/v1/runs/t/checkpoints/..%2Fckpt%2Fc/restore", {}, 404, None),
    ("DELETE /v1/runs/t/checkpoints/{name}", "encoded dot-dot", "delete", "/v1/runs/t/checkpoints/%2E%2E",
     {}, 422, "invalid checkpoint name '..'"),
    ("DELETE /v1/runs/t/checkpoints/{name}", "encoded traversal", "delete",
     "/v1/runs/t/checkpoints/..%2F..%2Fvictim", {}, 404, None),
    ("DELETE /v1/runs/t/checkpoints/{name}", "unknown", "delete", "/v1/runs/t/checkpoints/nope", {}, 404,
     "does not exist"),
]  # fmt: skip


@pytest.fixture
def primed(tmp_path):
    (tmp_path / "victim.safetensors").write_bytes(b"must survive")
    with make_client(tmp_path) as c:
        _prime(c, tmp_path / "ckpt" / "t")
        yield c, tmp_path


@pytest.mark.parametrize(
    ("method", "url", "kwargs", "status", "detail"),
    [c[2:] for c in CASES],
    ids=[f"{c[0]}: {c[1]}" for c in CASES],
)
def test_bad_input_is_4xx_with_detail_and_changes_nothing(primed, method, url, kwargs, status,
                                                          detail) -> None:  # fmt: skip
    client, root = primed
    before, files = full_state(client), _files(root)
    r = client.request(method.upper(), url, **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert body["detail"], body
    if detail is not None:
        assert detail in str(body["detail"]), body
    assert_same_state(full_state(client), before)
    assert _files(root) == files


def test_every_operation_has_a_bad_input_case(client) -> None:
    spec = client.get("/openapi.json").json()
    ops = {f"{m.upper()} {p}" for p, item in spec["paths"].items() for m in item}
    missing = ops - {c[0].replace("/v1/runs/t/", "/v1/runs/{run}/") for c in CASES}
    assert not missing, f"operations without a bad-input case: {sorted(missing)}"


@pytest.mark.parametrize(
    ("method", "url"),
    [
        ("post", "/v1/runs/t/params/w/step"),
        ("post", "/v1/runs/t/step"),
        ("put", "/v1/runs/t/params/w/value"),
        ("post", "/v1/runs/t/params/h/hessian"),
        ("put", "/v1/runs/t/groups/g/state"),
    ],
)
def test_oversized_tensor_bodies_are_413_on_every_tensor_endpoint(tmp_path, method, url) -> None:
    with make_client(tmp_path, max_body_bytes=64) as c:
        register(c, shape=(6,))
        register(c, name="h", shape=(6,), algorithm="sophia")
        before = full_state(c)
        big = (
            st_save({"w": np.ones(16, np.float32)})
            if url == "/v1/runs/t/step"
            else f32(np.ones(17))
        )
        r = c.request(method.upper(), url, content=big)
        assert r.status_code == 413, r.text
        assert "exceeds the limit of 64" in r.json()["detail"]
        assert_same_state(full_state(c), before)


# -- access control -----------------------------------------------------------------------

TOKEN = "s3cret-token"
FILL = {"run": "t", "name": "w", "slot": "exp_avg"}


def _concrete(path: str) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: FILL.get(m.group(1), "c"), path)


@pytest.mark.e2e
def test_token_guards_every_operation_on_the_real_server(tmp_path) -> None:
    """Every operation of the schema but /healthz, the two step endpoints (served outside
    FastAPI) included, answers 401 without the token, with a wrong one or a malformed one."""
    with Server(tmp_path / "ckpt", STEPD_TOKEN=TOKEN) as server:
        ok = {"authorization": f"Bearer {TOKEN}"}
        with httpx.Client(base_url=server.url, timeout=10) as c:
            assert c.get("/openapi.json").status_code == 401  # the schema and /docs too
            assert c.get("/docs").status_code == 401
            spec = c.get("/openapi.json", headers=ok).json()
            assert register(c, shape=(6,)).status_code == 401
            before = c.get("/v1/runs/t/params", headers=ok).json()
            ops = [(m, p) for p, item in spec["paths"].items() for m in item]
            assert ("post", "/v1/runs/{run}/params/{name}/step") in ops
            assert ("post", "/v1/runs/{run}/step") in ops
            for method, path in ops:
                url = _concrete(path)
                if path == "/healthz":
                    assert c.request(method, url).status_code == 200
                    continue
                for headers in (
                    {},
                    {"authorization": "Bearer wrong"},
                    {"authorization": f"bearer {TOKEN}"},
                    {"authorization": f"Bearer  {TOKEN}"},
                    {"authorization": TOKEN},
                    {"x-stepd-token": TOKEN},
                ):
                    r = c.request(method, url, headers=headers, content=f32(np.ones(6)))
                    assert r.status_code == 401, (method, url, headers, r.text)
                    assert r.headers["www-authenticate"] == "Bearer"
                    assert r.json()["detail"] == "missing or wrong bearer token"
            assert c.get("/v1/runs/t/params", headers=ok).json() == before
            assert c.get("/v1/runs/t/checkpoints", headers=ok).status_code == 200


ESCAPES = ["..", "../x", "../../victim", "/tmp/x", "/etc/passwd", "a/b", "a\\b", ".hidden",
           "-x", "x\x00", "x\n", "%2e%2e", "..%2Fvictim", "~", "ck.safetensors"]  # fmt: skip


def test_checkpoint_names_cannot_escape_the_directory(tmp_path) -> None:
    ckpt = tmp_path / "ckpt"
    with make_client(tmp_path) as c:
        register(c, shape=(2,))
        (tmp_path / "victim.safetensors").write_bytes(b"x")
        assert c.post("/v1/runs/t/checkpoints", json={"name": "ok"}).status_code == 201
        outside = _files(tmp_path)
        for name in ESCAPES:
            r = c.post("/v1/runs/t/checkpoints", json={"name": name})
            assert r.status_code == 422, (name, r.text)
            assert "invalid checkpoint name" in r.json()["detail"]
            if name == "..":  # every HTTP client resolves /checkpoints/.. itself
                continue
            for method, suffix in (("post", "/restore"), ("delete", "")):
                r = c.request(
                    method.upper(), f"/v1/runs/t/checkpoints/{quote(name, safe='')}{suffix}"
                )
                assert r.status_code in (404, 405, 422), (name, method, r.text)
        assert _files(tmp_path) == outside
        assert sorted(p.name for p in (ckpt / "t").iterdir()) == ["ok.safetensors"]


@pytest.mark.e2e
def test_server_binds_to_loopback_by_default(tmp_path, monkeypatch) -> None:
    from stepd.service.config import Settings

    monkeypatch.delenv("STEPD_HOST", raising=False)
    assert Settings().host == "127.0.0.1"
    with Server(tmp_path) as server:  # no --host: the default
        port = f"{server.port:04X}"
        listening = []
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            for line in Path(table).read_text().splitlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                if local.endswith(f":{port}") and state == "0A":
                    listening.append(local.split(":")[0])
        assert listening == ["0100007F"]  # 127.0.0.1 only, no wildcard, no IPv6
        server.stop(signal.SIGKILL)


# Both checked at the ASGI front door (service/app.py), before FastAPI parses a JSON body.


def test_token_is_checked_before_the_body_is_parsed(tmp_path) -> None:
    with make_client(tmp_path, token=TOKEN) as c:
        r = c.post("/v1/runs/t/params", content=b"{nope", headers=J)
        assert r.status_code == 401, r.text


def test_json_bodies_obey_the_body_limit(tmp_path) -> None:
    with make_client(tmp_path, max_body_bytes=64) as c:
        r = c.put("/v1/runs/t/lr", content=b'{"lr": 1.0}' + b" " * 100, headers=J)
        assert r.status_code == 413, r.text
