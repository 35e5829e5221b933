"""The service's page: the static files of ``downloader/web/``, served as they are."""

from __future__ import annotations

import mimetypes
from pathlib import Path

from aiohttp import web

from ..storage import is_component

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".json": "application/json",
}

routes = web.RouteTableDef()


def _page_file(name: str) -> web.FileResponse:
    """A file directly in WEB_DIR, by name; nothing else (no folders, no hidden files)."""
    files = {p.name: p for p in WEB_DIR.iterdir() if p.is_file()} if WEB_DIR.is_dir() else {}
    path = files.get(name)
    if path is None or not is_component(name):
        raise web.HTTPNotFound()
    kind = _TYPES.get(path.suffix) or mimetypes.guess_type(name)[0] or "application/octet-stream"
    headers = {"Content-Type": kind, "X-Content-Type-Options": "nosniff"}
    return web.FileResponse(path, headers=headers)


@routes.get("/")
async def index(request: web.Request) -> web.FileResponse:
    return _page_file("index.html")


@routes.get("/web/{name}")
async def web_file(request: web.Request) -> web.FileResponse:
    return _page_file(request.match_info["name"])
