"""The pages for people (dashboard, /docs, /redoc) without a browser: every script and
style they name is served from the package, and the token guards data, not code.
(tests/service/test_dashboard_browser.py runs them in Chromium.)"""

from __future__ import annotations

import re

import pytest
from stepd.service.api.pages import STATIC

from tests.support.app import make_client

ASSET = re.compile(r"""(?:src|href)=["']([^"']+)["']|url: ?'([^']+)'""")
TOKEN = "pages-s3cret"


def _assets(html: str) -> list[str]:
    return [a or b for a, b in ASSET.findall(html)]


@pytest.mark.parametrize("page", ["/", "/docs", "/redoc"])
def test_every_asset_of_a_page_is_served_here(tmp_path, page: str) -> None:
    with make_client(tmp_path) as c:
        r = c.get(page)
        assert r.status_code == 200
        assets = _assets(r.text)
        assert assets, r.text
        for url in assets:
            assert url.startswith("/"), f"{page} loads {url} from elsewhere"
            assert c.get(url).status_code == 200, url
        assert "http://" not in r.text
        assert "https://" not in r.text


def test_the_dashboard_may_only_talk_to_its_server(tmp_path) -> None:
    with make_client(tmp_path) as c:
        r = c.get("/")
        assert "default-src 'self'" in r.headers["content-security-policy"]
        assert '<meta name="stepd-token" content="none">' in r.text


def test_with_a_token_the_page_and_code_are_open_and_the_data_is_not(tmp_path) -> None:
    with make_client(tmp_path, token=TOKEN) as c:
        r = c.get("/")
        assert r.status_code == 200
        assert '<meta name="stepd-token" content="required">' in r.text
        assert c.get("/static/dashboard/dashboard.js").status_code == 200
        assert c.get("/static/vendor/uplot/uPlot.iife.min.js").status_code == 200
        for closed in ("/v1/runs", "/v1/runs/t/stats", "/docs", "/redoc", "/openapi.json"):
            assert c.get(closed).status_code == 401, closed
        ok = {"authorization": f"Bearer {TOKEN}"}
        assert c.get("/v1/runs/t/stats", headers=ok).status_code == 200
        assert c.get("/static/../v1/runs").status_code == 401  # no way round via the prefix
        assert c.get("/static/%2e%2e/engine.py").status_code == 404


def test_the_vendored_code_names_no_other_host_it_would_load_from() -> None:
    redoc = (STATIC / "vendor" / "redoc" / "redoc.standalone.js").read_text()
    assert "cdn.redoc.ly" not in redoc  # its logo, pointed home (VENDORED.md)
    assert "/static/vendor/redoc/logo-mini.svg" in redoc
    listed = (STATIC / "vendor" / "VENDORED.md").read_text()
    for folder in ("uplot", "swagger-ui", "redoc"):
        assert f"`{folder}/`" in listed
        assert (STATIC / "vendor" / folder / "LICENSE").is_file()
