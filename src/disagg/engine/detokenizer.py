"""Output token ids -> text, incrementally, with stop strings.

Byte-level BPE can split one character across tokens, so text is emitted only once it decodes
cleanly (no trailing U+FFFD). Stop strings are matched on the accumulated text; until the request
ends, the last (longest stop string - 1) characters are held back so a client never sees the
beginning of a stop string that is then cut.
"""

from __future__ import annotations

from disagg.engine.sampling import SamplingParams
from disagg.model.tokenizer import Tokenizer


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.stop = params.stop
        self.include_stop = params.include_stop_str_in_output
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.prefix_offset = 0  # ids[prefix_offset:read_offset] is the last decoded window
        self.read_offset = 0
        self.text = ""
        self.emitted = 0  # characters of `text` already returned

    def add(self, token_ids: list[int]) -> str | None:
        """Append tokens; returns the stop string if one now appears (text is cut there)."""
        self.ids.extend(token_ids)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset :])
        if full.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return None
        new = full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        search_from = max(0, len(self.text) - self.holdback)
        self.text += new
        for s in self.stop:
            idx = self.text.find(s, search_from)
            if idx >= 0:
                self.text = self.text[: idx + len(s) if self.include_stop else idx]
                return s
        return None

    def take(self, final: bool) -> str:
        """Text not yet returned; all of it when the request has ended."""
        end = len(self.text) if final else max(self.emitted, len(self.text) - self.holdback)
        out = self.text[self.emitted : end]
        self.emitted = end
        return out

    def skip_emitted(self) -> None:
        """Mark everything so far as already sent (tokens another worker streamed)."""
        self.emitted = len(self.text)
