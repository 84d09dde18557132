"""Markdown to the HTML subset QTextBrowser shows, with Pygments-highlighted code blocks.

Fenced code blocks are cut out first (an unclosed fence while streaming counts as code to the
end), highlighted with inline styles, and returned with their raw text so the view can offer
a Copy link per block. Everything else goes through Python-Markdown. No Qt in here.

Messages are untrusted text (a model writes half of them): raw HTML in them is shown as text,
never passed to the view (``EscapeRawHtml``); links keep only web and mail schemes, so a
message cannot carry the view's own action links (``copy-msg:``, ``edit:``, ...); images
become their alt text, so a message cannot make the view load a local file.
"""

from __future__ import annotations

import html
import re
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from urllib.parse import urlsplit

import markdown
from markdown.extensions import Extension
from markdown.treeprocessors import Treeprocessor
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import TextLexer, get_lexer_by_name
from pygments.util import ClassNotFound

FENCE = re.compile(r"^```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)(?:^```[ \t]*$|\Z)", re.M | re.S)
SAFE_SCHEMES = frozenset({"http", "https", "mailto"})


def _safe_href(href: str) -> bool:
    return urlsplit(href.strip()).scheme.lower() in SAFE_SCHEMES


class _SafeLinks(Treeprocessor):
    """Links to other schemes lose their target; images become their alt text."""

    def run(self, root: ElementTree.Element) -> None:
        for element in root.iter():
            if element.tag == "a" and not _safe_href(element.get("href", "")):
                element.attrib.pop("href", None)
            elif element.tag == "img":
                alt = element.get("alt", "")
                element.tag, element.text = "span", alt
                element.attrib.clear()


class EscapeRawHtml(Extension):
    """Raw HTML blocks and inline tags are left as text, which the serializer escapes."""

    def extendMarkdown(self, md: markdown.Markdown) -> None:
        md.preprocessors.deregister("html_block")
        md.inlinePatterns.deregister("html")
        md.treeprocessors.register(_SafeLinks(md), "safe_links", 0)


MARKDOWN_EXTENSIONS: list[str | Extension] = ["tables", "sane_lists", "nl2br"]


@dataclass(frozen=True)
class CodeBlock:
    language: str
    code: str


@dataclass(frozen=True)
class Rendered:
    html: str
    code_blocks: tuple[CodeBlock, ...]


@dataclass(frozen=True)
class Palette:
    code_background: str
    code_border: str
    pygments_style: str
    link: str


LIGHT = Palette("#f4f6f8", "#d0d7de", "default", "#0b5cad")
DARK = Palette("#1e2227", "#3a4048", "monokai", "#6cb6ff")


def _lexer(language: str, code: str):  # type: ignore[no-untyped-def]
    try:
        return get_lexer_by_name(language) if language else TextLexer()
    except ClassNotFound:
        return TextLexer()


def highlight_code(code: str, language: str, palette: Palette) -> str:
    formatter = HtmlFormatter(noclasses=True, nowrap=True, style=palette.pygments_style)
    return highlight(code, _lexer(language, code), formatter)


def code_block_html(block: CodeBlock, anchor: str, palette: Palette) -> str:
    label = html.escape(block.language or "code")
    body = highlight_code(block.code, block.language, palette)
    return (
        f'<table width="100%" cellpadding="6" cellspacing="0" '
        f'bgcolor="{palette.code_background}" style="border: 1px solid {palette.code_border};">'
        f'<tr><td><span style="color: gray;">{label}</span> &nbsp; '
        f'<a href="{anchor}" style="color: {palette.link};">Copy</a></td></tr>'
        f'<tr><td><pre style="margin: 0;">{body}</pre></td></tr></table>'
    )


def markdown_html(text: str) -> str:
    extensions = [*MARKDOWN_EXTENSIONS, EscapeRawHtml()]
    return markdown.markdown(text, extensions=extensions, output_format="html")


def render(text: str, palette: Palette = LIGHT, anchor_prefix: str = "copy-code:") -> Rendered:
    """Render a message; code block ``i`` links to ``f"{anchor_prefix}{i}"``."""
    parts: list[str] = []
    blocks: list[CodeBlock] = []
    position = 0
    for match in FENCE.finditer(text):
        parts.append(markdown_html(text[position : match.start()]))
        block = CodeBlock(match.group(1), match.group(2).rstrip("\n"))
        parts.append(code_block_html(block, f"{anchor_prefix}{len(blocks)}", palette))
        blocks.append(block)
        position = match.end()
    parts.append(markdown_html(text[position:]))
    return Rendered("".join(parts), tuple(blocks))
