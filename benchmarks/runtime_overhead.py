"""Cost of applying patches inside llama.cpp, measured side by side in one process.

    python benchmarks/runtime_overhead.py [--rounds 5] [--model M.gguf]

Every configuration has its own engine (llama.cpp contexts) on the same model file.
"one context" rows keep every token in the context with the eval callback; "split"
rows decode what a patch does not edit in a second context without it (the
default with --ngl > 0).
Prefill (256 tokens) is interleaved round by round; decode (128 steps) is
interleaved step by step: step i of every configuration runs back to back,
so drift and stalls of a shared, noisy machine hit all of them alike.  The
ratio column is throughput relative to "no callback", taken as the median of
the paired per-step (per-round for prefill) time ratios: 1.00 = free.  "request x"
is the same for a whole request (prefill + every decode step of a round, so a
split context's KV move is counted once per request).
Then: patch load + validate + swap latency next to llama.cpp's own LoRA
adapter init + set (a random LoRA GGUF of the same model, made here).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

from common import table

TEXT = ("The history of astronomy is long and rich. Ancient people watched the sky and "
        "noticed the regular motion of the sun, the moon and the planets. ") * 40


def patch_sets(base):
    from edge_reft.patch import random_patch
    mid, a, b = base.n_layer // 2, base.n_layer // 3, 2 * base.n_layer // 3
    return {
        "no patch": None,
        f"prompt-scoped l1 @{mid} r4": [random_patch(base, [(mid, "l1", 4)])],
        f"prompt-scoped f1+l1 @{mid} r4": [random_patch(base, [(mid, "f1+l1", 4)])],
        f"all positions @{mid} r4": [random_patch(base, [(mid, "all", 4)])],
        f"two patches: l1 @{a} + all @{b}": [random_patch(base, [(a, "l1", 4)]),
                                             random_patch(base, [(b, "all", 4)], seed=1)],
    }


def measure(configs: dict, prompt: list[int], cont: list[int], rounds: int):
    """configs: name -> (engine, pset).  Returns name -> (prefill times, decode times, request
    times)."""
    pre = {k: [] for k in configs}
    dec = {k: [] for k in configs}
    req = {k: [] for k in configs}
    n = len(prompt)
    for r in range(rounds + 1):  # round 0 warms up
        for name, (engine, pset) in configs.items():
            engine._keep(0)
            t = time.perf_counter()
            engine._forward(prompt, 0, n, pset)
            if r:
                pre[name].append((time.perf_counter() - t) / n)
        for i, tok in enumerate(cont):
            for name, (engine, pset) in configs.items():
                t = time.perf_counter()
                engine._forward([tok], n + i, n, pset)
                if r:
                    dec[name].append(time.perf_counter() - t)
        if r:
            for k in configs:
                req[k].append(pre[k][-1] * n + sum(dec[k][-len(cont):]))
        print(f"  round {r}/{rounds}", file=sys.stderr)
    return pre, dec, req


def move_ms(engine, prompt: list[int], reps: int = 20) -> float:
    """Median time to move the KV cache of ``prompt`` from one context to the other."""
    nat = engine.native
    nat.keep(0)
    nat.decode(np.asarray(prompt, dtype=np.int32), 0, np.zeros(len(prompt), np.int8), edit=False)
    times = []
    for i in range(reps):
        t = time.perf_counter()
        nat.use(edit=i % 2 == 0)
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e3


def lora_gguf(path: str, base, rank: int = 8) -> None:
    """A LoRA adapter on q and v of every block, random weights, in llama.cpp's layout."""
    import gguf
    w = gguf.GGUFWriter(path, base.architecture)
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(rank))
    rng = np.random.default_rng(0)
    d, kv = base.n_embd, 192  # SmolLM2: 3 kv heads x 64
    for L in range(base.n_layer):
        for name, n_out in (("attn_q", d), ("attn_v", kv)):
            w.add_tensor(f"blk.{L}.{name}.weight.lora_a", (rng.standard_normal((rank, d)) * 0.01).astype(np.float32))
            w.add_tensor(f"blk.{L}.{name}.weight.lora_b", (rng.standard_normal((n_out, rank)) * 0.01).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def swap_latency(engine, tmp: str, reps: int = 200) -> list[list[object]]:
    from edge_reft.patch import random_patch
    from edge_reft.reftfile import load_patch, save_patch
    from edge_reft.runtime import PatchSet
    rows = []
    n = engine.base.n_layer
    for spec, label in (([(n // 2, "l1", 4)], "LoReFT r4, 1 layer"),
                        ([(L * n // 5, "f1+l1", 8) for L in range(1, 5)], "LoReFT r8, 4 layers")):
        p = save_patch(random_patch(engine.base, spec), os.path.join(tmp, "p.reft"))
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            PatchSet([load_patch(p, model=engine.base)])
            times.append(time.perf_counter() - t)
        rows.append([f"{label}: load + validate + swap", os.path.getsize(p),
                     min(times) * 1e6, float(np.median(times)) * 1e6])
    lora = os.path.join(tmp, "lora.gguf")
    lora_gguf(lora, engine.base)
    times = []
    for _ in range(20):
        t = time.perf_counter()
        engine.native.lora_set(engine.native.lora_init(lora))
        times.append(time.perf_counter() - t)
        engine.native.lora_set(None)
    rows.append([f"llama.cpp LoRA r8 q,v, {engine.base.n_layer} layers: init + set", os.path.getsize(lora),
                 min(times) * 1e6, float(np.median(times)) * 1e6])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--ngl", type=int, default=0, help="layers on the GPU")
    ap.add_argument("--split", choices=["both", "on", "off"], default="both",
                    help="which decode-context modes to measure for the native gate")
    a = ap.parse_args()
    from edge_reft.models import default_model
    from edge_reft.runtime import Engine
    from edge_reft.runtime.llamacpp.gate import load_gate
    model = a.model or str(default_model())
    # with no layer on a GPU, keep every op on the CPU (llama.cpp would ship big batches to one)
    kw = dict(n_ctx=512, n_ubatch=512, n_threads=a.threads, n_gpu_layers=a.ngl, op_offload=a.ngl > 0)
    gates = (["native"] if load_gate() else []) + ["python"]
    none = Engine(model, patches=False, **kw)
    toks = none._tokenize(TEXT, add_special=False)
    prompt, cont = toks[:256], toks[256:384]
    configs = {"no callback": (none, none.patch_set(None))}
    modes = {"both": (False, True), "on": (True,), "off": (False,)}[a.split]
    for g in gates:
        for split in (modes if g == "native" else (False,)):
            label = f"{g} gate, {'split' if split else 'one context'}"
            for name, patches in patch_sets(none.base).items():
                e = Engine(model, gate=g, split_decode=split, **kw)
                configs[f"{label}: {name}"] = (e, e.patch_set(patches))
    pre, dec, req = measure(configs, prompt, cont, a.rounds)
    rows = []
    for name in configs:
        p, d, q = np.array(pre[name]), np.array(dec[name]), np.array(req[name])
        rp = np.median(np.array(pre["no callback"]) / p)
        rd = np.median(np.array(dec["no callback"]) / d)
        rq = np.median(np.array(req["no callback"]) / q)
        rows.append([name, p.min() * 1e3, np.median(p) * 1e3, rp, d.min() * 1e3, np.median(d) * 1e3, rd, rq])
    print(table(["config", "prefill ms/tok min", "median", "prefill x", "decode ms/tok min", "median",
                 "decode x", "request x"], rows,
                title=f"\nllama.cpp + edge-reft on {os.path.basename(model)}: prefill {len(prompt)} + decode "
                f"{len(cont)}, {a.rounds} rounds, {a.threads or os.cpu_count()} threads, ngl {a.ngl} "
                f"(x = throughput relative to no callback, median of paired ratios)"))
    moved = [(k, e) for k, (e, _) in configs.items() if e.native.split and e.native.moves]
    if moved:
        print(table(["config", "KV moves", "ms per move (256 tokens)"],
                    [[k, e.native.moves, move_ms(e, prompt)] for k, e in moved[:1]],
                    title="\nsplit decode: moving a prompt's KV cache between the two contexts"))
    with tempfile.TemporaryDirectory() as tmp:
        print(table(["adapter", "file bytes", "min us", "median us"], swap_latency(none, tmp),
                    title="\npatch swap latency vs llama.cpp's LoRA adapter"))


if __name__ == "__main__":
    main()
