"""Turning package files into corpus documents: licence blocks out, markup to text.

Licence and copyright boilerplate is removed from every document, so that no licence text reaches the
training mix (the common-licenses texts are held out for evaluation; near-copies of them in file headers
would leak that domain).
"""

from __future__ import annotations

import gzip
import re
import subprocess
from html.parser import HTMLParser
from pathlib import Path

LICENSE_WORDS = re.compile(r"licen[cs]e|copyright|warrant|\(c\)|redistribut|SPDX", re.IGNORECASE)
LICENSE_FILE = re.compile(r"^(licen[cs]e|copying|copyright|notice|authors|patents)", re.IGNORECASE)

# a run of `//` lines, or one /* ... */ block
_C_COMMENT = re.compile(r"(?:^[ \t]*//[^\n]*\n)+|/\*.*?\*/", re.MULTILINE | re.DOTALL)
# a run of `#` lines (Perl, shell, YAML)
_HASH_COMMENT = re.compile(r"(?:^[ \t]*#[^\n]*\n)+", re.MULTILINE)
# a POD section about licence, copyright or authorship, up to the next =head1 or =cut
_POD_LICENSE = re.compile(r"^=head1[ \t]+(?:[A-Z ]*)(?:LICEN[CS]E|COPYRIGHT|AUTHORS?)[^\n]*\n.*?(?=^=head1|^=cut|\Z)",
                          re.MULTILINE | re.DOTALL)
# a man page section about licence, copyright or the colophon, up to the next section heading
_MAN_LICENSE = re.compile(r"^(?:COPYRIGHT|LICEN[CS]E|COLOPHON)[^\n]*\n.*?(?=^[A-Z][A-Z ]+\n|\Z)",
                          re.MULTILINE | re.DOTALL)


def _drop_matching(pattern: re.Pattern, text: str) -> str:
    return pattern.sub(lambda m: "" if LICENSE_WORDS.search(m.group(0)) else m.group(0), text)


def clean_code(text: str, language: str) -> str:
    """Source code without the comment blocks that carry licence or copyright text."""
    if language in ("c", "cpp", "javascript", "typescript"):
        text = _drop_matching(_C_COMMENT, text)
    elif language == "perl":
        text = _POD_LICENSE.sub("", text)
        text = _drop_matching(_HASH_COMMENT, text)
    return _tidy(text)


def clean_man(text: str) -> str:
    return _tidy(_MAN_LICENSE.sub("", text))


def _tidy(text: str) -> str:
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{4,}", "\n\n\n", text).strip() + "\n"


def read_text(path: Path) -> str | None:
    """A file's text (gunzipped where it ends in .gz), or None for bytes that are not UTF-8."""
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def render_man(path: Path, width: int = 80) -> str | None:
    """A man page rendered to plain text by man(1)/groff, as a reader sees it; None if it fails."""
    result = subprocess.run(["man", "-l", "-E", "UTF-8", "-P", "cat", str(path)], capture_output=True,
                            env={"MANWIDTH": str(width), "MAN_KEEP_FORMATTING": "0", "PATH": "/usr/bin:/bin",
                                 "LANG": "C.UTF-8"})
    if result.returncode != 0 or not result.stdout:
        return None
    text = result.stdout.decode("utf-8", errors="replace")
    text = re.sub(r".\x08", "", text)  # overstrike bold/underline, if any survived
    return clean_man(text)


class _HTMLText(HTMLParser):
    """Visible text of an HTML page: block elements end lines; scripts, styles and legal notices dropped."""

    BLOCKS = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "dt", "dd", "table",
              "section", "blockquote"}
    SKIP = {"script", "style", "head"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip_depth = 0
        self._stack: list[bool] = []  # per open element: does it start a skipped region
        self._pre = 0

    def handle_starttag(self, tag, attrs):
        classes = dict(attrs).get("class") or ""
        skip = tag in self.SKIP or "legalnotice" in classes or "navheader" in classes or "navfooter" in classes
        if tag in ("br", "img", "meta", "link", "hr", "input"):
            if tag == "br":
                self.parts.append("\n")
            return
        self._stack.append(skip)
        self._skip_depth += skip
        self._pre += tag == "pre"
        if tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in ("br", "img", "meta", "link", "hr", "input") or not self._stack:
            return
        self._skip_depth -= self._stack.pop()
        self._pre -= tag == "pre" and self._pre > 0
        if tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data):
        if self._skip_depth:
            return
        self.parts.append(data if self._pre else re.sub(r"\s+", " ", data))


def html_to_text(html: str) -> str:
    parser = _HTMLText()
    parser.feed(html)
    lines = (line.strip() if not line.startswith(" ") else line.rstrip() for line in "".join(parser.parts).split("\n"))
    return _tidy("\n".join(lines))
