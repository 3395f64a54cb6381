"""An unexpected error inside the server is a JSON 500 on a connection that stays usable.

uvicorn closes a keep-alive connection when the app raises, so a pooled client's next
request on it would meet a reset. The trigger here is a sabotaged folder, not a test route:
after the server starts, a regular file takes the place of the run's checkpoint folder, so
a save fails with an OSError the engine does not map to a status (a checkpoint dir that is a
file from the start is refused when the server starts).
"""

from __future__ import annotations

import httpx
import pytest

from tests.support.proxy import DroppingProxy
from tests.support.server import Server

pytestmark = pytest.mark.e2e  # starts a real server process


def test_a_500_leaves_the_keep_alive_connection_usable(tmp_path) -> None:
    checkpoints = tmp_path / "checkpoints"
    not_a_folder = checkpoints / "t"  # where run t's checkpoints go
    with Server(checkpoints) as server:
        checkpoints.mkdir(exist_ok=True)
        not_a_folder.write_bytes(b"a file where the checkpoint folder should be")
        proxy = DroppingProxy(server.port)  # counts the connections the client opens
        try:
            with httpx.Client(base_url=proxy.url, timeout=10) as c:
                assert c.get("/v1/runs/t").status_code == 200
                for _ in range(3):
                    r = c.post("/v1/runs/t/checkpoints", json={"name": "x"})
                    assert r.status_code == 500, r.text
                    assert r.headers["content-type"] == "application/json"
                    assert r.json()["detail"].startswith("internal error")
                    assert c.get("/v1/runs/t").status_code == 200  # the same connection
            assert proxy.accepted == 1
        finally:
            proxy.close()
        assert server.proc.poll() is None
    log = server.proc.stdout.read().decode()
    assert log.count("unexpected error in POST /v1/runs/t/checkpoints") == 3, log
    assert "FileExistsError" in log  # the traceback is in the server's log
    assert not_a_folder.read_bytes() == b"a file where the checkpoint folder should be"
