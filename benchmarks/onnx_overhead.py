"""Cost of patches in the ONNX Runtime backend, measured side by side in one run.

    python onnx_overhead.py [--rounds 5] [--threads 2] [--model M.gguf]     (from benchmarks/)

1. Patches: per precision (int4, fp32), one export with patch inputs at every
   block; no patch / l1 / all positions / two patches on that one session, each
   configuration with its own KV cache and bound inputs; prefill (128 tokens)
   interleaved round by round, decode (48 steps) step by step, in a shuffled
   order, so drift hits all alike.  x = throughput relative to no patch
   (median of paired ratios).
2. The inputs' own cost: the builder's graph (no patch inputs) against exports
   with inputs at 3 blocks and at all of them, decode step by step in a
   shuffled order, one thread each (no two thread pools spinning at once).
3. Batching: 4 prompts with 4 different patches in one ``generate_batch``
   against 4 ``generate`` calls (the same tokens come out), rounds alternating.
4. llama.cpp on the same prompts and patch: speed, and how many greedy tokens
   of the ONNX models equal llama.cpp's on the user's Q4_1 GGUF.
Exports are cached in EDGE_REFT_CACHE/onnx/ (built once, ~15 s each).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from common import table

TEXT = ("The history of astronomy is long and rich. Ancient people watched the sky and "
        "noticed the regular motion of the sun, the moon and the planets. ") * 20
PROMPTS = ["Tell me a long story about a dragon.", "Explain how a bicycle works, step by step.",
           "Write a poem about the sea.", "Describe your ideal holiday in detail."]


def exports(model: str) -> dict[str, str]:
    from edge_reft.converters.onnx_export import export_onnx
    from edge_reft.models import cache_dir
    root = cache_dir() / "onnx"
    out = {}
    for name, precision, layers in (("int4", "int4", None), ("fp32", "fp32", None),
                                    ("int4 @8,15,22", "int4", [8, 15, 22])):
        tag = name.replace(" @", "-l").replace(",", "-")
        out[name] = str(export_onnx(model, root / f"bench-{tag}", precision=precision, layers=layers))
    return out


def builder_graph(model: str) -> str:
    """The builder's own int4 graph, without patch inputs (built once)."""
    from edge_reft.converters.onnx_export import run_builder
    from edge_reft.fingerprint import from_gguf
    from edge_reft.train.hf import hf_dir
    from edge_reft.models import cache_dir
    out = cache_dir() / "onnx" / "bench-builder-int4"
    if not (out / "model.onnx").exists():
        out.mkdir(parents=True, exist_ok=True)
        run_builder(hf_dir(model), out, "int4", from_gguf(model).n_layer)
    return str(out)


class PlainGraph:
    """Decode on a graph without patch inputs, with the engine's shared KV buffers."""

    def __init__(self, folder: str, like, threads: int | None):
        import onnxruntime as ort
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        self.s = ort.InferenceSession(os.path.join(folder, "model.onnx"), so)
        self.io = self.s.io_binding()
        self.bufs = [np.zeros_like(b) for b in like.kv.buffers.values()]
        for (past, present), b in zip(like.kv_inputs.items(), self.bufs):
            v = ort.OrtValue.ortvalue_from_numpy(b)
            self.io.bind_ortvalue_input(past, v)
            self.io.bind_ortvalue_output(present, v)

    def step(self, toks: list[int], start: int) -> None:
        ids, mask = np.array([toks], np.int64), np.ones((1, start + len(toks)), np.int64)
        self.io.bind_cpu_input("input_ids", ids)
        self.io.bind_cpu_input("attention_mask", mask)
        self.io.bind_output("logits")
        self.s.run_with_iobinding(self.io)


def patch_sets(base, layers):
    from edge_reft.patch import random_patch
    a, mid, b = layers[0], layers[len(layers) // 2], layers[-1]
    return {"no patch": None,
            f"l1 @{mid} r4": [random_patch(base, [(mid, "l1", 4)])],
            f"all positions @{mid} r4": [random_patch(base, [(mid, "all", 4)])],
            f"two patches: l1 @{a} + all @{b} r8": [random_patch(base, [(a, "l1", 8)]),
                                                   random_patch(base, [(b, "all", 8)], seed=1)]}


class Lane:
    """One configuration on a shared engine: its own KV cache and bound patch inputs,
    swapped in around each call (one session, so no two thread pools fight)."""

    def __init__(self, engine, pset):
        self.e, self.pset, self.kv, self.key, self.n = engine, pset, engine.new_kv(1, engine.n_ctx), None, 0

    def forward(self, toks: list[int], start: int, n_prompt: int) -> float:
        e = self.e
        e.kv, e._weights_key, e._n_past = self.kv, self.key, start
        t = time.perf_counter()
        e._forward(toks, start, n_prompt, self.pset)
        dt = time.perf_counter() - t
        self.key = e._weights_key
        return dt


def interleaved(lanes: dict[str, Lane], prompt: list[int], cont: list[int], rounds: int) -> list[list[object]]:
    pre = {k: [] for k in lanes}
    dec = {k: [] for k in lanes}
    n, rng = len(prompt), np.random.default_rng(0)
    for r in range(rounds + 1):  # round 0 warms up
        for name in rng.permutation(list(lanes)):
            dt = lanes[name].forward(prompt, 0, n)
            if r:
                pre[name].append(dt / n)
        for i, tok in enumerate(cont):
            for name in rng.permutation(list(lanes)):
                dt = lanes[name].forward([tok], n + i, n)
                if r:
                    dec[name].append(dt)
        print(f"  round {r}/{rounds}", file=sys.stderr)
    base = next(iter(lanes))
    return [[k, np.median(pre[k]) * 1e3, float(np.median(np.array(pre[base]) / pre[k])),
             np.median(dec[k]) * 1e3, float(np.median(np.array(dec[base]) / dec[k]))] for k in lanes]


def timed_run(engine, pset, prompt: list[int], cont: list[int]) -> tuple[float, float]:
    """(prefill s/token, median decode s/step) of one prompt and forced continuation."""
    engine._keep(0)
    t = time.perf_counter()
    engine._forward(prompt, 0, len(prompt), pset)
    pre = (time.perf_counter() - t) / len(prompt)
    steps = []
    for i, tok in enumerate(cont):
        t = time.perf_counter()
        engine._forward([tok], len(prompt) + i, len(prompt), pset)
        steps.append(time.perf_counter() - t)
    return pre, float(np.median(steps))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a GGUF (default: the embedded SmolLM2 Q4_1)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    from edge_reft.models import default_model
    from edge_reft.patch import random_patch
    from edge_reft.runtime import Engine
    model = a.model or str(default_model())
    dirs = exports(model)
    kw = dict(n_ctx=512, n_threads=a.threads)
    heads = ["config", "prefill ms/tok", "prefill x", "decode ms/tok", "decode x"]

    for precision in ("int4", "fp32"):  # 1. patches on one session
        e = Engine(dirs[precision], backend="onnx", **kw)
        toks = e._tokenize(TEXT, add_special=False)
        prompt, cont = toks[:128], toks[128:176]
        lanes = {name: Lane(e, e.patch_set(p)) for name, p in patch_sets(e.base, e.export.layers).items()}
        print(table(heads, interleaved(lanes, prompt, cont, a.rounds),
                    title=f"\n1. ONNX {precision}, inputs at all {len(e.export.layers)} blocks: prefill "
                    f"{len(prompt)} + decode {len(cont)}, {a.rounds} rounds, {a.threads} threads "
                    "(x = throughput relative to no patch, median of paired ratios)"))
        e.close()

    # 2. what the patch inputs cost, against the builder's own graph (decode, one thread each)
    one = dict(kw, n_threads=1)
    e_all1, e_3 = Engine(dirs["int4"], backend="onnx", **one), Engine(dirs["int4 @8,15,22"], backend="onnx", **one)
    plain = PlainGraph(builder_graph(model), e_all1, 1)
    toks = e_all1._tokenize(TEXT, add_special=False)
    prompt, cont = toks[:128], toks[128:176]
    l1, every = [random_patch(e_3.base, [(15, "l1", 4)])], [random_patch(e_3.base, [(15, "all", 4)])]
    runs = {"builder graph (no patch inputs)": lambda toks, start: plain.step(toks, start)}
    for label, eng in ((f"export, inputs at all {len(e_all1.export.layers)} blocks", e_all1),
                       ("export, inputs at 3 blocks", e_3)):
        for what, p in (("no patch", None), ("l1 @15 r4", l1), ("all @15 r4", every)):
            lane = Lane(eng, eng.patch_set(p))
            runs[f"{label}, {what}"] = lambda toks, start, lane=lane: lane.forward(toks, start, len(prompt))
    times = {k: [] for k in runs}
    rng = np.random.default_rng(1)
    for r in range(a.rounds + 1):  # round 0 warms up
        for run in runs.values():
            run(prompt, 0)
        for i, tok in enumerate(cont):
            for name in rng.permutation(list(runs)):
                t = time.perf_counter()
                runs[name]([tok], len(prompt) + i)
                if r:
                    times[name].append(time.perf_counter() - t)
        print(f"  graph round {r}/{a.rounds}", file=sys.stderr)
    base = np.array(times["builder graph (no patch inputs)"])
    print(table(["graph, patch", "decode ms/tok", "decode x"],
                [[k, np.median(v) * 1e3, float(np.median(base / np.array(v)))] for k, v in times.items()],
                title=f"\n2. int4 decode against the builder's own graph: {len(cont)} steps x {a.rounds} rounds, "
                "1 thread, shuffled order (x = throughput relative to the builder's graph)"))
    del plain, e_3, e_all1
    e_all = Engine(dirs["int4"], backend="onnx", **kw)

    # 3. one batch of 4 patches against 4 sequential runs
    e = e_all
    L = e.export.layers
    patches = [random_patch(e.base, [(L[len(L) // 2], "l1", 4)], scale=2.0, seed=1),
               random_patch(e.base, [(L[len(L) // 3], "all", 4)], scale=1.0, seed=2),
               random_patch(e.base, [(L[-1], "f2+l2", 8), (L[-1], "all", 2)], scale=2.0, seed=3),
               random_patch(e.base, [(L[0], "l1", 16)], scale=2.0, seed=4)]
    n_tok = 48
    res: dict[str, list[tuple[float, float]]] = {"4 x generate": [], "generate_batch (4 rows)": []}
    produced = 0
    for r in range(a.rounds + 1):  # round 0 warms up
        t = time.perf_counter()
        seq = [e.generate(p, patch=q, max_tokens=n_tok, stream=False, cache="off") for p, q in zip(PROMPTS, patches)]
        t_seq = time.perf_counter() - t
        t = time.perf_counter()
        bat = e.generate_batch(PROMPTS, patches=patches, max_tokens=n_tok)
        t_bat = time.perf_counter() - t
        assert [c.tokens for c in seq] == [c.tokens for c in bat], "a batch must equal its single runs"
        produced = sum(len(c.tokens) for c in bat)
        if r:
            res["4 x generate"].append((produced / t_seq, produced / sum(c.decode_s for c in seq)))
            res["generate_batch (4 rows)"].append((produced / t_bat, produced / bat[0].decode_s))
        print(f"  batch round {r}/{a.rounds}", file=sys.stderr)
    seq_tps = np.array(res["4 x generate"])
    rows = []
    for k, v in res.items():
        v = np.array(v)
        rows.append([k, produced, float(np.median(v[:, 0])), float(np.median(v[:, 0] / seq_tps[:, 0])),
                     float(np.median(v[:, 1])), float(np.median(v[:, 1] / seq_tps[:, 1]))])
    print(table(["run", "tokens", "tokens/s", "x", "decode tokens/s", "decode x"], rows,
                title=f"\n3. int4, 4 prompts with 4 different patches, {n_tok} tokens each, {a.threads} threads "
                "(tokens/s: the whole call, prefill included; decode: after the prompts; identical tokens)"))

    # 4. llama.cpp on the same prompt and patches
    llama = Engine(model, n_ctx=512, n_threads=a.threads, op_offload=False)
    rows = []
    for name, eng in (("llama.cpp Q4_1 (the GGUF)", llama), ("ONNX int4", e)):
        ps = eng.patch_set([random_patch(eng.base, [(15, "l1", 4)])])
        runs = [timed_run(eng, ps, prompt, cont) for _ in range(a.rounds + 1)][1:]  # the first warms up
        rows.append([name, np.median([x[0] for x in runs]) * 1e3, np.median([x[1] for x in runs]) * 1e3])
    fp32 = Engine(dirs["fp32"], backend="onnx", **kw)
    same = {"ONNX int4": [0, 0], "ONNX fp32": [0, 0]}
    for i, text in enumerate(PROMPTS):
        p = random_patch(e.base, [(15, "l1", 4)], scale=2.0, seed=i)
        ref = llama.generate(text, patch=p, max_tokens=32, stream=False).tokens
        for name, eng in (("ONNX int4", e), ("ONNX fp32", fp32)):
            got = eng.generate(text, patch=p, max_tokens=32, stream=False).tokens
            same[name][0] += next((j for j, (x, y) in enumerate(zip(got, ref)) if x != y), min(len(got), len(ref)))
            same[name][1] += max(len(got), len(ref))
    sizes = {"llama.cpp Q4_1 (the GGUF)": os.path.getsize(model),
             "ONNX int4": e.export.manifest["bytes"], "ONNX fp32": fp32.export.manifest["bytes"]}
    rows.append(["ONNX fp32", "-", "-"])
    for r in rows:
        r.insert(1, f"{sizes[r[0]] / 1e6:.0f} MB")
        s = same.get(r[0])
        r.append(f"{s[0]}/{s[1]}" if s else "(reference)")
    print(table(["backend", "size", "prefill ms/tok", "decode ms/tok", "greedy = llama.cpp (identical prefix)"], rows,
                title=f"\n4. against llama.cpp: prompt {len(prompt)} + decode {len(cont)} with l1 @15 r4; greedy "
                f"32 tokens x {len(PROMPTS)} prompts with a patch each"))


if __name__ == "__main__":
    main()
