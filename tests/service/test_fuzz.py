"""Schemathesis against the real server's /openapi.json: no 5xx, no schema violation."""

from __future__ import annotations

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

from tests.support.app import b64
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
