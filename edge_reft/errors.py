"""The one exception family of edge-reft.

Every failure a user can cause (a bad file, a patch for another model, a
malformed request) is a ``ReftError``; its message names the file or the
field, what was expected and what was found.
"""
from __future__ import annotations


class ReftError(Exception):
    """Base class of every error edge-reft raises on purpose."""


class ReftFormatError(ReftError):
    """A `.reft` (or model GGUF) file is malformed; lists every problem found."""

    def __init__(self, path: object, problems: list[str] | str):
        self.path = str(path)
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        noun = "problem" if len(self.problems) == 1 else "problems"
        super().__init__(f"{self.path}: {len(self.problems)} {noun}:\n{lines}")


class PatchMismatchError(ReftError):
    """A patch was made for another base model than the one in hand."""


class PositionError(ReftError):
    """A position rule is malformed, or cannot be applied to this prompt."""


class BackendError(ReftError):
    """A runtime backend failed (llama.cpp, ONNX Runtime)."""
