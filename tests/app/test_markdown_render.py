"""Markdown to HTML with highlighted code blocks and their copy links."""

from __future__ import annotations

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
