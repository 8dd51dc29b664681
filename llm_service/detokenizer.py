"""A sequence's text: incremental detokenization that never emits half of a UTF-8 character, and
stop strings.

Byte-level BPE tokens can end inside a multi-byte character; decoding such a prefix yields U+FFFD.
We decode a short window of recent tokens and emit only text that has become stable (the same
approach as text-generation-inference and vLLM), so each delta is whole characters. StopMatcher
holds back text that may begin a stop string and cuts the text before the first one.
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the decoding window
        self.read_offset = 0  # tokens before this have been emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Add one token; return the newly stable text (possibly empty)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return full[len(prefix) :]
        return ""

    def flush(self) -> str:
        """At the end of generation: whatever is left, replacement characters included."""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix) :]


class StopMatcher:
    """Holds back text that may be the start of a stop string; cuts the text at the first stop."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.text = ""
        self.emitted = 0

    def feed(self, piece: str) -> tuple[str, bool]:
        """Append piece; return (text safe to emit now, whether a stop string was hit)."""
        self.text += piece
        search_from = max(0, self.emitted - self.hold)
        hits = [i for i in (self.text.find(s, search_from) for s in self.stops) if i >= 0]
        if hits:
            out = self.text[self.emitted : min(hits)]
            self.emitted = len(self.text)
            return out, True
        safe_end = max(self.emitted, len(self.text) - self.hold)
        out = self.text[self.emitted : safe_end]
        self.emitted = safe_end
        return out, False

    def rest(self) -> str:
        out = self.text[self.emitted :]
        self.emitted = len(self.text)
        return out


class TextOutput:
    """One sequence's answer as text: tokens in, stable text out, cut before the first stop string."""

    def __init__(self, tokenizer, stops: tuple[str, ...]):
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.stops = StopMatcher(stops)

    def add(self, token_id: int) -> tuple[str, bool]:
        """One more token -> (text to emit now, whether the text reached a stop string)."""
        return self.stops.feed(self.detokenizer.add(token_id))

    def close(self) -> str:
        """The answer ended without a stop string (EOS, max_tokens): the text still held back, up to a
        stop string that the detokenizer's tail completes."""
        tail, hit = self.stops.feed(self.detokenizer.flush())
        return tail if hit else tail + self.stops.rest()
