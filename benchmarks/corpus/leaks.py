"""The reserved evaluation texts, and a check that no training document shares a long run of words with them.

Reserved (never trained or tuned on): the licence texts of Debian's base-files package
(``/usr/share/common-licenses``) and CPython's standard-library sources. A document that shares any run of
``SHINGLE_WORDS`` whitespace-separated words with them is dropped from the training corpus.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

SHINGLE_WORDS = 12
COMMON_LICENSES = Path("/usr/share/common-licenses")


def cpython_stdlib() -> Path:
    """The running interpreter's standard-library folder (its top-level ``*.py`` files are reserved)."""
    return Path(sysconfig.get_paths()["stdlib"])


def reserved_files() -> list[Path]:
    licenses = sorted(p for p in COMMON_LICENSES.glob("*") if p.is_file() and not p.is_symlink())
    stdlib = sorted(cpython_stdlib().glob("*.py"))
    return licenses + stdlib


def _shingles(text: str) -> set[int]:
    words = text.split()
    return {hash(tuple(words[i:i + SHINGLE_WORDS])) for i in range(len(words) - SHINGLE_WORDS + 1)}


@dataclass
class ReservedText:
    files: list[Path]
    shingles: set[int] = field(default_factory=set)

    @classmethod
    def default(cls) -> ReservedText:
        files = reserved_files()
        if not files:
            raise FileNotFoundError(f"no reserved texts found ({COMMON_LICENSES}, {cpython_stdlib()}/*.py): "
                                    "the leak check would pass vacuously")
        reserved = cls(files)
        for path in files:
            reserved.shingles |= _shingles(path.read_text(encoding="utf-8", errors="replace"))
        return reserved

    def leaks(self, text: str) -> bool:
        words = text.split()
        return any(hash(tuple(words[i:i + SHINGLE_WORDS])) in self.shingles
                   for i in range(len(words) - SHINGLE_WORDS + 1))

    def describe(self) -> dict:
        return {"shingle_words": SHINGLE_WORDS, "files": len(self.files), "shingles": len(self.shingles),
                "roots": [str(COMMON_LICENSES), f"{cpython_stdlib()}/*.py"]}
