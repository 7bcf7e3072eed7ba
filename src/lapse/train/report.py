"""``report.html``: the training report as one self-contained page, plots embedded.

:func:`report_html` renders the Markdown that ``lapse train`` writes to
``report.md`` (headings, paragraphs, bullet lists, pipe tables, ``**bold**``,
`` `code` `` and image links) and embeds every linked PNG of the report folder
as a base64 ``data:`` URI, so the page opens anywhere (a browser, an MLflow
artifact view, an e-mail) without its folder. It renders that Markdown only;
it is not a general Markdown converter.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path
from typing import Final

__all__ = ["report_html"]

_IMAGE: Final = re.compile(r"^!\[(?P<alt>[^\]]*)\]\((?P<src>[^)\s]+)\)$")
_BOLD: Final = re.compile(r"\*\*(.+?)\*\*")
_CODE: Final = re.compile(r"`([^`]+)`")
_CELL_SPLIT: Final = re.compile(r"(?<!\\)\|")
_RULE: Final = re.compile(r"^\|(\s*:?-+:?\s*\|)+$")
_STYLE: Final = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto;
       padding: 0 1rem; line-height: 1.45; color: #222; }
table { border-collapse: collapse; margin: 0.5rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.2rem 0.5rem; text-align: right; }
th:first-child, td:first-child { text-align: left; }
img { max-width: 100%; display: block; margin: 0.5rem 0 1rem; }
code { background: #f3f3f3; padding: 0 0.2rem; }
"""


def _inline(text: str) -> str:
    out = html.escape(text, quote=False)
    out = _CODE.sub(r"<code>\1</code>", out)
    return _BOLD.sub(r"<strong>\1</strong>", out)


def _cells(line: str) -> list[str]:
    inner = line.strip().removeprefix("|").removesuffix("|")
    return [c.strip().replace("\\|", "|") for c in _CELL_SPLIT.split(inner)]


def _table(lines: list[str]) -> str:
    rows = [_cells(line) for line in lines if not _RULE.match(line.strip())]
    head = "".join(f"<th>{_inline(c)}</th>" for c in rows[0])
    body = "".join(
        "<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in rows[1:]
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _image(alt: str, src: str, folder: Path) -> str:
    path = folder / src
    if path.suffix.lower() != ".png" or not path.is_file():
        return f"<p>{_inline(alt)} ({html.escape(src)}: not found)</p>"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _blocks(markdown: str) -> list[list[str]]:
    """Consecutive lines of one kind (table rows, list items, text) grouped; blank lines split."""
    blocks: list[list[str]] = []
    kind = ""
    for line in markdown.splitlines():
        text = line.strip()
        now = "" if not text else "|" if text.startswith("|") else "-" if text[:2] == "- " else "p"
        if text.startswith(("#", "![")):
            now = "single"
        if now and (now != kind or now == "single"):
            blocks.append([])
        if now:
            blocks[-1].append(text)
        kind = now
    return blocks


def report_html(markdown: str, folder: Path, *, title: str) -> str:
    """``markdown`` (a ``report.md``) as a self-contained HTML page; images linked as
    ``![alt](file.png)`` on their own line are read from ``folder`` and embedded."""
    parts: list[str] = []
    for block in _blocks(markdown):
        first = block[0]
        if first.startswith("#"):
            level = min(len(first) - len(first.lstrip("#")), 6)
            parts.append(f"<h{level}>{_inline(first[level:].strip())}</h{level}>")
        elif (image := _IMAGE.match(first)) is not None:
            parts.append(_image(image["alt"], image["src"], folder))
        elif first.startswith("|"):
            parts.append(_table(block))
        elif first.startswith("- "):
            items = "".join(f"<li>{_inline(line[2:])}</li>" for line in block)
            parts.append(f"<ul>{items}</ul>")
        else:
            parts.append(f"<p>{_inline(' '.join(block))}</p>")
    body = "\n".join(parts)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n"
        f"<body>\n{body}\n</body>\n</html>\n"
    )
