"""What every page shares: the Jinja2 environment (autoescaping), its filters, `render`, forms.

The pages themselves are the `pages_*` routers; the app that holds them is `app.py`.
"""

from __future__ import annotations

import urllib.parse
from pathlib import Path
from typing import Any

import jinja2
from fastapi import Request
from fastapi.responses import HTMLResponse

from tuneforge import __version__
from tuneforge.ui.security import CSRF_FIELD

HERE = Path(__file__).parent
NAV = [
    ("/new", "New run"),
    ("/data", "Data"),
    ("/runs", "Runs"),
    ("/compare", "Compare"),
    ("/chat", "Chat"),
    ("/feedback", "Feedback"),
    ("/export", "Export"),
]


def _number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        if abs(value) >= 100:
            return f"{value:.1f}"
        return f"{value:.{digits}f}" if abs(value) >= 1e-3 else f"{value:.{digits}g}"
    return str(value)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,  # every value is HTML-escaped unless a template says otherwise
        undefined=jinja2.StrictUndefined,
    )
    env.filters["num"] = _number
    env.filters["duration"] = _duration
    env.filters["q"] = lambda value: urllib.parse.quote(str(value), safe="/")
    return env


def render(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
    app = request.app
    html = app.state.templates.get_template(name).render(
        nav=NAV,
        path=request.url.path,
        csrf=app.state.keys.csrf,
        csrf_field=CSRF_FIELD,
        version=__version__,
        workspace=str(app.state.ws.root),
        **context,
    )
    return HTMLResponse(html, status_code=status)


async def form_data(request: Request) -> dict[str, str]:
    """An urlencoded form body (the Guard already checked its CSRF field); the last value wins."""
    body = (await request.body()).decode("utf-8", "replace")
    return dict(urllib.parse.parse_qsl(body, keep_blank_values=True))
