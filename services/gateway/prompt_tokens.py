"""The checkpoint's tokenizer in the gateway: a rendered chat prompt becomes token ids exactly as
transformers' `apply_chat_template(tokenize=True)` makes them (no special tokens added: the
template writes BOS itself), and generated ids become the token strings logprobs report."""

from __future__ import annotations

from pathlib import Path

import tokenizers

TOKENIZER_FILE = "tokenizer.json"


class PromptTokenizer:
    def __init__(self, tokenizer: tokenizers.Tokenizer):
        self._tokenizer = tokenizer

    @classmethod
    def load(cls, checkpoint: Path) -> "PromptTokenizer | None":
        path = checkpoint / TOKENIZER_FILE
        return cls(tokenizers.Tokenizer.from_file(str(path))) if path.is_file() else None

    def encode_rendered(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def token_text(self, token_id: int) -> str:
        """One token's own text (special tokens included), as logprobs list it."""
        return self._tokenizer.decode([token_id], skip_special_tokens=False)
