"""Markdown to HTML with highlighted code blocks and their copy links."""

from __future__ import annotations

import pytest

from app.markdown_render import DARK, render


def test_code_blocks_are_highlighted_and_get_copy_links() -> None:
    text = "Use **this**:\n\n```python\nx = 1\n```\n\nthen `y`\n\n```\nraw\n```"
    result = render(text, anchor_prefix="copy-code:m1:")
    assert [b.code for b in result.code_blocks] == ["x = 1", "raw"]
    assert [b.language for b in result.code_blocks] == ["python", ""]
    assert 'href="copy-code:m1:0"' in result.html and 'href="copy-code:m1:1"' in result.html
    assert "<strong>this</strong>" in result.html and "<code>y</code>" in result.html
    assert "<span style=" in result.html, "pygments inline colours"


def test_an_unclosed_fence_while_streaming_is_still_code() -> None:
    result = render("Start:\n```js\nlet a = 1;\nlet b")
    assert [b.code for b in result.code_blocks] == ["let a = 1;\nlet b"]


def test_dark_palette_changes_code_background() -> None:
    assert DARK.code_background in render("```\nx\n```", DARK).html


@pytest.mark.parametrize(
    ("text", "unwanted"),
    [
        ("<script>alert(1)</script> hi", "<script"),
        ('a <b onmouseover="x">bold</b>', "<b "),
        ("<div>\nblock\n</div>", "<div"),
        ('<img src="file:///etc/passwd">', "<img"),
        ("<table><tr><td>fake ui</td></tr></table>", "<table"),
    ],
)
def test_raw_html_in_a_message_is_shown_as_text(text: str, unwanted: str) -> None:
    out = render(text).html
    assert unwanted not in out
    assert "&lt;" in out  # the tag is visible as text


def test_links_keep_web_schemes_only_and_images_become_their_alt_text() -> None:
    out = render(
        "[run](edit:42) [copy](copy-msg:1) [web](https://example.org) ![cat](file:///a.png)"
    ).html
    assert 'href="https://example.org"' in out
    assert "edit:" not in out and "copy-msg:" not in out and "file:" not in out
    assert "cat" in out and "<img" not in out
    assert "<strong>b</strong>" in render("x < y and **b**").html  # markdown still works
