"""The data side of python -m train: a resume on other data is refused (data fingerprint),
training streams a prepared corpus, and data mistakes are one line with exit status 2."""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest

from tests._corpus import documents
from train import __main__ as cli
from train import config as config_lib
from train import default_corpus, loop
from train import prepare as prepare_lib
from train.data import build_data

# One block of width 32: compile time dominates, as in test_train.py.
MICRO = {"num_layers": 1, "hidden": 32, "intermediate": 64, "num_heads": 2}
FAST = ["--steps", "2", "--batch-size", "4", "--seq-len", "32", "--eval-batches", "1",
        "--no-progress"]


@pytest.fixture
def micro_preset(monkeypatch):
    """The CLI's tiny preset shrunk to the micro model (the CLI has no model-size flag)."""
    monkeypatch.setitem(config_lib.PRESETS, "tiny",
                        {**config_lib.PRESETS["tiny"], "model_overrides": MICRO})


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_resume_without_gensim_is_refused(tmp_path, micro_preset, monkeypatch, capsys):
    # The failure measured in issue 10: gensim installed for the first part, not for the
    # resumed part, and the run silently continued on the pydoc fallback corpus.
    if default_corpus.find_enwiki_sample() is None:
        pytest.skip("gensim is not installed: the first part cannot use the Wikipedia sample")
    out = str(tmp_path / "run")
    assert cli.main(["--out", out, "--stop-after", "1", *FAST]) == 0
    capsys.readouterr()
    saved = json.loads((tmp_path / "run" / "checkpoints" / "1" / "data_fingerprint" /
                        "metadata").read_text())
    assert "enwiki" in saved["corpus"]
    monkeypatch.setattr(default_corpus, "find_enwiki_sample", lambda: None)  # gensim gone
    assert cli.main(["--out", out, "--resume", *FAST]) == 2
    err = _one_line_error(capsys)
    assert re.search(r"trained on other data: the corpus differs: checkpoint 'enwiki sample.*"
                     r"this run 'pydoc_data.topics", err), err


def test_train_on_a_prepared_corpus_and_resume_only_on_the_same_tokens(tmp_path, micro_preset,
                                                                       capsys):
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(documents(300)), encoding="utf-8")
    prepared = str(tmp_path / "prepared")
    prepare = [str(text), "--out", prepared, "--val-fraction", "0.1", "--no-progress"]
    assert prepare_lib.main(prepare + ["--shard-tokens", "4000"]) == 0
    out = str(tmp_path / "run")
    argv = ["--data", prepared, "--out", out, "--log-every", "1", *FAST]
    assert cli.main(argv + ["--stop-after", "1"]) == 0

    # The same tokens prepared again with another shard size: the same data, resumable.
    assert prepare_lib.main(prepare + ["--shard-tokens", "100000", "--overwrite"]) == 0
    assert cli.main(argv + ["--resume"]) == 0
    assert "step 2: val loss" in capsys.readouterr().out
    records = loop.read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2]

    # Other text in the same place: refused in one line naming what changed.
    text.write_text("\n\n".join(documents(300, seed=1)), encoding="utf-8")
    assert prepare_lib.main(prepare + ["--overwrite"]) == 0
    capsys.readouterr()
    assert cli.main(argv + ["--resume"]) == 2
    assert "the corpus differs" in _one_line_error(capsys)


def test_data_mistakes_are_one_line(tmp_path, monkeypatch, capsys):
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(documents(40)), encoding="utf-8")
    garbage_txt = tmp_path / "garbage.txt"
    garbage_txt.write_bytes(np.random.default_rng(0).bytes(4000))
    garbage_npy = tmp_path / "garbage.npy"
    garbage_npy.write_bytes(np.random.default_rng(1).bytes(4000))
    nul_txt = tmp_path / "nul.txt"
    nul_txt.write_bytes(b"text\x00with\x00nul bytes\x00" * 50)
    cases = [
        (["--data", str(text), "--val-fraction", "0"], r"validation split.* is empty"),
        (["--data", str(garbage_txt)], r"garbage.txt' is not UTF-8 text"),
        (["--data", str(nul_txt)], r"nul.txt' is not UTF-8 text \(it contains NUL bytes\)"),
        (["--data", str(garbage_npy)], r"garbage.npy' is not a NumPy .npy file"),
        (["--data", str(text), "--tokenizer-model", str(tmp_path / "none.model")],
         r"none.model' does not exist"),
        (["--data", str(text), "--tokenizer-model", str(garbage_npy)],
         r"garbage.npy' is not a readable SentencePiece model"),
        (["--data", str(tmp_path / "x.partial")], r"no index.json.*interrupted prepare"),
    ]
    (tmp_path / "x.partial").mkdir()
    for i, (argv, message) in enumerate(cases):
        code = cli.main(argv + ["--out", str(tmp_path / f"run{i}"), *FAST])
        err = _one_line_error(capsys)
        assert code == 2 and re.search(message, err), (argv, err)
        assert "allow_pickle" not in err and "Traceback" not in err
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # not installed
    assert cli.main(["--data", str(text), "--tokenizer", "sentencepiece",
                     "--out", str(tmp_path / "spm"), *FAST]) == 2
    assert "pip install 'llr-optax[sentencepiece]'" in _one_line_error(capsys)


def test_data_fingerprints_are_content_hashes(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("\n\n".join(documents(40)), encoding="utf-8")
    single = dict(shard_index=0, shard_count=1, seq_len=16)
    from train.data import DataConfig

    a = build_data(DataConfig(source=str(text), **single)).fingerprint
    moved = tmp_path / "b.txt"
    moved.write_bytes(text.read_bytes())
    assert build_data(DataConfig(source=str(moved), **single)).fingerprint["tokens_sha256"] == \
        a["tokens_sha256"]  # the path is not part of it
    assert build_data(DataConfig(source=str(text), val_fraction=0.2, **single)).fingerprint[
        "tokens_sha256"] != a["tokens_sha256"]  # another split is other data
    text.write_text("\n\n".join(documents(40, seed=3)), encoding="utf-8")
    assert build_data(DataConfig(source=str(text), **single)).fingerprint["tokens_sha256"] != \
        a["tokens_sha256"]
