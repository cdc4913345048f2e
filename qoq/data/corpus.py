"""The project's English text corpus: the prose of the Python documentation.

No package carries WikiText-2, so qoq uses the reStructuredText sources of the CPython
documentation that Debian ships (`python3-doc`, PSF License 2.0): the tutorial, HOWTOs, FAQ and
language reference are modern technical English prose, about 0.8M tokens with SmolLM2's tokenizer
after markup and code are stripped. Splits are disjoint by document: "eval" for perplexity,
"calib" for quantization calibration.
"""

from __future__ import annotations

import glob
import os
import re
from functools import lru_cache
from pathlib import Path

SPLITS = {
    "eval": ("tutorial", "faq", "reference"),
    "calib": ("howto", "whatsnew"),
}
_KEEP_DIRECTIVES = {"note", "warning", "tip", "important", "seealso", "attention", "caution", "hint"}
_ROLE = re.compile(r":[\w-]+(?::[\w-]+)?:`([^`]*)`")
_LINK = re.compile(r"`([^`<]*?)\s*<[^`>]*>`_{1,2}")
_INLINE = [
    (re.compile(r"``([^`]*)``"), r"\1"),
    (re.compile(r"`([^`]*)`_{0,2}"), r"\1"),
    (re.compile(r"\*\*([^*]+)\*\*"), r"\1"),
    (re.compile(r"(?<![\w*])\*([^*\s][^*]*)\*(?![\w*])"), r"\1"),
    (re.compile(r"\|([\w-]+)\|"), r"\1"),
    (re.compile(r"\s*\[#\w*\]_"), ""),
]
_UNDERLINE = re.compile(r"^([=\-~^*#+`'\".:_])\1{2,}\s*$")


class CorpusError(RuntimeError):
    pass


def docs_source_dir() -> Path:
    """Locate the documentation sources: $QOQ_CORPUS_DIR, else the newest /usr/share/doc/python3*."""
    if os.environ.get("QOQ_CORPUS_DIR"):
        return Path(os.environ["QOQ_CORPUS_DIR"])
    found = sorted(
        glob.glob("/usr/share/doc/python3*/html/_sources"),
        key=lambda p: [int(x) for x in re.findall(r"\d+", p)],
    )
    if not found:
        raise CorpusError(
            "the text corpus needs Debian's python3-doc package: apt-get install python3-doc "
            "(or point QOQ_CORPUS_DIR at a folder of .rst/.txt files)"
        )
    return Path(found[-1])


def _role_text(match: re.Match) -> str:
    text = match.group(1)
    text = re.sub(r"\s*<[^>]*>$", "", text)  # :ref:`title <target>` -> title
    return text.lstrip("~!").rsplit(".", 1)[-1] if text.startswith("~") else text.lstrip("!")


def _clean_inline(line: str) -> str:
    line = _ROLE.sub(_role_text, line)
    line = _LINK.sub(r"\1", line)
    for pattern, repl in _INLINE:
        line = pattern.sub(repl, line)
    return line.replace("\\", "")


def rst_to_prose(source: str) -> str:
    """Keep the paragraphs of a reST document; drop code, directives, tables and markup."""
    paragraphs: list[str] = []
    current: list[str] = []
    skip_indent: int | None = None  # inside a block we drop (code, directive body)
    literal_next = False  # the last paragraph ended in "::": a code block follows
    literal_indent = 0

    def flush() -> None:
        if current:
            text = " ".join(current).strip()
            if len(text.split()) >= 4:  # drop headings and stray fragments
                paragraphs.append(text)
            current.clear()

    for raw in source.splitlines():
        indent = len(raw) - len(raw.lstrip())
        stripped = raw.strip()
        if skip_indent is not None:
            if not stripped or indent > skip_indent:
                continue
            skip_indent = None
        if not stripped:
            flush()
            if literal_next:
                skip_indent, literal_next = literal_indent, False
            continue
        if stripped.startswith(".."):
            flush()
            name = re.match(r"\.\.\s+([\w-]+)::", stripped)
            if not (name and name.group(1) in _KEEP_DIRECTIVES):
                skip_indent = indent
            continue
        if _UNDERLINE.match(stripped) or stripped.startswith(("+-", "|", ">>>", "...", "$ ")):
            flush()
            continue
        if stripped.endswith("::"):
            literal_next = True
            literal_indent = indent
            stripped = stripped[:-2].rstrip() + (":" if not stripped.endswith(" ::") else "")
        current.append(_clean_inline(stripped.lstrip("*-# ") if stripped[:2] in ("* ", "- ", "#.") else stripped))
    flush()
    return "\n\n".join(p for p in paragraphs if p)


@lru_cache(maxsize=4)
def load_corpus(split: str = "eval") -> str:
    """The cleaned text of a split, documents in a fixed (sorted) order."""
    if split not in SPLITS:
        raise ValueError(f"unknown corpus split {split!r}: choose from {', '.join(SPLITS)}")
    root = docs_source_dir()
    files: list[Path] = []
    for section in SPLITS[split]:
        files += sorted((root / section).rglob("*.txt")) + sorted((root / section).rglob("*.rst"))
    if not files:
        raise CorpusError(f"{root} holds no documents for split {split!r} (looked in {', '.join(SPLITS[split])})")
    return "\n\n".join(rst_to_prose(f.read_text(encoding="utf-8", errors="replace")) for f in files)
