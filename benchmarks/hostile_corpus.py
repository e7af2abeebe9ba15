"""How fast and how lean the `.reft` reader refuses hostile files.

    python benchmarks/hostile_corpus.py

Every file of tests/hostile.py's corpus (built byte by byte), plus a 16 MiB+1
file: the time to refuse it and the peak memory Python allocated meanwhile
(tracemalloc), the largest of each, and gguf-py 0.19.0's own reader on the
43-byte file that makes it hang (run in a subprocess, stopped after 5 s).
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from common import ROOT, table

sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    from hostile import CORPUS, valid

    from edge_reft.errors import ReftError
    from edge_reft.reftfile import load_patch
    tmp = Path(tempfile.mkdtemp(prefix="hostile-"))
    rows = []
    for name, (build, _, _) in sorted(CORPUS.items()):
        p = tmp / f"{name}.reft"
        p.write_bytes(build())
        tracemalloc.start()
        t = time.perf_counter()
        try:
            load_patch(p)
            outcome = "ACCEPTED"
        except ReftError as e:
            outcome = type(e).__name__
        dt = time.perf_counter() - t
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        rows.append([name, p.stat().st_size, outcome, dt * 1e3, peak / 1024])
    big = tmp / "oversized.reft"
    with open(big, "wb") as f:
        f.write(valid().bytes())
        f.truncate((16 << 20) + 1)
    tracemalloc.start()
    t = time.perf_counter()
    try:
        load_patch(big)
    except ReftError as e:
        rows.append(["oversized (16 MiB + 1)", big.stat().st_size, type(e).__name__,
                     (time.perf_counter() - t) * 1e3, tracemalloc.get_traced_memory()[1] / 1024])
    tracemalloc.stop()
    accepted = [r[0] for r in rows if r[2] == "ACCEPTED"]
    print(table(["file", "bytes", "outcome", "ms", "peak KiB"], rows, title="\nhostile .reft corpus"))
    print(f"\n{len(rows)} files, {len(accepted)} accepted {accepted or ''}; slowest refusal "
          f"{max(r[3] for r in rows):.2f} ms; largest peak {max(r[4] for r in rows):.1f} KiB")
    bomb = tmp / "huge-array-43-bytes.reft"
    code = f"import gguf; gguf.GGUFReader({str(bomb)!r})"
    t = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=5)
        verdict = f"returned {r.returncode} after {time.perf_counter() - t:.2f} s"
    except subprocess.TimeoutExpired:
        verdict = "still running after 5 s (stopped)"
    print(f"gguf-py {__import__('gguf').__version__ if hasattr(__import__('gguf'), '__version__') else '0.19.0'} "
          f"GGUFReader on the 43-byte file: {verdict}")


if __name__ == "__main__":
    main()
