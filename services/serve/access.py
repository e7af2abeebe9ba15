"""Optional per-key patch authorization for the server (``edge-reft serve --keys KEYS.json``).

KEYS.json maps a bearer key to the patch names it may use, or ``"*"`` for all:

    {"k-alice-6f1c...": ["alice"], "k-ops-91ab...": "*"}

With keys, every ``/v1`` request needs ``Authorization: Bearer KEY``; a key sees
(``/v1/models``) and uses only its own patches, and a patch it may not use answers
exactly like a missing one, so a client cannot probe which names exist.
"""
from __future__ import annotations

import hmac
import json
import os
import re
from dataclasses import dataclass

from edge_reft.errors import ReftError
from edge_reft.spec import PATCH_NAME

_NAME = re.compile(PATCH_NAME)
_KEY = re.compile(r"\A[\x21-\x7e]{8,512}\Z")  # printable ASCII, no spaces: what a header can carry


@dataclass(frozen=True)
class Grant:
    """What one client may use: every patch (``names is None``) or the names listed."""
    names: frozenset[str] | None = None

    def allows(self, name: str) -> bool:
        return self.names is None or name in self.names


EVERYTHING = Grant()


class AccessKeys:
    def __init__(self, grants: dict[str, Grant]):
        self._grants = {k.encode(): g for k, g in grants.items()}

    def __len__(self) -> int:
        return len(self._grants)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "AccessKeys":
        """Read and validate KEYS.json; every problem is listed in one error."""
        try:
            with open(path, "rb") as f:
                data = json.loads(f.read(1 << 20))
        except (OSError, ValueError) as e:
            raise ReftError(f"{path}: cannot read the keys file ({e}); expected a JSON object "
                            '{"KEY": ["patch", ...] or "*"}') from None
        if not isinstance(data, dict) or not data:
            raise ReftError(f'{path}: expected a non-empty JSON object {{"KEY": ["patch", ...] or "*"}}')
        problems, grants = [], {}
        for key, names in data.items():
            shown = f"{key[:4]}..." if len(key) > 4 else repr(key)
            if not _KEY.match(key):
                problems.append(f"key {shown}: expected 8 to 512 printable ASCII characters without spaces")
            if names == "*":
                grants[key] = EVERYTHING
            elif isinstance(names, list) and all(isinstance(n, str) and _NAME.match(n) for n in names):
                grants[key] = Grant(frozenset(names))
            else:
                problems.append(f"key {shown}: expected a list of patch names or \"*\", found {names!r:.60}")
        if problems:
            raise ReftError(f"{path}: " + "; ".join(problems))
        return cls(grants)

    @classmethod
    def single(cls, key: str, source: str = "--api-key") -> "AccessKeys":
        """One key that may use every patch (``serve --api-key``)."""
        if not _KEY.match(key):
            raise ReftError(f"{source}: expected 8 to 512 printable ASCII characters without spaces")
        return cls({key: EVERYTHING})

    def merged(self, other: "AccessKeys | None") -> "AccessKeys":
        out = AccessKeys({})
        out._grants = {**self._grants, **(other._grants if other else {})}
        return out

    def grant(self, authorization: str | None) -> Grant | None:
        """The grant of an ``Authorization: Bearer KEY`` header, or None (no or unknown key).
        Every key is compared in constant time, so timing does not tell how close a guess is."""
        if not authorization or not authorization.startswith("Bearer "):
            return None
        given = authorization[7:].strip().encode("utf-8", "replace")
        found = None
        for key, g in self._grants.items():
            if hmac.compare_digest(key, given):
                found = g
        return found
