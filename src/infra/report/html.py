"""HTML pieces for the report: every value is escaped here, and JSON placed in a script is
made inert (``<``, ``>``, ``&`` written as ``\\u003c`` ...), so text from specs, logs, events
or metrics can never become markup or script."""

from __future__ import annotations

import html
import json
import math
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Raw:
    """Markup built by this module (already escaped): passed through as it is."""

    markup: str


Cell = Raw | str | int | float | bool | None


def esc(value: object) -> str:
    """Text as HTML (quotes too, so it is safe in an attribute as well)."""
    return html.escape(str(value), quote=True)


def text_of(value: object) -> str:
    """A cell's text: empty for none, numbers short, everything else as ``str``."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return format(value, ".6g") if math.isfinite(value) else str(value)
    return str(value)


def cell_html(value: Cell) -> str:
    """One cell's markup: ``Raw`` as it is, anything else escaped."""
    return value.markup if isinstance(value, Raw) else esc(text_of(value))


def table(headers: Sequence[str], rows: Iterable[Sequence[Cell]],
          css: str = "grid") -> Raw:
    """A table: headers and cells escaped (except ``Raw`` cells)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell_html(c)}</td>" for c in row) + "</tr>\n"
                   for row in rows)
    return Raw(f'<table class="{esc(css)}"><thead><tr>{head}</tr></thead>'
               f"<tbody>\n{body}</tbody></table>")


def pairs(rows: Iterable[tuple[str, Cell]]) -> Raw:
    """A two-column key/value table."""
    body = "".join(f"<tr><th>{esc(k)}</th><td>{cell_html(v)}</td></tr>\n" for k, v in rows)
    return Raw(f'<table class="kv"><tbody>\n{body}</tbody></table>')


def note(text: str) -> Raw:
    """A short remark under a section (escaped)."""
    return Raw(f'<p class="note">{esc(text)}</p>')


def section(anchor: str, title: str, *parts: Raw) -> Raw:
    """A titled section of the page."""
    inner = "\n".join(p.markup for p in parts)
    return Raw(f'<section id="{esc(anchor)}"><h2>{esc(title)}</h2>\n{inner}\n</section>')


_SCRIPT_UNSAFE = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026",
                                "\u2028": "\\u2028", "\u2029": "\\u2029"})


def script_json(doc: Any) -> str:
    """``doc`` as JSON that can sit inside ``<script>`` whatever its strings hold."""
    return json_text_for_script(json.dumps(doc, allow_nan=False, separators=(",", ":")))


def json_text_for_script(text: str) -> str:
    """Already-encoded JSON made inert in a script: ``<``, ``>``, ``&`` only ever occur
    inside JSON strings, where their ``\\uXXXX`` form means the same."""
    return text.translate(_SCRIPT_UNSAFE)


_CLOSE = re.compile(r"</(script)", re.IGNORECASE)


def inline_script(source: str) -> str:
    """A library's source as an inline ``<script>``; a ``</script`` or ``<!--`` in it (in a
    string or a comment) is written so that it cannot end the element early."""
    safe = _CLOSE.sub(r"<\\/\1", source).replace("<!--", "<\\!--")
    return f"<script>{safe}</script>"


def utc(at: float | None) -> str:
    """An epoch time as ``YYYY-MM-DD HH:MM:SS`` UTC (empty for none)."""
    if at is None:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(at))


def utc_ms(at: float) -> str:
    """An epoch time as plotly reads a date (UTC, milliseconds)."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(at)) + f".{int(at * 1000) % 1000:03d}"


def duration(seconds: float | None) -> str:
    """Seconds as ``1h02m03s`` / ``2m03s`` / ``4.2s`` (empty for none)."""
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    h, rest = divmod(whole, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def size(n: float | None) -> str:
    """Bytes as MiB / GiB (empty for none)."""
    if n is None:
        return ""
    if n >= 1 << 30:
        return f"{n / (1 << 30):.2f} GiB"
    return f"{n / (1 << 20):.1f} MiB"
