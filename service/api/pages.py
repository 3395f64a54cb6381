"""Pages for people: the dashboard at ``/`` and the API documentation at ``/docs`` and
``/redoc``. Every script, style and font they use is served from the package
(``service/static``, vendored copies listed in ``static/vendor/VENDORED.md``): no page
loads anything from another host, so they work on an air-gapped cluster too."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent.parent / "static"
PREFIX = "/static"  # served without the token: code and styles, no data
VENDOR = f"{PREFIX}/vendor"
# The dashboard may talk to this server only: a script that tried another host would fail.
DASHBOARD_CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)

router = APIRouter(include_in_schema=False)


@cache
def _dashboard_template() -> str:
    return (STATIC / "dashboard" / "index.html").read_text()


@router.get("/", response_class=HTMLResponse)
async def dashboard(request: Request) -> HTMLResponse:
    """The dashboard; it asks for the token (kept in the tab's session storage) when the
    server has one, before it makes any API request."""
    needs = "required" if request.app.state.settings.token else "none"
    page = _dashboard_template().replace("{{token}}", needs)
    return HTMLResponse(page, headers={"content-security-policy": DASHBOARD_CSP})


@router.get("/docs", response_class=HTMLResponse)
async def swagger_ui(request: Request) -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url="/openapi.json",
        title="stepd API",
        swagger_js_url=f"{VENDOR}/swagger-ui/swagger-ui-bundle.js",
        swagger_css_url=f"{VENDOR}/swagger-ui/swagger-ui.css",
        swagger_favicon_url=f"{VENDOR}/swagger-ui/favicon-32x32.png",
    )


@router.get("/redoc", response_class=HTMLResponse)
async def redoc(request: Request) -> HTMLResponse:
    return get_redoc_html(
        openapi_url="/openapi.json",
        title="stepd API",
        redoc_js_url=f"{VENDOR}/redoc/redoc.standalone.js",
        redoc_favicon_url=f"{VENDOR}/swagger-ui/favicon-32x32.png",
        with_google_fonts=False,
    )


def mount(app: FastAPI) -> None:
    """The pages and the package's static files on ``app``."""
    app.include_router(router)
    app.mount(PREFIX, StaticFiles(directory=STATIC), name="static")


def is_public(path: str) -> bool:
    """Paths served without the token: the dashboard's page and static code (no data: the
    page asks for the token before it reads anything)."""
    return path == "/" or path.startswith(f"{PREFIX}/")
