"""Where a GPU context's eval-callback cost goes, when the callback edits nothing.

    python benchmarks/gpu/callback_cost.py --model smol8.gguf [--ngl 99] [--steps 128]

Decode steps (one token each, after a 64-token prompt), interleaved step by step
across contexts on one model file, with no patch:
  no callback        a context without cb_eval (plain llama.cpp)
  C callback         the native gate, asking for nothing (one context)
  Python callback    the Python gate, asking for nothing (one context)
  split (default)    the native gate with split decode: unedited steps in a plain context
Each is measured with CUDA graphs on and with GGML_CUDA_DISABLE_GRAPHS=1 (a fresh
process each, since ggml-cuda reads it once).  x = median of paired ratios to
"no callback" in the same process (throughput; 1.000 = free).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import table  # noqa: E402

PROMPT = "The history of astronomy is long and rich. Ancient people watched the sky. " * 6


def measure(model: str, ngl: int, steps: int) -> dict[str, list[float]]:
    from edge_reft.runtime import Engine
    kw = dict(n_ctx=512, n_gpu_layers=ngl)
    engines = {"no callback": Engine(model, patches=False, **kw),
               "C callback, asks nothing": Engine(model, gate="native", split_decode=False, **kw),
               "Python callback, asks nothing": Engine(model, gate="python", split_decode=False, **kw),
               "native gate, split decode": Engine(model, gate="native", split_decode=True, **kw)}
    first = next(iter(engines.values()))
    toks = first._tokenize(PROMPT, add_special=False)
    prompt, cont = toks[:64], (toks[64:] * 4)[:steps]
    times = {k: [] for k in engines}
    for r in range(3):
        for e in engines.values():
            e._keep(0)
            e._forward(prompt, 0, len(prompt), e.patch_set(None))
        for i, tok in enumerate(cont):
            for k, e in engines.items():
                t = time.perf_counter()
                e._forward([tok], len(prompt) + i, len(prompt), e.patch_set(None))
                if r:
                    times[k].append(time.perf_counter() - t)
    for e in engines.values():
        e.close()
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--ngl", type=int, default=99)
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(measure(a.model, a.ngl, a.steps)))
        return
    rows = []
    for graphs in ("on", "off"):
        env = dict(os.environ)
        if graphs == "off":
            env["GGML_CUDA_DISABLE_GRAPHS"] = "1"
        out = subprocess.run([sys.executable, __file__, "--model", a.model, "--ngl", str(a.ngl),
                              "--steps", str(a.steps), "--child"], env=env, capture_output=True,
                             text=True, check=True)
        times = {k: np.array(v) for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}
        base = times["no callback"]
        for k, t in times.items():
            rows.append([k, graphs, float(np.median(t)) * 1e3, float(np.median(base / t))])
    print(table(["context", "CUDA graphs", "decode ms/token (median)", "x vs no callback"], rows,
                title=f"\ncallback cost on {os.path.basename(a.model)}, ngl {a.ngl}, {a.steps} decode steps x 2 rounds, "
                      "no patch"))


if __name__ == "__main__":
    main()
