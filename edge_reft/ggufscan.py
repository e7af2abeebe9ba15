"""A strict, bounded GGUF parser that returns immutable records.

Why not ``gguf.GGUFReader``: the released gguf 0.19.0 reader trusts every
count and length in the file, so a crafted 43-byte file with a huge array
length makes it loop and allocate without bound.  Here every count and length
is checked against the bytes that remain *before* anything loops or
allocates, so the work done is O(file size) and a rejection is fast.

The parser is generic (it also reads the metadata of model GGUFs for
fingerprints); what a `.reft` must contain is checked in ``reftfile``.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

import numpy as np

from .errors import ReftFormatError
from .files import open_regular
from .spec import GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC

# GGUF value types (gguf.GGUFValueType); spelled here so this module needs
# nothing but numpy.
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
TYPE_NAMES = ("UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "FLOAT32", "BOOL",
              "STRING", "ARRAY", "UINT64", "INT64", "FLOAT64")
_SCALAR = {UINT8: "<B", INT8: "<b", UINT16: "<H", INT16: "<h", UINT32: "<I", INT32: "<i",
           FLOAT32: "<f", BOOL: "<B", UINT64: "<Q", INT64: "<q", FLOAT64: "<d"}
_NUMPY = {UINT8: "<u1", INT8: "<i1", UINT16: "<u2", INT16: "<i2", UINT32: "<u4", INT32: "<i4",
          FLOAT32: "<f4", BOOL: "<u1", UINT64: "<u8", INT64: "<i8", FLOAT64: "<f8"}
GGML_MAX_DIMS = 4
GGML_MAX_NAME = 64  # ggml refuses tensor names of 64 bytes or more
# every ggml tensor type: (elements per block, bytes per block), as gguf-py 0.19.0's
# GGML_QUANT_SIZES (tests/test_fuzz.py compares them); lets a model's tensors be bounds-checked
# without importing gguf-py
GGML_BLOCKS = {0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
               9: (32, 40), 10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210),
               15: (256, 292), 16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18),
               21: (256, 110), 22: (256, 82), 23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4),
               27: (1, 8), 28: (1, 8), 29: (256, 56), 30: (1, 2), 34: (256, 54), 35: (256, 66),
               39: (32, 17), 40: (64, 36), 41: (128, 18)}


@dataclass(frozen=True)
class Limits:
    """What a parse may accept; every bound is also checked against the file size."""
    max_key_bytes: int = 65535
    max_string_bytes: int = 1 << 30
    max_array_depth: int = 2          # 1 = arrays of scalars/strings only
    max_kv: int = 1 << 20
    max_tensors: int = 1 << 20
    # ggml type -> (elements per block, bytes per block); None = do not read tensor infos
    tensor_types: Mapping[int, tuple[int, int]] | None = None
    strict_utf8: bool = True
    max_trailing_bytes: int | None = None  # bytes allowed after the last tensor's data


@dataclass(frozen=True)
class Value:
    type: int                      # a GGUF value type
    value: Any                     # int, float, bool, str, tuple (strings/arrays) or read-only ndarray
    sub_type: int | None = None    # element type of an ARRAY

    @property
    def type_name(self) -> str:
        name = TYPE_NAMES[self.type]
        return f"ARRAY[{TYPE_NAMES[self.sub_type]}]" if self.type == ARRAY else name


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]   # numpy order (GGUF stores ne[0] first; this is reversed)
    ggml_type: int
    offset: int              # absolute byte offset of the data in the file
    nbytes: int


@dataclass(frozen=True)
class GGUFFile:
    path: str
    version: int
    fields: Mapping[str, Value]
    tensors: tuple[TensorInfo, ...]
    alignment: int
    file_size: int


class _Stop(Exception):
    """A structural problem after which parsing cannot continue."""


class _Cursor:
    def __init__(self, buf: memoryview, strict_utf8: bool):
        self.buf, self.pos, self.end = buf, 0, len(buf)
        self.errors = "strict" if strict_utf8 else "surrogateescape"

    def remaining(self) -> int:
        return self.end - self.pos

    def need(self, n: int, what: str) -> None:
        if n > self.remaining():
            raise _Stop(f"{what}: needs {n} bytes at offset {self.pos}, "
                        f"only {self.remaining()} remain (file truncated or length corrupt)")

    def scalar(self, vtype: int, what: str) -> Any:
        fmt = _SCALAR[vtype]
        size = struct.calcsize(fmt)
        self.need(size, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        if vtype == BOOL:
            if v not in (0, 1):
                raise _Stop(f"{what}: bool byte is {v}, expected 0 or 1")
            return bool(v)
        return v

    def string(self, what: str, max_bytes: int) -> str:
        n = self.scalar(UINT64, f"{what} length")
        if n > max_bytes:
            raise _Stop(f"{what}: string of {n} bytes exceeds the limit of {max_bytes}")
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8", self.errors)
        except UnicodeDecodeError as e:
            raise _Stop(f"{what}: not valid UTF-8 ({e.reason} at byte {e.start})") from None


def _min_size(vtype: int) -> int:
    """Fewest bytes one value of ``vtype`` can occupy (bounds counts before loops)."""
    if vtype == STRING:
        return 8
    if vtype == ARRAY:
        return 12
    return struct.calcsize(_SCALAR[vtype])


def _value_type(cur: _Cursor, what: str) -> int:
    t = cur.scalar(UINT32, f"{what} type")
    if t >= len(TYPE_NAMES):
        raise _Stop(f"{what}: unknown value type {t} (expected 0..12)")
    return t


def _value(cur: _Cursor, vtype: int, what: str, lim: Limits, depth: int) -> Value:
    if vtype == STRING:
        return Value(STRING, cur.string(what, lim.max_string_bytes))
    if vtype != ARRAY:
        return Value(vtype, cur.scalar(vtype, what))
    if depth >= lim.max_array_depth:
        raise _Stop(f"{what}: arrays nested deeper than {lim.max_array_depth} are not accepted")
    sub = _value_type(cur, f"{what} element")
    count = cur.scalar(UINT64, f"{what} count")
    if count * _min_size(sub) > cur.remaining():
        raise _Stop(f"{what}: array of {count} {TYPE_NAMES[sub]} cannot fit in the "
                    f"{cur.remaining()} bytes that remain")
    if sub in _NUMPY:
        size = count * _min_size(sub)
        arr = np.frombuffer(cur.buf, dtype=_NUMPY[sub], count=count, offset=cur.pos).copy()
        cur.pos += size
        if sub == BOOL:
            if arr.size and arr.max() > 1:
                raise _Stop(f"{what}: bool array holds a byte other than 0 or 1")
            arr = arr.astype(bool)
        arr.setflags(write=False)
        return Value(ARRAY, arr, sub)
    if sub == STRING:
        return Value(ARRAY, _strings(cur, count, what, lim.max_string_bytes), sub)
    items = tuple(_value(cur, sub, f"{what}[{i}]", lim, depth + 1).value for i in range(count))
    return Value(ARRAY, items, sub)


_U64 = struct.Struct("<Q").unpack_from


def _strings(cur: _Cursor, count: int, what: str, max_bytes: int) -> tuple[str, ...]:
    """An array of strings: the hot loop of a model's vocabulary, kept tight."""
    buf, pos, end, errors = cur.buf, cur.pos, cur.end, cur.errors
    out = []
    for i in range(count):
        if pos + 8 > end:
            cur.pos = pos
            cur.need(8, f"{what}[{i}] length")
        (n,) = _U64(buf, pos)
        pos += 8
        if n > max_bytes or pos + n > end:
            cur.pos = pos
            raise _Stop(f"{what}[{i}]: string of {n} bytes does not fit "
                        f"({end - pos} bytes remain, limit {max_bytes})")
        try:
            out.append(str(buf[pos:pos + n], "utf-8", errors))
        except UnicodeDecodeError as e:
            raise _Stop(f"{what}[{i}]: not valid UTF-8 ({e.reason})") from None
        pos += n
    cur.pos = pos
    return tuple(out)


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def parse(buf: bytes | memoryview | mmap.mmap, path: str, limits: Limits) -> GGUFFile:
    """Parse a whole GGUF image; raise one ReftFormatError naming what is wrong."""
    mv = memoryview(buf)
    try:
        return _parse(_Cursor(mv, limits.strict_utf8), path, limits)
    except _Stop as e:
        problem = str(e)
    finally:
        mv.release()  # a traceback must not pin an mmap open
    raise ReftFormatError(path, problem)


def _parse(cur: _Cursor, path: str, lim: Limits) -> GGUFFile:
    cur.need(4, "magic")
    magic = bytes(cur.buf[:4])
    if magic != GGUF_MAGIC:
        raise _Stop(f"magic: expected b'GGUF', found {magic!r} (not a GGUF file)")
    cur.pos = 4
    version = cur.scalar(UINT32, "header version")
    if version not in (2, 3):
        raise _Stop(f"header version: expected 3 (or 2), found {version}")
    n_tensors = cur.scalar(UINT64, "header tensor count")
    n_kv = cur.scalar(UINT64, "header metadata count")
    if n_kv > lim.max_kv or n_kv * 13 > cur.remaining():
        raise _Stop(f"header metadata count: {n_kv} entries cannot fit in {cur.remaining()} "
                    f"bytes (limit {lim.max_kv})")
    if n_tensors > lim.max_tensors or n_tensors * 32 > cur.remaining():
        raise _Stop(f"header tensor count: {n_tensors} tensors cannot fit in {cur.remaining()} "
                    f"bytes (limit {lim.max_tensors})")
    fields: dict[str, Value] = {}
    for i in range(n_kv):
        k = cur.string(f"metadata key #{i}", lim.max_key_bytes)
        if not k:
            raise _Stop(f"metadata key #{i}: empty key")
        if k in fields:
            raise _Stop(f"metadata key {k!r}: appears twice")
        fields[k] = _value(cur, _value_type(cur, k), k, lim, 0)

    alignment = GGUF_DEFAULT_ALIGNMENT
    if "general.alignment" in fields:
        a = fields["general.alignment"]
        if a.type != UINT32 or a.value == 0 or a.value & (a.value - 1) or a.value > 1 << 16:
            raise _Stop(f"general.alignment: expected a power of two UINT32 <= 65536, found {a.value!r}")
        alignment = a.value

    tensors: tuple[TensorInfo, ...] = ()
    if lim.tensor_types is not None:
        tensors = _tensor_infos(cur, n_tensors, alignment, lim)
    return GGUFFile(path, version, MappingProxyType(fields), tensors, alignment, cur.end)


def _tensor_infos(cur: _Cursor, n: int, alignment: int, lim: Limits) -> tuple[TensorInfo, ...]:
    raw = []
    names: set[str] = set()
    for i in range(n):
        name = cur.string(f"tensor #{i} name", GGML_MAX_NAME - 1)
        if name in names:
            raise _Stop(f"tensor {name!r}: appears twice")
        names.add(name)
        n_dims = cur.scalar(UINT32, f"tensor {name!r} n_dims")
        if not 1 <= n_dims <= GGML_MAX_DIMS:
            raise _Stop(f"tensor {name!r}: n_dims is {n_dims}, expected 1..{GGML_MAX_DIMS}")
        ne = [cur.scalar(UINT64, f"tensor {name!r} dim {j}") for j in range(n_dims)]
        gtype = cur.scalar(UINT32, f"tensor {name!r} type")
        offset = cur.scalar(UINT64, f"tensor {name!r} offset")
        if gtype not in lim.tensor_types:
            allowed = ", ".join(str(t) for t in lim.tensor_types)
            raise _Stop(f"tensor {name!r}: ggml type {gtype} is not accepted (allowed: {allowed})")
        if any(d == 0 for d in ne):
            raise _Stop(f"tensor {name!r}: a dimension is 0 ({ne})")
        block, block_bytes = lim.tensor_types[gtype]
        if ne[0] % block:
            raise _Stop(f"tensor {name!r}: {ne[0]} elements per row is not a multiple of the "
                        f"type's block of {block}")
        nelem = 1
        for d in ne:
            nelem *= d
            if nelem > cur.end:  # no tensor can have more elements than the file has bytes
                raise _Stop(f"tensor {name!r}: shape {ne} is larger than the file")
        if offset % alignment:
            raise _Stop(f"tensor {name!r}: offset {offset} is not a multiple of {alignment}")
        raw.append((name, tuple(reversed(ne)), gtype, offset, nelem // block * block_bytes))
    data_start = _align(cur.pos, alignment)
    out, spans = [], []
    for name, shape, gtype, offset, nbytes in raw:
        start = data_start + offset
        if start + nbytes > cur.end:
            raise _Stop(f"tensor {name!r}: data [{start}, {start + nbytes}) runs past the end "
                        f"of the file ({cur.end} bytes)")
        spans.append((start, start + nbytes, name))
        out.append(TensorInfo(name, shape, gtype, start, nbytes))
    spans.sort()
    for (s0, e0, n0), (s1, _, n1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise _Stop(f"tensor {n1!r}: data overlaps tensor {n0!r}")
    if lim.max_trailing_bytes is not None:
        end = max((e for _, e, _ in spans), default=data_start)
        if cur.end - end > lim.max_trailing_bytes:
            raise _Stop(f"file: {cur.end - end} unexpected bytes after the last tensor's data")
    return tuple(out)


def read_bytes(path: str | os.PathLike[str], max_bytes: int | None) -> bytes:
    """The whole file, refused before reading if it is over ``max_bytes``."""
    p = os.fspath(path)
    try:
        with os.fdopen(open_regular(p), "rb") as f:  # a FIFO named x.reft must not block
            size = os.fstat(f.fileno()).st_size
            if max_bytes is not None and size > max_bytes:
                raise ReftFormatError(p, f"file: {size} bytes exceeds the limit of {max_bytes} "
                                         "bytes (a patch is kilobytes; raise max_bytes to accept it)")
            data = f.read(size + 1 if max_bytes is None else min(size, max_bytes) + 1)
    except OSError as e:
        raise ReftFormatError(p, f"file: cannot be read ({e.strerror or e})") from None
    if max_bytes is not None and len(data) > max_bytes:  # grew while we read it
        raise ReftFormatError(p, f"file: more than the limit of {max_bytes} bytes")
    if not data:
        raise ReftFormatError(p, "file: empty (0 bytes), expected a GGUF file")
    return data


def read_metadata(path: str | os.PathLike[str], limits: Limits) -> GGUFFile:
    """Parse the header and metadata of a (large) GGUF file through a read-only map."""
    p = os.fspath(path)
    try:
        with os.fdopen(open_regular(p), "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise ReftFormatError(p, "file: empty (0 bytes), expected a GGUF file")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                return parse(mm, p, limits)
    except OSError as e:
        raise ReftFormatError(p, f"file: cannot be read ({e.strerror or e})") from None
