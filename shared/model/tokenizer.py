"""Text <-> token ids with a checkpoint's tokenizer.json, and streaming detokenisation."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tokenizers

from shared.model.config import token_ids

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# Files whose `eos_token_id` also ends generation (Llama 3 lists several ids in generation_config.json).
_EOS_ID_FILES = ("config.json", "generation_config.json")
# Decoding this character means the ids so far end inside a multi-byte UTF-8 character.
_REPLACEMENT_CHAR = "\ufffd"
# Tokens of context decoded together with each new one, so merges and leading spaces come out right.
_DECODE_CONTEXT_TOKENS = 5


class Tokenizer:
    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        bos_token_id: int | None = None,
        eos_token_ids: Sequence[int] = (),
        add_bos_token: bool | None = None,
    ):
        """add_bos_token: tokenizer_config.json's flag; None leaves BOS to tokenizer.json's post-processor."""
        self._tokenizer = tokenizer
        self.bos_token_id = bos_token_id
        self.eos_token_ids: tuple[int, ...] = tuple(eos_token_ids)
        self._add_bos_token = add_bos_token

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of text, with BOS exactly when the checkpoint's tokenizer adds it."""
        ids = self._tokenizer.encode(text, add_special_tokens=True).ids
        bos = self.bos_token_id
        if bos is not None and self._add_bos_token is True and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        if bos is not None and self._add_bos_token is False and ids and ids[0] == bos:
            ids = ids[1:]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)


class IncrementalDecoder:
    """Turns generated ids into text as they arrive, never emitting half a UTF-8 character.

    Each push decodes a short window of ids twice (without and with the new id) and returns the
    difference, holding it back while the text still ends in an incomplete character.
    """

    def __init__(self, tokenizer: Tokenizer, context_ids: Sequence[int] = ()):
        """context_ids: the prompt's ids (their last few give the first generated token its spacing)."""
        self._tokenizer = tokenizer
        self._ids = list(context_ids[-_DECODE_CONTEXT_TOKENS:]) if context_ids else []
        self._prefix_offset = 0  # start of the decoding window
        self._read_offset = len(self._ids)  # ids before this are already emitted
        self.text = ""  # everything emitted so far

    def push(self, token_id: int) -> str:
        """Add one generated id; returns the new printable text (possibly empty)."""
        self._ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        """Text still held back at the end of generation (an incomplete character decodes as U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        window = self._ids[self._prefix_offset :]
        emitted = self._tokenizer.decode(self._ids[self._prefix_offset : self._read_offset])
        decoded = self._tokenizer.decode(window)
        if len(decoded) <= len(emitted) or (decoded.endswith(_REPLACEMENT_CHAR) and not final):
            return ""
        new_text = decoded[len(emitted) :]
        # Keep only the ids the next window needs.
        self._ids = self._ids[self._read_offset :]
        self._prefix_offset, self._read_offset = 0, len(self._ids)
        self.text += new_text
        return new_text


def load_tokenizer(path: str | Path) -> Tokenizer | None:
    """The checkpoint's tokenizer, or None when it has no tokenizer.json."""
    path = Path(path)
    tokenizer_file = path / TOKENIZER_FILE
    if not tokenizer_file.is_file():
        return None
    tokenizer = tokenizers.Tokenizer.from_file(str(tokenizer_file))
    tokenizer_config = _read_json(path / TOKENIZER_CONFIG_FILE)

    def special_id(key: str) -> int | None:
        token = tokenizer_config.get(key)
        content = token.get("content") if isinstance(token, dict) else token
        return tokenizer.token_to_id(content) if content else None

    eos_ids: list[int] = []
    for candidate in [special_id("eos_token")] + [
        i for name in _EOS_ID_FILES for i in token_ids(_read_json(path / name).get("eos_token_id"))
    ]:
        if candidate is not None and candidate not in eos_ids:
            eos_ids.append(candidate)
    bos_id = special_id("bos_token")
    if bos_id is None:
        bos_id = _read_json(path / "config.json").get("bos_token_id")
    return Tokenizer(tokenizer, bos_id, eos_ids, tokenizer_config.get("add_bos_token"))


def _read_json(file: Path) -> dict[str, Any]:
    return json.loads(file.read_text()) if file.is_file() else {}
