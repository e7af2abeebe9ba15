"""A base model into an ONNX Runtime graph whose LoReFT edits are graph inputs.

    export_onnx("model.gguf", "onnx_dir", precision="int4", layers=[8, 15, 22])

1. a GGUF becomes an HF folder (``edge_reft.train.hf.hf_dir``, cached);
2. onnxruntime-genai's model builder writes its fused graph (int4: MatMulNBits);
3. at every chosen block L, the fused norm that reads the residual stream
   after block L (``a + b``: block L+1's input norm, or the final norm) goes
   into an ``If`` on the input ``reft.L.on``: off, the same fused op; on, the
   edits first.  Each of ``slots`` edits is, in order (edge_reft.loreft.edit),

       h <- h + (mask * (h @ delta_t + bias)) @ rotate

   with graph inputs rotate A (B, r, d), delta_t = B^T (B, d, r) (W - R for LoReFT),
   bias (B, 1, r) and mask (B, S, 1), r = ``max_rank`` (zero rows are no-ops),
   B the batch: every row its own patch.  The runtime turns a block on only
   when some mask is non-zero, so unused blocks cost one ``If``;
4. an input ``logits_start`` (int64 [1]) keeps the LM head to positions
   ``logits_start..S-1`` (prefill needs one row of logits, scoring all).

``edge_reft_onnx.json`` in the folder records the base model's identity, the
settings and every input's name: it is the contract the runtime reads.  The
export is built in a temporary folder and renamed into place; the same inputs
give the same folder, and an up-to-date folder is left alone.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from edge_reft.errors import BackendError, ReftError
from edge_reft.files import atomic_dir, sha256_file
from edge_reft.outputs import check_output
from edge_reft.fingerprint import from_gguf, from_hf_dir, gguf_metadata
from edge_reft.runtime.onnx.native import FORMAT, MANIFEST, VERSION

PRECISIONS = ("int4", "int8", "fp32")
# GGUF architectures whose export is checked against the torch reference, one by one
# (tests/test_onnx_archs.py); Mistral's GGUFs are "llama".  Others are refused before any work.
EXPORTABLE = ("gemma2", "gemma3", "llama", "phi3", "qwen2", "qwen3")
WHY_NOT = {  # architectures the builder lists that still cannot be exported, and why
    "granite": "transformers cannot read granite GGUFs, and the export goes through transformers",
}
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "generation_config.json", "special_tokens_map.json", "config.json")
INT64_MAX = (1 << 63) - 1


def site_inputs(layer: int, slot: int) -> dict[str, str]:
    """Graph input names of one edit slot."""
    return {k: f"reft.{layer}.{slot}.{k}" for k in ("rotate", "delta_t", "bias", "mask")}


def _say(msg: str) -> None:
    print(f"[export-onnx] {msg}", file=sys.stderr, flush=True)


def _digest(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(f"{p.name}\n".encode())
        sha256_file(p, into=h)
    return h.hexdigest()


def _versions() -> dict[str, str]:
    from importlib.metadata import version
    from edge_reft import __version__
    return {"edge_reft": __version__, "onnxruntime-genai": version("onnxruntime-genai"),
            "onnx": version("onnx"), "onnxruntime": version("onnxruntime")}


def export_onnx(base: str | os.PathLike[str], out: str | os.PathLike[str], *, precision: str = "int4",
                layers: Sequence[int] | None = None, slots: int = 2, max_rank: int = 16,
                force: bool = False) -> Path:
    """Export ``base`` (a GGUF file or an HF folder) to ``out``; returns ``out``.

    ``layers=None`` means every block.  Skips the work when ``out`` already holds
    an export of the same source with the same settings (unless ``force``)."""
    src, out = Path(base), Path(out)
    _check_tools()
    if precision not in PRECISIONS:
        raise ReftError(f"precision: {precision!r}, expected one of {PRECISIONS}")
    if not src.exists():
        raise ReftError(f"{src}: no such file or folder (expected a .gguf or an HF model folder)")
    out.parent.mkdir(parents=True, exist_ok=True)
    check_output(out, [src], force=force, folder=True, marker=MANIFEST)
    model = from_hf_dir(src) if src.is_dir() else from_gguf(src)
    check_exportable(src, model.architecture)
    layers = sorted(set(range(model.n_layer) if layers is None else layers))
    problems = [f"--layers: block {L} is outside 0..{model.n_layer - 1}" for L in layers
                if not 0 <= L < model.n_layer]
    if not layers:
        problems.append("--layers: no block chosen")
    if not 1 <= slots <= 8:
        problems.append(f"--slots: {slots}, expected 1..8 edits per block")
    if not 1 <= max_rank <= model.n_embd:
        problems.append(f"--max-rank: {max_rank}, expected 1..{model.n_embd}")
    if problems:
        raise ReftError(f"export-onnx {src}: " + "; ".join(problems))
    _say(f"source {src} ({model.describe()}): hashing")
    files = [src] if src.is_file() else [p for p in src.iterdir()
                                         if p.is_file() and not p.name.startswith(".")]
    settings = {"precision": precision, "layers": layers, "slots": slots, "max_rank": max_rank,
                "source_sha256": _digest(files), "versions": _versions(),
                "converter_sha256": sha256_file(__file__)}
    if not force and _up_to_date(out, settings):
        _say(f"{out} is up to date (same source and settings): nothing to do")
        return out
    with atomic_dir(out, replace=True) as tmp:  # built aside, fsynced, renamed into place
        if src.is_dir():
            hf = src
        else:
            _say("[1/4] GGUF -> HF folder (dequantized, cached)")
            from edge_reft.train.hf import hf_dir
            hf = hf_dir(src)
        _say(f"[2/4] onnxruntime-genai builder, {precision}")
        run_builder(_builder_input(hf, tmp), tmp, precision, model.n_layer)
        _say(f"[3/4] LoReFT inputs at {len(layers)} block(s) x {slots} slot(s), rank <= {max_rank}")
        try:
            sites, switches = _insert_loreft(tmp / "model.onnx", layers, slots, max_rank, model.n_embd,
                                             model.n_layer)
        except BackendError as e:
            raise BackendError(f"export-onnx {src} ({model.architecture}): {e}") from None
        for name in SIDE_FILES:
            if (hf / name).exists():
                shutil.copyfile(hf / name, tmp / name)
        (tmp / "genai_config.json").unlink(missing_ok=True)  # its generator does not know our inputs
        cfg = json.loads((hf / "config.json").read_text())
        text = cfg.get("text_config") or cfg
        kv_heads = int(text.get("num_key_value_heads") or text["num_attention_heads"])
        head_dim = int(text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"])
        manifest = {"format": FORMAT, "version": VERSION, "base": asdict(model), "export": settings,
                    "model": "model.onnx", "kv_heads": kv_heads, "head_dim": head_dim,
                    "context_length": int(text.get("max_position_embeddings") or 2048),
                    "logits_start": "logits_start", "sites": sites, "switches": switches,
                    "bytes": sum(p.stat().st_size for p in tmp.iterdir() if p.is_file())}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        _say("[4/4] checking the graph loads in onnxruntime")
        _smoke_test(tmp)
    _say(f"wrote {out} ({manifest['bytes'] / 1e6:.1f} MB)")
    return out


def check_exportable(src: Path, arch: str) -> None:
    """Refuse, by name, an architecture whose export is not known to compute what llama.cpp does."""
    why = WHY_NOT.get(arch, "not tested with export-onnx") if arch not in EXPORTABLE else None
    # llama.cpp's converter writes rope.scaling.attn_factor with a long-context Phi-3's
    # rope_factors_long/short tensors, and only then
    if arch == "phi3" and src.is_file() and "phi3.rope.scaling.attn_factor" in gguf_metadata(src).fields:
        why = "transformers drops a long-context (LongRoPE) Phi-3 GGUF's rope factors"
    if why:
        raise ReftError(f"{src}: architecture {arch!r} cannot be exported to ONNX: {why} (supported: "
                        f"{', '.join(EXPORTABLE)}, short-context Phi-3); its patches still run in llama.cpp")


def _check_tools() -> None:
    import importlib.util
    missing = [m for m in ("onnx", "onnx_ir", "onnxruntime", "onnxruntime_genai", "torch", "transformers", "tqdm")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise ReftError(f"export-onnx needs {', '.join(missing)}: pip install 'edge-reft[onnx-export]'")


def _up_to_date(out: Path, settings: dict) -> bool:
    try:
        m = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return m.get("export") == settings and (out / m.get("model", "model.onnx")).exists()


def _builder_input(hf: Path, tmp: Path) -> Path:
    """``hf`` as the builder must read it to build the model transformers builds: the same
    folder, or a view of it (its files linked) with config.json adjusted.

    Phi-3: the builder takes its LongRoPE graph whenever max_position_embeddings differs from
    original_max_position_embeddings, while transformers uses the latter only with LongRoPE
    scaling (a long-context GGUF is refused before this), so the two are made equal.
    Gemma 3 with RoPE scaling (4B and up) is refused: the builder would apply it to the local
    layers too (builder_shim.py adapts the rest)."""
    cfg = json.loads((hf / "config.json").read_text())
    fixed = dict(cfg)
    if cfg.get("model_type") == "phi3" and "original_max_position_embeddings" in cfg:
        fixed["original_max_position_embeddings"] = cfg["max_position_embeddings"]
    rope = cfg.get("rope_parameters") or {}
    if any(rope.get(k, {}).get("rope_type", "default") != "default" for k in ("full_attention", "sliding_attention")):
        raise ReftError(f"export-onnx: {cfg.get('model_type')} with RoPE scaling cannot be exported: "
                        "onnxruntime-genai's builder would scale its local layers too; its patches still "
                        "run in llama.cpp")
    if fixed == cfg:
        return hf
    view = tmp / ".builder-input"
    view.mkdir()
    for f in hf.iterdir():
        if f.is_file() and f.name != "config.json":
            try:
                os.symlink(f.resolve(), view / f.name)
            except OSError:  # no symlinks (Windows without developer mode)
                shutil.copyfile(f, view / f.name)
    (view / "config.json").write_text(json.dumps(fixed, indent=2))
    return view


def run_builder(hf: Path, tmp: Path, precision: str, n_layer: int) -> None:
    """Run the builder in a subprocess, its log to a file, its progress as a bar.

    windowed_kv_cache=false: sliding-window layers get a full-length KV cache like every other
    layer (the window is still applied as a mask), as the runtime's one shared buffer per layer
    expects; the builder's default ring buffer would need a capacity of at least the window."""
    from tqdm import tqdm
    cmd = [sys.executable, "-m", "edge_reft.converters.builder_shim", "-i", str(hf), "-o", str(tmp),
           "-p", precision, "-e", "cpu", "-c", str(tmp / ".builder-cache"),
           "--extra_options", "hf_token=false", "windowed_kv_cache=false"]
    log = tmp / ".builder.log"
    with open(log, "w") as f, tqdm(total=n_layer + 2, desc="builder", unit="step", file=sys.stderr) as bar:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"))
        assert proc.stdout is not None
        for line in proc.stdout:
            f.write(line)
            if line.startswith(("Reading layer", "Reading LM head", "Saving GenAI")):
                bar.update(1)
        rc = proc.wait()
    if rc != 0 or not (tmp / "model.onnx").exists():
        tail = log.read_text()[-2000:]
        raise BackendError(f"onnxruntime-genai's builder failed on {hf} (exit {rc}); its log ends:\n{tail}")
    for aside in (".builder-cache", ".builder-input"):
        shutil.rmtree(tmp / aside, ignore_errors=True)
    log.unlink()


def _insert_loreft(path: Path, layers: Sequence[int], slots: int, rank: int, d: int,
                   n_layer: int) -> tuple[list[dict], dict[str, str]]:
    """Rewrite the graph at ``path`` in place (weights stay in their external file);
    returns the sites and, per block, the name of its on/off input."""
    import onnx
    from onnx import TensorProto, helper

    m = onnx.load(str(path), load_external_data=False)
    g = m.graph
    by_name = {n.name: n for n in g.node}
    final_name = f"/model/layers.{n_layer}/final_norm_layernorm/SkipLayerNorm"
    final = by_name.get(final_name)
    if final is None:
        raise BackendError("no final norm in the builder's graph: it is not laid out like its llama graphs")
    new_inputs, sites, switches = [], [], {}
    for L in layers:
        target = f"/model/layers.{L + 1}/input_layernorm/SkipLayerNorm" if L + 1 < n_layer else final_name
        norm = by_name.get(target)
        if norm is None or norm.op_type != "SkipSimplifiedLayerNormalization":
            raise BackendError(f"no fused norm {target!r} reads the residual stream after block {L}; "
                               "the builder's graph is not laid out like its llama graphs")
        names = [site_inputs(L, k) for k in range(slots)]
        switches[str(L)] = switch = f"reft.{L}.on"
        new_inputs.append(helper.make_tensor_value_info(switch, TensorProto.BOOL, []))
        for k, n in enumerate(names):
            new_inputs += [
                helper.make_tensor_value_info(n["rotate"], TensorProto.FLOAT, ["batch_size", rank, d]),
                helper.make_tensor_value_info(n["delta_t"], TensorProto.FLOAT, ["batch_size", d, rank]),
                helper.make_tensor_value_info(n["bias"], TensorProto.FLOAT, ["batch_size", 1, rank]),
                helper.make_tensor_value_info(n["mask"], TensorProto.FLOAT, ["batch_size", "sequence_length", 1])]
            sites.append({"layer": L, "slot": k, "inputs": n})
        at = list(g.node).index(norm)
        g.node.remove(norm)
        g.node.insert(at, _switched_norm(helper, TensorProto, norm, L, names, switch))
    _slice_logits(g, helper, TensorProto, final.output[0])
    g.input.extend(new_inputs)
    onnx.save(m, str(path))
    return sites, switches


def _switched_norm(helper, TensorProto, norm, L: int, slots: list[dict[str, str]], switch: str):
    """``If(switch)``: on, the edits then the builder's fused norm; off, the fused norm alone.

    The fused op computes ``a + b`` (the residual stream after block L) and its
    norm.  The edits turn ``b`` into ``b + delta_1 + ...``, slot k seeing
    ``h_k = a + b_k``: with zero edits both branches are the same op on the same
    inputs (bit for bit), and a call whose masks are all zero (a prompt-scoped
    patch while decoding, or no patch) takes the off branch at no cost."""
    p = f"/reft/layers.{L}"
    a, b, gamma = norm.input[0], norm.input[1], norm.input[2]
    keep = len(norm.output) > 3 and norm.output[3]
    outs = [norm.output[0]] + ([norm.output[3]] if keep else [])

    def fused(prefix: str, skip: str) -> tuple[object, list[str]]:
        o = [f"{prefix}/normed", f"{prefix}/residual"]
        node = helper.make_node("SkipSimplifiedLayerNormalization", [a, skip, gamma],
                                [o[0], "", "", o[1]] if keep else [o[0]], name=f"{prefix}/SkipLayerNorm",
                                domain="com.microsoft", **{x.name: helper.get_attribute_value(x)
                                                          for x in norm.attribute})
        return node, o[:len(outs)]

    nodes, h, skip = [helper.make_node("Add", [a, b], [f"{p}/on/h0"], name=f"{p}/on/Add")], f"{p}/on/h0", b
    for k, n in enumerate(slots):
        q = f"{p}/on/slot{k}"
        nodes += [
            helper.make_node("MatMul", [h, n["delta_t"]], [f"{q}/proj"], name=f"{q}/MatMul"),
            helper.make_node("Add", [f"{q}/proj", n["bias"]], [f"{q}/biased"], name=f"{q}/AddBias"),
            helper.make_node("Mul", [f"{q}/biased", n["mask"]], [f"{q}/masked"], name=f"{q}/Mask"),
            helper.make_node("MatMul", [f"{q}/masked", n["rotate"]], [f"{q}/delta"], name=f"{q}/Rotate"),
            helper.make_node("Add", [skip, f"{q}/delta"], [f"{q}/skip"], name=f"{q}/Edit")]
        skip = f"{q}/skip"
        if k + 1 < len(slots):
            nodes.append(helper.make_node("Add", [a, skip], [f"{q}/h"], name=f"{q}/Residual"))
            h = f"{q}/h"
    on_norm, on_outs = fused(f"{p}/on", skip)
    off_norm, off_outs = fused(f"{p}/off", b)

    def branch(name: str, body: list, out_names: list[str]):
        return helper.make_graph(body, name, [], [helper.make_tensor_value_info(o, TensorProto.FLOAT, None)
                                                  for o in out_names])
    return helper.make_node("If", [switch], outs, name=f"{p}/If",
                            then_branch=branch(f"reft_on_{L}", nodes + [on_norm], on_outs),
                            else_branch=branch(f"reft_off_{L}", [off_norm], off_outs))


def _slice_logits(g, helper, TensorProto, hidden: str) -> None:
    """Feed the LM head rows logits_start.. only (one row in prefill instead of all).

    ``hidden``, the final norm's output, must be read by the LM head alone: the builder takes
    any Linear as wide as the vocabulary for the LM head (a fused gate_up of 2 x 512 with a
    vocabulary of 1024, say), and such a graph is refused here rather than run."""
    readers = [n for n in g.node if hidden in n.input]
    if len(readers) != 1 or not any(o.name == "logits" for o in g.output):
        raise BackendError(f"the final norm's output feeds {len(readers)} node(s), expected the LM head alone: "
                           "the builder misread this model (a Linear as wide as the vocabulary?)")
    head = readers[0]
    g.initializer.extend([helper.make_tensor("/reft/logits/ends", TensorProto.INT64, [1], [INT64_MAX]),
                          helper.make_tensor("/reft/logits/axes", TensorProto.INT64, [1], [1])])
    node = helper.make_node("Slice", [hidden, "logits_start", "/reft/logits/ends", "/reft/logits/axes"],
                            ["/reft/logits/rows"], name="/reft/logits/Slice")
    g.node.insert(list(g.node).index(head), node)
    head.input[list(head.input).index(hidden)] = "/reft/logits/rows"
    g.input.append(helper.make_tensor_value_info("logits_start", TensorProto.INT64, [1]))
    out = next(o for o in g.output if o.name == "logits")
    out.type.tensor_type.shape.dim[1].dim_param = "logits_length"


def _smoke_test(folder: Path) -> None:
    """Open the export with the runtime and run two tokens with zero patches."""
    from edge_reft.runtime.onnx.engine import OnnxEngine
    with OnnxEngine(folder, n_ctx=8, n_threads=1) as e:
        out = e.logits([1, 2])
        if out.shape != (2, e.vocab_size) or not (out == out).all():
            raise BackendError(f"{folder}: the exported graph gives logits of shape {out.shape}")

