#!/usr/bin/env python3
"""Extract a plain-text prose corpus from the HTML pages inside a Debian package.

usage: deb_to_text.py PACKAGE.deb HTML_DIR_IN_PACKAGE OUT.txt
  e.g. deb_to_text.py debian-handbook_11.20220922_all.deb usr/share/doc/debian-handbook/html/en-US handbook.txt

Reads the .deb directly (an `ar` archive holding data.tar.*), so it needs neither dpkg nor a
scratch folder. The pages directly in HTML_DIR are read in sorted file-name order; from each,
the text of every paragraph element (<p>, or <div class="para">) is kept, except text inside
<pre>, <table>, <script> or <style>. Runs of white space become one space, and paragraphs of
fewer than 8 words are dropped (captions, navigation). Paragraphs are separated by a blank line.
"""
import html.parser
import io
import posixpath
import re
import sys
import tarfile

SKIP = {"pre", "table", "script", "style"}


def ar_members(data):
    """(name, bytes) of each member of a System V `ar` archive (the .deb container)."""
    if data[:8] != b"!<arch>\n":
        raise ValueError("not an ar archive (a .deb starts with '!<arch>')")
    pos = 8
    while pos + 60 <= len(data):
        header = data[pos:pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        yield name, data[pos + 60:pos + 60 + size]
        pos += 60 + size + (size & 1)


class ParagraphText(html.parser.HTMLParser):
    """Collects paragraph text. The open elements form a stack; an end tag closes every
    element above the matching start tag too (HTML's implied ends), and closing a paragraph
    element emits the text gathered since the last emit."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.open = []  # (tag, is_paragraph)
        self.skipping = 0
        self.text = []
        self.paragraphs = []

    def handle_starttag(self, tag, attrs):
        is_para = tag == "p" or (tag == "div" and ("class", "para") in attrs)
        self.open.append((tag, is_para))
        self.skipping += tag in SKIP

    def handle_endtag(self, tag):
        while self.open:
            closed, is_para = self.open.pop()
            self.skipping -= closed in SKIP
            if is_para:
                self.emit()
            if closed == tag:
                return

    def handle_data(self, data):
        if not self.skipping and any(is_para for _, is_para in self.open):
            self.text.append(data)

    def emit(self):
        words = " ".join("".join(self.text).split())
        self.text = []
        if len(words.split(" ")) >= 8:
            self.paragraphs.append(words)


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    deb, html_dir, out = sys.argv[1], sys.argv[2].strip("/"), sys.argv[3]
    data = next((m for n, m in ar_members(open(deb, "rb").read()) if n.startswith("data.tar")), None)
    if data is None:
        sys.exit(f"{deb}: no data.tar.* member")
    pages = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for m in tar.getmembers():
            path = posixpath.normpath(m.name.lstrip("./"))
            if (m.isfile() or m.issym() or m.islnk()) and posixpath.dirname(path) == html_dir and path.endswith(".html"):
                pages[posixpath.basename(path)] = tar.extractfile(m).read()
    if not pages:
        sys.exit(f"{deb}: no .html pages in {html_dir}")
    paragraphs = []
    for name in sorted(pages):
        p = ParagraphText()
        p.feed(pages[name].decode("utf-8", errors="replace"))
        p.close()
        paragraphs += p.paragraphs
    with open(out, "w", encoding="utf-8") as f:
        f.write("\n\n".join(paragraphs) + "\n")
    chars = sum(map(len, paragraphs)) + 2 * (len(paragraphs) - 1) + 1
    print(f"{len(pages)} pages, {len(paragraphs)} paragraphs, {chars:,} characters -> {out}")


if __name__ == "__main__":
    main()
