"""Tokenizer wrapper and streaming detokenisation, on the demo's byte-level tokenizer and tiny hand-built ones."""

from __future__ import annotations

import json

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers
from transformers import AutoTokenizer

from shared.model import IncrementalDecoder, Tokenizer, ensure_demo_checkpoint, load_tokenizer
from shared.model.demo import BOS_TOKEN_ID, EOS_TOKEN_ID, byte_tokenizer

TEXT = "naïve café – 東京 🚀 done"


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return ensure_demo_checkpoint(tmp_path_factory.mktemp("model") / "demo")


@pytest.fixture(scope="module")
def demo_tokenizer(demo_dir) -> Tokenizer:
    return load_tokenizer(demo_dir)


def _metaspace_tokenizer() -> tokenizers.Tokenizer:
    """SentencePiece-style words: '▁' marks a leading space, which decoding drops at the very start."""
    vocab = {"<unk>": 0, "<s>": 1, "▁Hello": 2, "▁world": 3, "!": 4}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    return tok


def test_demo_tokenizer_is_byte_level_with_bos(demo_tokenizer):
    ids = demo_tokenizer.encode(TEXT)
    assert ids[0] == BOS_TOKEN_ID
    assert ids[1:] == list(TEXT.encode("utf-8"))
    assert demo_tokenizer.decode(ids) == TEXT
    assert demo_tokenizer.decode([*ids, EOS_TOKEN_ID]) == TEXT
    assert demo_tokenizer.decode([*ids, EOS_TOKEN_ID], skip_special_tokens=False) == f"<s>{TEXT}</s>"
    assert demo_tokenizer.vocab_size == 258
    assert demo_tokenizer.eos_token_ids == (EOS_TOKEN_ID,)
    assert demo_tokenizer.bos_token_id == BOS_TOKEN_ID


def test_demo_tokenizer_agrees_with_transformers(demo_dir, demo_tokenizer):
    hf = AutoTokenizer.from_pretrained(demo_dir)
    assert hf(TEXT)["input_ids"] == demo_tokenizer.encode(TEXT)
    assert hf.decode(demo_tokenizer.encode(TEXT), skip_special_tokens=True) == TEXT


def test_add_bos_token_flag_of_tokenizer_config_wins():
    tok = _metaspace_tokenizer()
    assert Tokenizer(tok, bos_token_id=1).encode("Hello world") == [2, 3]
    assert Tokenizer(tok, bos_token_id=1, add_bos_token=True).encode("Hello world") == [1, 2, 3]


def test_add_bos_token_false_removes_a_post_processor_bos():
    assert Tokenizer(byte_tokenizer(), bos_token_id=BOS_TOKEN_ID, add_bos_token=False).encode("hi") == list(b"hi")


def test_no_tokenizer_json_means_no_tokenizer(tmp_path):
    assert load_tokenizer(tmp_path) is None


def test_eos_ids_come_from_tokenizer_config_config_and_generation_config(tmp_path):
    _metaspace_tokenizer().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "<s>"}, "eos_token": "!", "add_bos_token": True}))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 4}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [4, 0]}))
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.eos_token_ids == (4, 0)
    assert tokenizer.bos_token_id == 1
    assert tokenizer.encode("Hello") == [1, 2]


def test_streaming_never_shows_half_a_character(demo_tokenizer):
    decoder = IncrementalDecoder(demo_tokenizer)
    pieces = [decoder.push(i) for i in demo_tokenizer.encode(TEXT)[1:]]
    assert "".join(pieces) == TEXT == decoder.text
    assert not any("\ufffd" in p for p in pieces)
    rocket = list("🚀".encode("utf-8"))
    start = len(TEXT.encode("utf-8").split("🚀".encode("utf-8"))[0])
    # the first three bytes of the 4-byte rocket print nothing; the fourth prints all of it
    assert pieces[start : start + len(rocket)] == ["", "", "", "🚀"]


def test_flush_releases_an_incomplete_character(demo_tokenizer):
    decoder = IncrementalDecoder(demo_tokenizer)
    assert decoder.push(ord("a")) == "a"
    assert decoder.push("é".encode("utf-8")[0]) == ""
    assert decoder.flush() == "\ufffd"


def test_streaming_keeps_leading_spaces_after_the_prompt():
    tokenizer = Tokenizer(_metaspace_tokenizer())
    prompt = tokenizer.encode("Hello")
    assert tokenizer.decode([3]) == "world"  # decoded alone, the space is lost
    decoder = IncrementalDecoder(tokenizer, context_ids=prompt)
    assert [decoder.push(i) for i in (3, 4)] == [" world", "!"]  # "▁world", "!"
