"""The corpus builder's text rules: licence blocks out, other comments kept, markup to text, the leak check."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "corpus"))

from clean import LICENSE_FILE, clean_code, clean_man, html_to_text  # noqa: E402
from leaks import SHINGLE_WORDS, ReservedText  # noqa: E402


def test_c_licence_comments_removed_other_comments_kept():
    source = (
        "// Copyright (c) 2001 Someone.\n// Distributed under the Boost Software License, Version 1.0.\n"
        "#include <vector>\n/* Permission is hereby granted, free of charge, without warranty */\n"
        "// keep: the fast path for small buffers\nint f() { return 1; /* inline note */ }\n"
    )
    out = clean_code(source, "cpp")
    assert "Copyright" not in out and "warranty" not in out and "Boost Software License" not in out
    assert "// keep: the fast path for small buffers" in out and "/* inline note */" in out
    assert "#include <vector>" in out and "int f()" in out


def test_perl_pod_licence_and_hash_licence_removed():
    source = (
        "# This library is free software; you can redistribute it under the same terms as Perl.\n"
        "package Foo;\n# a helper comment\nsub bar { 1 }\n"
        "=head1 NAME\n\nFoo - does things\n\n=head1 COPYRIGHT AND LICENSE\n\nCopyright 2004 Jane.\n\n"
        "=head1 SEE ALSO\n\nBar\n\n=cut\n"
    )
    out = clean_code(source, "perl")
    assert "redistribute" not in out and "Copyright 2004" not in out
    assert "# a helper comment" in out and "=head1 NAME" in out and "=head1 SEE ALSO" in out


def test_man_copyright_section_removed():
    page = "NAME\n       ls - list\n\nCOPYRIGHT\n       Copyright 2020 FSF. License GPLv3+.\n\nSEE ALSO\n       dir(1)\n"
    out = clean_man(page)
    assert "GPLv3" not in out and "SEE ALSO" in out and "ls - list" in out


def test_html_to_text_drops_legal_notice_and_scripts():
    html = ("<html><head><title>t</title></head><body><div class='legalnotice'>Licensed under GPL</div>"
            "<h1>Packages</h1><p>APT   installs\npackages.</p><script>x()</script><pre>  apt  install x\n</pre></body>")
    out = html_to_text(html)
    assert "GPL" not in out and "x()" not in out
    assert "Packages" in out and "APT installs packages." in out and "  apt  install x" in out


@pytest.mark.parametrize("name,excluded", [("LICENSE", True), ("COPYING.LIB", True), ("copyright", True),
                                           ("NOTICE.txt", True), ("license_util.hpp", True), ("vector.hpp", False)])
def test_licence_file_names(name, excluded):
    assert bool(LICENSE_FILE.match(name)) is excluded


def test_leak_check_finds_a_shared_run_of_words(tmp_path):
    reserved_text = " ".join(f"w{i}" for i in range(40))
    path = tmp_path / "reserved.txt"
    path.write_text(reserved_text)
    reserved = ReservedText([path])
    reserved.shingles |= {hash(tuple(reserved_text.split()[i:i + SHINGLE_WORDS])) for i in range(40 - SHINGLE_WORDS + 1)}
    run = " ".join(f"w{i}" for i in range(10, 10 + SHINGLE_WORDS))
    assert reserved.leaks(f"some prefix {run} and a tail")
    short = " ".join(f"w{i}" for i in range(10, 10 + SHINGLE_WORDS - 1))
    assert not reserved.leaks(f"some prefix {short} and a tail")
