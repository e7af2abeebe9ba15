"""Peak memory of `edge-reft train` on real-size K-quant models, against the file's size.

    python benchmarks/train_memory.py [--shapes llama-1b,llama-3b] [--steps 20] [--examples 200]
                                      [--args "--recompute off"]

Each shape is a real architecture at its published size with random weights
(tests/shapes.py: transformers config -> llama.cpp's convert_hf_to_gguf.py ->
llama_model_quantize to Q4_K_M).  `edge-reft train` runs with its defaults
(four blocks spread over the depth, f1+l1, rank 4, the 1 GiB weights cache and
the 1 GiB prefix cache), 200 arithmetic examples, --max-steps 20; its peak RSS
(the kernel's count for that process, as `/usr/bin/time -v` reports it) counts
the pages of the memory-mapped GGUF it touched.  The goal: peak RSS <= file size + 1.5 GiB.  8 B is projected from the
two measured shapes: overhead = a + b * parameters (a straight line through
them), checked against the same goal.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, table

sys.path.insert(0, str(ROOT / "tests"))
import shapes  # noqa: E402

PARAMS = {"llama-1b": 1.236e9, "llama-3b": 3.213e9, "llama-8b": 8.030e9}  # the published models' counts
GIB = 1 << 30


def peak_rss(cmd: list[str]) -> tuple[int, float, str]:
    """(peak RSS in bytes, seconds, stderr) of one process: the kernel's own count for that
    child (``wait4``'s ru_maxrss, what ``/usr/bin/time -v`` prints)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, text=True)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        text = err.read()
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{text[-3000:]}")
    return usage.ru_maxrss << 10, time.perf_counter() - t0, text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="llama-1b,llama-3b")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--examples", type=int, default=200)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--data", default=None, help="JSONL to train on (default: AI2 arithmetic, train half)")
    ap.add_argument("--args", default="", help="more `edge-reft train` options, e.g. \"--recompute off\"")
    a = ap.parse_args()
    rows, points = [], []
    with tempfile.TemporaryDirectory() as tmp:
        from edge_reft.tasks import arithmetic_records, write_jsonl
        data = a.data or write_jsonl(arithmetic_records("train", a.examples), Path(tmp) / "arith.jsonl")
        for name in a.shapes.split(","):
            gguf = shapes.gguf(name, "Q4_K_M")
            size = gguf.stat().st_size
            out = Path(tmp) / f"{name}.reft"
            rss, secs, err = peak_rss([sys.executable, "-m", "edge_reft", "train", str(gguf), "--data", str(data),
                                       "--out", str(out), "--max-steps", str(a.steps), "--device", a.device, *a.args.split()])
            for ln in err.splitlines():
                if ln.startswith("[train]") and ("examples" in ln or "recomputed" in ln):
                    print(f"  {name}: {ln}", file=sys.stderr)
            points.append((PARAMS.get(name, 0.0), rss - size))
            rows.append([name, f"{size / GIB:.2f}", f"{rss / GIB:.2f}", f"{(rss - size) / GIB:.2f}",
                         "yes" if rss <= size + 1.5 * GIB else "NO", f"{secs:.0f}"])
    if len(points) >= 2 and "llama-8b" not in a.shapes:
        (p1, o1), (p2, o2) = points[:2]
        b = (o2 - o1) / (p2 - p1)
        o8 = o1 + b * (PARAMS["llama-8b"] - p1)
        size8 = 4.92 * GIB  # Llama-3.1-8B-Instruct Q4_K_M as published
        rows.append(["llama-8b (projected)", f"{size8 / GIB:.2f}", f"{(size8 + o8) / GIB:.2f}", f"{o8 / GIB:.2f}",
                     "yes" if o8 <= 1.5 * GIB else "NO", "-"])
    print(table(["shape (Q4_K_M, random weights)", "file GiB", "peak RSS GiB", "RSS - file GiB",
                 "<= file + 1.5 GiB", "wall s"], rows,
                title=f"edge-reft train, {a.args or 'defaults'}, {a.examples} examples, --max-steps {a.steps}, "
                       f"device {a.device}"))


if __name__ == "__main__":
    main()
