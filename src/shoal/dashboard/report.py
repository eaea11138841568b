"""One self-contained HTML file of a run directory, for papers and tickets.

The report is the dashboard's own page (``static/index.html``, ``app.js``, ``app.css``) with
uPlot, the styles, the script and the run's state inlined: it opens from a file, offline, and
shows the same charts and tables as the live dashboard (every page at once, no buttons).
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path

from shoal.dashboard.app import STATIC
from shoal.dashboard.replay import RunDirFollower
from shoal.errors import DataError

__all__ = ["render_report", "write_report"]

_ASSETS = {  # the page's reference -> the file inlined in its place
    '<link rel="stylesheet" href="/static/vendor/uPlot.min.css">': ("style",
                                                                    "vendor/uPlot.min.css"),
    '<link rel="stylesheet" href="/static/app.css">': ("style", "app.css"),
    '<script src="/static/vendor/uPlot.iife.min.js" defer></script>': (
        "script", "vendor/uPlot.iife.min.js"),
    '<script src="/static/app.js" defer></script>': ("script", "app.js"),
}


def _inline(tag: str, text: str) -> str:
    # nothing in the inlined text may close its element early
    closing = f"</{tag}"
    if closing in text.lower():
        text = text.replace(closing, f"<\\/{tag}").replace(closing.upper(), f"<\\/{tag}")
    return f"<{tag}>{text}</{tag}>"


def render_report(run_dir: str | Path, summary: Sequence[str] = ()) -> str:
    """The report of ``run_dir`` as one HTML document.

    Args:
        run_dir: the run directory.
        summary: lines of text shown first (``shoal report`` passes the run's summary as
            ``shoal run`` printed it).

    Raises:
        DataError: not a run directory, or a malformed ``metrics.jsonl`` line.
    """
    follower = RunDirFollower(run_dir)
    page = (STATIC / "index.html").read_text()
    for ref, (tag, name) in _ASSETS.items():
        if ref not in page:
            raise DataError(f"the dashboard page no longer references {name} as the report "
                            f"expects", path=str(STATIC / "index.html"))
        page = page.replace(ref, _inline(tag, (STATIC / name).read_text()))
    state = json.dumps(follower.state.snapshot(), allow_nan=False).replace("</", "<\\/")
    data = f'<script type="application/json" id="shoal-data">{state}</script>'
    page = page.replace("</head>", f"{data}\n</head>", 1)
    title = html.escape(f"shoal report: {follower.run_dir.name}")
    page = page.replace("<title>shoal dashboard</title>", f"<title>{title}</title>", 1)
    if summary:
        text = html.escape("\n".join(line.rstrip() for line in summary).strip("\n"))
        page = page.replace("<main>", f'<main>\n  <section id="summary"><h2>Summary</h2>'
                            f"<pre>{text}</pre></section>", 1)
    return page


def write_report(run_dir: str | Path, out: str | Path, summary: Sequence[str] = ()) -> Path:
    """Write :func:`render_report` to ``out``; returns its path."""
    path = Path(out)
    path.write_text(render_report(run_dir, summary))
    return path
