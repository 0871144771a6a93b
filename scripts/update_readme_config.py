"""Regenerate the README's config reference table from plait/config.py (``make docs``)."""

import pathlib

from plait.config import reference_markdown

readme = pathlib.Path(__file__).resolve().parents[1] / "README.md"
text = readme.read_text()
start, end = "<!-- config-reference:start -->\n", "\n<!-- config-reference:end -->"
head, rest = text.split(start, 1)
_, tail = rest.split(end, 1)
readme.write_text(head + start + reference_markdown() + end + tail)
