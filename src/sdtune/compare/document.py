"""A tiny document model rendered twice: markdown (images linked as files) and self-contained HTML (images
embedded as data URIs), so report.md and report.html always say the same thing."""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass

CODE = re.compile(r"`([^`]+)`")
BOLD = re.compile(r"\*\*([^*]+)\*\*")


@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Paragraph:
    text: str  # may hold `code` and **bold**


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Figure:
    alt: str
    file: str  # path relative to the report, where the PNG is also written
    png: bytes


@dataclass
class Code:
    text: str


Block = Heading | Paragraph | Bullets | Table | Figure | Code


def to_markdown(blocks: list[Block]) -> str:
    out = []
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"{'#' * block.level} {block.text}")
        elif isinstance(block, Paragraph):
            out.append(block.text)
        elif isinstance(block, Bullets):
            out.append("\n".join(f"- {item}" for item in block.items))
        elif isinstance(block, Table):
            lines = [block.header, ["---"] * len(block.header), *block.rows]
            out.append("\n".join("| " + " | ".join(c.replace("|", "\\|") for c in line) + " |" for line in lines))
        elif isinstance(block, Figure):
            out.append(f"![{block.alt}]({block.file})")
        elif isinstance(block, Code):
            out.append(f"```\n{block.text}\n```")
    return "\n\n".join(out) + "\n"


def _inline(text: str) -> str:
    """Escaped text with `code` and **bold** turned into tags."""
    escaped = html.escape(text)
    return BOLD.sub(r"<strong>\1</strong>", CODE.sub(r"<code>\1</code>", escaped))


STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 8px;
text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
img{max-width:100%;display:block;margin:1em 0}code,pre{background:#f6f6f6;font-size:12px}pre{padding:8px;
overflow-x:auto}"""


def to_html(blocks: list[Block], title: str) -> str:
    out = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
           f"<style>{STYLE}</style></head><body>"]
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"<h{block.level}>{_inline(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            out.append(f"<p>{_inline(block.text)}</p>")
        elif isinstance(block, Bullets):
            out.append("<ul>" + "".join(f"<li>{_inline(item)}</li>" for item in block.items) + "</ul>")
        elif isinstance(block, Table):
            head = "".join(f"<th>{_inline(c)}</th>" for c in block.header)
            body = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in block.rows)
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif isinstance(block, Figure):
            data = base64.b64encode(block.png).decode("ascii")
            out.append(f"<img alt=\"{html.escape(block.alt)}\" src=\"data:image/png;base64,{data}\">")
        elif isinstance(block, Code):
            out.append(f"<pre>{html.escape(block.text)}</pre>")
    out.append("</body></html>\n")
    return "\n".join(out)
