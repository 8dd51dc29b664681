"""The demo page at /demo (and / redirects there): plain HTML, CSS and JavaScript shipped in the
package (gateway/static/), with no build step and nothing loaded from elsewhere, so it works
offline. The page's own files hold no data and are served without a key; everything it shows
comes from the API (/v1/models, /v1/videos, /v1/chat/completions), which needs the key the user
types into the page once when keys are set.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent / "static"
# the page's files, open without a key (auth.py); listed one by one so that nothing else is
PAGE_PATHS = frozenset({"/", "/demo", "/demo/", "/demo/index.html", "/demo/demo.css", "/demo/demo.js"})
# the page loads only its own files, and decodes the chosen video from a blob: URL
CONTENT_SECURITY_POLICY = ("default-src 'self'; media-src 'self' blob:; img-src 'self' blob: data:; "
                           "object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


class PageFiles(StaticFiles):
    def file_response(self, *args, **kwargs):
        response = super().file_response(*args, **kwargs)
        response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response


def install_demo(app: FastAPI) -> None:
    app.mount("/demo", PageFiles(directory=STATIC_DIR, html=True), name="demo")

    @app.get("/", include_in_schema=False)
    async def front_page() -> RedirectResponse:
        return RedirectResponse("/demo/")
