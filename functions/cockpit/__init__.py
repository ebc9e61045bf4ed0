"""The cockpit: a static web page (HTML, CSS, JavaScript; no build step, no CDN) served at `/`."""

from __future__ import annotations

from pathlib import Path

STATIC_DIR = Path(__file__).parent / "static"


def routes(settings=None) -> list:
    """Routes to append after the stream app's API routes."""
    from starlette.routing import Mount
    from starlette.staticfiles import StaticFiles

    return [Mount("/", app=StaticFiles(directory=STATIC_DIR, html=True), name="cockpit")]
