"""An ``edge-reft export-onnx`` folder, read without torch: its manifest, patches laid out
as the graph's inputs, and the IOBinding and KV buffers onnxruntime runs it with (its
tokenizer is edge_reft.hftokenizer's).

The manifest (``edge_reft_onnx.json``, written by
``edge_reft.converters.onnx_export``) names every input; each edit slot at
block L takes rotate A (B, r, d), delta_t = B^T (B, d, r), bias c (B, 1, r)
and mask (B, S, 1), r the export's max rank (zero-padded: zero rows change
nothing).  Several interventions on one block fill its slots in order.
Each block also has a bool input ``reft.L.on``: off, the block runs the
builder's graph unchanged (cheap), so a call turns on only the blocks some
row's mask edits.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from edge_reft.errors import ReftError, ReftFormatError
from edge_reft.patch import BaseModel

from ..edits import PatchSet

MANIFEST = "edge_reft_onnx.json"
FORMAT, VERSION = "edge-reft-onnx", 1


@dataclass(frozen=True)
class Site:
    layer: int
    slot: int
    inputs: dict[str, str]   # rotate, delta_t, bias, mask -> graph input name


class Export:
    """The manifest of an export folder, and patches turned into its inputs."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        try:
            m = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ReftError(f"{self.folder}: not an export-onnx folder ({MANIFEST}: {e}); make one with "
                            "`edge-reft export-onnx MODEL --out DIR`") from None
        problems = []
        if m.get("format") != FORMAT or m.get("version") != VERSION:
            problems.append(f"format/version: {m.get('format')!r} {m.get('version')!r}, expected "
                            f"{FORMAT!r} {VERSION}")
        for k in ("base", "export", "model", "kv_heads", "head_dim", "sites", "switches", "logits_start"):
            if k not in m:
                problems.append(f"{k}: missing")
        if problems:
            raise ReftFormatError(path, problems)
        self.manifest = m
        self.base = BaseModel(**m["base"])
        ex = m["export"]
        self.precision, self.slots, self.max_rank = ex["precision"], int(ex["slots"]), int(ex["max_rank"])
        self.layers = tuple(int(L) for L in ex["layers"])
        self.sites = tuple(Site(int(s["layer"]), int(s["slot"]), dict(s["inputs"])) for s in m["sites"])
        self.site_of = {(s.layer, s.slot): s for s in self.sites}
        self.model_path = self.folder / m["model"]
        self.kv_heads, self.head_dim = int(m["kv_heads"]), int(m["head_dim"])
        self.context_length = int(m.get("context_length", 2048))
        self.logits_start = m["logits_start"]
        self.switches = {int(L): name for L, name in m["switches"].items()}
        self._zeros: dict[tuple[int, int], np.ndarray] = {}
        self._bool = {v: np.array(v) for v in (False, True)}  # shared, so unchanged switches are not re-fed

    # ---- patches -> inputs ---------------------------------------------------------------
    def check(self, pset: PatchSet) -> None:
        """Refuse a patch set this export has no inputs for (lists every problem)."""
        where = [(p.source, i) for p in pset.patches for i in range(len(p.interventions))]
        problems = []
        for L, items in pset.by_layer.items():
            for k, c in enumerate(items):
                src, i = where[c.index]
                if L not in self.layers:
                    problems.append(f"{src}: reft.{i} edits block {L}, but this export has patch inputs at "
                                    f"blocks {list(self.layers)} only; re-export with --layers including "
                                    f"{L}, or --all-layers")
                    break
                if k >= self.slots:
                    problems.append(f"{src}: reft.{i} is intervention {k + 1} on block {L}; the export has "
                                    f"{self.slots} slot(s) per block; re-export with --slots {len(items)}")
                if c.rotate.shape[0] > self.max_rank:
                    problems.append(f"{src}: reft.{i} has rank {c.rotate.shape[0]}, above the export's "
                                    f"--max-rank {self.max_rank}; re-export with --max-rank "
                                    f"{c.rotate.shape[0]} or more")
        if problems:
            raise ReftError(f"{self.folder}: this ONNX export cannot apply the patch:\n"
                            + "\n".join(f"  - {p}" for p in problems))

    def slot_of(self, pset: PatchSet) -> dict[int, Site]:
        """Intervention index -> the site it fills."""
        return {c.index: self.site_of[(L, k)] for L, items in pset.by_layer.items()
                for k, c in enumerate(items)}

    def weights(self, pset: PatchSet) -> dict[str, np.ndarray]:
        """rotate, delta_t and bias of every used site for one sequence (no batch axis)."""
        r, out = self.max_rank, {}
        for index, site in self.slot_of(pset).items():
            c = pset.interventions[index]
            rank, d = c.rotate.shape
            rot, dt, b = np.zeros((r, d), np.float32), np.zeros((d, r), np.float32), np.zeros((1, r), np.float32)
            rot[:rank], dt[:, :rank], b[0, :rank] = c.rotate, c.delta.T, c.bias
            out.update({site.inputs["rotate"]: rot, site.inputs["delta_t"]: dt, site.inputs["bias"]: b})
        return out

    def batch_weights(self, psets: Sequence[PatchSet], d: int) -> dict[str, np.ndarray]:
        """Every site's rotate, delta_t and bias with a batch axis, row b from ``psets[b]``."""
        rows = [self.weights(p) for p in psets]
        r, out = self.max_rank, {}
        for site in self.sites:
            zero = {"rotate": (r, d), "delta_t": (d, r), "bias": (1, r)}
            for kind, shape in zero.items():
                name = site.inputs[kind]
                if any(name in w for w in rows):
                    out[name] = np.stack([w.get(name, np.zeros(shape, np.float32)) for w in rows])
                else:
                    out[name] = np.zeros((len(rows),) + shape, np.float32)
        return out

    def masks(self, psets: Sequence[PatchSet], starts: Sequence[int], n: int,
              n_prompts: Sequence[int]) -> dict[str, np.ndarray]:
        """Every site's (B, n, 1) mask, row b covering positions starts[b]..starts[b]+n-1,
        and every block's switch (on where a mask is non-zero).  Sites no row uses share
        one read-only zero array (cheap to re-feed)."""
        zero = self._zeros.get((len(psets), n))
        if zero is None:
            zero = np.zeros((len(psets), n, 1), np.float32)
            zero.setflags(write=False)
            self._zeros = {(len(psets), n): zero}
        out = {s.inputs["mask"]: zero for s in self.sites}
        for b, (pset, start, n_prompt) in enumerate(zip(psets, starts, n_prompts)):
            if not pset:
                continue
            m = pset.masks(start, n, n_prompt)
            for index, site in self.slot_of(pset).items():
                name = site.inputs["mask"]
                if out[name] is zero:
                    out[name] = np.zeros((len(psets), n, 1), np.float32)
                out[name][b, :, 0] = m[index]
        on = {s.layer for s in self.sites if out[s.inputs["mask"]] is not zero and out[s.inputs["mask"]].any()}
        out.update({name: self._bool[L in on] for L, name in self.switches.items()})
        return out


class Binding:
    """An IOBinding over some rows of a KVCache, holding every array it binds
    (onnxruntime reads bound numpy memory in place, it does not copy it)."""

    def __init__(self, session, kv_inputs: dict[str, str], kv: "KVCache", rows: slice):
        import onnxruntime as ort
        self.ort, self.io = ort, session.io_binding()
        self.kept: dict[str, np.ndarray] = {}
        self.logits = np.empty(0, np.float32)
        for past, present in kv_inputs.items():
            v = ort.OrtValue.ortvalue_from_numpy(kv.buffers[past][rows])  # a view: writes land in kv
            self.io.bind_ortvalue_input(past, v)
            self.io.bind_ortvalue_output(present, v)

    def feed(self, feeds: dict[str, np.ndarray]) -> None:
        """Bind inputs, skipping those already bound with equal contents."""
        for name, arr in feeds.items():
            old = self.kept.get(name)
            if old is arr or (old is not None and old.shape == arr.shape and np.array_equal(old, arr)):
                continue
            arr = np.ascontiguousarray(arr)
            self.io.bind_cpu_input(name, arr)
            self.kept[name] = arr

    def logits_out(self, shape: tuple[int, ...]) -> np.ndarray:
        """The buffer onnxruntime writes the logits into (re-bound when the shape changes)."""
        if self.logits.shape != shape:
            self.logits = np.empty(shape, np.float32)
            self.io.bind_ortvalue_output("logits", self.ort.OrtValue.ortvalue_from_numpy(self.logits))
        return self.logits


class KVCache:
    """Shared past/present buffers for ``batch`` sequences, (batch, kv_heads, capacity, head_dim)."""

    def __init__(self, session, kv_inputs: dict[str, str], batch: int, capacity: int, export: Export):
        self.session, self.kv_inputs, self.capacity = session, kv_inputs, capacity
        self.buffers = {name: np.zeros((batch, export.kv_heads, capacity, export.head_dim), np.float32)
                        for name in kv_inputs}
        self.all = self.binding(slice(None))

    def binding(self, rows: slice) -> Binding:
        """An IOBinding over ``rows`` of these buffers (past and present are the same memory)."""
        return Binding(self.session, self.kv_inputs, self, rows)
