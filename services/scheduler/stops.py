"""Incremental detokenisation with stop strings: the text streamed to the client never shows a
stop string, nor the start of one that may still complete."""

from __future__ import annotations


class StopChecker:
    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = stop
        self._ids: list[int] = []
        self._text = ""  # all decoded text so far
        self._sent = 0  # characters already released to the client
        self._final: str | None = None

    @property
    def has_tokenizer(self) -> bool:
        return self.tokenizer is not None

    @property
    def text(self) -> str:
        return self._final if self._final is not None else self._text

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token; return (new text safe to show, whether a stop string was hit)."""
        if self.tokenizer is None:
            return "", False
        self._ids.append(token_id)
        # Decoding the whole sequence keeps multi-byte characters and merges right; the hold-back
        # below covers a trailing replacement char from an incomplete UTF-8 sequence.
        self._text = self.tokenizer.decode(self._ids)
        for s in self.stop:
            at = self._text.find(s, max(0, self._sent - len(s)))
            if at != -1:
                self._final = self._text[:at]
                delta = self._final[self._sent :]
                self._sent = len(self._final)
                return delta, True
        safe = len(self._text)
        if self._text.endswith("\ufffd"):
            safe -= 1
        for s in self.stop:  # hold back a suffix that is a prefix of a stop string
            for k in range(min(len(s) - 1, safe), 0, -1):
                if self._text[safe - k : safe] == s[:k]:
                    safe -= k
                    break
        delta = self._text[self._sent : safe] if safe > self._sent else ""
        self._sent = max(self._sent, safe)
        return delta, False
