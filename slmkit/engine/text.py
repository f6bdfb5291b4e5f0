"""Streaming text: incremental detokenization and stop strings.

Byte-level BPE tokens do not align with characters: a multi-byte UTF-8 character (an
emoji, a CJK character) can be split across tokens, and decoding a prefix of the tokens
then ends in U+FFFD. :class:`IncrementalDetokenizer` only releases text once it is
complete, so the concatenation of the deltas always equals the full decode.

:class:`StopStringFilter` holds back the tail of the text that could still be the start
of a stop string, so that a client never sees part of a stop string.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turn a growing list of token ids into text deltas that are whole characters.

    Decodes a short window of recent tokens (from ``prefix`` to the end) and compares it
    with the same window without the newest tokens; the difference is the new text. A
    window that ends in U+FFFD is an unfinished character: nothing is released until a
    later token completes it (or :meth:`flush` at the end).

    Args:
        tokenizer: a transformers tokenizer.
        skip_special_tokens: drop special tokens (``<|im_end|>``, ...) from the text.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # start of the decode window
        self._read = 0    # tokens whose text was already released

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip,
                                     clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Append one token; return the newly completed text (possibly "")."""
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            self._prefix, self._read = self._read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """Release whatever is left at the end of generation (even an incomplete char)."""
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return after[len(before):] if len(after) > len(before) else ""


class StopStringFilter:
    """Detect stop strings in streamed text and hold back possible partial matches.

    Args:
        stops: stop strings (non-empty).

    Feed text with :meth:`push`; it returns ``(safe_text, stopped)``. Once ``stopped`` is
    True the text up to (not including) the stop string has been released in full.
    """

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self._pending = ""
        self.stopped = False

    def push(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        if self.stopped:
            return "", True
        buf = self._pending + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            self._pending = ""
            return buf[:min(hits)], True
        hold = self._partial_suffix(buf)
        self._pending = buf[len(buf) - hold:] if hold else ""
        return buf[:len(buf) - hold], False

    def flush(self) -> str:
        """Release held-back text at the end (no stop string followed)."""
        out, self._pending = self._pending, ""
        return "" if self.stopped else out

    def _partial_suffix(self, buf: str) -> int:
        """Length of the longest suffix of ``buf`` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:n]):
                    best = n
                    break
        return best
