"""What each runtime costs in task accuracy: one SmolLM2 patch, SST-2, through llama.cpp and ONNX.

    python benchmarks/sst2_backends.py [--epochs 3] [--precisions fp32,int8,int4]

One LoReFT patch (l1 at block 15, rank 4; 436 SST-2 train examples, 3 epochs,
the defaults otherwise) is trained once on SmolLM2-135M-Instruct's own Q4_1
blocks, then scored on the 436 test examples (log-prob of "positive" vs
"negative" as the first reply token; benchmarks/sst2_scoring.py) through
llama.cpp on the Q4_1 GGUF and through `edge-reft export-onnx` models of the
same GGUF at each precision (onnxruntime-genai's builder on its dequantized
weights: fp32, int8 and int4 blocks of its own).  Without the patch too, so
the patch's gain is shown per runtime, and the share of test examples where
the runtime's answer equals llama.cpp's.  The exports are cached in
EDGE_REFT_CACHE/onnx/.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from common import table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--precisions", default="fp32,int8,int4")
    a = ap.parse_args()
    from sst2_scoring import answers

    from edge_reft.converters.onnx_export import export_onnx
    from edge_reft.models import cache_dir, default_model
    from edge_reft.tasks import sst2_records, write_jsonl
    from edge_reft.train import TrainConfig, train

    gguf = default_model()
    tmp = Path(tempfile.mkdtemp(prefix="sst2-backends-"))
    test = sst2_records("test")
    truth = [r["response"] for r in test]
    out = tmp / "sst2-l1-15-r4.reft"
    t0 = time.perf_counter()
    train(gguf, write_jsonl(sst2_records("train"), tmp / "train.jsonl"), out,
          TrainConfig(layers=(15,), rank=4, positions="l1", epochs=a.epochs), progress=False)
    print(f"trained {out.name} in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    runtimes = [("llama.cpp, Q4_1 GGUF", gguf)]
    for p in a.precisions.split(","):
        t0 = time.perf_counter()
        folder = export_onnx(gguf, cache_dir() / "onnx" / f"smollm2-l15-{p}", precision=p, layers=[15])
        print(f"export-onnx {p}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        runtimes.append((f"ONNX Runtime, export-onnx {p}", folder))
    rows, anchor = [], {}
    for label, model in runtimes:
        got = {}
        for which, patch in (("base", None), ("patch", str(out))):
            got[which] = answers(patch, test, str(model))
            anchor.setdefault(which, got[which])
        acc = {k: sum(x == y for x, y in zip(v, truth)) / len(truth) for k, v in got.items()}
        same = sum(x == y for x, y in zip(got["patch"], anchor["patch"])) / len(truth)
        rows.append([label, acc["base"], acc["patch"], acc["patch"] - acc["base"], same])
        print(rows[-1], file=sys.stderr, flush=True)
    print(table(["runtime", "acc without patch", "acc with patch", "patch's gain", "patched answers = llama.cpp's"],
                rows, title=f"\nSST-2, {len(test)} test examples, one patch (l1 @15 r4, {a.epochs} epochs on 436 "
                            f"train examples, trained on {Path(gguf).name}'s blocks)"))


if __name__ == "__main__":
    main()
