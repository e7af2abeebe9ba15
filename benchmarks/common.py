"""What every benchmark shares: a table printer and interleaved timing."""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

ROOT = Path(__file__).resolve().parent.parent


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], title: str = "") -> str:
    cells = [[h for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = "  ".join("-" * w for w in widths)
    out = [title] if title else []
    out.append("  ".join(h.ljust(w) for h, w in zip(cells[0], widths)))
    out.append(line)
    out += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
            for r in cells[1:]]
    return "\n".join(out)


def _fmt(c: object) -> str:
    if isinstance(c, float):
        return f"{c:.3f}" if abs(c) < 100 else f"{c:.1f}"
    return str(c)


def interleaved(configs: dict[str, Callable[[], dict[str, float]]], rounds: int) -> dict[str, dict[str, list[float]]]:
    """Run every config once per round, in turn, so drift hits all of them alike."""
    results: dict[str, dict[str, list[float]]] = {k: {} for k in configs}
    for r in range(rounds):
        for name, fn in configs.items():
            for metric, v in fn().items():
                results[name].setdefault(metric, []).append(v)
        print(f"  round {r + 1}/{rounds} done", file=sys.stderr)
    return results


def stats(xs: Sequence[float]) -> tuple[float, float]:
    return min(xs), statistics.median(xs)


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t
