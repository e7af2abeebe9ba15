"""The one rule every writer obeys before any work: an output never replaces an input, and never
replaces a file of another kind (or a folder it did not write) unless the user passes --force.

``edge-reft train m.gguf --data d.jsonl --out m.gguf`` must fail in the first
second, not after training, and must never leave the model replaced by a
patch.  Core module: imports nothing from edge-reft but ``errors``.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Iterable

from .errors import ReftError

Pathish = str | os.PathLike[str]


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_output(out: Pathish, inputs: Iterable[Pathish | None] = (), *, flag: str = "--out",
                 expect_suffix: str = ".reft", force: bool = False, folder: bool = False,
                 marker: str | None = None) -> Path:
    """Refuse ``out`` (before anything is computed) when writing it would destroy an input, a
    non-``expect_suffix`` file, or a non-empty folder without ``marker``; return it as a Path.

    ``folder``: the output is a folder replaced as a whole (inputs inside it count too).
    ``force`` allows replacing other files/folders, never an input."""
    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise ReftError(f"{flag} {out}: the folder {parent} does not exist (create it first)")
    real = out.resolve()
    for given in inputs:
        src = Path(given) if given is not None else None
        if src is None or not src.exists():  # nothing to destroy; reading it will say it is missing
            continue
        same = False
        try:
            same = out.exists() and src.exists() and os.path.samefile(out, src)
        except OSError:
            pass
        if same or real == src.resolve() or (folder and _inside(src.resolve(), real)):
            what = "holds the input" if folder and not same and real != src.resolve() else "is the input"
            raise ReftError(f"{flag} {out}: {what} {src}; writing there would destroy it "
                            "(choose another output path)")
    if not (out.exists() or out.is_symlink()):
        return out
    st = os.stat(out) if out.exists() else os.lstat(out)
    if folder:
        if not stat.S_ISDIR(st.st_mode):
            raise ReftError(f"{flag} {out}: exists and is not a folder")
        if not force and any(out.iterdir()) and not (marker and (out / marker).exists()):
            raise ReftError(f"{flag} {out}: a folder with other files in it (no {marker or 'output'} "
                            "written by edge-reft); pass --force to replace it")
        return out
    if stat.S_ISDIR(st.st_mode):
        raise ReftError(f"{flag} {out}: is a folder, expected a file name (e.g. {out / ('patch' + expect_suffix)})")
    if not stat.S_ISREG(st.st_mode) and not stat.S_ISLNK(st.st_mode):
        raise ReftError(f"{flag} {out}: exists and is not a regular file; refusing to replace it")
    if out.suffix != expect_suffix and not force:
        raise ReftError(f"{flag} {out}: exists and is not a {expect_suffix} file; pass --force to "
                        "replace it (or choose another name)")
    return out
