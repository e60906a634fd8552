"""Tests of python -m train.prepare and of training data read from its shards
(train/prepare.py, train/shards.py, and train/data.py on a prepared corpus)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests._corpus import documents
from train import prepare as prepare_lib
from train import shards
from train.data import DataConfig, build_data
from train.errors import UserError
from train.tokenizers import ByteTokenizer
from train.windows import num_windows

SINGLE = dict(shard_index=0, shard_count=1)
ROOT = Path(__file__).resolve().parents[1]


def _is_val(doc: str, fraction: float, seed: int = 0) -> bool:
    """The documented split rule, written out independently of train.split."""
    h = hashlib.blake2b(doc.encode("utf-8"), digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(h, "big") / 2.0**64 < fraction


def _expected_streams(docs, fraction, seed=0):
    """(train, val) byte-token streams: UTF-8 bytes of each document + EOS 256."""
    out = {"train": [], "val": []}
    for d in docs:
        out["val" if _is_val(d, fraction, seed) else "train"] += list(d.encode("utf-8")) + [256]
    return np.array(out["train"], np.int64), np.array(out["val"], np.int64)


def _write_source(kind: str, root: Path, docs: list[str]) -> Path:
    if kind == "txt":
        path = root / "corpus.txt"
        path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    elif kind == "jsonl":
        path = root / "corpus.jsonl"
        path.write_text("".join(json.dumps({"text": d, "n": i}) + "\n" for i, d in enumerate(docs)),
                        encoding="utf-8")
    elif kind == "parquet":
        path = root / "corpus.parquet"
        pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), path,
                       row_group_size=7)
    else:  # a folder: .txt files (one document each), a .jsonl and a .parquet
        path = root / "folder"
        (path / "sub").mkdir(parents=True)
        for i, d in enumerate(docs[:10]):
            (path / f"a{i:02d}.txt").write_text(d, encoding="utf-8")
        (path / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[10:25]),
                                      encoding="utf-8")
        pq.write_table(pa.table({"text": docs[25:]}), path / "sub" / "c.parquet")
    return path


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet", "folder"])
def test_prepare_text_sources(kind, tmp_path):
    docs = documents(60)
    source = _write_source(kind, tmp_path, docs)
    corpus = prepare_lib.prepare(str(source), tmp_path / "out", val_fraction=0.2,
                                 shard_tokens=1000, progress=False)
    want_train, want_val = _expected_streams(docs, 0.2)
    assert 0 < len(want_val) < len(want_train)
    for split, want in (("train", want_train), ("val", want_val)):
        stream = corpus.tokens(split)
        assert len(stream) == len(want)
        assert np.array_equal(stream[0:len(stream)], want)
        # Every shard is a plain .npy file holding its part of the stream.
        files = corpus.index["splits"][split]["shards"]
        assert [f["tokens"] for f in files[:-1]] == [1000] * (len(files) - 1)
        parts = [np.load(tmp_path / "out" / f["file"], mmap_mode="r") for f in files]
        assert all(p.dtype == np.uint16 for p in parts)
        assert np.array_equal(np.concatenate(parts), want)
    val_docs = [d for d in docs if _is_val(d, 0.2)]
    assert corpus.num_documents("val") == len(val_docs)
    assert corpus.num_documents("train") == len(docs) - len(val_docs)
    # Bits per byte counts the validation targets: every val byte but the first token's.
    assert corpus.val_target_bytes == sum(len(d.encode()) for d in val_docs) - 1
    assert corpus.tokenizer["sha256"] == ByteTokenizer.sha256
    assert not shards.partial_dir(tmp_path / "out").exists()


def test_prepare_with_a_tokenizer_json_and_the_trainer_checks_it(tmp_path):
    from tests.test_tokenizers import _metaspace_json  # a hand-written tokenizer.json
    from train.tokenizers import load_tokenizer_model

    model = _metaspace_json(tmp_path / "tok.json")
    docs = documents(50)
    source = _write_source("jsonl", tmp_path, docs)
    corpus = prepare_lib.prepare(str(source), tmp_path / "out", tokenizer_model=str(model),
                                 val_fraction=0.2, progress=False)
    tok = load_tokenizer_model(model)
    eos = [tok.eos_id]
    want = {"train": [], "val": []}
    for d in docs:
        want["val" if _is_val(d, 0.2) else "train"] += tok.encode(d).tolist() + eos
    for split in ("train", "val"):
        assert corpus.tokens(split)[0:10**9].tolist() == want[split]
    assert corpus.vocab_size == tok.vocab_size and corpus.eos_id == tok.eos_id
    copied = tmp_path / "out" / corpus.tokenizer["file"]
    assert copied.read_bytes() == model.read_bytes()  # the prepared dir carries its tokenizer
    assert corpus.val_target_bytes == int(tok.token_bytes[want["val"][1:]].sum())

    # The trainer: the same tokenizer (by content, any path) is accepted, another refused.
    data = build_data(DataConfig(source=str(tmp_path / "out"), tokenizer_model=str(copied),
                                 seq_len=8, batch_size=2, **SINGLE))
    assert data.vocab_size == tok.vocab_size and data.val_bytes == corpus.val_target_bytes
    # Its split was fixed at prepare time: the trainer's default or the prepared fraction
    # is accepted, another one is an error (it would otherwise be silently ignored).
    build_data(DataConfig(source=str(tmp_path / "out"), val_fraction=0.2, seq_len=8,
                          **SINGLE))
    with pytest.raises(UserError, match="fixed by python -m train.prepare: drop --val-fraction 0.3"):
        build_data(DataConfig(source=str(tmp_path / "out"), val_fraction=0.3, seq_len=8,
                              **SINGLE))
    with pytest.raises(UserError, match="is not the tokenizer"):
        build_data(DataConfig(source=str(tmp_path / "out"),
                              tokenizer_model=str(_metaspace_json(tmp_path / "other.json",
                                                                  with_eos=False)),
                              seq_len=8, **SINGLE))


def test_prepare_trains_sentencepiece_on_the_training_documents(tmp_path):
    from train.tokenizers import SentencePieceTokenizer, load_tokenizer_model

    docs = documents(80)
    source = _write_source("parquet", tmp_path, docs)
    corpus = prepare_lib.prepare(str(source), tmp_path / "out", tokenizer="sentencepiece",
                                 vocab_size=400, val_fraction=0.2, progress=False,
                                 cache_dir=str(tmp_path / "cache"))
    train_docs = [d for d in docs if not _is_val(d, 0.2)]
    # The model cache is keyed by the training text: asking for a model of exactly the
    # training documents finds the one prepare trained (no second model).
    reference = SentencePieceTokenizer.train(train_docs, 400, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.model"))) == 1
    copied = tmp_path / "out" / corpus.tokenizer["file"]
    assert copied.read_bytes() == reference.model_path.read_bytes()
    assert corpus.tokenizer["kind"] == "sentencepiece"
    tok = load_tokenizer_model(copied)
    want = [i for d in train_docs for i in tok.encode(d).tolist() + [tok.eos_id]]
    assert corpus.tokens("train")[0:10**9].tolist() == want


def test_prepare_token_ids(tmp_path):
    ids = np.random.default_rng(0).integers(0, 70_000, size=5000).astype(np.int64)
    np.save(tmp_path / "ids.npy", ids)
    corpus = prepare_lib.prepare(str(tmp_path / "ids.npy"), tmp_path / "out", val_fraction=0.1,
                                 shard_tokens=700, progress=False)
    assert corpus.vocab_size == int(ids.max()) + 1 and corpus.index["dtype"] == "uint32"
    assert np.array_equal(corpus.tokens("train")[0:5000], ids[:4500])
    assert np.array_equal(corpus.tokens("val")[0:5000], ids[4500:])
    assert corpus.val_target_bytes is None and corpus.tokenizer is None
    with pytest.raises(UserError, match=r"outside \[0, 1000\)"):
        prepare_lib.prepare(str(tmp_path / "ids.npy"), tmp_path / "small", vocab_size=1000,
                            progress=False)
    assert not (tmp_path / "small").exists() and not (tmp_path / "small.partial").exists()


def test_fingerprint_is_content_and_read_from_the_index(tmp_path):
    docs = documents(40)
    source = _write_source("txt", tmp_path, docs)
    a = prepare_lib.prepare(str(source), tmp_path / "a", val_fraction=0.2, shard_tokens=500,
                            progress=False)
    b = prepare_lib.prepare(str(source), tmp_path / "b", val_fraction=0.2, shard_tokens=100_000,
                            progress=False)
    assert a.fingerprint == b.fingerprint  # same tokens, other sharding: same data
    (tmp_path / "c.txt").write_text("\n\n".join(docs[:-1]), encoding="utf-8")
    c = prepare_lib.prepare(str(tmp_path / "c.txt"), tmp_path / "c", val_fraction=0.2,
                            progress=False)
    assert c.fingerprint != a.fingerprint

    # Opening reads the index only: a shard damaged in place (same size) goes unnoticed
    # until --verify re-reads the shards.
    shard = tmp_path / "a" / a.index["splits"]["train"]["shards"][1]["file"]
    raw = bytearray(shard.read_bytes())
    raw[200] ^= 0xFF
    shard.write_bytes(bytes(raw))
    assert shards.open_prepared(tmp_path / "a").fingerprint == a.fingerprint
    assert shards.verify_prepared(tmp_path / "a") == [f"{shard.name}: content does not match its SHA-256"]
    assert prepare_lib.main(["--verify", str(tmp_path / "a"), "--no-progress"]) == 1
    assert prepare_lib.main(["--verify", str(tmp_path / "b"), "--no-progress"]) == 0
    # A truncated shard is caught when opening (its size no longer matches).
    shard.write_bytes(bytes(raw[:-2]))
    with pytest.raises(UserError, match="damaged.*train-00001.npy"):
        build_data(DataConfig(source=str(tmp_path / "a"), **SINGLE))


def test_interrupted_prepare_leaves_nothing_usable_and_a_rerun_starts_over(tmp_path, monkeypatch,
                                                                            capsys):
    source = _write_source("txt", tmp_path, documents(60))
    out = tmp_path / "out"
    real_write, calls = shards.ShardWriter.write, []

    def interrupted(self, ids):
        calls.append(1)
        if len(calls) == 20:
            raise KeyboardInterrupt  # Ctrl-C in the middle of writing shards
        real_write(self, ids)

    monkeypatch.setattr(shards.ShardWriter, "write", interrupted)
    code = prepare_lib.main([str(source), "--out", str(out), "--shard-tokens", "500",
                             "--val-fraction", "0.2", "--no-progress"])
    assert code == 130 and "interrupted" in capsys.readouterr().err
    assert not out.exists() and not shards.partial_dir(out).exists()
    monkeypatch.setattr(shards.ShardWriter, "write", real_write)

    # A killed run (no cleanup) leaves OUT.partial with half-written shards: the trainer
    # refuses it, and a rerun removes it and starts over.
    partial = shards.partial_dir(out)
    partial.mkdir()
    (partial / "train-00000.npy").write_bytes(b"\x93NUMPY half")
    with pytest.raises(UserError, match="no index.json.*interrupted prepare"):
        build_data(DataConfig(source=str(partial), **SINGLE))
    assert prepare_lib.main([str(source), "--out", str(out), "--shard-tokens", "500",
                             "--val-fraction", "0.2", "--no-progress"]) == 0
    assert "left by an interrupted prepare" in capsys.readouterr().err
    assert not partial.exists()
    want_train, _ = _expected_streams(documents(60), 0.2)
    assert np.array_equal(shards.open_prepared(out).tokens("train")[0:10**9], want_train)


def test_prepare_cli_errors_are_one_line(tmp_path, capsys):
    source = _write_source("txt", tmp_path, documents(30))
    garbage = tmp_path / "garbage.txt"
    garbage.write_bytes(np.random.default_rng(0).bytes(5000))
    bad_npy = tmp_path / "bad.npy"
    bad_npy.write_bytes(np.random.default_rng(1).bytes(500))
    assert prepare_lib.main([str(source), "--out", str(tmp_path / "ok"), "--val-fraction", "0.2",
                             "--no-progress"]) == 0
    capsys.readouterr()
    for argv, message in [
        ([str(tmp_path / "nope.txt"), "--out", str(tmp_path / "x")], "not found: .*nope.txt"),
        ([str(source), "--out", str(tmp_path / "ok")], "already exists.*--overwrite"),
        ([str(source), "--out", str(source)], "already exists and holds something else"),
        ([str(garbage), "--out", str(tmp_path / "x")], "garbage.txt.* is not UTF-8 text"),
        ([str(bad_npy), "--out", str(tmp_path / "x")], "bad.npy.* is not a NumPy .npy file"),
        ([str(source), "--out", str(tmp_path / "x"), "--val-fraction", "0"], "val-fraction"),
        ([str(source), "--out", str(tmp_path / "x"), "--tokenizer-model",
          str(tmp_path / "nope.model")], "nope.model.* does not exist"),
        ([str(bad_npy), "--out", str(tmp_path / "x"), "--tokenizer", "sentencepiece"],
         "token ids already"),
    ]:
        assert prepare_lib.main(argv + ["--no-progress"]) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: "), err
        assert __import__("re").search(message, err), (message, err)
        assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()
    # --overwrite replaces a prepared corpus (only a prepared corpus).
    assert prepare_lib.main([str(source), "--out", str(tmp_path / "ok"), "--overwrite",
                             "--val-fraction", "0.3"]) == 0
    captured = capsys.readouterr()
    assert "tokenising" in captured.err  # the progress bar
    assert shards.open_prepared(tmp_path / "ok").index["split"]["val_fraction"] == 0.3


# ------------------------------------------------------------ the trainer's side


@pytest.fixture(scope="module")
def prepared_ids(tmp_path_factory):
    """A prepared corpus of distinct ids 0..19999: a row names its window by its first id.
    Shards of 777 tokens, so windows cross shard boundaries."""
    root = tmp_path_factory.mktemp("prepared")
    np.save(root / "ids.npy", np.arange(20_000, dtype=np.int32))
    prepare_lib.prepare(str(root / "ids.npy"), root / "out", val_fraction=0.1, shard_tokens=777,
                        progress=False)
    return root / "out", np.arange(18_000), np.arange(18_000, 20_000)


def _window_starts(batches, stream, seq_len):
    starts = []
    for b in batches:
        for inp, tgt in zip(b["inputs"], b["targets"]):
            s = int(inp[0])
            assert s % seq_len == 0
            assert np.array_equal(inp, stream[s:s + seq_len])
            assert np.array_equal(tgt, stream[s + 1:s + seq_len + 1])
            starts.append(s // seq_len)
    return starts


def test_training_windows_come_from_the_shards(prepared_ids):
    out, train, val = prepared_ids
    data = build_data(DataConfig(source=str(out), seq_len=16, batch_size=4, num_epochs=2,
                                 num_threads=0, **SINGLE))
    assert data.tokenizer is None and data.vocab_size == 20_000 and data.val_bytes is None
    assert (data.num_train_tokens, data.num_val_tokens) == (len(train), len(val))
    n = num_windows(len(train), 16)
    starts = _window_starts(data.train_iter(), train, 16)
    epoch1, epoch2 = starts[:n // 4 * 4], starts[n // 4 * 4:]
    assert sorted(epoch1) == sorted(epoch2) == list(range(n))  # n is a multiple of 4 here
    assert epoch1 != epoch2 and epoch1 != sorted(epoch1)  # shuffled, reshuffled
    # Validation: every target of the validation stream exactly once, in order.
    targets = np.concatenate([b["targets"][b["mask"] > 0] for b in data.val_batches()])
    assert np.array_equal(targets, val[1:])


def test_each_process_reads_its_own_contiguous_share(prepared_ids):
    out, train, _ = prepared_ids
    n = num_windows(len(train), 8)
    m = n // 3
    for i in range(3):
        data = build_data(DataConfig(source=str(out), seq_len=8, batch_size=1, num_epochs=1,
                                     num_threads=0, shard_index=i, shard_count=3))
        starts = _window_starts(data.train_iter(), train, 8)
        assert sorted(starts) == list(range(i * m, (i + 1) * m))


def test_prepared_iterator_state_round_trip(prepared_ids):
    out, _, _ = prepared_ids
    cfg = DataConfig(source=str(out), seq_len=16, batch_size=4, seed=5, **SINGLE)
    it = build_data(cfg).train_iter()
    for _ in range(270):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(30)]  # crosses the epoch boundary (281 batches)
    again = build_data(cfg).train_iter()
    again.set_state(state)
    for want in expected:
        got = next(again)
        assert all(np.array_equal(want[k], got[k]) for k in want)


def test_open_shard_files_are_bounded_and_streams_pickle(prepared_ids, monkeypatch):
    monkeypatch.setattr(shards, "_MAX_OPEN_SHARDS", 3)
    out, train, _ = prepared_ids
    stream = shards.open_prepared(out).tokens("train")
    assert len(stream.paths) > 20
    for a in np.random.default_rng(0).integers(0, len(train) - 2000, 200):
        assert np.array_equal(stream[a:a + 2000], train[a:a + 2000])  # up to 4 shards
        assert len(stream._fds) <= 3  # pylint: disable=protected-access
    assert np.array_equal(stream[-5:], train[-5:]) and stream[7:7].shape == (0,)
    copy = pickle.loads(pickle.dumps(stream))
    assert len(pickle.dumps(stream)) < 10_000  # its file list, not its tokens
    assert np.array_equal(copy[700:900], train[700:900])


TWO_PROCESSES = textwrap.dedent("""
    import sys
    import jax

    port, pid, same, mine = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=pid)
    from train.data import DataConfig, build_data
    from train.errors import UserError

    data = build_data(DataConfig(source=same, seq_len=8, batch_size=1, num_epochs=1,
                                 num_threads=0))
    starts = sorted(int(b["inputs"][0, 0]) // 8 for b in data.train_iter())
    print(data.shard_index, data.shard_count, starts[0], starts[-1], len(starts))
    try:
        build_data(DataConfig(source=mine, seq_len=8, batch_size=1))
        print("no error")
    except UserError as e:
        print("UserError:", e)
""")


def test_two_processes_read_their_own_shares_and_must_see_the_same_data(prepared_ids,
                                                                        tmp_path):
    out, train, _ = prepared_ids
    n = num_windows(len(train), 8)
    m = n // 2
    # Process 1 is then given another corpus (say, another file at the same path on its
    # host): both processes must stop with the same one-line error, not train on a mix.
    np.save(tmp_path / "other.npy", np.arange(1, 20_001, dtype=np.int32))
    prepare_lib.prepare(str(tmp_path / "other.npy"), tmp_path / "other", val_fraction=0.1,
                        progress=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, "-c", TWO_PROCESSES, str(port), str(i), str(out),
                               str(mine)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for i, mine in enumerate([out, tmp_path / "other"])]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    # The last two lines are ours (gloo prints its connection on stdout before them).
    lines = [out.strip().splitlines()[-2:] for out, _ in outs]
    assert [first for first, _ in lines] == [f"0 2 0 {m - 1} {m}", f"1 2 {m} {2 * m - 1} {m}"]
    errors = {second for _, second in lines}
    assert len(errors) == 1 and errors.pop().startswith("UserError: Processes [1] of 2 see other")


MEMORY_CHECK = textwrap.dedent("""
    import sys
    from train.data import DataConfig, build_data

    def rss_mib():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

    import grain, numpy  # noqa: F401  (imported before the baseline: not the corpus)

    start = rss_mib()
    data = build_data(DataConfig(source=sys.argv[1], seq_len=256, batch_size=32, num_threads=1,
                                 val_batch_size=64, shard_index=0, shard_count=1))
    it = data.train_iter()
    for _ in range(500):   # 16,000 random windows spread over the whole corpus
        next(it)
    for i, _ in enumerate(data.val_batches()):  # and the first 100 validation batches
        if i == 100:
            break
    print(start, rss_mib(), data.num_train_tokens)
""")


def test_memory_does_not_grow_with_the_corpus(tmp_path):
    # ~340 MB of tokens written straight into shards (a prepared corpus of random ids).
    out = tmp_path / "big"
    out.mkdir()
    rng = np.random.default_rng(0)
    splits = {}
    for name, chunks in (("train", 20), ("val", 1)):
        writer = shards.ShardWriter(out, name, np.uint16, 1 << 25)
        for _ in range(chunks):
            writer.write(np.frombuffer(rng.bytes(1 << 24), np.uint16))  # 8 Mi tokens
        splits[name] = {"documents": None, "tokens": writer.tokens, "shards": writer.close(),
                        "sha256": writer.split_hash.hexdigest()}
    splits["val"]["target_bytes"] = None
    shards.write_index(out, {"vocab_size": 1 << 16, "eos_id": None, "dtype": "uint16",
                             "split": {"rule": "test", "val_fraction": None, "seed": None},
                             "splits": splits, "tokenizer": None,
                             "source": {"name": "random ids", "text_field": None}})
    corpus_mib = sum(f.stat().st_size for f in out.iterdir()) / 2**20
    result = subprocess.run([sys.executable, "-c", MEMORY_CHECK, str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    start, end, tokens = (float(x) for x in result.stdout.split())
    assert tokens == 20 * (1 << 23)
    growth = end - start
    print(f"corpus {corpus_mib:.0f} MiB; RSS {start:.0f} -> {end:.0f} MiB (+{growth:.1f})")
    assert corpus_mib > 300
    assert growth < 0.05 * corpus_mib, (growth, corpus_mib)
