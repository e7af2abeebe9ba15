"""The pyreft converter's memory against crafted inputs (issue 14, item 11): zip entries that
share bytes, config.json keys that repeat.  Built byte by byte; no torch needed."""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest

from edge_reft.converters.pyreft import from_pyreft
from edge_reft.converters.torch_pickle import read_state_dict
from edge_reft.errors import ReftFormatError
from edge_reft.patch import BaseModel

BASE = BaseModel("llama", 16, 4, "ab" * 32, "synthetic")
KEY = "layer_1_comp_block_output_unit_pos_nunit_1#0"


def _local(name: bytes, data: bytes) -> bytes:
    return struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 0, 0, 0, zlib.crc32(data), len(data),
                       len(data), len(name), 0) + name + data


def _central(name: bytes, data: bytes, offset: int) -> bytes:
    return struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, 0, 0, 0, zlib.crc32(data), len(data),
                       len(data), len(name), 0, 0, 0, 0, 0, offset) + name


def overlapping_archive(copies: int, payload: bytes) -> bytes:
    """A stored zip whose entries archive/data/0..copies-1 nest: each one's data holds the
    next one's header and data, so every entry ends with the same ``payload`` bytes."""
    pkl = (b"archive/data.pkl", b"\x80\x02}q\x00.")
    names = [f"archive/data/{i}".encode() for i in range(copies)]
    inner = b""
    datas = []
    for name in reversed(names):  # the innermost entry holds the payload alone
        data = inner if inner else payload
        datas.append((name, data))
        inner = _local(name, data)
    datas.reverse()
    body = _local(*pkl)
    offsets = [0]
    offsets.append(len(body))
    body += inner
    off = offsets[1]
    entries = [(pkl[0], pkl[1], 0)]
    for name, data in datas:
        entries.append((name, data, off))
        off += 30 + len(name)
    cd = b"".join(_central(n, d, o) for n, d, o in entries)
    eocd = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(entries), len(entries), len(cd), len(body), 0)
    return body + cd + eocd


def test_zip_entries_sharing_bytes_are_refused(tmp_path):
    p = tmp_path / "intkey.bin"
    p.write_bytes(overlapping_archive(20, b"\0" * 4096))
    with pytest.raises(ReftFormatError, match="overlap"):
        read_state_dict(p)


def _folder(tmp_path: Path, config_text: str) -> Path:
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / f"intkey_{KEY}.bin").write_bytes(b"PK\x05\x06" + b"\0" * 18)
    (d / "config.json").write_text(config_text)
    return d


def test_a_key_listed_200_times_is_refused_before_any_file_is_read(tmp_path):
    cls = "<class 'pyreft.interventions.LoreftIntervention'>"
    d = _folder(tmp_path, json.dumps({"sorted_keys": [KEY] * 200, "intervention_types": [cls] * 200}))
    with pytest.raises(ReftFormatError, match="listed 200 times"):
        from_pyreft(d, BASE, "l1")


def test_a_repeated_json_key_is_refused(tmp_path):
    cls = "<class 'pyreft.interventions.LoreftIntervention'>"
    one = f'"sorted_keys": ["{KEY}"]'
    text = "{" + ", ".join([one] * 200) + f', "intervention_types": ["{cls}"]' + "}"
    d = _folder(tmp_path, text)
    with pytest.raises(ReftFormatError, match="appears twice"):
        from_pyreft(d, BASE, "l1")


def test_a_fifo_archive_is_refused_without_blocking(tmp_path):
    import os
    p = tmp_path / "intkey.bin"
    os.mkfifo(p)
    with pytest.raises(ReftFormatError, match="regular file"):
        read_state_dict(p)
