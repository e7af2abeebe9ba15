"""What a saved KV state costs against recomputing the prompt it holds.

    python benchmarks/kv_states.py [--threads 1] [--rounds 5]

One llama.cpp context on the embedded SmolLM2 (F16 KV cache).  For prompts
of several lengths under an f1+l1 patch (it edits position 0, so nothing is
shared with another patch's cache): prefill from scratch, saving the state
(llama_state_seq_get_data) and restoring it (..._set_data); median of rounds.
This is what a context serving many users pays per patch switch with saved
states (runtime/kvstates.py) instead of a full prefill.
"""
from __future__ import annotations

import argparse
import statistics
import time

from common import table, timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    from edge_reft.patch import random_patch
    from edge_reft.runtime import Engine
    e = Engine(n_ctx=2048, n_threads=a.threads)
    pset = e.patch_set(random_patch(e.base, [(10, "f1+l1", 4)], seed=1))
    words = e.prompt_tokens("The quick brown fox jumps over the lazy dog. " * 120, raw=True)
    rows = []
    for n in (34, 128, 512, 1024):
        toks = words[:n]
        pre, save, load, size = [], [], [], 0
        for _ in range(a.rounds):
            e._keep(0)
            pre.append(timed(lambda: e._forward(toks, 0, n, pset)))
            t = time.perf_counter()
            blob = e._save_state()
            save.append(time.perf_counter() - t)
            size = len(blob)
            load.append(timed(lambda: e._load_state(blob)))
        p, s, lo = (statistics.median(x) * 1e3 for x in (pre, save, load))
        rows.append([n, size / 2**20, p, s, lo, p / (s + lo)])
    print(table(["prompt tokens", "state MB", "prefill ms", "save ms", "restore ms", "prefill / (save+restore)"],
                rows, title=f"\nSaved KV states vs recomputing, SmolLM2-135M Q4_1, {a.threads} thread(s), "
                            f"median of {a.rounds}"))


if __name__ == "__main__":
    main()
