"""The offline default corpus: gensim's English Wikipedia sample, else pydoc topics.

The default corpus is the English Wikipedia sample that the ``gensim`` wheel ships as
test data (a shortened ``pages-articles`` dump, 1.7 MB bz2). We only read that file
as data -- gensim is never imported, because importing it pulls in scipy and takes
seconds. The MediaWiki XML is parsed with the standard library and the wiki markup
is stripped by :func:`clean_wikitext`, a small regex/token-scanner based cleaner.

When gensim is not installed, the fallback is the Python standard library's own
documentation topics (``pydoc_data.topics.topics``), which every CPython ships. The
two corpora differ, so a run records which one it used (``Corpus.name``) and the data
fingerprint in its checkpoints refuses to resume on the other one.
"""

from __future__ import annotations

import bz2
import html
import importlib.metadata
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

from train.corpus import Corpus

__all__ = [
    "DEFAULT_MIN_DOC_CHARS",
    "ENWIKI_SAMPLE",
    "clean_wikitext",
    "find_enwiki_sample",
    "iter_wiki_articles",
    "load_default_corpus",
    "load_pydoc_topics",
    "load_wiki_corpus",
]

# Path of the Wikipedia sample inside the gensim distribution.
ENWIKI_SAMPLE = (
    "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
)

# Documents shorter than this (in characters, after cleaning) are stubs or
# disambiguation leftovers that carry little text; dropping them is harmless.
DEFAULT_MIN_DOC_CHARS = 200

# --------------------------------------------------------------------------------------
# Wiki markup cleaner
# --------------------------------------------------------------------------------------

_COMMENT_RE = re.compile(r"<!--.*?(?:-->|\Z)", re.DOTALL)
# Tags whose *content* is not prose (footnotes, formulas, galleries, ...): drop it all.
_DROP_CONTENT_TAGS = "ref|math|chem|gallery|timeline|imagemap|score|graph|mapframe|templatedata"
_SELF_CLOSING_DROP_RE = re.compile(rf"<(?:{_DROP_CONTENT_TAGS})\b[^<>]*/\s*>", re.IGNORECASE)
_PAIRED_DROP_RE = re.compile(
    rf"<({_DROP_CONTENT_TAGS})\b[^<>]*>.*?</\1\s*>", re.IGNORECASE | re.DOTALL
)
# Any other tag (<br/>, <small>, <sup>, <nowiki>, <blockquote>, ...): keep its content.
# Requiring a letter after '<' keeps prose such as "x < y" intact.
_TAG_RE = re.compile(r"</?[A-Za-z][A-Za-z0-9]*\b[^<>]*>")
# Template and table delimiters. Tables only open/close at the start of a line, which
# also stops "{{foo|}}" from being read as a table end.
# "|}}" at a line start closes a template whose last parameter is empty, not a table.
_BRACE_TOKEN_RE = re.compile(r"\{\{|\}\}|^[ \t]*\{\||^[ \t]*\|\}(?!\})", re.MULTILINE)
# An innermost internal link: no "[[" or "]]" inside, but single brackets are allowed
# (image captions such as "the character [and] greatness" or "Bicyclo[1.1.0]butane").
_LINK_RE = re.compile(r"\[\[((?:[^\[\]]|\[(?!\[)|\](?!\]))*)\]\]")
_DROP_LINK_NAMESPACES = frozenset({"file", "image", "category", "media"})
# Interlanguage links such as [[de:Anarchismus]] or [[zh-yue:...]].
_LANG_PREFIX_RE = re.compile(r"^[a-z]{2,3}(?:-[a-z]{2,8})*$")
# An external link; its label may itself contain internal links ("[[a|b]]").
_EXTERNAL_LINK_RE = re.compile(
    r"\[(?:(?:https?|ftp)://|//)[^\s\]]*(?:\s+((?:\[\[[^\[\]]*\]\]|[^\]])*))?\]"
)
_EMPHASIS_RE = re.compile(r"'{2,}")
_HEADING_RE = re.compile(r"^[ \t]*(={1,6})[ \t]*(.*?)[ \t]*\1[ \t]*$", re.MULTILINE)
_LIST_MARKER_RE = re.compile(r"^[ \t]*[*#:;]+[ \t]*", re.MULTILINE)
_MAGIC_WORD_RE = re.compile(r"__[A-Z]+__")
_HRULE_RE = re.compile(r"^-{4,}[ \t]*$", re.MULTILINE)
_EMPTY_PARENS_RE = re.compile(r"\([\s,;:]*\)")
_SPACE_BEFORE_PUNCT_RE = re.compile(r"[ \t]+([,.;:!?])")
_SPACES_RE = re.compile(r"[^\S\n]+")  # whitespace other than newlines (incl. nbsp)
_BLANK_LINES_RE = re.compile(r"\n{2,}")


def _remove_templates_and_tables(text: str) -> str:
    """Removes ``{{...}}`` templates and ``{|...|}`` tables, including nested ones.

    A regex cannot match balanced nesting, so we scan only the delimiter tokens and
    keep a depth counter (templates and tables share it: they nest inside each other
    in both directions). Text is kept only at depth 0. An unmatched closer at depth 0
    is dropped; an opener that is never closed is dropped alone (rather than eating
    the rest of the article).

    Args:
      text: Wikitext.

    Returns:
      The text without templates and tables.
    """
    pieces: list[str] = []
    depth = 0
    kept_until = 0  # end of the last emitted (or skipped) span
    open_starts: list[int] = []  # start offsets of currently open constructs
    for m in _BRACE_TOKEN_RE.finditer(text):
        token = m.group().strip()
        if token in ("{{", "{|"):
            if depth == 0:
                pieces.append(text[kept_until : m.start()])
            open_starts.append(m.end())
            depth += 1
        else:  # "}}" or "|}"
            if depth == 0:
                pieces.append(text[kept_until : m.start()])
            else:
                depth -= 1
                open_starts.pop()
            kept_until = m.end()
    if depth == 0:
        pieces.append(text[kept_until:])
    else:
        # Unclosed construct: drop only its opener and clean what follows it.
        pieces.append(_remove_templates_and_tables(text[open_starts[0] :]))
    return "".join(pieces)


def _replace_link(match: re.Match) -> str:
    """Replacement for one innermost ``[[...]]`` link: its label, or nothing."""
    parts = match.group(1).split("|")
    target = parts[0].strip()
    if ":" in target:
        prefix = target.split(":", 1)[0].strip().lower()
        if prefix in _DROP_LINK_NAMESPACES:
            return ""
        if len(parts) == 1 and _LANG_PREFIX_RE.match(prefix):
            return ""  # interlanguage link: not part of the prose
    label = parts[-1].strip() if len(parts) > 1 else ""
    # "[[a|]]" (pipe trick) and "[[a]]" both display the target.
    return label or target.lstrip(":")


def _replace_links(text: str) -> str:
    """Resolves internal links innermost-first (captions of images contain links)."""
    while True:
        new = _LINK_RE.sub(_replace_link, text)
        if new == text:
            return new
        text = new


def clean_wikitext(text: str) -> str:
    """Converts MediaWiki markup into plain prose.

    Removes comments, ``<ref>`` footnotes (and other non-prose tags such as
    ``<math>``), templates ``{{...}}`` (nested), tables ``{|...|}``, file/image/
    category links and interlanguage links; replaces ``[[target|label]]`` by
    ``label``, ``[[target]]`` by ``target`` and ``[http://x label]`` by ``label``;
    strips other HTML tags, ``'''bold'''``/``''italic''`` quotes, heading ``=``
    signs and list markers; unescapes HTML entities; collapses whitespace.

    The result has one paragraph (or heading, or list item) per line.

    Args:
      text: Wikitext as found in a ``<text>`` element of a dump (XML already decoded).

    Returns:
      Plain text; empty if nothing but markup was present.
    """
    text = _COMMENT_RE.sub("", text)
    text = _SELF_CLOSING_DROP_RE.sub("", text)
    text = _PAIRED_DROP_RE.sub("", text)
    text = _remove_templates_and_tables(text)
    # External links first: they may sit inside image captions, and their closing
    # "]" must not be mistaken for part of a "]]".
    text = _EXTERNAL_LINK_RE.sub(lambda m: m.group(1) or "", text)
    text = _replace_links(text)
    text = _TAG_RE.sub("", text)
    # Entities are unescaped only after tags are gone, so "&lt;b&gt;" stays literal text.
    text = html.unescape(text)
    text = _EMPHASIS_RE.sub("", text)
    text = _HEADING_RE.sub(r"\2", text)
    text = _HRULE_RE.sub("", text)
    text = _LIST_MARKER_RE.sub("", text)
    text = _MAGIC_WORD_RE.sub("", text)
    # Removing templates such as {{lang|..}} leaves "( )" and " ," behind.
    text = _EMPTY_PARENS_RE.sub("", text)
    text = _SPACES_RE.sub(" ", text)
    text = _SPACE_BEFORE_PUNCT_RE.sub(r"\1", text)
    lines = (line.strip() for line in text.split("\n"))
    return "\n".join(line for line in lines if line)


# --------------------------------------------------------------------------------------
# MediaWiki XML dump
# --------------------------------------------------------------------------------------


def _local(tag: str) -> str:
    """Tag name without its XML namespace (dumps change namespace per version)."""
    return tag.rsplit("}", 1)[-1]


def iter_wiki_articles(path: str | os.PathLike) -> Iterator[tuple[str, str]]:
    """Yields ``(title, raw wikitext)`` of each article page of a MediaWiki dump.

    Redirects and pages outside the main namespace (``ns != 0``: talk, user,
    project pages, ...) are skipped. The parse is streaming (``iterparse``) and
    namespace-agnostic; ``.bz2`` files are decompressed on the fly.

    Args:
      path: A ``pages-articles`` XML dump, optionally bz2-compressed.

    Yields:
      ``(title, wikitext)`` pairs in dump order.
    """
    opener = bz2.open if str(path).endswith(".bz2") else open
    with opener(path, "rb") as f:
        for _, elem in ET.iterparse(f, events=("end",)):
            if _local(elem.tag) != "page":
                continue
            title, ns, text, redirect = "", "0", "", False
            for child in elem.iter():
                name = _local(child.tag)
                if name == "title":
                    title = child.text or ""
                elif name == "ns":
                    ns = (child.text or "").strip()
                elif name == "redirect":
                    redirect = True
                elif name == "text":
                    text = child.text or ""
            # Free the page subtree: keeps memory flat on large dumps.
            elem.clear()
            if redirect or ns != "0" or text.lstrip()[:9].upper() == "#REDIRECT":
                continue
            yield title, text


def load_wiki_corpus(
    path: str | os.PathLike,
    *,
    min_chars: int = DEFAULT_MIN_DOC_CHARS,
    name: str | None = None,
) -> Corpus:
    """Reads a MediaWiki dump into a corpus of cleaned articles.

    Args:
      path: The dump (``.xml`` or ``.xml.bz2``).
      min_chars: Articles shorter than this after cleaning are dropped.
      name: Corpus name; defaults to the file name.

    Returns:
      One document per article, title first, in dump order.
    """
    docs = []
    for title, wikitext in iter_wiki_articles(path):
        body = clean_wikitext(wikitext)
        if len(body) >= min_chars:
            # The title is the article's subject; without it the text often starts
            # mid-thought ("is a political philosophy ...").
            docs.append(f"{title}\n{body}")
    return Corpus(name=name or Path(path).name, documents=docs)


def find_enwiki_sample() -> Path | None:
    """Locates the Wikipedia sample inside an installed gensim, without importing it.

    Returns:
      The path of the ``.bz2`` dump, or ``None`` when gensim (or the file) is absent.
    """
    try:
        dist = importlib.metadata.distribution("gensim")
    except importlib.metadata.PackageNotFoundError:
        return None
    candidates = [Path(str(dist.locate_file(ENWIKI_SAMPLE)))]
    # RECORD-based lookup too, in case the install layout differs (e.g. a wheel
    # unpacked somewhere else than site-packages).
    for f in dist.files or ():
        if str(f).replace("\\", "/").endswith(ENWIKI_SAMPLE.rsplit("/", 1)[-1]):
            candidates.append(Path(str(dist.locate_file(f))))
    for p in candidates:
        if p.is_file():
            return p
    return None


def load_pydoc_topics() -> Corpus:
    """The fallback corpus: CPython's own help topics, one document per topic."""
    from pydoc_data.topics import topics  # standard library, always present

    docs = [topics[k].strip() for k in sorted(topics)]
    return Corpus(name="pydoc_data.topics (Python standard library help topics)",
                  documents=[d for d in docs if d])


def load_default_corpus(*, min_chars: int = DEFAULT_MIN_DOC_CHARS) -> Corpus:
    """The offline default corpus: gensim's enwiki sample, else pydoc topics.

    Args:
      min_chars: Minimum cleaned article length for the Wikipedia corpus.

    Returns:
      The corpus; ``corpus.name`` says which one was used.
    """
    path = find_enwiki_sample()
    if path is None:
        return load_pydoc_topics()
    return load_wiki_corpus(
        path, min_chars=min_chars, name=f"enwiki sample from gensim test data ({path.name})"
    )
