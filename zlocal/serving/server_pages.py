"""Routes that serve static pages: the built-in chat page at ``/`` and offline API docs at ``/docs``.

The chat page (zlocal/static/) is plain HTML/JS/CSS with no external reference; its Content-Security-Policy
only allows this origin, so a page that tried to load anything from a CDN would fail in the browser
instead of silently depending on the network. The Swagger UI assets for ``/docs`` come from the pinned
``fastapi-offline`` package (FastAPI's default page loads them from a CDN and is blank offline).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, Response

STATIC_DIR = Path(__file__).resolve().parent / "static"

# The chat page may only talk to the server that served it; nothing is loaded from elsewhere.
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


@dataclass(frozen=True)
class Asset:
    """One file served under a fixed path."""

    file: Path
    media_type: str


PAGE_ASSETS: dict[str, Asset] = {
    "/": Asset(STATIC_DIR / "chat.html", "text/html; charset=utf-8"),
    "/static/chat.js": Asset(STATIC_DIR / "chat.js", "text/javascript; charset=utf-8"),
    "/static/chat.css": Asset(STATIC_DIR / "chat.css", "text/css; charset=utf-8"),
}

# A browser cannot attach an API key to a page load, and the page holds no data: these paths are
# served without the key (server_guard). Every request the page then makes carries the key.
KEYLESS_PAGE_PATHS = frozenset(PAGE_ASSETS)

DOCS_ASSETS = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "favicon.png": "image/png",
}


def swagger_dir() -> Path:
    """Where the pinned ``fastapi-offline`` package keeps its Swagger UI build."""
    try:
        import fastapi_offline
    except ImportError as exc:
        from zlocal.errors import DependencyError

        raise DependencyError(
            "the server's offline /docs need fastapi-offline: pip install -c scripts/constraints.txt "
            "-e '.[serve]'"
        ) from exc

    return Path(fastapi_offline.__file__).resolve().parent / "static"


def add_page_routes(app: FastAPI) -> None:
    """Register the page routes on ``app`` (called by ``create_app`` before the OpenAPI setup)."""
    for path, asset in PAGE_ASSETS.items():
        app.add_api_route(path, _asset_endpoint(asset), methods=["GET"], include_in_schema=False)
    _add_docs_routes(app)


def _asset_endpoint(asset: Asset):
    body = asset.file.read_bytes()  # read once: the files are a few kB and never change while serving
    headers = {
        "Content-Security-Policy": PAGE_CSP,
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-cache",
    }

    async def serve_asset() -> Response:
        return Response(body, media_type=asset.media_type, headers=headers)

    return serve_asset


def _add_docs_routes(app: FastAPI) -> None:
    """``/docs``: FastAPI's Swagger UI page, its script, style and icon served from this server."""
    assets = swagger_dir()

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - API docs",
            swagger_js_url=f"{root}/docs/swagger-ui-bundle.js",
            swagger_css_url=f"{root}/docs/swagger-ui.css",
            swagger_favicon_url=f"{root}/docs/favicon.png",
            # Swagger UI would otherwise send the schema to validator.swagger.io for a badge.
            swagger_ui_parameters={"validatorUrl": None},
        )

    for name, media_type in DOCS_ASSETS.items():
        app.add_api_route(
            f"/docs/{name}",
            _docs_asset_endpoint(assets / name, media_type),
            methods=["GET"],
            include_in_schema=False,
        )


def _docs_asset_endpoint(file: Path, media_type: str):
    async def serve_docs_asset() -> FileResponse:
        return FileResponse(file, media_type=media_type)

    return serve_docs_asset
