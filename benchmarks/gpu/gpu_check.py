"""The llama.cpp runtime with the model on a GPU: exactness checks, then overhead tables.

    python benchmarks/gpu/gpu_check.py --model smol8.gguf [--rounds 6]

Run by benchmarks/gpu/run.sh on the device (llama-cpp-python built with CUDA).
Checks, each printed PASS/FAIL with its numbers:
  - identity patch: logits bit-identical to no patch, model on the GPU (both gates);
  - llama.cpp's own control vector vs the equivalent constant patch: bit-identical;
  - random patches, GPU vs CPU on F32 weights: cosine of the logit change >= 0.9999, same
    argmax (on quantized weights only reported: each device's kernels quantize differently);
  - native gate vs Python callback on the GPU: the same logits to float32 rounding;
  - n_ubatch 8 on a 40-token prompt: the edits land in the right ubatch;
  - split decode (unedited steps in a context without the callback) == one context:
    greedy tokens identical, last logits bit-identical.
Then benchmarks/runtime_overhead.py with the model on the GPU, and on the CPU.
Works for any GPU build of llama-cpp-python (CUDA, Vulkan, Metal).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
FAILS: list[str] = []


def check(name: str, ok: bool, detail: str) -> None:
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)
    if not ok:
        FAILS.append(name)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def check_model(path: str, kw: dict, exact: bool) -> None:
    from edge_reft.patch import identity, random_patch
    from edge_reft.runtime import Engine
    from oracles import patch_and_control_vector, stepwise_logits

    gpu = {g: Engine(path, n_ctx=512, n_gpu_layers=99, gate=g, **kw) for g in ("native", "python")}
    cpu = Engine(path, n_ctx=512, n_gpu_layers=0, op_offload=False, **kw)  # really on the CPU
    base = cpu.base
    last = base.n_layer - 1
    prompt = gpu["native"].prompt_tokens("Tell me about the moon and its phases.")
    long = gpu["native"].prompt_tokens("Please list five facts about the planet Mars, in short bullet "
                                       "points that a child could follow, and explain each one.")
    for g, e in gpu.items():
        plain = e.logits(prompt)
        same = all(np.array_equal(e.logits(prompt, identity(base, L, pos)), plain)
                   for L in (0, last // 2, last) for pos in ("l1", "f2+l2", "all"))
        check(f"identity patch bit-identical on the GPU ({g} gate)", same, "layers 0, mid, last x l1, f2+l2, all")
        for L in (1, last):
            ours, oracle = patch_and_control_vector(e, prompt, L, L)
            check(f"constant patch == llama.cpp control vector at layer {L} ({g} gate)",
                  np.array_equal(ours, oracle), f"max |diff| {np.abs(ours - oracle).max():.3g}")
    cpu_plain, gpu_plain = cpu.logits(prompt), gpu["native"].logits(prompt)
    print(f"unpatched GPU vs CPU: max |diff| {np.abs(cpu_plain - gpu_plain).max():.3g}, "
          f"cosine {cosine(cpu_plain, gpu_plain):.6f}")
    specs = [[(last // 2, "l1", 4)], [(1, "f2+l2", 4)], [(last, "all", 2)], [(0, "all", 4), (last // 2, "l1", 8)]]
    for spec in specs:
        patch = random_patch(base, spec, scale=4.0, seed=len(spec) + spec[0][0])
        on_cpu = cpu.logits(prompt, patch)
        g_native = gpu["native"].logits(prompt, patch)
        c = cosine(on_cpu - cpu_plain, g_native - gpu_plain)
        arg = bool(on_cpu[-1].argmax() == g_native[-1].argmax())
        detail = f"cosine of the logit change {c:.5f}, last-token argmax equal {arg}"
        if exact:
            check(f"patch {spec}: GPU vs CPU", c >= 0.9999 and arg, detail)
        else:  # quantized kernels differ by device (Q8 activations): reported, not judged
            print(f"INFO  patch {spec}: GPU vs CPU on quantized weights: {detail}", flush=True)
        # both gates compute the reference edit to float32 rounding (C loop vs numpy's BLAS order)
        g_py = gpu["python"].logits(prompt, patch)
        d = np.abs(g_native - g_py).max()
        c = cosine(g_native - gpu_plain, g_py - gpu_plain)
        # (the GPU's own float32 matmuls differ from the CPU's by ~0.04 here, so compare directions)
        check(f"patch {spec}: native gate vs Python callback on the GPU", c >= (0.9999 if exact else 0.98),
              f"max |diff| {d:.3g}, cosine of the logit change {c:.5f}")
    with Engine(path, n_ctx=256, n_ubatch=8, n_gpu_layers=99, **kw) as small:
        for pos in ("f2+l2", "all"):
            patch = random_patch(base, [(2, pos, 4), (last, pos, 2)], scale=4.0, seed=9)
            big = gpu["native"].logits(long, patch) - gpu["native"].logits(long)
            eff = small.logits(long, patch) - small.logits(long)
            c = cosine(big, eff)
            check(f"n_ubatch 8 on {len(long)} tokens, {pos} at layers 2 and {last}", c >= (0.999 if exact else 0.9),
                  f"cosine of the logit change vs one ubatch {c:.5f}")
    split = Engine(path, n_ctx=512, n_gpu_layers=99, split_decode=True, **kw)
    one = Engine(path, n_ctx=512, n_gpu_layers=99, split_decode=False, **kw)
    cont = split.prompt_tokens("The moon has phases because it orbits the Earth.", raw=True)
    for spec in ([(last // 2, "l1", 4)], [(1, "f1+l1", 4), (last, "l1", 2)], [(last // 2, "all", 4)]):
        patch = random_patch(base, spec, scale=2.0, seed=3)
        moves = split.native.moves
        la, lb = stepwise_logits(split, prompt, cont, patch), stepwise_logits(one, prompt, cont, patch)
        check(f"split decode == one context, patch {spec}", np.array_equal(la, lb),
              f"prefill + {len(cont)} decode steps, logits max |diff| {np.abs(la - lb).max():.3g}, "
              f"{split.native.moves - moves} KV moves")
    for e in [*gpu.values(), cpu, split, one]:
        e.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--no-cpu-table", action="store_true", help="skip the overhead table on the CPU")
    a = ap.parse_args()
    sys.path.insert(0, str(HERE.parent.parent / "tests"))
    from edge_reft.dequantize import dequantize_gguf
    f32 = Path(a.model).with_suffix(".f32.gguf")
    if not f32.exists():
        dequantize_gguf(a.model, f32)  # exact comparisons need float32 weights (see below)
    for label, path, kw in (("Q4_1", a.model, {}), ("F32", str(f32), {"kv_f32": True})):
        exact = label == "F32"
        print(f"\n== {label} weights ({path})" + ("" if exact else ": quantized kernels quantize the "
              "activations (Q8), which amplifies float32 rounding; exact checks use F32 below"))
        check_model(path, kw, exact)
    bench = [sys.executable, str(HERE.parent / "runtime_overhead.py"), "--model", str(Path(a.model).resolve()),
             "--rounds", str(a.rounds)]
    for extra in (["--ngl", "99"], *([] if a.no_cpu_table else [["--ngl", "0", "--threads", "8", "--split", "off"]])):
        print(f"\n$ runtime_overhead.py {' '.join(extra)}", flush=True)
        subprocess.run(bench + extra, check=True, cwd=HERE.parent, stderr=subprocess.DEVNULL)
    print(f"\n{len(FAILS)} checks failed" + (f": {FAILS}" if FAILS else ""))
    return 1 if FAILS else 0


if __name__ == "__main__":
    sys.exit(main())
