"""K-quant dequantization: edge-reft's torch code vs gguf-py's numpy code, side by side.

    python benchmarks/kquant_dequant.py [--threads 1] [--rounds 7] [--size 2048]

One size x size matrix of random blocks per type (float16 scales finite),
dequantized to float32 by both; the two run in turn each round (median of
rounds) and their outputs are compared bit for bit.  This is what a training
step pays per layer past the dequantized-weights cache (ggufq.DequantCache).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import statistics

import numpy as np
from common import interleaved, table, timed

# type -> byte offsets of its float16 fields
F16_FIELDS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def random_matrix(name: str, size: int, seed: int = 0) -> np.ndarray:
    """(size, bytes per row) of random blocks with finite random float16 scales."""
    import gguf
    nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]][1]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (size * size // 256, nbytes), dtype=np.uint8)
    for off in F16_FIELDS[name]:
        d = (rng.standard_normal(len(raw)) * 1e-3).astype(np.float16)
        raw[:, off:off + 2] = d.view(np.uint8).reshape(-1, 2)
    return raw.reshape(size, -1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--size", type=int, default=2048)
    a = ap.parse_args()
    import gguf
    import torch
    from edge_reft.train import ggufq
    torch.set_num_threads(a.threads)
    rows = []
    for name in F16_FIELDS:
        qtype = gguf.GGMLQuantizationType[name]
        raw = random_matrix(name, a.size)
        raw_t = torch.from_numpy(raw)
        exact = np.array_equal(ggufq.dequantize(raw_t, int(qtype), (a.size, a.size)).numpy().view(np.uint32),
                               gguf.quants.dequantize(raw, qtype).astype(np.float32).view(np.uint32))
        res = interleaved({
            "gguf-py": lambda: {"s": timed(lambda: gguf.quants.dequantize(raw, qtype))},
            "torch": lambda: {"s": timed(lambda: ggufq.dequantize(raw_t, int(qtype), (a.size, a.size)))},
        }, a.rounds)
        ref, ours = (statistics.median(res[k]["s"]) * 1e3 for k in ("gguf-py", "torch"))
        rows.append([name, ref, ours, ref / ours, "yes" if exact else "NO"])
    versions = f"torch {torch.__version__} ({a.threads} thread(s)), gguf-py {importlib.metadata.version('gguf')}"
    print(table(["type", "gguf-py ms", "torch ms", "speed-up", "bit-exact"], rows,
                title=f"\nDequantizing one {a.size}x{a.size} matrix to float32, median of {a.rounds}, {versions}"))


if __name__ == "__main__":
    main()
