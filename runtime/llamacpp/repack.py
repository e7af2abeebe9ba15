"""llama.cpp's CPU weight repacking: whether to use its extra CPU buffer types, and why.

A policy over one fact the native layer reads (``cpu_extra_bufts``), kept apart from
the binding so that it can be tested with any list of buffer types.
"""
from __future__ import annotations

import os

from edge_reft.errors import BackendError

from .native import check_version, cpu_extra_bufts

REPACK_MODES = ("auto", "on", "off")
REPACK_ENV = "EDGE_REFT_REPACK"


def choose_repack(mode: str | None = None, bufts: list[str] | None = None) -> tuple[bool, str]:
    """Whether to let llama.cpp repack weights into its extra CPU buffer types, and why.

    The pinned build's AMX buffer type crashes in ggml_backend_amx_mul_mat on Sapphire
    Rapids-class CPUs (ggml-org/llama.cpp#20824), so "auto" turns extra buffer types off
    wherever "AMX" is among them and keeps them elsewhere (ARM and AVX2 repacks are safe and
    faster).  ``mode`` (or $EDGE_REFT_REPACK): "auto", "on" (always, AMX included) or "off";
    ``bufts``: the extra buffer types offered (default: this machine's).
    """
    env = os.environ.get(REPACK_ENV) or None
    mode = mode or env or "auto"
    if mode not in REPACK_MODES:
        src = f"${REPACK_ENV}" if env == mode else "repack"
        raise BackendError(f"{src}: {mode!r}, expected one of {', '.join(REPACK_MODES)}")
    if bufts is None:
        check_version()
        bufts = cpu_extra_bufts()
    listed = ", ".join(bufts) or "none"
    if mode != "auto":
        return mode == "on", f"CPU weight repacking {mode} (forced; extra buffer types here: {listed})"
    if any(b.startswith("AMX") for b in bufts):
        return False, (f"CPU weight repacking off: this CPU's llama.cpp offers AMX ({listed}), whose "
                       f"matmul crashes in the pinned build; {REPACK_ENV}=on forces it")
    return True, f"CPU weight repacking on (extra buffer types: {listed})"
