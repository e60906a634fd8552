"""Tests of train/corpus.py: user text files read (streamed) as documents, and the one-line
errors that name a file that is not what its name says."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests._corpus import documents
from train import corpus as corpus_lib
from train.data import DataConfig, build_data
from train.errors import UserError

SINGLE = dict(shard_index=0, shard_count=1)


def test_load_txt_jsonl_and_directory(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("first doc\nstill first\n\n  \n\nsecond doc\n", encoding="utf-8")
    assert corpus_lib.load_documents(txt) == ["first doc\nstill first", "second doc"]

    jl = tmp_path / "a.jsonl"
    jl.write_text(json.dumps({"body": "one"}) + "\n\n" + json.dumps({"body": "twö"}) + "\n",
                  encoding="utf-8")
    assert corpus_lib.load_documents(jl, text_field="body") == ["one", "twö"]
    with pytest.raises(ValueError, match="'text' field"):
        corpus_lib.load_documents(jl)

    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    (d / "b.txt").write_text("doc b\n\nsame doc b", encoding="utf-8")
    (d / "sub" / "a.txt").write_text("doc a", encoding="utf-8")
    (d / "ignored.md").write_text("nope", encoding="utf-8")
    assert corpus_lib.load_documents(d) == ["doc b\n\nsame doc b", "doc a"]


def test_streamed_text_documents_match_a_whole_file_split(tmp_path):
    text = ("\n \t\r\nfirst doc\r\nstill first  \r\n\r\n\r\n  second\tdoc \n \n\nthird ü\n"
            "\n\n\n" + "\n\n".join(documents(30)) + "\n  \n")
    path = tmp_path / "tricky.txt"
    path.write_bytes(text.encode("utf-8"))
    # Reference: the whole file read at once (universal newlines), split at blank lines.
    whole = path.read_text(encoding="utf-8")
    reference = [d.strip() for d in re.split(r"\n[ \t\r]*\n", whole) if d.strip()]
    seen = []
    assert list(corpus_lib.iter_documents(path, progress=seen.append)) == reference
    assert reference[:3] == ["first doc\nstill first", "second\tdoc", "third ü"]
    assert sum(seen) == path.stat().st_size  # progress accounts for every byte


def test_bad_files_are_named_in_one_line(tmp_path):
    cases = []
    png = tmp_path / "image.txt"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)
    cases.append((png, r"image.txt' is not UTF-8 text"))
    jl = tmp_path / "bad.jsonl"
    jl.write_bytes(b'{"text": "ok"}\n{"text": "fine"}\n{"text": "\xff\xfe"}\n')
    cases.append((jl, r"bad.jsonl' is not UTF-8 text \(line 3"))
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.txt").write_text("fine text", encoding="utf-8")
    (folder / "b.txt").write_bytes(np.random.default_rng(0).bytes(300))
    cases.append((folder, r"b.txt' is not UTF-8 text"))
    garbage = tmp_path / "garbage.npy"
    garbage.write_bytes(np.random.default_rng(1).bytes(300))
    cases.append((garbage, r"garbage.npy' is not a NumPy .npy file"))
    objects = tmp_path / "objects.npy"
    np.save(objects, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    cases.append((objects, r"objects.npy' holds Python objects"))
    truncated = tmp_path / "truncated.npy"
    np.save(truncated, np.arange(1000, dtype=np.int32))
    truncated.write_bytes(truncated.read_bytes()[:-100])
    cases.append((truncated, r"truncated.npy' is not a readable .npy file"))
    parquet = tmp_path / "fake.parquet"
    parquet.write_text("not parquet", encoding="utf-8")
    cases.append((parquet, r"fake.parquet' is not a readable Parquet file"))
    other_column = tmp_path / "body.parquet"
    pq.write_table(pa.table({"body": ["a document"]}), other_column)
    cases.append((other_column, r"body.parquet' has no column 'text' \(columns: body\)"))
    for path, message in cases:
        with pytest.raises(UserError, match=message) as info:
            build_data(DataConfig(source=str(path), **SINGLE))
        assert "\n" not in str(info.value) and "allow_pickle" not in str(info.value)
    assert corpus_lib.load_documents(other_column, text_field="body") == ["a document"]
