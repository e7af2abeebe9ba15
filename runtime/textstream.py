"""Token bytes to text, incrementally, with stop strings held back until decided."""
from __future__ import annotations

import codecs
from typing import Sequence


class TextStream:
    """Feed token pieces (bytes); get text that is safe to show.

    Multi-byte UTF-8 characters split across tokens are joined, and text that
    could be the start of a stop string is held back until it is known not
    to be one.  ``stopped`` turns true at the first full stop string, and the
    text is cut just before it.
    """

    def __init__(self, stop: Sequence[str] = ()):
        self.stop = [s for s in stop if s]
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pending = ""
        self.text = ""
        self.stopped = False

    def feed(self, piece: bytes) -> str:
        if self.stopped:
            return ""
        self.pending += self.decoder.decode(piece)
        return self._release(final=False)

    def close(self) -> str:
        if self.stopped:
            return ""
        self.pending += self.decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        hits = [(self.pending.find(s), s) for s in self.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if hits:
            i = min(hits)[0]
            out, self.pending, self.stopped = self.pending[:i], "", True
        elif final:
            out, self.pending = self.pending, ""
        else:
            hold = max((k for s in self.stop for k in range(1, len(s))
                        if self.pending.endswith(s[:k])), default=0)
            cut = len(self.pending) - hold
            out, self.pending = self.pending[:cut], self.pending[cut:]
        self.text += out
        return out
