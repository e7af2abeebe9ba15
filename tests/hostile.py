"""GGUF files built byte by byte, and a corpus of hostile `.reft` files.

Independent of edge-reft's writer on purpose: ``build`` packs the bytes
itself, so a bug shared by our writer and reader cannot hide here.  The
corpus is used by tests/test_hostile.py and benchmarks/hostile_corpus.py.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
_FMT = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f",
        BOOL: "<B", U64: "<Q", I64: "<q", F64: "<d"}
FP = "ab" * 32  # a well-formed fingerprint for synthetic bases


def s(text: str | bytes) -> bytes:
    b = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(b)) + b


def val(t: int, v: Any, sub: int | None = None) -> bytes:
    if t == STR:
        return s(v)
    if t == ARR:
        if sub is None:  # raw bytes as an ARRAY[UINT8] (used nested)
            return struct.pack("<IQ", U8, len(v)) + bytes(v)
        return struct.pack("<IQ", sub, len(v)) + b"".join(val(sub, x) for x in v)
    return struct.pack(_FMT[t], v)


@dataclass
class G:
    """A GGUF image under construction: edit any part, then ``bytes()``."""
    kv: list[tuple[str, int, Any, int | None]] = field(default_factory=list)
    tensors: list[tuple[str, tuple[int, ...], int, bytes]] = field(default_factory=list)
    magic: bytes = b"GGUF"
    version: int = 3
    n_kv: int | None = None
    n_tensors: int | None = None
    alignment: int = 32
    offsets: dict[str, int] = field(default_factory=dict)  # override a tensor's offset

    def set(self, k: str, t: int, v: Any, sub: int | None = None) -> "G":
        self.kv = [e for e in self.kv if e[0] != k] + [(k, t, v, sub)]
        return self

    def drop(self, k: str) -> "G":
        self.kv = [e for e in self.kv if e[0] != k]
        return self

    def header(self) -> bytes:
        n_kv = len(self.kv) if self.n_kv is None else self.n_kv
        n_t = len(self.tensors) if self.n_tensors is None else self.n_tensors
        return self.magic + struct.pack("<IQQ", self.version, n_t, n_kv)

    def bytes(self) -> bytes:
        out = bytearray(self.header())
        for k, t, v, sub in self.kv:
            out += s(k) + struct.pack("<I", t) + val(t, v, sub)
        off = 0
        for name, shape, gtype, data in self.tensors:
            ne = tuple(reversed(shape))
            o = self.offsets.get(name, off)
            out += s(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", d) for d in ne)
            out += struct.pack("<IQ", gtype, o)
            off += (len(data) + self.alignment - 1) // self.alignment * self.alignment
        out += b"\0" * (-len(out) % self.alignment)
        for _, _, _, data in self.tensors:
            out += data + b"\0" * (-len(data) % self.alignment)
        return bytes(out)


def orthonormal(r: int, d: int, seed: int = 0) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, r)))
    return np.ascontiguousarray(q.T, dtype=np.float32)


def valid(n_embd: int = 16, n_layer: int = 4, rank: int = 2, count: int = 1,
          dtype: str = "F32", positions: str = "f1+l1", itype: str = "loreft", version: int = 1) -> G:
    """A correct `.reft` image following FORMAT.md, built by hand (types without a weight,
    consreft and lobireft, store rotate and bias only)."""
    g = G()
    g.set("general.architecture", STR, "llama").set("general.type", STR, "adapter")
    g.set("adapter.type", STR, "reft").set("reft.version", U32, version)
    g.set("reft.base.n_embd", U32, n_embd).set("reft.base.n_layer", U32, n_layer)
    g.set("reft.base.fingerprint", STR, FP).set("reft.base.name", STR, "synthetic")
    g.set("reft.count", U32, count)
    code, np_dtype = {"F32": (0, "<f4"), "F16": (1, "<f2")}[dtype]
    rng = np.random.default_rng(1)
    for i in range(count):
        g.set(f"reft.{i}.type", STR, itype).set(f"reft.{i}.layer", U32, i % n_layer)
        g.set(f"reft.{i}.component", STR, "block_output").set(f"reft.{i}.positions", STR, positions)
        g.set(f"reft.{i}.rank", U32, rank)
        arrays = {"rotate": orthonormal(rank, n_embd, i),
                  "weight": rng.standard_normal((rank, n_embd)).astype(np.float32),
                  "bias": rng.standard_normal(rank).astype(np.float32)}
        if itype in ("consreft", "lobireft"):
            del arrays["weight"]
        for role, a in arrays.items():
            g.tensors.append((f"reft.{i}.{role}", a.shape, code, a.astype(np_dtype).tobytes()))
    return g


def _tensor(g: G, name: str, data: np.ndarray | None = None, gtype: int | None = None,
            shape: tuple[int, ...] | None = None) -> G:
    for j, (n, sh, t, raw) in enumerate(g.tensors):
        if n == name:
            g.tensors[j] = (n, shape if shape is not None else (data.shape if data is not None else sh),
                            gtype if gtype is not None else t,
                            data.astype("<f4").tobytes() if data is not None else raw)
    return g


def _nan(role: str, value: float) -> Callable[[], bytes]:
    def make() -> bytes:
        g = valid()
        a = np.frombuffer([t for t in g.tensors if t[0] == f"reft.0.{role}"][0][3], "<f4").copy()
        a[0] = value
        return _tensor(g, f"reft.0.{role}", a.reshape(-1 if role == "bias" else (2, 16))).bytes()
    return make


def _v2(itype: str = "direft", positions: str = "f1+l1",
        edit: Callable[[G], Any] = lambda g: None) -> Callable[[], bytes]:
    """A format-2 image of ``itype`` (valid as built), then ``edit``."""
    def make() -> bytes:
        g = valid(itype=itype, positions=positions, version=2)
        r = edit(g)
        return r if isinstance(r, bytes) else g.bytes()
    return make


def _flip(offset: int, bit: int) -> Callable[[], bytes]:
    def make() -> bytes:
        b = bytearray(valid().bytes())
        b[offset] ^= 1 << bit
        return bytes(b)
    return make


def _truncate(frac: float) -> Callable[[], bytes]:
    return lambda: valid().bytes()[: int(len(valid().bytes()) * frac)]


def _g(edit: Callable[[G], Any]) -> Callable[[], bytes]:
    def make() -> bytes:
        g = valid()
        r = edit(g)
        return r if isinstance(r, bytes) else g.bytes()
    return make


def _dup_key(g: G) -> bytes:
    b = bytearray(g.header())
    b[16:24] = struct.pack("<Q", len(g.kv) + 1)
    body = b"".join(s(k) + struct.pack("<I", t) + val(t, v, sub) for k, t, v, sub in g.kv)
    dup = s("reft.count") + struct.pack("<I", U32) + val(U32, 1)
    g2 = G(kv=[], tensors=g.tensors)  # reuse tensor section packing
    tail = g2.bytes()[24:]
    return bytes(b) + body + dup + tail


def _huge_array_43() -> bytes:
    """The 43-byte shape that hangs gguf 0.19.0's reader: one key, an array of 2^62 uint8."""
    return b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + s("a") + struct.pack("<IIQ", ARR, U8, 1 << 62)


# name -> (builder, expected error class name, a fragment the message must contain)
CORPUS: dict[str, tuple[Callable[[], bytes], str, str]] = {
    "empty": (lambda: b"", "ReftFormatError", "empty"),
    "magic": (lambda: b"GGUZ" + valid().bytes()[4:], "ReftFormatError", "magic"),
    "text-file": (lambda: b"hello, this is not a patch\n", "ReftFormatError", "magic"),
    "version-1": (_g(lambda g: setattr(g, "version", 1)), "ReftFormatError", "version"),
    "version-4": (_g(lambda g: setattr(g, "version", 4)), "ReftFormatError", "version"),
    "version-2": (_g(lambda g: setattr(g, "version", 2)), "ReftFormatError", "header version"),
    "trunc-magic": (lambda: b"GG", "ReftFormatError", "magic"),
    "trunc-header": (lambda: valid().bytes()[:12], "ReftFormatError", "tensor count"),
    "trunc-10pct": (_truncate(0.10), "ReftFormatError", "cannot fit"),
    "trunc-30pct": (_truncate(0.30), "ReftFormatError", "remain"),
    "trunc-50pct": (_truncate(0.50), "ReftFormatError", "remain"),
    "trunc-70pct": (_truncate(0.70), "ReftFormatError", "tensor"),
    "trunc-90pct": (_truncate(0.90), "ReftFormatError", "past the end"),
    "trunc-last-data-byte": (lambda: valid().bytes()[:-25], "ReftFormatError", "past the end"),
    "huge-n-kv": (_g(lambda g: setattr(g, "n_kv", 1 << 63)), "ReftFormatError", "metadata count"),
    "huge-n-tensors": (_g(lambda g: setattr(g, "n_tensors", (1 << 64) - 1)), "ReftFormatError", "tensor count"),
    "n-kv-plus-one": (_g(lambda g: setattr(g, "n_kv", len(g.kv) + 1)), "ReftFormatError", ""),
    "huge-array-43-bytes": (_huge_array_43, "ReftFormatError", "cannot fit"),
    "huge-string-length": (lambda: b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", (1 << 64) - 1)
                           + b"\0" * 16, "ReftFormatError", "metadata key #0"),
    "huge-value-string": (lambda: b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + s("k") + struct.pack("<IQ", STR, 1 << 40),
                          "ReftFormatError", "exceeds the limit"),
    "nested-arrays": (_g(lambda g: g.set("reft.train.x", ARR, [b"", b""], ARR)), "ReftFormatError", "nested"),
    "array-of-arrays-huge": (lambda: b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + s("k")
                             + struct.pack("<IIQ", ARR, ARR, 1 << 60), "ReftFormatError", "cannot fit"),
    "unknown-value-type": (lambda: b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + s("k") + struct.pack("<I", 13) + b"\0" * 8,
                           "ReftFormatError", "unknown value type"),
    "bool-byte-2": (_g(lambda g: g.set("reft.train.flag", BOOL, 2)), "ReftFormatError", "bool"),
    "bad-utf8-key": (_g(lambda g: g.set(b"reft.train.\xff\xfe", U32, 1)), "ReftFormatError", "UTF-8"),
    "bad-utf8-value": (_g(lambda g: g.set("reft.base.name", STR, b"\xc3\x28")), "ReftFormatError", "UTF-8"),
    "empty-key": (_g(lambda g: g.set("", U32, 1)), "ReftFormatError", "empty key"),
    "long-key": (_g(lambda g: g.set("reft.train." + "k" * 300, U32, 1)), "ReftFormatError", "exceeds the limit"),
    "duplicate-key": (_g(_dup_key), "ReftFormatError", "appears twice"),
    "duplicate-tensor": (_g(lambda g: g.tensors.append(g.tensors[0])), "ReftFormatError", "appears twice"),
    "missing-count": (_g(lambda g: g.drop("reft.count")), "ReftFormatError", "reft.count: missing"),
    "missing-fingerprint": (_g(lambda g: g.drop("reft.base.fingerprint")), "ReftFormatError", "reft.base.fingerprint"),
    "missing-n-embd": (_g(lambda g: g.drop("reft.base.n_embd")), "ReftFormatError", "reft.base.n_embd"),
    "missing-layer": (_g(lambda g: g.drop("reft.0.layer")), "ReftFormatError", "reft.0.layer: missing"),
    "missing-tensor": (_g(lambda g: g.tensors.pop()), "ReftFormatError", "reft.0.bias"),
    "wrong-type-layer": (_g(lambda g: g.set("reft.0.layer", STR, "3")), "ReftFormatError", "reft.0.layer: type STRING"),
    "wrong-type-count": (_g(lambda g: g.set("reft.count", I32, 1)), "ReftFormatError", "reft.count: type INT32"),
    "not-adapter": (_g(lambda g: g.set("general.type", STR, "model")), "ReftFormatError", "general.type"),
    "lora-adapter": (_g(lambda g: g.set("adapter.type", STR, "lora")), "ReftFormatError", "adapter.type"),
    "count-zero": (_g(lambda g: g.set("reft.count", U32, 0)), "ReftFormatError", "reft.count"),
    "count-two-one-present": (_g(lambda g: g.set("reft.count", U32, 2)), "ReftFormatError", "reft.1.type: missing"),
    "count-huge": (_g(lambda g: g.set("reft.count", U32, 0xFFFFFFFF)), "ReftFormatError", "reft.count"),
    "extra-tensor": (_g(lambda g: g.tensors.append(("reft.9.rotate", (2, 16), 0, b"\0" * 128))),
                     "ReftFormatError", "unexpected"),
    "extra-key": (_g(lambda g: g.set("reft.7.layer", U32, 1)), "ReftFormatError", "unexpected key"),
    "nan-weight": (_nan("weight", float("nan")), "ReftFormatError", "NaN/Inf"),
    "inf-bias": (_nan("bias", float("inf")), "ReftFormatError", "NaN/Inf"),
    "huge-weight-1e30": (_nan("weight", 1e30), "ReftFormatError", "more than the limit of 10000"),
    "huge-bias-2e4": (_nan("bias", -2e4), "ReftFormatError", "reft.0.bias: holds a value of magnitude"),
    "nan-rotate": (_nan("rotate", float("nan")), "ReftFormatError", "NaN/Inf"),
    "rotate-not-orthonormal": (_g(lambda g: _tensor(g, "reft.0.rotate", 2 * orthonormal(2, 16))),
                               "ReftFormatError", "not orthonormal"),
    "rotate-wide": (_g(lambda g: _tensor(g, "reft.0.rotate", orthonormal(2, 17))), "ReftFormatError", "shape (2, 17)"),
    "weight-tall": (_g(lambda g: _tensor(g, "reft.0.weight", np.zeros((3, 16)))), "ReftFormatError", "shape (3, 16)"),
    "bias-long": (_g(lambda g: _tensor(g, "reft.0.bias", np.zeros(3))), "ReftFormatError", "reft.0.bias: shape"),
    "rank-mismatch": (_g(lambda g: g.set("reft.0.rank", U32, 3)), "ReftFormatError", "expected (3, 16)"),
    "rank-zero": (_g(lambda g: g.set("reft.0.rank", U32, 0)), "ReftFormatError", "reft.0.rank"),
    "layer-too-big": (_g(lambda g: g.set("reft.0.layer", U32, 4)), "ReftFormatError", "reft.0.layer"),
    "bad-positions": (_g(lambda g: g.set("reft.0.positions", STR, "x5")), "ReftFormatError", "reft.0.positions"),
    "zero-window": (_g(lambda g: g.set("reft.0.positions", STR, "l0")), "ReftFormatError", "reft.0.positions"),
    "bad-component": (_g(lambda g: g.set("reft.0.component", STR, "attention_output")), "ReftFormatError", "component"),
    "bad-type": (_g(lambda g: g.set("reft.0.type", STR, "lora")), "ReftFormatError", "reft.0.type"),
    "quantized-tensor": (_g(lambda g: _tensor(g, "reft.0.weight", gtype=2)), "ReftFormatError", "ggml type 2"),
    "f64-tensor": (_g(lambda g: _tensor(g, "reft.0.bias", gtype=28)), "ReftFormatError", "ggml type 28"),
    "tensor-dims-0": (_g(lambda g: _tensor(g, "reft.0.bias", shape=(0,))), "ReftFormatError", "dimension is 0"),
    "tensor-5-dims": (_g(lambda g: _tensor(g, "reft.0.bias", shape=(1, 1, 1, 1, 2))), "ReftFormatError", "n_dims"),
    "tensor-huge-dims": (_g(lambda g: _tensor(g, "reft.0.weight", shape=(1 << 40, 1 << 40))),
                         "ReftFormatError", "larger than the file"),
    "tensor-offset-unaligned": (_g(lambda g: g.offsets.update({"reft.0.weight": 4})), "ReftFormatError", "multiple of"),
    "tensor-offset-past-end": (_g(lambda g: g.offsets.update({"reft.0.bias": 1 << 40})), "ReftFormatError", "past the end"),
    "tensors-overlap": (_g(lambda g: g.offsets.update({"reft.0.weight": 0})), "ReftFormatError", "overlaps"),
    "tensor-name-64": (_g(lambda g: g.tensors.append(("t" * 64, (1,), 0, b"\0" * 4))), "ReftFormatError", "exceeds"),
    "trailing-garbage": (lambda: valid().bytes() + b"\x01" * 4096, "ReftFormatError", "unexpected bytes"),
    "alignment-zero": (_g(lambda g: g.set("general.alignment", U32, 0)), "ReftFormatError", "general.alignment"),
    "alignment-3": (_g(lambda g: g.set("general.alignment", U32, 3)), "ReftFormatError", "general.alignment"),
    "fingerprint-not-hex": (_g(lambda g: g.set("reft.base.fingerprint", STR, "Z" * 64)), "ReftFormatError", "hex"),
    "n-embd-zero": (_g(lambda g: g.set("reft.base.n_embd", U32, 0)), "ReftFormatError", "reft.base.n_embd"),
    "description-too-long": (_g(lambda g: g.set("general.description", STR, "x" * 70000)), "ReftFormatError", "exceeds"),
    "provenance-nan": (_g(lambda g: g.set("reft.train.loss", F32, float("nan"))), "ReftFormatError", "reft.train.loss"),
    "bitflip-version": (_flip(4, 3), "ReftFormatError", "version"),
    # format 2: its types, tensors and position rules
    "reft-version-0": (_g(lambda g: g.set("reft.version", U32, 0)), "ReftFormatError", "expected one of 1, 2"),
    "reft-version-3-newer": (_v2(edit=lambda g: g.set("reft.version", U32, 3)), "ReftFormatError", "upgrade"),
    "v1-file-v2-type": (_g(lambda g: g.set("reft.0.type", STR, "direft")), "ReftFormatError", "needs reft.version 2"),
    "v1-file-v2-rule": (_g(lambda g: g.set("reft.0.positions", STR, "f0+l1")), "ReftFormatError", "needs reft.version 2"),
    "v1-file-end-offset": (_g(lambda g: g.set("reft.0.positions", STR, "l1:-1")), "ReftFormatError", "needs reft.version 2"),
    "v2-unknown-type": (_v2(edit=lambda g: g.set("reft.0.type", STR, "direft2")), "ReftFormatError", "not a known intervention type"),
    "v2-type-case": (_v2(edit=lambda g: g.set("reft.0.type", STR, "DiReFT")), "ReftFormatError", "reft.0.type"),
    "v2-consreft-with-weight": (_v2("consreft", edit=lambda g: g.tensors.append(
        ("reft.0.weight", (2, 16), 0, b"\0" * 128))), "ReftFormatError", "consreft intervention stores rotate, bias"),
    "v2-lobireft-no-bias": (_v2("lobireft", edit=lambda g: g.tensors.pop()), "ReftFormatError", "reft.0.bias"),
    "v2-direft-missing-weight": (_v2("direft", edit=lambda g: g.tensors.pop(1)), "ReftFormatError",
                                 "'reft.0.weight': missing"),
    "v2-direft-not-orthonormal": (_v2("direft", edit=lambda g: _tensor(g, "reft.0.rotate", 2 * orthonormal(2, 16))),
                                  "ReftFormatError", "type direft needs R orthonormal"),
    "v2-consreft-not-orthonormal": (_v2("consreft", edit=lambda g: _tensor(g, "reft.0.rotate", 0.5 * orthonormal(2, 16))),
                                    "ReftFormatError", "not orthonormal"),
    "v2-nodireft-nan-weight": (_v2("nodireft", edit=lambda g: _tensor(g, "reft.0.weight", np.full((2, 16), np.nan))),
                               "ReftFormatError", "NaN/Inf"),
    "v2-lobireft-huge-bias": (_v2("lobireft", edit=lambda g: _tensor(g, "reft.0.bias", np.full(2, 1e9))),
                              "ReftFormatError", "more than the limit"),
    "v2-end-zero": (_v2(positions="l1:-0"), "ReftFormatError", "reft.0.positions"),
    "v2-end-on-all": (_v2(positions="all:-1"), "ReftFormatError", "reft.0.positions"),
    "v2-end-huge": (_v2(positions="l1:-9999999"), "ReftFormatError", "reft.0.positions"),
    "v2-both-zero": (_v2(positions="f0+l0"), "ReftFormatError", "reft.0.positions"),
    "v2-lone-zero": (_v2(positions="f0"), "ReftFormatError", "reft.0.positions"),
    "v2-positive-end": (_v2(positions="l1:1"), "ReftFormatError", "reft.0.positions"),
    "v2-rule-newline": (_v2(positions="f0+l1:-1\n"), "ReftFormatError", "reft.0.positions"),
    "bitflip-n-kv-high": (_flip(23, 7), "ReftFormatError", "metadata count"),
    "bitflip-first-key-len": (_flip(31, 6), "ReftFormatError", ""),
}
