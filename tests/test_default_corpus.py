"""Tests of train/default_corpus.py: the wiki markup cleaner, the dump parser, and the
offline default corpus (gensim's Wikipedia sample, else pydoc topics)."""

from __future__ import annotations

import bz2
import sys

import pytest

from train import default_corpus
from train.default_corpus import clean_wikitext



@pytest.mark.parametrize(
    "wikitext, expected",
    [
        ("'''Anarchism''' is a [[political philosophy]].",
         "Anarchism is a political philosophy."),
        ("See [[Pierre-Joseph Proudhon|Proudhon]] and [[anarchy|]].",
         "See Proudhon and anarchy."),
        ("A {{citation needed|date={{CURRENTYEAR}}}} claim.{{Infobox\n| a = b\n|}}",
         "A claim."),
        ("Before\n{| class=\"wikitable\"\n|-\n| cell {{x}} || [[y]]\n|}\nAfter",
         "Before\nAfter"),
        ("[[File:A.jpg|thumb|A caption with [[link]] and [note] text.]]Text "
         "[[Image:B.png|left]][[Category:Philosophy]][[de:Anarchismus]]here.",
         "Text here."),
        ("Visit [http://example.com the site] or [https://x.org].", "Visit the site or."),
        ("Claim.<ref name=\"a\">{{cite book|title=X}}</ref> More<ref name=b /> text.",
         "Claim. More text."),
        ("== History ==\nThe ''early'' period<!-- hidden -->.\n=== Sub ===\n* item one\n# item two",
         "History\nThe early period.\nSub\nitem one\nitem two"),
        ("x&nbsp;&lt;&nbsp;y &amp; <small>small</small> E=mc<sup>2</sup><br />end",
         "x < y & small E=mc2end"),
        ("Label of [http://a.b/c talk at [[University of X|UX]], 1962] kept.",
         "Label of talk at UX, 1962 kept."),
        ("Greek ({{lang-grc|ἀναρχία}}) word", "Greek word"),
        ("{{unclosed template\nBody   text\t here.", "unclosed template\nBody text here."),
        ("__NOTOC__\n{{Main|X}}\n\n\nPara one.\n----\nPara two.", "Para one.\nPara two."),
    ],
)
def test_clean_wikitext(wikitext, expected):
    assert clean_wikitext(wikitext) == expected


def _write_dump(path, pages, namespace="http://www.mediawiki.org/xml/export-0.11/"):
    """A minimal MediaWiki dump; pages = [(title, ns, text, is_redirect)]."""
    from xml.sax.saxutils import escape

    body = []
    for title, ns, text, redirect in pages:
        body.append(
            f"<page><title>{escape(title)}</title><ns>{ns}</ns><id>1</id>"
            + ('<redirect title="X" />' if redirect else "")
            + f'<revision><id>2</id><text xml:space="preserve">{escape(text)}</text>'
            + "</revision></page>"
        )
    xml = f'<mediawiki xmlns="{namespace}" version="0.11"><siteinfo/>{"".join(body)}</mediawiki>'
    with bz2.open(path, "wt", encoding="utf-8") as f:
        f.write(xml)


def test_wiki_dump_parsing_skips_redirects_and_other_namespaces(tmp_path):
    path = tmp_path / "dump.xml.bz2"
    article = "'''Foo''' is a [[bar|thing]] with <ref>x</ref> words. " * 10
    _write_dump(path, [
        ("Foo", 0, article, False),
        ("Redirected", 0, "#REDIRECT [[Foo]]", True),
        ("Redirect without tag", 0, "#redirect [[Foo]]", False),
        ("Wikipedia:Policy", 4, article, False),
        ("Stub", 0, "Tiny.", False),
    ])
    titles = [t for t, _ in default_corpus.iter_wiki_articles(path)]
    assert titles == ["Foo", "Stub"]
    corpus = default_corpus.load_wiki_corpus(path, min_chars=50)
    assert len(corpus.documents) == 1  # the stub is dropped
    assert corpus.documents[0].startswith("Foo\nFoo is a thing with words. Foo is a thing")


def test_default_corpus_is_clean_english_wikipedia():
    corpus = default_corpus.load_default_corpus()
    if default_corpus.find_enwiki_sample() is None:
        pytest.skip("gensim is not installed: the default corpus is the pydoc fallback")
    assert "enwiki" in corpus.name
    assert len(corpus.documents) > 100
    text = "\n".join(corpus.documents)
    for markup in ("[[", "]]", "{{", "}}", "<ref", "{|", "'''"):
        assert markup not in text, markup
    assert corpus.documents[0].startswith("Anarchism\nAnarchism is a political philosophy")
    assert text.count(" the ") > 10_000  # English prose
    assert "gensim" not in sys.modules  # located as a data file, never imported


def test_fallback_corpus_without_gensim(monkeypatch):
    monkeypatch.setattr(default_corpus, "find_enwiki_sample", lambda: None)
    corpus = default_corpus.load_default_corpus()
    assert "pydoc" in corpus.name
    assert len(corpus.documents) > 50
    assert all(d.strip() for d in corpus.documents)


def test_results_pages_state_the_default_corpus_size_it_has():
    """The results pages' passes-over-the-corpus figure uses this count."""
    from train.data import DataConfig, build_data  # pylint: disable=import-outside-toplevel
    from train.results_setup import DEFAULT_TRAIN_TOKENS  # pylint: disable=import-outside-toplevel

    if default_corpus.find_enwiki_sample() is None:
        pytest.skip("gensim is not installed: the default corpus is the pydoc fallback")
    assert build_data(DataConfig()).num_train_tokens == DEFAULT_TRAIN_TOKENS
