"""Documents built from data: a report is a list of typed blocks, each rendered to Markdown and to HTML.

Why data, not text: the HTML report used to be made by parsing the Markdown it was written as, so every table
cell was text that a converter had to split again (a `|` in a model name could shift a column). Now tables,
headings and figures are objects (pydantic, saved as JSON beside the Markdown), and both renderings come from the
same objects, so they cannot disagree and nothing is parsed back. Inline text keeps two marks, `code` and
**bold**, which both renderers understand.

The HTML page is self-contained: styles are inline and every figure is embedded as a base64 PNG, but only a PNG
inside the run folder (a figure reference never leaks a local file into a shared page).
"""

from __future__ import annotations

import base64
import html
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, Field

from safeunits.io import read_json, write_json, write_text

DOCUMENT_SUFFIX = ".doc.json"  # a Document's data beside its Markdown rendering (`<stem>.md`)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1100px;
       padding: 0 1rem; color: #1b1b1b; line-height: 1.45; }
h1 { border-bottom: 2px solid #d62728; padding-bottom: .3rem; }
h2 { margin-top: 2.2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 1rem 0; font-size: .9rem; }
th, td { border: 1px solid #ccc; padding: .25rem .55rem; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr:nth-child(even) td { background: #fafafa; }
code, pre { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: .85rem; }
pre { background: #f6f6f6; padding: .8rem; overflow-x: auto; border: 1px solid #e4e4e4; }
figure { margin: 1rem 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: .85rem; }
"""


def md_cell(text: Any) -> str:
    """Text safe inside one Markdown table cell: `|` escaped, line breaks as spaces (a label cannot shift columns)."""
    return " ".join(str(text).splitlines()).replace("|", "\\|")


def inline_html(text: str) -> str:
    """Inline text as HTML: escaped, with `code` and **bold** marked up."""
    out = html.escape(text, quote=False)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)


class Heading(BaseModel):
    kind: Literal["heading"] = "heading"
    level: int = Field(ge=1, le=6)
    text: str

    def markdown(self) -> str:
        return "#" * self.level + " " + self.text

    def html(self, base: Path) -> str:
        return f"<h{self.level}>{inline_html(self.text)}</h{self.level}>"


class Paragraph(BaseModel):
    kind: Literal["text"] = "text"
    text: str

    def markdown(self) -> str:
        return self.text

    def html(self, base: Path) -> str:
        return "<p>" + inline_html(" ".join(self.text.splitlines())) + "</p>"


class Bullets(BaseModel):
    kind: Literal["bullets"] = "bullets"
    items: list[str]

    def markdown(self) -> str:
        return "\n".join(f"- {' '.join(item.splitlines())}" for item in self.items)

    def html(self, base: Path) -> str:
        return "<ul>" + "".join(f"<li>{inline_html(item)}</li>" for item in self.items) + "</ul>"


class Code(BaseModel):
    kind: Literal["code"] = "code"
    text: str
    language: str = ""

    def markdown(self) -> str:
        return f"```{self.language}\n{self.text.rstrip()}\n```"

    def html(self, base: Path) -> str:
        return "<pre><code>" + html.escape(self.text.rstrip()) + "</code></pre>"


class Figure(BaseModel):
    """A figure file, relative to the folder the document is rendered for."""

    kind: Literal["figure"] = "figure"
    path: str
    caption: str

    def markdown(self) -> str:
        return f"![{self.caption}]({self.path})"

    def html(self, base: Path) -> str:
        """Embedded only when it is a PNG inside `base` (a link out of the folder, `/etc/hostname`, a symlink
        elsewhere stays text, so a shared page leaks no file)."""
        path = (base / self.path).resolve()
        if not path.is_relative_to(base.resolve()):
            return f"<p>{inline_html(self.markdown())} <em>(not embedded: only figures inside the run folder are)</em></p>"
        if not path.is_file():
            return f"<p><em>figure missing: {html.escape(self.path)}</em></p>"
        with path.open("rb") as fh:
            if fh.read(len(PNG_SIGNATURE)) != PNG_SIGNATURE:
                return f"<p>{inline_html(self.markdown())} <em>(not embedded: not a PNG figure)</em></p>"
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        return (f"<figure><img alt=\"{html.escape(self.caption)}\" src=\"data:image/png;base64,{data}\">"
                f"<figcaption>{inline_html(self.caption)}</figcaption></figure>")


ColumnFormat = Union[str, Callable[[Any], str]]


class Table(BaseModel):
    """Rows of text cells under named columns; `numeric` columns are right-aligned."""

    kind: Literal["table"] = "table"
    columns: list[str]
    rows: list[list[str]] = []
    numeric: list[bool] = []  # per column; missing entries: left-aligned

    @classmethod
    def from_rows(cls, rows: list[dict[str, Any]], columns: list[tuple[str, str, ColumnFormat]], *,
                  missing: str = "") -> Table:
        """Result rows as a table: (key, header, format) columns; format '%' shows fractions x100, a format spec
        applies `format`, a callable renders the value itself; absent values show `missing`."""
        def cell(value: Any, fmt: ColumnFormat) -> str:
            if value is None:
                return missing
            if callable(fmt):
                return fmt(value)
            if fmt == "%":
                return f"{100 * value:.1f}"
            return format(value, fmt) if fmt else str(value)

        return cls(columns=[h for _, h, _ in columns], rows=[[cell(r.get(k), f) for k, _, f in columns] for r in rows])

    def _right(self, i: int) -> bool:
        return i < len(self.numeric) and self.numeric[i]

    def markdown(self) -> str:
        head = "| " + " | ".join(map(md_cell, self.columns)) + " |"
        sep = "|" + "".join("---:|" if self._right(i) else "---|" for i in range(len(self.columns)))
        return "\n".join([head, sep] + ["| " + " | ".join(map(md_cell, row)) + " |" for row in self.rows])

    def html(self, base: Path) -> str:
        out = ["<table>", "<thead><tr>" + "".join(f"<th>{inline_html(c)}</th>" for c in self.columns) + "</tr></thead>",
               "<tbody>"]
        for row in self.rows:
            out.append("<tr>" + "".join(f"<td class=\"num\">{inline_html(c)}</td>" if self._right(i)
                                        else f"<td>{inline_html(c)}</td>" for i, c in enumerate(row)) + "</tr>")
        return "\n".join(out + ["</tbody>", "</table>"])


Block = Annotated[Union[Heading, Paragraph, Bullets, Code, Figure, Table], Field(discriminator="kind")]


class Document(BaseModel):
    """An ordered list of blocks; `markdown()` and `html()` render the same data."""

    blocks: list[Block] = []

    def add(self, *blocks: Block | Document | None) -> Document:
        """Append blocks (a Document's blocks are spliced in; None is skipped); returns self to chain."""
        for block in blocks:
            if isinstance(block, Document):
                self.blocks.extend(block.blocks)
            elif block is not None:
                self.blocks.append(block)
        return self

    def demoted(self, by: int, *, figures_under: str | None = None) -> Document:
        """This document inside another: headings `by` levels deeper (at most h6); figure paths prefixed by the
        folder the document lives in, relative to the outer document's folder."""
        blocks = []
        for b in self.blocks:
            if isinstance(b, Heading):
                b = b.model_copy(update={"level": min(b.level + by, 6)})
            elif isinstance(b, Figure) and figures_under:
                b = b.model_copy(update={"path": Path(figures_under, b.path).as_posix()})
            blocks.append(b)
        return Document(blocks=blocks)

    def markdown(self) -> str:
        return "\n\n".join(b.markdown() for b in self.blocks) + "\n"

    def html(self, base: str | os.PathLike, title: str) -> str:
        """A self-contained page; figures are embedded from inside `base` only."""
        body = "\n".join(b.html(Path(base)) for b in self.blocks)
        return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
                f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
                + body + "\n</body>\n</html>\n")

    def write(self, folder: str | os.PathLike, stem: str) -> str:
        """`<stem>.md` (for readers) and `<stem>.doc.json` (the data a report embeds) in `folder`; returns the
        data file's name."""
        folder = Path(folder)
        write_text(folder / f"{stem}.md", self.markdown())
        write_json(folder / f"{stem}{DOCUMENT_SUFFIX}", self.model_dump(mode="json"))
        return f"{stem}{DOCUMENT_SUFFIX}"

    @classmethod
    def load(cls, path: str | os.PathLike) -> Document:
        return cls.model_validate(read_json(path))
