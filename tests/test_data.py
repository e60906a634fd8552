"""Tests of the trainer's data pipeline in memory (split, windows, data).

Reading files: test_corpus.py; the default corpus: test_default_corpus.py; tokenizers:
test_tokenizers.py; prepared corpora: test_prepare.py; the trainer CLI: test_data_cli.py.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tests._corpus import documents
from train import data as data_lib
from train.data import DataConfig, build_data
from train.errors import UserError
from train.split import encode_documents, split_documents
from train.tokenizers import ByteTokenizer
from train.windows import num_windows, val_batches, window

# A single process unless a test says otherwise; avoids touching jax in most tests.
SINGLE = dict(shard_index=0, shard_count=1)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(documents(40)) + "\n", encoding="utf-8")
    return path


def _batches_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------
# Split, encode, pack
# --------------------------------------------------------------------------------------


def test_split_by_document_is_disjoint_and_deterministic():
    docs = documents(100)
    train, val = split_documents(docs, 0.1, seed=0)
    assert len(val) == 10 and len(train) == 90
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(docs)
    assert split_documents(docs, 0.1, seed=0) == (train, val)
    # Independent of document order; dependent on the split seed.
    train_r, val_r = split_documents(docs[::-1], 0.1, seed=0)
    assert set(val_r) == set(val)
    assert set(split_documents(docs, 0.1, seed=1)[1]) != set(val)
    # Degenerate cases.
    assert split_documents(docs, 0.0) == (docs, [])
    assert len(split_documents(docs[:3], 0.01)[1]) == 1  # at least one val doc
    head, tail = split_documents(["line one\nline two\nline three"], 0.3)
    assert head == ["line one\nline two"] and tail == ["line three"]
    with pytest.raises(ValueError, match="val_fraction"):
        split_documents(docs, 1.0)


def test_encode_documents_appends_eos():
    tok = ByteTokenizer()
    stream = encode_documents(["ab", "é"], tok)
    assert stream.tolist() == [97, 98, 256, 0xC3, 0xA9, 256]


def test_windows_tile_the_stream():
    stream = np.arange(1000, dtype=np.int32)
    seq_len = 7
    n = num_windows(len(stream), seq_len)
    assert n == (1000 - 1) // 7
    wins = [window(stream, i, seq_len) for i in range(n)]
    for w in wins:
        assert w["inputs"].shape == w["targets"].shape == (seq_len,)
        assert np.array_equal(w["targets"][:-1], w["inputs"][1:])  # shifted by one
    inputs = np.concatenate([w["inputs"] for w in wins])
    targets = np.concatenate([w["targets"] for w in wins])
    assert np.array_equal(inputs, stream[: n * seq_len])  # windows concatenate back
    assert np.array_equal(targets, stream[1 : n * seq_len + 1])  # each token once


# --------------------------------------------------------------------------------------
# Training iterator
# --------------------------------------------------------------------------------------


def test_train_batches_shape_and_shift(text_file):
    data = build_data(DataConfig(source=str(text_file), seq_len=16, batch_size=4, **SINGLE))
    assert data.steps_per_epoch == num_windows(data.num_train_tokens, 16) // 4
    it = data.train_iter()
    for _ in range(data.steps_per_epoch + 2):  # runs past the first epoch
        b = next(it)
        assert set(b) == {"inputs", "targets"}
        assert b["inputs"].shape == b["targets"].shape == (4, 16)
        assert b["inputs"].dtype == b["targets"].dtype == np.int32
        assert np.array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])


# A stream of distinct ids: a batch row identifies its window as row[0] // seq_len.
UNIQUE = np.arange(10 * 8 * 6 + 5, dtype=np.int32)


def _window_ids(batches, seq_len: int) -> list[int]:
    ids = []
    for b in batches:
        for row, tgt in zip(b["inputs"], b["targets"]):
            start = int(row[0])
            assert start % seq_len == 0
            assert np.array_equal(row, UNIQUE[start : start + seq_len])
            assert np.array_equal(tgt, UNIQUE[start + 1 : start + seq_len + 1])
            ids.append(start // seq_len)
    return ids


def test_train_epochs_are_shuffled_permutations_of_all_windows():
    seq_len, bs = 8, 6
    n = num_windows(len(UNIQUE), seq_len)  # 60 windows = 10 batches per epoch
    ds = data_lib.train_dataset(UNIQUE, seq_len=seq_len, batch_size=bs, seed=0, num_epochs=2)
    ids = _window_ids(list(ds), seq_len)
    assert len(ids) == 2 * n
    epoch1, epoch2 = ids[:n], ids[n:]
    assert sorted(epoch1) == sorted(epoch2) == list(range(n))
    assert epoch1 != sorted(epoch1) and epoch1 != epoch2  # reshuffled every epoch
    same = data_lib.train_dataset(UNIQUE, seq_len=seq_len, batch_size=bs, seed=0, num_epochs=2)
    assert _window_ids(list(same), seq_len) == ids


def test_train_shards_are_disjoint_and_equal_sized():
    seq_len, bs = 8, 2
    n = num_windows(len(UNIQUE), seq_len)
    seen = []
    for i in range(3):
        ds = data_lib.train_dataset(UNIQUE, seq_len=seq_len, batch_size=bs, num_epochs=1,
                                    shard_index=i, shard_count=3)
        ids = _window_ids(list(ds), seq_len)
        assert len(ids) == len(set(ids)) == n // 3 // bs * bs
        seen.append(set(ids))
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])


def test_train_iterator_checkpoint_round_trip(text_file, tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    data = build_data(DataConfig(source=str(text_file), seq_len=16, batch_size=4, seed=3,
                                 **SINGLE))
    # More steps than one epoch, so the restore crosses an epoch boundary.
    k, more = 5, data.steps_per_epoch + 3
    it = data.train_iter()
    for _ in range(k):
        next(it)
    state = it.get_state()
    ckpt = tmp_path / "ckpt"
    params = {"w": np.arange(6.0, dtype=np.float32).reshape(2, 3)}
    with ocp.CheckpointManager(ckpt) as mngr:
        mngr.save(k, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), data=data_lib.save_iterator_args(it)))
        mngr.wait_until_finished()
    expected = [next(it) for _ in range(more)]

    # 1) get_state / set_state on a fresh iterator.
    it2 = data.train_iter()
    it2.set_state(state)
    assert all(_batches_equal(a, next(it2)) for a in expected)

    # 2) orbax restore into a fresh iterator (fresh Data too, as after a restart).
    data2 = build_data(DataConfig(source=str(text_file), seq_len=16, batch_size=4, seed=3,
                                  **SINGLE))
    it3 = data2.train_iter()
    with ocp.CheckpointManager(ckpt) as mngr:
        restored = mngr.restore(k, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(params), data=data_lib.restore_iterator_args(it3)))
    assert np.array_equal(restored["params"]["w"], params["w"])
    assert it3.get_state() == state
    assert all(_batches_equal(a, next(it3)) for a in expected)

    # A different seed gives a different order.
    other = build_data(DataConfig(source=str(text_file), seq_len=16, batch_size=4, seed=4,
                                  **SINGLE)).train_iter()
    fresh = data.train_iter()
    assert not _batches_equal(next(other), next(fresh))


def test_finite_epochs_stop(text_file):
    data = build_data(DataConfig(source=str(text_file), seq_len=16, batch_size=4, num_epochs=2,
                                 num_threads=0, **SINGLE))
    n = num_windows(data.num_train_tokens, 16)
    assert len(list(data.train_iter())) == (2 * n) // 4


# --------------------------------------------------------------------------------------
# Validation pass
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_tokens, seq_len, batch_size", [(101, 10, 4), (100, 10, 3), (7, 10, 2)])
def test_val_pass_covers_every_target_once(n_tokens, seq_len, batch_size):
    stream = np.arange(1, n_tokens + 1, dtype=np.int32)  # ids != 0, so padding is visible
    batches = list(val_batches(stream, seq_len=seq_len, batch_size=batch_size))
    assert len(batches) == math.ceil(math.ceil((n_tokens - 1) / seq_len) / batch_size)
    targets, inputs = [], []
    for b in batches:
        assert b["inputs"].shape == b["targets"].shape == b["mask"].shape == (batch_size, seq_len)
        assert b["mask"].dtype == np.float32
        m = b["mask"] > 0
        assert np.all(b["targets"][~m] == 0) and np.all(b["inputs"][~m] == 0)
        targets.append(b["targets"][m])
        inputs.append(b["inputs"][m])
    # Every token but the first is a target exactly once, in order, after its input.
    assert np.array_equal(np.concatenate(targets), stream[1:])
    assert np.array_equal(np.concatenate(inputs), stream[:-1])
    again = list(val_batches(stream, seq_len=seq_len, batch_size=batch_size))
    assert all(_batches_equal(a, b) for a, b in zip(batches, again))


def test_val_pass_sharded_is_a_partition():
    stream = np.arange(1, 200, dtype=np.int32)
    full = np.concatenate([b["targets"][b["mask"] > 0]
                           for b in val_batches(stream, seq_len=8, batch_size=3)])
    parts, counts = [], []
    for i in range(3):
        batches = list(val_batches(stream, seq_len=8, batch_size=3, shard_index=i, shard_count=3))
        counts.append(len(batches))
        parts += [b["targets"][b["mask"] > 0] for b in batches]
    assert len(set(counts)) == 1  # same number of steps on every process
    assert sorted(np.concatenate(parts).tolist()) == sorted(full.tolist())


def test_build_data_val_split_and_bytes(text_file):
    data = build_data(DataConfig(source=str(text_file), seq_len=32, batch_size=4,
                                 val_fraction=0.1, **SINGLE))
    assert data.vocab_size == 257 and data.eos_id == 256
    assert data.num_train_docs == 36 and data.num_val_docs == 4
    assert data.corpus_name == str(text_file)
    batches = list(data.val_batches())
    assert len(batches) == data.num_val_batches
    assert sum(b["mask"].sum() for b in batches) == data.num_val_targets
    # The val stream is the val documents, each + EOS; bytes exclude EOS and the first.
    _, val_docs = split_documents(documents(40), 0.1, seed=0)
    assert np.array_equal(data.val_tokens, encode_documents(val_docs, ByteTokenizer()))
    assert data.val_bytes == sum(len(d.encode()) for d in val_docs) - 1
    assert data.bits_per_byte(math.log(2) * data.val_bytes) == pytest.approx(1.0)
    # No validation document text leaks into training.
    train_text = ByteTokenizer().decode(data.train_tokens)
    assert not any(d in train_text for d in val_docs)
    assert "byte" in data.summary()


def test_build_data_default_corpus():
    data = build_data(DataConfig(**SINGLE))
    assert data.num_train_tokens > 1_000_000 and data.num_val_tokens > 10_000
    assert data.val_bytes > 0.99 * data.num_val_tokens
    first = next(iter(data.val_batches()))
    assert first["inputs"].shape == (16, 128)


# --------------------------------------------------------------------------------------
# User data
# --------------------------------------------------------------------------------------


def test_build_data_from_jsonl(tmp_path):
    jl = tmp_path / "data.jsonl"
    jl.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents(20)),
                  encoding="utf-8")
    # Shards default to jax.process_index() / jax.process_count().
    data = build_data(DataConfig(source=str(jl), seq_len=16, batch_size=2))
    assert (data.shard_index, data.shard_count) == (0, 1)
    assert data.num_train_docs + data.num_val_docs == 20
    assert next(data.train_iter())["inputs"].shape == (2, 16)


def test_build_data_from_npy(tmp_path):
    ids = np.random.default_rng(0).integers(0, 50, size=5000).astype(np.int64)
    path = tmp_path / "tokens.npy"
    np.save(path, ids)
    data = build_data(DataConfig(source=str(path), seq_len=32, batch_size=4, val_fraction=0.1,
                                 **SINGLE))
    assert data.tokenizer is None and data.val_bytes is None
    assert data.vocab_size == int(ids.max()) + 1
    assert data.num_val_tokens == 500 and data.num_train_tokens == 4500
    assert np.array_equal(np.concatenate([data.train_tokens, data.val_tokens]), ids)
    b = next(data.train_iter())
    assert b["inputs"].dtype == np.int32 and b["inputs"].shape == (4, 32)
    assert build_data(DataConfig(source=str(path), vocab_size=64, seq_len=32,
                                 **SINGLE)).vocab_size == 64
    with pytest.raises(ValueError, match="vocab_size=10"):
        build_data(DataConfig(source=str(path), vocab_size=10, seq_len=32, **SINGLE))
    with pytest.raises(ValueError, match="bits per byte"):
        data.bits_per_byte(1.0)
    np.save(tmp_path / "bad.npy", np.zeros((2, 3), np.int32))
    with pytest.raises(ValueError, match="1-D"):
        build_data(DataConfig(source=str(tmp_path / "bad.npy"), **SINGLE))


def test_user_data_errors(tmp_path, text_file):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        build_data(DataConfig(source=str(missing), **SINGLE))
    odd = tmp_path / "data.csv"
    odd.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(ValueError, match="Unsupported data file extension '.csv'"):
        build_data(DataConfig(source=str(odd), **SINGLE))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        build_data(DataConfig(source=str(empty), **SINGLE))
    np.save(tmp_path / "empty.npy", np.zeros(0, np.int32))
    with pytest.raises(ValueError, match="empty"):
        build_data(DataConfig(source=str(tmp_path / "empty.npy"), **SINGLE))
    with pytest.raises(ValueError, match=r"seq_len=100000 .* only \d+ tokens"):
        build_data(DataConfig(source=str(text_file), seq_len=100_000, **SINGLE))
    with pytest.raises(ValueError, match="Unknown tokenizer 'bpe'"):
        build_data(DataConfig(source=str(text_file), tokenizer="bpe", **SINGLE))
    no_txt = tmp_path / "no_txt"
    no_txt.mkdir()
    with pytest.raises(ValueError, match=r"No \*\.txt files"):
        build_data(DataConfig(source=str(no_txt), **SINGLE))


def test_empty_validation_split_fails_before_training(text_file, tmp_path):
    with pytest.raises(UserError, match=r"validation split \(--val-fraction 0.0\) of .* is empty"):
        build_data(DataConfig(source=str(text_file), val_fraction=0.0, **SINGLE))
    np.save(tmp_path / "ids.npy", np.arange(100, dtype=np.int32))
    with pytest.raises(UserError, match="is empty"):
        build_data(DataConfig(source=str(tmp_path / "ids.npy"), val_fraction=0.0, seq_len=8,
                              **SINGLE))


def test_streaming_split_rule():
    from train.split import is_validation_document

    docs = [f"doc {i}" for i in range(20_000)]
    val = [d for d in docs if is_validation_document(d, 0.1)]
    # Binomial(20000, 0.1): standard deviation 0.0021; 0.01 is almost 5 of them.
    assert abs(len(val) / len(docs) - 0.1) < 0.01
    assert val == [d for d in docs if is_validation_document(d, 0.1)]  # deterministic
    assert set(val) != {d for d in docs if is_validation_document(d, 0.1, seed=1)}
    assert not any(is_validation_document(d, 0.0) for d in docs[:1000])
    # Both split rules take the documents of smallest hash: the exact-count split of the
    # first 2000 documents and the threshold rule are nested sets.
    _, exact = split_documents(docs[:2000], 0.1)
    streamed = {d for d in docs[:2000] if is_validation_document(d, 0.1)}
    assert set(exact) <= streamed or streamed <= set(exact)
