"""Tests of train/tokenizers.py: bytes, SentencePiece (trained here or pretrained), and
Hugging Face tokenizer.json files (trained in the test with the tokenizers package, so
no download), plus the errors a user sees for missing packages and bad files."""

from __future__ import annotations

import hashlib
import sys

import numpy as np
import pytest
import sentencepiece as spm
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from tests._corpus import documents
from train import tokenizers as tok_lib
from train.data import DataConfig, build_data
from train.errors import UserError
from train.split import encode_documents, split_documents
from train.tokenizers import ByteTokenizer, get_tokenizer, load_tokenizer_model

SINGLE = dict(shard_index=0, shard_count=1)
TEXT = "Document 7 café naïve. gamma delta Ωmega"


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    """A pretrained-style SentencePiece model: LLaMa's id layout (unk 0, bos 1, eos 2)."""
    path = tmp_path_factory.mktemp("spm") / "m.model"
    with path.open("wb") as f:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(documents(80)), model_writer=f, vocab_size=400,
            model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            normalization_rule_name="identity", byte_fallback=True, minloglevel=2)
    return path


@pytest.fixture(scope="module")
def byte_level_json(tmp_path_factory):
    """A GPT-2-style byte-level BPE tokenizer.json, trained here, with a BOS post-processor
    and truncation switched on (both must be ignored by the pipeline)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(documents(80), trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<s>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    tok.enable_truncation(8)
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    tok.save(str(path))
    return path


def _metaspace_json(path, with_eos: bool = True):
    """A SentencePiece-style (Metaspace, byte-fallback) BPE written by hand: every
    character of the alphabet below is a token, anything else falls back to bytes."""
    chars = sorted(set("".join(documents(20))) | {"▁"})
    specials = ["<unk>"] + (["</s>"] if with_eos else [])
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)] + chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    tok.add_special_tokens(specials)
    tok.save(str(path))
    return path


# ---------------------------------------------------------------------------- bytes


def test_byte_tokenizer_round_trip():
    tok = get_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer) and isinstance(tok, tok_lib.Tokenizer)
    assert tok.vocab_size == 257 and tok.eos_id == 256
    text = "Héllo, wörld — ναί 日本 🙂"
    ids = tok.encode(text)
    assert ids.dtype == np.int32
    assert ids.tolist() == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(np.append(ids, tok.eos_id)) == text  # EOS is skipped
    assert tok.token_bytes.shape == (257,) and tok.token_bytes[256] == 0
    assert tok.token_bytes[:256].tolist() == [1] * 256


def test_get_tokenizer_errors():
    with pytest.raises(UserError, match="Unknown tokenizer 'wordpiece'"):
        get_tokenizer("wordpiece")
    with pytest.raises(UserError, match="vocab_size"):
        get_tokenizer("byte", vocab_size=1000)
    with pytest.raises(UserError, match="Unknown tokenizer"):
        DataConfig(tokenizer="nope")
    with pytest.raises(UserError, match="not both"):
        DataConfig(tokenizer="sentencepiece", tokenizer_model="m.model")


# -------------------------------------------------------------------- sentencepiece


def test_sentencepiece_trains_caches_and_round_trips(tmp_path):
    docs = documents(60)
    tok = get_tokenizer("sentencepiece", documents=docs, vocab_size=400, cache_dir=tmp_path)
    cached = sorted(tmp_path.glob("*.model"))
    assert len(cached) == 1
    assert 300 <= tok.vocab_size <= 400
    assert tok.decode(tok.encode(TEXT)) == TEXT
    # Same corpus and size: loaded from the cache, no second model.
    tok2 = get_tokenizer("sentencepiece", documents=docs, vocab_size=400, cache_dir=tmp_path)
    assert tok2.model_path == tok.model_path
    assert np.array_equal(tok2.encode(TEXT), tok.encode(TEXT))
    # token_bytes sums to the UTF-8 size, up to the dummy-prefix space.
    n = int(tok.token_bytes[tok.encode(TEXT)].sum())
    assert n - len(TEXT.encode("utf-8")) in (0, 1)
    assert tok.sha256 == hashlib.sha256(cached[0].read_bytes()).hexdigest()


def test_pretrained_sentencepiece_model(spm_model):
    tok = load_tokenizer_model(spm_model)
    reference = spm.SentencePieceProcessor(model_file=str(spm_model))
    assert tok.name == "sentencepiece" and tok.eos_id == 2 == reference.eos_id()
    assert tok.vocab_size == reference.get_piece_size()
    text = TEXT + " 日本"  # 日本 is not in the vocabulary: byte fallback
    assert tok.encode(text).tolist() == reference.encode(text)
    assert [t.tolist() for t in tok.encode_batch([text, "beta"])] == reference.encode([text, "beta"])
    assert tok.decode(np.append(tok.encode(text), 2)) == text
    assert tok.sha256 == hashlib.sha256(spm_model.read_bytes()).hexdigest()
    # Byte pieces count 1, "▁" counts as the space it stands for; the dummy prefix adds 1.
    assert int(tok.token_bytes[tok.encode(text)].sum()) == len(text.encode("utf-8")) + 1
    assert tok.token_bytes[[0, 1, 2]].tolist() == [0, 0, 0]  # unk, bos, eos


def test_sentencepiece_missing_gives_install_hint(monkeypatch, spm_model):
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # makes the import fail
    with pytest.raises(UserError, match=r"pip install 'llr-optax\[sentencepiece\]'"):
        get_tokenizer("sentencepiece", documents=["some text"], vocab_size=400)
    with pytest.raises(UserError, match=r"pip install 'llr-optax\[sentencepiece\]'"):
        load_tokenizer_model(spm_model)


# ------------------------------------------------------------------ Hugging Face


def test_hf_byte_level_tokenizer_json(byte_level_json):
    tok = load_tokenizer_model(byte_level_json)
    reference = Tokenizer.from_file(str(byte_level_json))
    reference.no_truncation()
    assert tok.name == "huggingface" and tok.vocab_size == 320
    assert tok.eos_id == reference.token_to_id("<|endoftext|>")
    text = TEXT + " 日本 🙂" * 5  # longer than the stored truncation, never seen bytes
    ids = tok.encode(text)
    # No BOS from the post-processor, no truncation: exactly the model's own ids.
    assert ids.tolist() == reference.encode(text, add_special_tokens=False).ids
    assert len(ids) > 8 and reference.token_to_id("<s>") not in ids.tolist()
    assert [x.tolist() for x in tok.encode_batch([text, "x"])] == [
        e.ids for e in reference.encode_batch([text, "x"], add_special_tokens=False)]
    assert tok.decode(np.append(ids, tok.eos_id)) == text
    # Byte-level: each token's characters are bytes, so the count is exact.
    assert int(tok.token_bytes[ids].sum()) == len(text.encode("utf-8"))
    assert tok.token_bytes[tok.eos_id] == 0
    assert tok.sha256 == hashlib.sha256(byte_level_json.read_bytes()).hexdigest()


def test_hf_metaspace_tokenizer_json_counts_bytes(tmp_path):
    tok = load_tokenizer_model(_metaspace_json(tmp_path / "ms.json"))
    assert tok.eos_id == 1  # "</s>"
    text = TEXT + " 日本"
    ids = tok.encode(text)
    pieces = [tok._tok.id_to_token(int(i)) for i in ids]  # pylint: disable=protected-access
    assert "<0xE6>" in pieces  # 日 went through byte fallback
    assert tok.decode(ids) == text
    # "▁" is one byte (a space: one more than the text, the prefix), <0xNN> one byte.
    assert int(tok.token_bytes[ids].sum()) == len(text.encode("utf-8")) + 1


def test_hf_errors(tmp_path, monkeypatch, byte_level_json):
    with pytest.raises(UserError, match="noeos.json.* has no end-of-text token"):
        load_tokenizer_model(_metaspace_json(tmp_path / "noeos.json", with_eos=False))
    broken = tmp_path / "broken.json"
    broken.write_text('{"model": {"type": "BPE"', encoding="utf-8")
    with pytest.raises(UserError, match="broken.json.*not a readable Hugging Face"):
        load_tokenizer_model(broken)
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(UserError, match=r"pip install 'llr-optax\[tokenizers\]'"):
        load_tokenizer_model(byte_level_json)


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(UserError, match="nope.model.*does not exist"):
        load_tokenizer_model(tmp_path / "nope.model")
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(np.random.default_rng(0).bytes(3000))
    with pytest.raises(UserError, match="garbage.model.*not a readable SentencePiece"):
        load_tokenizer_model(garbage)


# ------------------------------------------------------- in the trainer's pipeline


@pytest.mark.parametrize("which", ["spm", "hf"])
def test_build_data_with_a_tokenizer_model(which, tmp_path, spm_model, byte_level_json):
    model = spm_model if which == "spm" else byte_level_json
    docs = documents(40)
    text_file = tmp_path / "corpus.txt"
    text_file.write_text("\n\n".join(docs), encoding="utf-8")
    data = build_data(DataConfig(source=str(text_file), tokenizer_model=str(model), seq_len=16,
                                 batch_size=2, val_fraction=0.1, **SINGLE))
    tok = load_tokenizer_model(model)
    train_docs, val_docs = split_documents(docs, 0.1)
    assert np.array_equal(data.train_tokens, encode_documents(train_docs, tok))
    assert np.array_equal(data.val_tokens, encode_documents(val_docs, tok))
    assert data.vocab_size == tok.vocab_size and data.eos_id == tok.eos_id
    assert data.val_bytes == int(tok.token_bytes[data.val_tokens[1:]].sum())
    assert data.fingerprint["tokenizer_sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    # A larger vocab_size pads the model's embedding; a smaller one is refused.
    padded = build_data(DataConfig(source=str(text_file), tokenizer_model=str(model),
                                   vocab_size=512, seq_len=16, **SINGLE))
    assert padded.vocab_size == 512
    with pytest.raises(UserError, match="vocab_size=100 is smaller"):
        build_data(DataConfig(source=str(text_file), tokenizer_model=str(model),
                              vocab_size=100, seq_len=16, **SINGLE))
