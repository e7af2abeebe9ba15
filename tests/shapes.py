"""Real architectures with random weights, made as the community makes GGUFs.

A transformers config of the architecture's shape, random weights (seeded),
a small SentencePiece tokenizer, then llama.cpp's own ``convert_hf_to_gguf.py``
(from the pinned llama-cpp-python sdist) and ``llama_cpp.llama_model_quantize``.
The files are real GGUFs of that architecture and size, good for mechanics,
parity, speed and memory (random weights say nothing about quality).

    python tests/shapes.py llama-1b Q4_K_M      # prints the cached file's path

Everything is cached under EDGE_REFT_CACHE/shapes, keyed by the shape's
config, and built under a lock (tests running in parallel wait, not race).
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

LLAMA_CPP_PYTHON = "0.3.36"  # the pinned version (pyproject.toml)
TOKENIZER = "1024-v2"        # bump when the tokenizer's recipe changes (every shape is rebuilt)

# Tiny versions of each architecture (hidden 256: K-quant blocks are 256 wide), with what
# makes the architecture itself: GQA, biases, norms, fused matrices, soft-capping, tying.
_TINY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=1024, max_position_embeddings=2048)
TINY = {
    "llama": dict(_TINY, model_type="llama", rope_theta=500000.0, tie_word_embeddings=True),
    "llama-untied": dict(_TINY, model_type="llama", rope_theta=500000.0, tie_word_embeddings=False),
    "mistral": dict(_TINY, model_type="mistral", rope_theta=1e6, sliding_window=None, tie_word_embeddings=False),
    "qwen2": dict(_TINY, model_type="qwen2", rope_theta=1e6, tie_word_embeddings=True),
    "qwen3": dict(_TINY, model_type="qwen3", head_dim=64, rope_theta=1e6, tie_word_embeddings=True),
    "gemma2": dict(_TINY, model_type="gemma2", head_dim=64, query_pre_attn_scalar=64, sliding_window=64,
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh"),
    "gemma3": dict(_TINY, model_type="gemma3_text", head_dim=64, query_pre_attn_scalar=64, sliding_window=64,
                   rope_theta=1e6, hidden_activation="gelu_pytorch_tanh"),
    # a fused gate_up (2 x intermediate) as wide as the vocabulary would be taken for the LM head by
    # onnxruntime-genai's builder (export-onnx refuses such a graph): 768, not 512
    "phi3": dict(_TINY, model_type="phi3", intermediate_size=768, rope_theta=10000.0, tie_word_embeddings=False,
                 pad_token_id=0),
}
# An architecture llama.cpp runs but transformers cannot load from a GGUF (training refuses it).
OTHER = {"granite": dict(_TINY, model_type="granite", rope_theta=10000.0, tie_word_embeddings=True, pad_token_id=0,
                        embedding_multiplier=12.0, residual_multiplier=0.22, logits_scaling=8.0,
                        attention_multiplier=0.015625)}
# Real sizes (the published configs' shapes), for memory and speed.
SIZED = {
    "llama-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                     tie_word_embeddings=True, max_position_embeddings=8192),
    "llama-3b": dict(model_type="llama", hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                     num_attention_heads=24, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                     tie_word_embeddings=True, max_position_embeddings=8192),
    "llama-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                     tie_word_embeddings=False, max_position_embeddings=8192),
}
SHAPES = {**TINY, **OTHER, **SIZED}
CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def cache() -> Path:
    from edge_reft.models import cache_dir
    return cache_dir() / "shapes"


def _once(target: Path, build, folder: bool = False) -> Path:
    """``build(tmp)`` into ``target`` (a file, or a folder) once, under a lock, atomically."""
    from edge_reft.files import atomic_dir, atomic_path, lock_file, locked
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with locked(lock_file(target)):
        if not target.exists():
            with (atomic_dir(target) if folder else atomic_path(target)) as tmp:
                build(Path(tmp))
    return target


def llama_cpp_tools() -> Path:
    """llama.cpp's converter and gguf-py from the pinned sdist (fetched by pip once)."""
    def build(out: Path) -> None:
        dl = out / "dl"
        subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={LLAMA_CPP_PYTHON}",
                        "--no-deps", "--no-binary", ":all:", "--no-build-isolation", "-q", "-d", str(dl)],
                       check=True)
        (sdist,) = dl.glob("*.tar.gz")
        keep = ("vendor/llama.cpp/convert_hf_to_gguf.py", "vendor/llama.cpp/conversion/",
                "vendor/llama.cpp/gguf-py/")
        with tarfile.open(sdist) as tar:
            for m in tar.getmembers():
                rel = m.name.split("/", 1)[-1]
                if m.isfile() and rel.startswith(keep):
                    m.name = rel[len("vendor/llama.cpp/"):]
                    tar.extract(m, out, filter="data")
        for p in dl.iterdir():
            p.unlink()
        dl.rmdir()
    return _once(cache() / f"llama.cpp-{LLAMA_CPP_PYTHON}", build, folder=True)


def tokenizer_model() -> Path:
    """A 1024-piece SentencePiece model trained on real text (BoolQ passages), byte fallback,
    with the control tokens llama.cpp expects of some families (Phi-3's ``<|endoftext|>``)."""
    def build(out: Path) -> None:
        import io

        import sentencepiece as spm

        from edge_reft.tasks import boolq_records
        text = [r["prompt"] for r in boolq_records("train", 400)]
        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=buf, vocab_size=1024,
                                       model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                       bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2,
                                       control_symbols=["<|endoftext|>"])
        out.write_bytes(buf.getvalue())
    return _once(cache() / f"tokenizer-{TOKENIZER}.model", build)


def key(name: str) -> str:
    return hashlib.sha256(json.dumps([SHAPES[name], TOKENIZER], sort_keys=True).encode()).hexdigest()[:10]


def hf_folder(name: str, dtype: str = "float32") -> Path:
    """transformers' model of the shape, seeded random weights, with the tokenizer."""
    def build(out: Path) -> None:
        import shutil

        import torch
        from transformers import AutoConfig, AutoModelForCausalLM
        cfg = dict(SHAPES[name])
        cfg = AutoConfig.for_model(cfg.pop("model_type"), bos_token_id=1, eos_token_id=2, **cfg)
        torch.manual_seed(0)
        # a GPU, where there is one, draws an 8 B model's random weights in seconds
        with torch.device("cuda" if torch.cuda.is_available() and name in SIZED else "cpu"):
            model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
        with torch.no_grad():  # transformers' init leaves norms at 1 and biases at 0: random them too
            for n, p in model.named_parameters():
                if p.dim() == 1:
                    p.add_(0.1 * torch.randn_like(p))
        model.save_pretrained(out)
        shutil.copy(tokenizer_model(), out / "tokenizer.model")
        (out / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
            "add_bos_token": True, "add_eos_token": False, "chat_template": CHAT}))
    return _once(cache() / f"{name}-{key(name)}-hf-{dtype}", build, folder=True)


def gguf(name: str, qtype: str = "F32") -> Path:
    """The shape as a GGUF: F32/F16/BF16 straight from llama.cpp's converter, any other
    type (Q4_K_M, Q8_0 ...) quantized from it by llama.cpp's quantizer."""
    stem = f"{name}-{key(name)}"
    if qtype in ("F32", "F16", "BF16"):
        def convert(out: Path) -> None:
            src = hf_folder(name, "float32" if qtype == "F32" else "bfloat16")
            tools = llama_cpp_tools()
            r = subprocess.run([sys.executable, str(tools / "convert_hf_to_gguf.py"), str(src), "--outtype",
                                qtype.lower(), "--outfile", str(out)], capture_output=True, text=True,
                               env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                                   [str(tools), *filter(None, [os.environ.get("PYTHONPATH")])])))
            if r.returncode:
                raise RuntimeError(f"convert_hf_to_gguf {src.name} failed:\n{r.stderr[-3000:]}")
        return _once(cache() / f"{stem}.{qtype}.gguf", convert)

    def quantize(out: Path) -> None:
        import llama_cpp
        ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        params.nthread = os.cpu_count() or 1
        src = gguf(name, "F16" if name in SIZED else "F32")
        if llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), params) != 0:
            raise RuntimeError(f"llama_model_quantize {src} -> {qtype} failed")
    return _once(cache() / f"{stem}.{qtype}.gguf", quantize)


if __name__ == "__main__":
    print(gguf(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "F32"))
