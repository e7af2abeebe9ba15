"""torch.save archives read without torch, and without running a single line of their code.

A ``.bin`` written by ``torch.save`` is a zip: ``<archive>/data.pkl`` (a
pickle) and ``<archive>/data/<key>`` (raw storages).  ``read_state_dict``
runs a narrowed copy of CPython's pure-Python unpickler: an allowlist of
opcodes, and of four kinds of globals (OrderedDict, _rebuild_tensor_v2,
_rebuild_parameter, the typed storage classes); every other global is
refused by name, so a malicious ``__reduce__`` never runs.  Tensors are
rebuilt as numpy arrays from the storage bytes, every size, stride and
offset bounded by those bytes.
"""
from __future__ import annotations

import io
import math
import os
import pickle
import pickletools
import re
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_reft import spec
from edge_reft.errors import ReftFormatError
from edge_reft.files import open_regular
from edge_reft.reftfile import decode_tensor

MAX_ARCHIVE_BYTES = 256 << 20  # one intervention of a 16k-wide model at rank 256 is 48 MiB
MAX_PICKLE_BYTES = 1 << 20     # a state dict's data.pkl is a few hundred bytes
VIEW_FACTOR = 4                # tensors may copy out at most 4x the elements of the storage they view

# ---- torch.save archives, read without torch --------------------------------------------

# torch typed storage class -> (numpy type of its raw bytes, torch dtype name)
STORAGES = {"FloatStorage": ("<f4", "float32"), "DoubleStorage": ("<f8", "float64"),
            "HalfStorage": ("<f2", "float16"), "BFloat16Storage": ("<u2", "bfloat16"),
            "LongStorage": ("<i8", "int64"), "IntStorage": ("<i4", "int32"),
            "ShortStorage": ("<i2", "int16"), "CharStorage": ("i1", "int8"),
            "ByteStorage": ("u1", "uint8"), "BoolStorage": ("?", "bool")}
FLOATING = ("float32", "float64", "float16", "bfloat16")


@dataclass(frozen=True, eq=False)
class StoredTensor:
    """A tensor of a torch archive: values (float32 for every floating dtype) and torch dtype."""
    values: np.ndarray
    dtype: str


@dataclass(frozen=True)
class _StorageClass:  # what GLOBAL torch.FloatStorage & co. load as: a name, not callable
    name: str


@dataclass(eq=False)
class _Storage:
    key: str
    dtype: str
    items: np.ndarray  # the raw elements (bfloat16 as uint16)
    viewed: int = 0    # elements copied out by the tensors that view it


class _Refused(Exception):
    pass


def _is_int(v: Any) -> bool:
    return type(v) is int


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                    hooks: Any = None, metadata: Any = None) -> StoredTensor:
    """torch._utils._rebuild_tensor_v2, bounded by the storage it views."""
    if not isinstance(storage, _Storage):
        raise _Refused(f"_rebuild_tensor_v2: argument 1 is {type(storage).__name__}, expected a storage")
    dims_ok = (isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride) <= 8
               and all(_is_int(v) and v >= 0 for v in size + stride))
    if not (dims_ok and _is_int(offset) and offset >= 0):
        raise _Refused(f"_rebuild_tensor_v2: offset {offset!r:.40}, size {size!r:.80}, stride "
                       f"{stride!r:.80}: expected non-negative integers, one stride per dimension")
    numel, have = math.prod(size), storage.items.size
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if numel and (last >= have or numel > have):
        raise _Refused(f"tensor of size {size} (offset {offset}, stride {stride}) does not fit its "
                       f"storage of {have} elements")
    storage.viewed += numel
    if storage.viewed > VIEW_FACTOR * have:  # many views of one storage: a memory bomb
        raise _Refused(f"storage {storage.key!r}: its tensors copy more than {VIEW_FACTOR}x its "
                       f"{have} elements")
    it = storage.items.itemsize
    raw = np.lib.stride_tricks.as_strided(storage.items[offset:] if numel else storage.items[:0],
                                          size, tuple(s * it for s in stride), writeable=False).copy()
    if storage.dtype == "bfloat16":
        raw = decode_tensor(raw.tobytes(), spec.GGML_BF16, size)
    elif storage.dtype in FLOATING:
        raw = raw.astype(np.float32)
    return StoredTensor(raw, storage.dtype)


def _rebuild_parameter(data: Any, requires_grad: Any = False, hooks: Any = None) -> StoredTensor:
    if not isinstance(data, StoredTensor):
        raise _Refused(f"_rebuild_parameter: argument 1 is {type(data).__name__}, expected a tensor")
    return data


GLOBALS = {("collections", "OrderedDict"): OrderedDict,
           ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
           ("torch._utils", "_rebuild_parameter"): _rebuild_parameter}
GLOBALS.update({("torch", name): _StorageClass(name) for name in STORAGES})
_OPNAME = {ord(op.code): op.name for op in pickletools.opcodes}
# what torch.save writes for a state dict (any protocol); no INST/OBJ/NEWOBJ/EXT*
OPCODES = {"PROTO", "FRAME", "STOP", "MARK", "POP", "POP_MARK", "DUP", "NONE", "NEWTRUE",
           "NEWFALSE", "BININT", "BININT1", "BININT2", "LONG1", "BINFLOAT", "BINUNICODE",
           "SHORT_BINUNICODE", "BINBYTES", "SHORT_BINBYTES", "EMPTY_TUPLE", "TUPLE", "TUPLE1",
           "TUPLE2", "TUPLE3", "EMPTY_LIST", "APPEND", "APPENDS", "EMPTY_DICT", "SETITEM",
           "SETITEMS", "BINPUT", "LONG_BINPUT", "MEMOIZE", "BINGET", "LONG_BINGET", "GLOBAL",
           "STACK_GLOBAL", "BINPERSID", "REDUCE", "BUILD"}


class _Dispatch(dict):
    def __missing__(self, code: int) -> Any:
        raise _Refused(f"pickle opcode {_OPNAME.get(code, hex(code))} is not allowed in a state dict")


def _build(u: "_SafeUnpickler") -> None:
    """BUILD only as nn.Module.state_dict() uses it: ``_metadata`` on the OrderedDict (dropped)."""
    state = u.stack.pop()
    if type(u.stack[-1]) is not OrderedDict or not isinstance(state, dict):
        raise _Refused(f"BUILD on a {type(u.stack[-1]).__name__}: only a state dict's metadata is allowed")


class _SafeUnpickler(pickle._Unpickler):  # the pure-Python unpickler: its opcode table can be narrowed
    dispatch = _Dispatch({c: f for c, f in pickle._Unpickler.dispatch.items() if _OPNAME.get(c) in OPCODES})
    dispatch[pickle.BUILD[0]] = _build

    def __init__(self, zf: zipfile.ZipFile, prefix: str):
        super().__init__(io.BytesIO(zf.read(prefix + "data.pkl")))
        self.zf, self.prefix, self.storages = zf, prefix, {}

    def find_class(self, module: str, name: str) -> Any:
        found = GLOBALS.get((module, name))
        if found is None:
            raise _Refused(f"refused global {module}.{name}: a state dict holds only OrderedDict, "
                           "tensors and storages (this file may be malicious)")
        return found

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageClass) and isinstance(pid[2], str) and _is_int(pid[4])):
            raise _Refused(f"persistent id {pid!r:.100}: expected ('storage', <storage class>, key, "
                           "location, numel)")
        _, cls, key, _location, numel = pid
        if key not in self.storages:
            np_type, dtype = STORAGES[cls.name]
            name = f"{self.prefix}data/{key}"
            try:
                entry = self.zf.getinfo(name)
            except KeyError:
                raise _Refused(f"storage {key!r}: the archive has no entry {name}") from None
            need = numel * np.dtype(np_type).itemsize
            if numel < 0 or need != entry.file_size:
                raise _Refused(f"storage {key!r}: {numel} elements of {cls.name} need {need} bytes, "
                               f"data/{key} holds {entry.file_size}")
            self.storages[key] = _Storage(key, dtype, np.frombuffer(self.zf.read(entry), np_type))
        elif self.storages[key].dtype != STORAGES[cls.name][1]:
            raise _Refused(f"storage {key!r}: read as {self.storages[key].dtype} and as {cls.name}")
        return self.storages[key]


def _archive_prefix(zf: zipfile.ZipFile) -> str:
    pkls = [i.filename for i in zf.infolist() if i.filename.endswith("/data.pkl")]
    if len(pkls) != 1:
        raise _Refused(f"{len(pkls)} <archive>/data.pkl entries, expected 1 (not a torch.save file?)")
    for i in zf.infolist():  # torch.save stores entries uncompressed: sizes are bytes on disk
        if i.compress_type != zipfile.ZIP_STORED or i.compress_size != i.file_size:
            raise _Refused(f"{i.filename}: compressed zip entry (torch.save writes stored entries)")
    _check_spans(zf)
    prefix = pkls[0][:-len("data.pkl")]
    if zf.getinfo(pkls[0]).file_size > MAX_PICKLE_BYTES:
        raise _Refused(f"data.pkl: larger than {MAX_PICKLE_BYTES} bytes")
    if prefix + "byteorder" in zf.namelist() and zf.read(prefix + "byteorder") != b"little":
        raise _Refused("byteorder: big-endian archives are not supported")
    return prefix


def _check_spans(zf: zipfile.ZipFile) -> None:
    """Refuse entries whose bytes overlap: one 20 MiB storage listed under 40 names would
    otherwise be read 40 times (the size checks see each entry alone)."""
    spans = []
    assert zf.fp is not None
    for i in zf.infolist():
        zf.fp.seek(i.header_offset)
        head = zf.fp.read(30)
        if len(head) != 30 or head[:4] != b"PK\x03\x04":
            raise _Refused(f"{i.filename}: no local header at offset {i.header_offset}")
        name_len, extra_len = struct.unpack("<HH", head[26:30])
        spans.append((i.header_offset, i.header_offset + 30 + name_len + extra_len + i.compress_size, i.filename))
    spans.sort()
    for (_, end0, name0), (start1, _, name1) in zip(spans, spans[1:]):
        if start1 < end0:
            raise _Refused(f"{name1}: its bytes overlap those of {name0} (a crafted archive)")


def _open_archive(path: Path, max_bytes: int) -> zipfile.ZipFile:
    try:
        size = path.stat().st_size
    except OSError as e:
        raise ReftFormatError(path, f"file: cannot be read ({e.strerror or e})") from None
    if size > max_bytes:
        raise ReftFormatError(path, f"file: {size} bytes, more than the limit of {max_bytes}")
    try:
        return zipfile.ZipFile(os.fdopen(open_regular(path), "rb"))  # a FIFO must not block
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise ReftFormatError(path, f"file: not a readable torch.save zip archive ({e}); the legacy "
                                    "pre-1.6 torch format is not supported") from None


def read_state_dict(path: str | os.PathLike[str], max_bytes: int = MAX_ARCHIVE_BYTES) -> dict[str, StoredTensor]:
    """The state dict of a ``torch.save`` file, read without torch and without running its code."""
    p = Path(path)
    with _open_archive(p, max_bytes) as zf:
        try:
            state = _SafeUnpickler(zf, _archive_prefix(zf)).load()
        except _Refused as e:
            raise ReftFormatError(p, str(e)) from None
        except Exception as e:  # a malformed archive or pickle: any failure is the file's
            raise ReftFormatError(p, f"unreadable archive ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, StoredTensor) for k, v in state.items()):
        raise ReftFormatError(p, f"data.pkl: a {type(state).__name__} that is not a state dict "
                                 "(names -> tensors)")
    return dict(state)


def archive_storage_count(path: Path) -> int:
    """How many tensor storages a torch.save archive holds (read from its listing only)."""
    with _open_archive(path, 1 << 62) as zf:
        return sum(1 for n in zf.namelist() if re.search(r"/data/[0-9]+$", n))


# ---- pyreft folders ----------------------------------------------------------------------
