"""Schemathesis against the real server's /openapi.json: no 5xx, no schema violation; and
generated hostile input (non-finite JSON numbers, deep nesting, odd Unicode, invalid UTF-8)
on every kind of field, each a 4xx that changes nothing."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from urllib.parse import quote

import httpx
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.support.app import RunClient, assert_same_snapshot, b64, full_state, make_client
from tests.support.server import Server

pytestmark = pytest.mark.e2e  # starts real server processes

CHECKS = [
    not_a_server_error,
    response_schema_conformance,
    content_type_conformance,
    status_code_conformance,
]
PER_OPERATION = 40  # ~25 operations: well over 500 generated cases in all


def _prime(c: httpx.Client) -> None:
    body = {
        "name": "w",
        "shape": [2, 3],
        "group": {"algorithm": "adamw", "hyperparams": {"lr": 1e-3}},
        "value": b64(np.arange(6, dtype=np.float32)),
    }
    assert c.post("/v1/runs/t/params", json=body).status_code == 201
    assert c.post("/v1/runs/t/params/w/step", content=np.ones(6, np.float32).tobytes()).is_success
    assert c.post("/v1/runs/t/checkpoints", json={"name": "c"}).status_code == 201


def _fuzz(op, url: str, failures: list[str]) -> int:
    """Run PER_OPERATION generated cases (valid and invalid) against one operation."""
    count = 0
    strategy = st.one_of(
        op.as_strategy(GenerationMode.POSITIVE), op.as_strategy(GenerationMode.NEGATIVE)
    )

    @given(case=strategy)
    @settings(
        max_examples=PER_OPERATION,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    def run(case) -> None:
        nonlocal count
        count += 1
        response = case.call(base_url=url, timeout=10)
        try:
            case.validate_response(response, checks=CHECKS)
        except (Exception, BaseExceptionGroup) as exc:
            failures.append(f"{op.label}: {type(exc).__name__}: {str(exc)[:800]}")

    run()
    return count


def test_fuzz_every_operation(tmp_path) -> None:
    # A small body limit keeps whatever the fuzzer registers small.
    with Server(tmp_path, STEPD_MAX_BODY_BYTES=str(1 << 16)) as server:
        with httpx.Client(base_url=server.url, timeout=10) as c:
            _prime(c)
            spec = c.get("/openapi.json").json()
        schema = schemathesis.openapi.from_dict(spec)
        failures: list[str] = []
        total = 0
        ops = [r.ok() for r in schema.get_all_operations()]
        assert len(ops) >= 20
        for op in ops:
            total += _fuzz(op, server.url, failures)
        assert server.proc.poll() is None
    assert failures == [], f"{len(failures)} of {total} cases failed:\n\n" + "\n\n".join(
        failures[:8]
    )
    assert total >= 500


# -- generated hostile input, in process: a 4xx, and nothing changed -----------------------

HOSTILE_EXAMPLES = 60  # per generator
J = {"content-type": "application/json"}
NON_FINITE = ["NaN", "Infinity", "-Infinity"]
# Each template has one hole, @, where a generated JSON value goes; whatever fills it, the
# request is invalid. (Adafactor's d is not here: Infinity is its "no clipping".)
JSON_HOLES = [
    (
        "post",
        "/v1/runs/t/params",
        '{"name": "n", "shape": [2], "group": {"algorithm": "adamw", "hyperparams": {"lr": @}}}',
    ),
    (
        "post",
        "/v1/runs/t/params",
        '{"name": "n", "shape": [2], "group": '
        '{"algorithm": "adamw", "hyperparams": {"betas": [0.9, @]}}}',
    ),
    (
        "post",
        "/v1/runs/t/params",
        '{"name": "n", "shape": [2], "group": {"algorithm": "adamw", "hyperparams": {"eps": @}}}',
    ),
    (
        "post",
        "/v1/runs/t/params",
        '{"name": "n", "shape": [2], "group": '
        '{"algorithm": "adamw", "hyperparams": {"weight_decay": @}}}',
    ),
    (
        "post",
        "/v1/runs/t/params",
        '{"name": "n", "shape": [2], "group": '
        '{"algorithm": "sgd", "hyperparams": {"momentum": @}}}',
    ),
    (
        "post",
        "/v1/runs/t/params",
        '{"name": "n", "shape": [2], "group": '
        '{"algorithm": "adafactor", "hyperparams": {"eps": [1e-30, @]}}}',
    ),
    (
        "post",
        "/v1/runs/t/params",
        '{"name": "n", "shape": [2], "group": '
        '{"algorithm": "adamw", "workers": {"mode": "sync", "count": @}}}',
    ),
    (
        "post",
        "/v1/runs/t/params",
        '{"name": "n", "shape": [2], "group": '
        '{"algorithm": "adamw", "workers": {"mode": "async", "max_staleness": @}}}',
    ),
    ("post", "/v1/runs/t/params", '{"name": "n", "shape": [@], "group": {"algorithm": "adamw"}}'),
    (
        "post",
        "/v1/runs/t/params",
        '{"name": "n", "shape": [2], "lr_scale": @, "group": {"algorithm": "adamw"}}',
    ),
    ("post", "/v1/runs/t/params", '{"name": @, "shape": [2], "group": {"algorithm": "adamw"}}'),
    ("put", "/v1/runs/t/lr", '{"lr": @}'),
    ("put", "/v1/runs/t/params/w/lr_scale", '{"lr_scale": @}'),
    ("post", "/v1/runs", '{"name": "fresh-run", "quota_bytes": @}'),
    ("post", "/v1/runs", '{"name": @}'),
    ("post", "/v1/runs/t/checkpoints", '{"name": @}'),
]
# Names no rule allows: combining marks, right-to-left text and controls, digits that are
# not ASCII, NUL, zero-width and fullwidth letters, a lone surrogate, a trailing newline.
ODD_NAMES = [
    "w\u0301",
    "\u202ew",
    "\u05e9",
    "w\u00b2",
    "\u0663",
    "w\x00",
    "\x00",
    "w\u200b",
    "\uff57",
    "w\ud800",
    "\U0001f600",
    "w\n",
    "\u0130",
    "\ufeffw",
    "\u212a",
]
# Bytes that are not UTF-8: a lone continuation byte, an invalid start byte, an overlong
# "/", a surrogate, a truncated sequence, a code point beyond U+10FFFF.
BAD_UTF8 = [b"\x80", b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe2\x82", b"\xf4\x90\x80\x80"]


def _nested(depth: int, kind: str) -> str:
    return "[" * depth + "]" * depth if kind == "array" else '{"a": ' * depth + "1" + "}" * depth


def _st_body(header: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + data


def _everything(client: RunClient, root: Path) -> tuple:
    """What no refused request may change: every param and slot, the metadata, the runs and
    the checkpoint folder's files."""
    engine = client.app.state.engine
    runs = sorted((r["name"], r["global_step"], r["params"]) for r in engine.runs())
    files = {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    return full_state(client), runs, files


def _hostile(strategy, tmp_path: Path) -> list[str]:
    """Send each generated ``(method, url, kwargs)``; returns what went wrong."""
    failures: list[str] = []
    with make_client(tmp_path) as c:
        _prime(c)
        assert c.post("/v1/runs/t/params/w/step", content=np.ones(6, np.float32).tobytes())
        root = tmp_path / "ckpt"
        before = _everything(c, root)

        @given(case=strategy)
        @settings(
            max_examples=HOSTILE_EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        def run(case: tuple[str, str, dict]) -> None:
            method, url, kwargs = case
            r = c.request(method.upper(), url, **kwargs)
            what = f"{method.upper()} {url[:120]} {str(kwargs)[:200]}"
            if not 400 <= r.status_code < 500:
                failures.append(f"{what}: {r.status_code} {r.text[:300]}")
                return
            after = _everything(c, root)
            try:
                assert_same_snapshot(after[0], before[0])
                assert after[1:] == before[1:]
            except AssertionError as exc:
                failures.append(f"{what}: state changed: {str(exc)[:300]}")

        run()
    return failures


def _group_id(gid: list[str]) -> str:
    return gid[0] if gid else "unknown"


@st.composite
def non_finite_numbers(draw) -> tuple[str, str, dict]:
    literal = draw(st.sampled_from(NON_FINITE))
    where = draw(st.integers(0, len(JSON_HOLES) + 1))
    if where < len(JSON_HOLES):
        method, url, template = JSON_HOLES[where]
        return method, url, {"content": template.replace("@", literal), "headers": J}
    # A state upload whose metadata (JSON inside safetensors) holds the literal.
    key = draw(st.sampled_from(["lr", "global_step", "counts", "lr_scales"]))
    value = {"counts": '{"w": @}', "lr_scales": '{"w": @}'}.get(key, "@").replace("@", literal)
    meta = {"algorithm": '"adamw"', "hyperparams": "{}", key: value}
    header = json.dumps({"__metadata__": meta}).encode()
    if where == len(JSON_HOLES):
        return "put", "/v1/runs/t/groups/@w/state", {"content": _st_body(header)}
    # A gradient batch whose versions hold it.
    entry = {"dtype": "F32", "shape": [6], "data_offsets": [0, 24]}
    header = json.dumps({"__metadata__": {"versions": '{"w": ' + literal + "}"}, "w": entry})
    return "post", "/v1/runs/t/step", {"content": _st_body(header.encode(), b"\0" * 24)}


@st.composite
def deep_nesting(draw) -> tuple[str, str, dict]:
    # Past the JSON parser's recursion limit (10k), and just under it (the body parses and
    # the nesting reaches validation and the error's echo of the input).
    depth = draw(st.sampled_from([10_000, 900, 400]))
    kind = draw(st.sampled_from(["array", "object"]))
    nested = _nested(depth, kind)
    where = draw(st.integers(0, len(JSON_HOLES) + 3))
    if where < len(JSON_HOLES):
        method, url, template = JSON_HOLES[where]
        return method, url, {"content": template.replace("@", nested), "headers": J}
    if where == len(JSON_HOLES):  # the whole body
        return "post", "/v1/runs/t/params", {"content": nested, "headers": J}
    if where == len(JSON_HOLES) + 1:  # a safetensors header nested itself
        header = '{"w": ' + nested + "}"
        return "post", "/v1/runs/t/step", {"content": _st_body(header.encode())}
    if where == len(JSON_HOLES) + 2:  # JSON nested inside safetensors metadata strings
        meta = {"algorithm": '"adamw"', "hyperparams": nested, "counts": "{}"}
        header = json.dumps({"__metadata__": meta}).encode()
        return "put", "/v1/runs/t/groups/@w/state", {"content": _st_body(header)}
    entry = {"dtype": "F32", "shape": [6], "data_offsets": [0, 24]}
    header = json.dumps({"__metadata__": {"versions": nested}, "w": entry}).encode()
    return "post", "/v1/runs/t/step", {"content": _st_body(header, b"\0" * 24)}


@st.composite
def odd_unicode(draw) -> tuple[str, str, dict]:
    name = draw(st.sampled_from(ODD_NAMES))
    # In a path: its UTF-8 percent-encoded (a lone surrogate as the bytes it would have).
    p = quote(name.encode("utf-8", "surrogatepass"), safe="")
    as_json = json.dumps(name)  # escaped: \ud800 arrives as a lone surrogate
    body = np.ones(6, np.float32).tobytes()
    cases = [
        ("post", "/v1/runs/t/params", {"content": '{"name": ' + as_json + ', "shape": [2], '
         '"group": {"algorithm": "adamw"}}', "headers": J}),
        ("post", "/v1/runs", {"json": {"name": name.encode("utf-8", "surrogatepass")
                                       .decode("utf-8", "replace")}}),
        ("post", "/v1/runs", {"content": '{"name": ' + as_json + "}", "headers": J}),
        ("post", "/v1/runs/t/checkpoints", {"content": '{"name": ' + as_json + "}",
                                            "headers": J}),
        ("put", "/v1/runs/t/lr", {"content": '{"lr": 0.1, "group": ' + as_json + "}",
                                  "headers": J}),
        ("get", f"/v1/runs/t/params/{p}", {}),
        ("post", f"/v1/runs/t/params/{p}/step", {"content": body}),
        ("put", f"/v1/runs/t/params/{p}/value", {"content": body}),
        ("put", f"/v1/runs/t/params/{p}/lr_scale", {"json": {"lr_scale": 2.0}}),
        ("post", f"/v1/runs/t/checkpoints/{p}/restore", {}),
        ("delete", f"/v1/runs/t/checkpoints/{p}", {}),
        ("delete", f"/v1/runs/{p}", {}),
        ("put", f"/v1/runs/t/groups/{p}/state", {"content": _st_body(b"{}")}),
        ("post", f"/v1/runs/t/params/w/step?worker={p}", {"content": body}),
        ("post", f"/v1/runs/t/iteration/end?worker={p}", {}),
        # a gradient batch naming it, and a request id made of it
        ("post", "/v1/runs/t/step", {"content": _st_body(json.dumps(
            {name: {"dtype": "F32", "shape": [6], "data_offsets": [0, 24]}}).encode(),
            b"\0" * 24)}),
        ("post", "/v1/runs/t/params/w/step", {"content": body, "headers": {
            "x-stepd-request-id": ("r" * 16 + name).encode("utf-8", "surrogatepass")}}),
    ]  # fmt: skip
    return draw(st.sampled_from(cases))


@st.composite
def invalid_utf8(draw) -> tuple[str, str, dict]:
    bad = draw(st.sampled_from(BAD_UTF8))
    p = quote(b"w" + bad, safe="")
    body = np.ones(6, np.float32).tobytes()
    cases = [
        ("post", "/v1/runs/t/params", {"content": b'{"name": "w' + bad + b'", "shape": [2], '
         b'"group": {"algorithm": "adamw"}}', "headers": J}),
        ("post", "/v1/runs", {"content": b'{"name": "' + bad + b'"}', "headers": J}),
        ("put", "/v1/runs/t/lr", {"content": b'{"lr": 0.1' + bad + b"}", "headers": J}),
        ("post", "/v1/runs/t/checkpoints", {"content": b'{"name": "' + bad + b'"}',
                                            "headers": J}),
        ("post", "/v1/runs/t/step", {"content": _st_body(b'{"w' + bad + b'": {}}')}),
        ("put", "/v1/runs/t/groups/@w/state", {"content": _st_body(
            b'{"__metadata__": {"algorithm": "\\"adamw' + bad + b'\\""}}')}),
        ("get", f"/v1/runs/t/params/{p}", {}),
        ("post", f"/v1/runs/t/params/{p}/step", {"content": body}),
        ("post", f"/v1/runs/t/checkpoints/{p}/restore", {}),
        ("delete", f"/v1/runs/t/checkpoints/{p}", {}),
        ("delete", f"/v1/runs/{p}", {}),
        ("post", f"/v1/runs/t/params/w/step?worker={p}", {"content": body}),
        ("post", "/v1/runs/t/params/w/step", {"content": body, "headers": {
            "x-stepd-request-id": b"r" * 16 + bad}}),
        ("put", "/v1/runs/t/params/w/lr_scale", {"content": b'{"lr_scale": 1' + bad + b"}",
                                                 "headers": J}),
    ]  # fmt: skip
    return draw(st.sampled_from(cases))


@st.composite
def huge_integers(draw) -> tuple[str, str, dict]:
    # Beyond Python's int digit limit (4300): json.loads raises a plain ValueError.
    big = "1" * draw(st.sampled_from([4301, 5000, 20_000]))
    entry = '{"dtype": "F32", "shape": [' + big + '], "data_offsets": [0, 24]}'
    versions = json.dumps(
        {
            "__metadata__": {"versions": '{"w": ' + big + "}"},
            "w": {"dtype": "F32", "shape": [6], "data_offsets": [0, 24]},
        }
    )
    cases = [
        ("post", "/v1/runs/t/step", {"content": _st_body(('{"w": ' + entry + "}").encode(),
                                                         b"\0" * 24)}),
        ("post", "/v1/runs/t/step", {"content": _st_body(versions.encode(), b"\0" * 24)}),
        ("put", "/v1/runs/t/lr", {"content": '{"lr": ' + big + "}", "headers": J}),
    ]  # fmt: skip
    return draw(st.sampled_from(cases))


def _with_group(strategy, tmp_path: Path):
    """Put w's group id where a case says ``@w`` (known once the app has started)."""
    gid: list[str] = []
    original = _prime

    def primed(c: httpx.Client) -> None:
        original(c)
        gid.append(next(g["id"] for g in c.get("/v1/runs/t/groups").json()))

    def fill(case: tuple[str, str, dict]) -> tuple[str, str, dict]:
        method, url, kwargs = case
        return method, url.replace("@w", _group_id(gid)), kwargs

    return strategy.map(fill), primed


@pytest.mark.parametrize(
    "generator",
    [
        non_finite_numbers,
        deep_nesting,
        odd_unicode,
        invalid_utf8,
        huge_integers,
    ],
    ids=["non-finite numbers", "deep nesting", "odd unicode", "invalid utf-8", "huge integers"],
)
def test_hostile_input_is_4xx_and_changes_nothing(tmp_path, monkeypatch, generator) -> None:
    strategy, primed = _with_group(generator(), tmp_path)
    monkeypatch.setitem(globals(), "_prime", primed)
    failures = _hostile(strategy, tmp_path)
    assert failures == [], f"{len(failures)} cases failed:\n\n" + "\n\n".join(failures[:10])
