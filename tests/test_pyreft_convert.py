"""pyreft checkpoints -> .reft: torch.save files in pyreft's layout (built here with torch's
own modules, so every case and every hostile variant can be made), pyreft's formula written
out independently, the runtime on the real SmolLM2, and hostile archives.  Checkpoints that
pyreft itself trained are tests/test_pyreft_real.py's."""
from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_reft import spec
from edge_reft.converters.pyreft import convert, from_pyreft, pyreft_positions, read_state_dict, to_pyreft
from edge_reft.errors import ReftError
from edge_reft.fingerprint import base_model
from edge_reft.loreft import apply
from edge_reft.patch import random_patch
from edge_reft.positions import PositionRule
from edge_reft.reftfile import load_patch

D, N_LAYER = 576, 30  # SmolLM2-135M
PROMPT = "Tell me about the moon and its phases."


# ---- pyreft's modules, as in pyreft/interventions.py (their state dicts are the file layout) ----

class LowRankRotateLayer(torch.nn.Module):
    def __init__(self, n: int, m: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(n, m))
        torch.nn.init.orthogonal_(self.weight)


def loreft_state(seed: int, r: int = 4, d: int = D, dtype=torch.bfloat16, rot_dtype=torch.float32):
    """LoreftIntervention.state_dict() after 'training' (parameters moved off their init)."""
    torch.manual_seed(seed)
    rot = torch.nn.utils.parametrizations.orthogonal(LowRankRotateLayer(d, r))
    lin = torch.nn.Linear(d, r)
    with torch.no_grad():
        rot.parametrizations.weight.original.add_(0.3 * torch.randn(d, r).tril(-1))  # diag: no grad
        lin.weight.normal_(0, 0.3)
        lin.bias.normal_(0, 4.0)
    state = OrderedDict((k, v.to(dtype)) for k, v in lin.state_dict().items())
    state["rotate_layer"] = rot.weight.data.to(rot_dtype)
    return state


class NoreftLike(torch.nn.Module):  # NoreftIntervention's parameters and buffers, in its order
    def __init__(self, seed: int, r: int = 4, d: int = D, add_bias: bool = True):
        super().__init__()
        torch.manual_seed(seed)
        self.register_buffer("embed_dim", torch.tensor(d))
        self.register_buffer("interchange_dim", torch.tensor(d))
        self.proj_layer = torch.nn.Linear(d, r, bias=add_bias).to(torch.bfloat16)
        self.learned_source = torch.nn.Linear(d, r).to(torch.bfloat16)
        with torch.no_grad():
            for p in self.parameters():
                p.normal_(0, 0.3)


class ConsreftLike(torch.nn.Module):
    """Consreft/Lobireft (learned_source a bare [r] Parameter) or, ``linear``, Direft, after
    'training': the parametrization's original moved off its init, as an optimizer moves it."""
    def __init__(self, r: int = 4, d: int = D, linear: bool = False, seed: int = 0, trivialization: bool = True):
        super().__init__()
        torch.manual_seed(seed)
        self.register_buffer("embed_dim", torch.tensor(d))
        self.register_buffer("interchange_dim", torch.tensor(d))
        self.rotate_layer = torch.nn.utils.parametrizations.orthogonal(
            LowRankRotateLayer(d, r), use_trivialization=trivialization)
        if linear:
            self.learned_source = torch.nn.Linear(d, r)
        else:
            self.learned_source = torch.nn.Parameter(torch.rand(r))
        with torch.no_grad():
            self.rotate_layer.parametrizations.weight.original.add_(0.2 * torch.randn(d, r).tril(-1))
            for p in ([self.learned_source] if not linear else self.learned_source.parameters()):
                p.normal_(0, 0.5)


STATES = {
    "loreft": lambda s: loreft_state(s),
    "loreft-f32": lambda s: loreft_state(s, dtype=torch.float32),
    "loreft-all-bf16": lambda s: loreft_state(s, rot_dtype=torch.bfloat16),
    "noreft": lambda s: NoreftLike(s).state_dict(),
    "noreft-nobias": lambda s: NoreftLike(s, add_bias=False).state_dict(),
    "loreft-d64": lambda s: loreft_state(s, d=64),
    "loreft-not-orthonormal": lambda s: OrderedDict(loreft_state(s), rotate_layer=torch.randn(D, 4)),
    "loreft-int-weight": lambda s: OrderedDict(loreft_state(s), weight=torch.ones(4, D, dtype=torch.long)),
    "loreft-bias-rank5": lambda s: OrderedDict(loreft_state(s), bias=torch.zeros(5)),
    "consreft": lambda s: ConsreftLike(seed=s).state_dict(),
    "lobireft": lambda s: ConsreftLike(seed=s).state_dict(),
    "direft": lambda s: ConsreftLike(linear=True, seed=s).state_dict(),
    "nodireft": lambda s: NoreftLike(s).state_dict(),
    "direft-bad-diag": lambda s: OrderedDict(
        (k, v.diagonal_scatter(torch.full((4,), -0.5)) if k.endswith(".original") else v)
        for k, v in ConsreftLike(linear=True, seed=s).state_dict().items()),
    "direft-no-base": lambda s: ConsreftLike(linear=True, seed=s, trivialization=False).state_dict(),
}
CLASS = {"loreft": "LoreftIntervention", "noreft": "NoreftIntervention", "consreft": "ConsreftIntervention",
         "lobireft": "LobireftIntervention", "direft": "DireftIntervention", "nodireft": "NodireftIntervention"}


def key(layer: int, i: int, style: str, component: str = "block_output") -> str:
    if style == "old":
        return f"layer.{layer}.comp.{component}.unit.pos.nunit.1#{i}"
    return f"layer_{layer}_comp_{component}_unit_pos_nunit_1#{i}"


def save_pyreft(folder: Path, layers: list[int], kind: str = "loreft", style: str = "new",
                config: bool | dict = True, cls: str | None = None,
                keys: dict[int, str] | None = None) -> dict[str, OrderedDict]:
    """What IntervenableModel.save writes for representations on ``layers`` (untied f+l lists
    each layer twice); ``config`` may be a dict of extra config.json fields, ``keys`` replaces
    the key of the j-th representation.  Returns key -> state dict."""
    folder.mkdir(parents=True, exist_ok=True)
    seen: dict[int, int] = {}
    states = {}
    for j, layer in enumerate(layers):
        seen[layer] = seen.get(layer, -1) + 1
        k = (keys or {}).get(j) or key(layer, seen[layer], style)
        states[k] = STATES[kind](100 + j)
        torch.save(states[k], folder / f"intkey_{k}.bin")
    if config:
        name = cls or CLASS[kind.split("-")[0]]
        name = name if name.startswith("<") else f"<class 'pyreft.interventions.{name}'>"
        cfg = {"intervention_constant_sources": [True] * len(layers),
               "intervention_dimensions": [D] * len(layers),
               "intervention_types": [name] * len(layers),
               "mode": "parallel", "sorted_keys": list(states), "transformers_version": "4.45.1",
               "representations": [[L, "block_output", "pos", 1, 4] + [None] * 9 for L in layers]}
        cfg.update(config if isinstance(config, dict) else {})
        (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return states


def rotate_t(state: OrderedDict) -> torch.Tensor:
    """R^T (d, r) as pyreft's module computes it: LoReFT saves it; the others' parametrization
    is loaded into torch's own orthogonal module and evaluated there."""
    if "rotate_layer" in state:
        return state["rotate_layer"].float()
    orig = state["rotate_layer.parametrizations.weight.original"]
    layer = torch.nn.utils.parametrizations.orthogonal(
        LowRankRotateLayer(*orig.shape), use_trivialization="rotate_layer.parametrizations.weight.0.base" in state)
    layer.load_state_dict({k.removeprefix("rotate_layer."): v for k, v in state.items()
                           if k.startswith("rotate_layer.")})
    return layer.weight.detach().float()


def pyreft_edit(state: OrderedDict, h: torch.Tensor, kind: str = "loreft") -> torch.Tensor:
    """pyreft's forward (act = identity) of class ``kind``, from the raw state dict, in float32."""
    s = {k: v.float() for k, v in state.items() if v.is_floating_point()}
    if kind == "loreft":  # h + (W h + b - R h) R^T, rotate_layer = R^T
        rot = s["rotate_layer"]
        return h + (h @ s["weight"].T + s["bias"] - h @ rot) @ rot.T
    if kind in ("noreft", "nodireft"):
        w2 = s["proj_layer.weight"]  # NoReFT: h + (W1 h + b1 - (W2 h + b2)) W2; NodiReFT: h + (W1 h + b1) W2
        proj = h @ w2.T + s.get("proj_layer.bias", torch.zeros(w2.shape[0]))
        src = h @ s["learned_source.weight"].T + s["learned_source.bias"]
        return h + ((src - proj) if kind == "noreft" else src) @ w2
    rot = rotate_t(state)
    if kind == "direft":  # h + (W h + b) R^T
        return h + (h @ s["learned_source.weight"].T + s["learned_source.bias"]) @ rot.T
    if kind == "consreft":  # h + (b - R h) R^T
        return h + (s["learned_source"] - h @ rot) @ rot.T
    return h + (s["learned_source"] @ rot.T).expand_as(h)  # LobiReFT: h + b R^T


def pyreft_locations(positions: str, share_weights: bool, n: int, count: int) -> list[list[int]]:
    """pyreft's get_intervention_locations (last_position = n), one row per intervention."""
    f, l = PositionRule.parse(positions).first, PositionRule.parse(positions).last
    f, l = min(n // 2, f), min(n // 2, l)
    left, right = list(range(f)), list(range(n - l, n))
    if share_weights or not (f and l):
        return [left + right] * count
    return [left] * (count // 2) + [right] * (count // 2)


@pytest.fixture(scope="module")
def base(smol_q4):
    return base_model(smol_q4)


# ---- conversions: layout, positions and the math of every intervention ---------------------

CASES = [  # id, layers as pyreft lists them, kind, key style, config.json?, positions, share_weights
    ("loreft-l1", [3, 15], "loreft", "new", True, "l1", False),
    ("old-keys", [15], "loreft", "old", True, "l3", False),
    ("tied-f1+l1", [8, 15], "loreft", "new", True, "f1+l1", True),
    ("untied-f2+l3", [4, 15, 4, 15], "loreft", "new", True, "f2+l3", False),
    ("untied-old-keys", [15, 15], "loreft", "old", True, "f1+l1", False),
    ("trainer-checkpoint", [4, 15, 4, 15], "loreft", "new", False, "f1+l1", False),
    ("fp32-weight", [0], "loreft-f32", "new", True, "f5", False),
    ("model-cast-to-bf16", [29], "loreft-all-bf16", "new", True, "l1", False),
    ("noreft-add-bias", [15], "noreft", "new", True, "l1", False),
    ("noreft-no-bias", [2, 2], "noreft-nobias", "new", True, "f1+l1", False),
    ("consreft", [7], "consreft", "new", True, "l2", False),
    ("lobireft", [7, 19], "lobireft", "new", True, "f1+l1", True),
    ("direft-untied", [4, 15, 4, 15], "direft", "new", True, "f2+l3", False),
    ("direft-no-config", [15], "direft", "new", False, "l1", False),
    ("direft-no-trivialization", [15], "direft-no-base", "new", True, "l1", False),
    ("nodireft", [10], "nodireft", "new", True, "l3", False),
]


@pytest.mark.parametrize("_id,layers,kind,style,config,positions,share", CASES, ids=[c[0] for c in CASES])
def test_converts_exactly(_id, layers, kind, style, config, positions, share, smol_q4, tmp_path):
    folder = tmp_path / "ckpt" / ("intervenable_model" if not config else "")
    states = save_pyreft(folder, layers, kind, style, config)
    if not config:  # a trainer checkpoint: no config.json, an empty pytorch_model.bin beside
        torch.save({}, folder / "pytorch_model.bin")
    cls = kind.split("-")[0]
    patch = convert(tmp_path / "ckpt", smol_q4, tmp_path / "out.reft", positions, share, convention="end",
                    intervention_type=cls if cls in ("noreft", "nodireft") and not config else None)
    assert patch.source == str(tmp_path / "out.reft") and patch.base.fingerprint == base_model(smol_q4).fingerprint
    assert len(patch.interventions) == len(layers)
    h = torch.randn(7, D, generator=torch.Generator().manual_seed(0)) * 3
    # pyvene's order: layers as listed, #0 before #1 (also from file names alone)
    for n in (1, 2, 3, 5, 40):  # pyreft's windows on every prompt length, short ones included
        rows = pyreft_locations(positions, share, n, len(layers))
        assert [iv.positions.select(n).tolist() for iv in patch.interventions] == rows, n
    for iv, (k, state) in zip(patch.interventions, states.items()):
        assert iv.layer == int(k.replace(".", "_").split("_")[1])
        assert iv.type == cls
        if iv.type == "loreft":  # the tensors themselves, bit for bit
            assert np.array_equal(iv.rotate, state["rotate_layer"].float().numpy().T)
            assert np.array_equal(iv.weight, state["weight"].float().numpy())
            assert np.array_equal(iv.bias, state["bias"].float().numpy())
        if "rotate_layer.parametrizations.weight.original" in state:  # R from torch's own module
            np.testing.assert_allclose(iv.rotate, rotate_t(state).numpy().T, rtol=0, atol=2e-6)
        got = apply(iv.type, h.numpy(), iv.rotate, iv.weight, iv.bias)
        np.testing.assert_allclose(got, pyreft_edit(state, h, cls).numpy(), rtol=1e-5, atol=1e-4)
        assert np.abs(got - h.numpy()).max() > 0.05  # the edit is not a no-op (tolerance: 1e-4)
    assert patch.provenance["converted_from"] == "pyreft"
    assert patch.provenance["pyreft_dataset_convention"] == "end"


def test_without_a_convention_it_warns_and_assumes_end(base, tmp_path):
    save_pyreft(tmp_path, [15])
    with pytest.warns(UserWarning, match="--dataset-convention end-1"):
        patch = from_pyreft(tmp_path, base, "l3")
    assert str(patch.interventions[0].positions) == "f0+l3"


@pytest.mark.parametrize("convention,positions,share,rules", [
    ("end", "l1", False, ["f0+l1"]), ("end-1", "l1", False, ["f0+l1:-1"]), ("last-token", "l1", False, ["l1"]),
    ("end", "f1+l1", True, ["f1+l1"]), ("end-1", "f3+l3", False, ["f3+l0:-1", "f0+l3:-1"]),
])
def test_conventions_become_exact_rules(convention, positions, share, rules, base, tmp_path):
    save_pyreft(tmp_path, [15] * len(rules))
    patch = from_pyreft(tmp_path, base, positions, share, convention=convention)
    assert [str(iv.positions) for iv in patch.interventions] == rules


@pytest.mark.parametrize("kind,dtype", [("loreft", "F32"), ("loreft-all-bf16", "BF16"), ("noreft", "F32")])
def test_storage_type_is_lossless(kind, dtype, smol_q4, tmp_path):
    save_pyreft(tmp_path / "c", [15], kind)
    patch = convert(tmp_path / "c", smol_q4, tmp_path / "o.reft", "l1", convention="end")
    assert spec.TENSOR_DTYPES[patch.interventions[0].dtype] == dtype


def test_base_may_be_an_hf_folder(smol_q4, tmp_path):
    from edge_reft.train.hf import hf_dir
    save_pyreft(tmp_path / "c", [15])
    from_hf = convert(tmp_path / "c", hf_dir(smol_q4), tmp_path / "hf.reft", "l1", convention="end")
    assert from_hf.base.fingerprint == base_model(smol_q4).fingerprint


@pytest.mark.parametrize("kind", ["loreft", "noreft", "consreft", "direft"])
def test_reader_agrees_with_torch_load(kind, tmp_path):
    states = save_pyreft(tmp_path, [15], kind)
    path = tmp_path / f"intkey_{next(iter(states))}.bin"
    ref = torch.load(path, weights_only=True)
    got = read_state_dict(path)
    assert list(got) == list(ref)
    for k, t in ref.items():
        assert got[k].dtype == str(t.dtype).removeprefix("torch.")
        want = t.float().numpy() if t.is_floating_point() else t.numpy()
        assert got[k].values.shape == tuple(t.shape) and np.array_equal(got[k].values, want)


def test_views_offsets_and_scalars_read_like_torch(tmp_path):
    big = torch.randn(6, 9)
    state = OrderedDict(view=big[1:, ::2], t=big.T, scalar=torch.tensor(576), half=torch.randn(3).half(),
                        empty=torch.zeros(0, 4), shared=big[2])
    torch.save(state, tmp_path / "v.bin")
    got = read_state_dict(tmp_path / "v.bin")
    for k, t in state.items():
        want = t.float().numpy() if t.is_floating_point() else t.numpy()
        assert np.array_equal(got[k].values, want), k


# ---- errors: one clear message naming what is wrong ----------------------------------------

PEFT_KEY = "comp_base_model_model_model_layers[15]_output_unit_pos_nunit_1#0"
ERRORS = [  # id, save_pyreft kwargs, positions, share_weights, expected in the message
    ("noreft-without-config", dict(layers=[15], kind="noreft", config=False), "l1", False,
     "pass --type noreft or --type nodireft"),
    ("consreft-without-config", dict(layers=[15], kind="consreft", config=False), "l1", False,
     "pass --type consreft or --type lobireft"),
    ("class-and-tensors-disagree", dict(layers=[15], kind="loreft", cls="DireftIntervention"), "l1", False,
     "those of LoreftIntervention, but the declared type is direft"),
    ("unknown-pyreft-class", dict(layers=[15], cls="SteerreftIntervention"), "l1", False,
     "not one of pyreft's classes"),
    ("direft-diagonal-truncated", dict(layers=[15], kind="direft-bad-diag"), "l1", False, "truncates to 0"),
    ("foreign-class", dict(layers=[15], cls="<class 'evil.LoreftIntervention'>"), "l1", False,
     "evil.LoreftIntervention"),
    ("other-hidden-size", dict(layers=[15], kind="loreft-d64"), "l1", False, "n_embd 576"),
    ("not-orthonormal", dict(layers=[15], kind="loreft-not-orthonormal"), "l1", False, "not orthonormal"),
    ("integer-weight", dict(layers=[15], kind="loreft-int-weight"), "l1", False, "expected floating point"),
    ("bias-of-other-rank", dict(layers=[15], kind="loreft-bias-rank5"), "l1", False,
     "bias: shape (5,), expected (4,)"),
    ("block-input", dict(layers=[15], keys={0: key(15, 0, "new", "block_input")}), "l1", False,
     "component 'block_input'"),
    ("peft-module-path", dict(layers=[15], keys={0: PEFT_KEY}), "l1", False, "PEFT"),
    ("layer-outside-model", dict(layers=[30]), "l1", False, "blocks 0..29"),
    ("untied-needs-pairs", dict(layers=[15]), "f1+l1", False, "two per layer"),
    ("pairs-but-share-weights", dict(layers=[15, 15]), "f1+l1", True, "no --share-weights"),
    ("pairs-but-one-window", dict(layers=[15, 15]), "l1", False, "untied f<N>+l<M>"),
    ("act-fn-relu", dict(layers=[15], config={"act_fn": "relu"}), "l1", False, "act_fn"),
    ("bad-positions", dict(layers=[15]), "l0", False, "position rule 'l0'"),
]


@pytest.mark.parametrize("case", ERRORS, ids=[c[0] for c in ERRORS])
def test_refuses_with_a_clear_error(case, base, tmp_path):
    _, kw, positions, share, expected = case
    save_pyreft(tmp_path, **kw)
    with pytest.raises(ReftError) as e:
        from_pyreft(tmp_path, base, positions, share, convention="end")
    assert expected in str(e.value), str(e.value)
    assert "Traceback" not in str(e.value)


def _lora(d: Path) -> None:
    torch.save({"base_model.model.layers.0.lora_A.weight": torch.nn.Parameter(torch.ones(2, D))},
               d / "pytorch_model.bin")


def _drop_one(d: Path) -> None:
    next(d.glob("intkey_*.bin")).unlink()


def _stray(d: Path) -> None:
    (d / f"intkey_{key(9, 0, 'new')}.bin").write_bytes(next(d.glob("intkey_*.bin")).read_bytes())


TAMPERED = [  # id, what is done to a valid checkpoint, expected in the message
    ("lora-weights-beside", _lora, "LoRA"),
    ("listed-file-missing", _drop_one, "file missing"),
    ("file-not-listed", _stray, "not listed in config.json"),
]


@pytest.mark.parametrize("case", TAMPERED, ids=[c[0] for c in TAMPERED])
def test_refuses_tampered_folders(case, base, tmp_path):
    save_pyreft(tmp_path, [3, 15])
    case[1](tmp_path)
    with pytest.raises(ReftError, match=case[2]):
        from_pyreft(tmp_path, base, "l1", convention="end")


def test_every_problem_is_reported_at_once(base, tmp_path):
    save_pyreft(tmp_path, [15, 31], keys={0: key(15, 0, "new", "mlp_output")})
    with pytest.raises(ReftError) as e:
        from_pyreft(tmp_path, base, "l1", convention="end")
    assert "mlp_output" in str(e.value) and "layer 31" in str(e.value) and "2 problems" in str(e.value)


# ---- hostile archives: nothing runs, nothing is allocated beyond the file's bytes -----------

class StorageRef:
    def __init__(self, cls, key: str, numel: int):
        self.cls, self.key, self.numel = cls, key, numel


class RawTensor:
    """A tensor as torch pickles it, with every field chosen by the test (and possibly a lie)."""
    def __init__(self, key="0", numel=4, offset=0, size=(4,), stride=(1,), state=None):
        self.ref, self.args = StorageRef(torch.FloatStorage, key, numel), (offset, size, stride)
        self.state = state

    def __reduce__(self):
        args = (self.ref, *self.args, False, OrderedDict())
        return (torch._utils._rebuild_tensor_v2, args) + ((self.state,) if self.state else ())


class TorchPickler(pickle.Pickler):  # torch.save's persistent ids, written by hand
    def persistent_id(self, obj):
        return ("storage", obj.cls, obj.key, "cpu", obj.numel) if isinstance(obj, StorageRef) else None


def archive(path: Path, obj=None, pkl: bytes | None = None, byteorder="little",
            compression=zipfile.ZIP_STORED, numel: int = 4) -> None:
    """A torch.save zip archive around ``obj`` (or raw ``pkl`` bytes), one float32 storage."""
    import io
    buf = io.BytesIO()
    TorchPickler(buf, protocol=2).dump(obj)
    with zipfile.ZipFile(path, "w", compression) as z:
        z.writestr("archive/data.pkl", buf.getvalue() if pkl is None else pkl)
        z.writestr("archive/byteorder", byteorder)
        z.writestr("archive/data/0", np.arange(numel, dtype="<f4").tobytes())
        z.writestr("archive/version", "3\n")


def unicode_op(text: str) -> bytes:
    return b"X" + struct.pack("<I", len(text.encode())) + text.encode()


class Evil:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


def _corrupt(path: Path, mark: Path) -> None:
    torch.save(OrderedDict(weight=torch.full((64,), 7.0)), path)
    data = bytearray(path.read_bytes())
    data[data.index(np.full(64, 7.0, "<f4").tobytes()) + 5] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncated(path: Path, mark: Path) -> None:
    torch.save(loreft_state(0), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


LEGACY_MAGIC = b"\x80\x02\x8a\x0alZ\xa8\x96P\x19\xfc\x9c\x46"  # torch < 1.6: a pickled magic number
HOSTILE = [  # id, writes the intkey file (path, mark), expected in the message
    ("os-system", lambda p, m: torch.save(OrderedDict(w=Evil(os.system, f"touch {m}")), p), "global posix.system"),
    ("open-for-writing", lambda p, m: torch.save(OrderedDict(w=Evil(open, str(m), "w")), p), "global io.open"),
    ("eval", lambda p, m: torch.save(OrderedDict(w=Evil(eval, f"open({str(m)!r}, 'w')")), p),
     "global __builtin__.eval"),
    ("inst-opcode", lambda p, m: archive(p, pkl=b"(" + unicode_op(f"touch {m}") + b"ios\nsystem\n."), "opcode INST"),
    ("build-on-a-tensor", lambda p, m: archive(p, OrderedDict(w=RawTensor(state={"x": 1}))),
     "BUILD on a StoredTensor"),
    ("storage-numel-lie", lambda p, m: archive(p, OrderedDict(w=RawTensor(numel=1 << 40))), "holds 16"),
    ("tensor-past-its-storage", lambda p, m: archive(p, OrderedDict(w=RawTensor(size=(5,)))), "does not fit"),
    ("broadcast-bomb", lambda p, m: archive(p, OrderedDict(w=RawTensor(size=(1 << 40, 1 << 40), stride=(0, 0)))),
     "does not fit"),
    ("many-views-of-one-storage", lambda p, m: archive(p, OrderedDict(
        (f"w{i}", RawTensor(numel=1 << 16, size=(1 << 16,))) for i in range(5)), numel=1 << 16), "more than 4x"),
    ("negative-stride", lambda p, m: archive(p, OrderedDict(w=RawTensor(stride=(-1,)))), "non-negative"),
    ("missing-storage", lambda p, m: archive(p, OrderedDict(w=RawTensor(key="7"))), "no entry archive/data/7"),
    ("not-a-state-dict", lambda p, m: archive(p, [RawTensor()]), "not a state dict"),
    ("big-endian", lambda p, m: archive(p, OrderedDict(w=RawTensor()), byteorder="big"), "big-endian"),
    ("deflated", lambda p, m: archive(p, OrderedDict(w=RawTensor()), compression=zipfile.ZIP_DEFLATED),
     "compressed"),
    ("truncated-zip", _truncated, "zip archive"),
    ("corrupt-storage-bytes", _corrupt, "CRC"),
    ("legacy-pickle", lambda p, m: p.write_bytes(LEGACY_MAGIC + bytes(40)), "zip archive"),
    ("empty-file", lambda p, m: p.write_bytes(b""), "zip archive"),
]


@pytest.mark.parametrize("case", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_archives_are_refused_and_run_nothing(case, smol_q4, tmp_path):
    mark = tmp_path / "pwned"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    intkey = ckpt / f"intkey_{key(15, 0, 'new')}.bin"
    case[1](intkey, mark)
    with pytest.raises(ReftError) as e:
        convert(ckpt, smol_q4, tmp_path / "out.reft", "l1", convention="end")
    assert case[2] in str(e.value) and str(intkey) in str(e.value), str(e.value)
    assert not mark.exists() and not (tmp_path / "out.reft").exists()


def test_the_hand_written_archive_is_what_torch_reads(tmp_path):
    """The hostile cases' builder, fed honest fields, writes what torch.load and we both read."""
    archive(tmp_path / "a.bin", OrderedDict(w=RawTensor(offset=1, size=(2,), stride=(2,))))
    assert torch.load(tmp_path / "a.bin", weights_only=True)["w"].tolist() == [1.0, 3.0]
    assert read_state_dict(tmp_path / "a.bin")["w"].values.tolist() == [1.0, 3.0]


# ---- back to pyreft, and round trips ----------------------------------------------------------

ROUND_TRIPS = [  # kind, layers, positions, share_weights, convention
    ("loreft", [4, 15, 4, 15], "f2+l3", False, "end"),
    ("loreft", [3, 9], "f1+l1", True, "end-1"),
    ("loreft-all-bf16", [15], "l2", False, "end"),
    ("noreft", [15], "l1", False, "last-token"),
    ("direft", [4, 15, 4, 15], "f1+l2", False, "end-1"),
    ("consreft", [6], "l3", False, "end"),
    ("lobireft", [6], "f2", False, "end"),
    ("nodireft", [6], "l1", False, "end"),
]
KEYS = {"loreft": ["weight", "bias", "rotate_layer"],
        "noreft": ["embed_dim", "interchange_dim", "proj_layer.weight", "learned_source.weight", "learned_source.bias"],
        "direft": ["embed_dim", "interchange_dim", "rotate_layer.parametrizations.weight.original",
                   "rotate_layer.parametrizations.weight.0.base", "learned_source.weight", "learned_source.bias"],
        "consreft": ["learned_source", "embed_dim", "interchange_dim", "rotate_layer.parametrizations.weight.original",
                     "rotate_layer.parametrizations.weight.0.base"]}


@pytest.mark.parametrize("kind,layers,positions,share,convention", ROUND_TRIPS)
def test_round_trip_is_exact(kind, layers, positions, share, convention, smol_q4, tmp_path):
    cls = kind.split("-")[0]
    keys = list(save_pyreft(tmp_path / "a", layers, kind))
    first = convert(tmp_path / "a", smol_q4, tmp_path / "1.reft", positions, share, convention=convention)
    setting = to_pyreft(first, tmp_path / "b")
    assert (setting.positions, setting.share_weights, setting.convention, setting.exact) == \
        (positions, share, convention, True)
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    assert cfg["sorted_keys"] == keys and cfg["mode"] == "parallel"
    assert cfg["intervention_types"][0] == f"<class 'pyreft.interventions.{CLASS[cls]}'>"
    assert cfg["representations"][0] == [layers[0], "block_output", "pos", 1, 4] + [None] * 9
    want = KEYS[{"nodireft": "noreft", "lobireft": "consreft"}.get(cls, cls)]
    h = torch.randn(5, D, generator=torch.Generator().manual_seed(1))
    for k, iv in zip(keys, first.interventions):  # what pyreft's own torch.load reads, and its edit
        state = torch.load(tmp_path / "b" / f"intkey_{k}.bin", weights_only=True)
        assert list(state) == want
        np.testing.assert_allclose(pyreft_edit(state, h, cls).numpy(),
                                   apply(iv.type, h.numpy(), iv.rotate, iv.weight, iv.bias), atol=2e-5)
    second = convert(tmp_path / "b", smol_q4, tmp_path / "2.reft", positions, share, convention=convention)
    for a, b in zip(first.interventions, second.interventions, strict=True):
        assert (a.layer, a.positions, a.type) == (b.layer, b.positions, b.type)
        for role in ("rotate", "weight", "bias"):  # R through torch's parametrization: to rounding
            x, y = getattr(a, role), getattr(b, role)
            assert (x is None) == (y is None), role
            if x is not None and role == "rotate" and cls in ("direft", "consreft", "lobireft"):
                np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)
            elif x is not None:
                assert np.array_equal(x, y), role


def test_to_pyreft_refuses_what_pyreft_cannot_express(base, tmp_path):
    mixed = random_patch(base, [(3, "l1", 2), (5, "l2", 2)])
    with pytest.raises(ReftError, match="one position setting"):
        pyreft_positions(mixed)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(ReftError, match="not an empty folder"):
        to_pyreft(random_patch(base, [(3, "l1", 2)]), tmp_path / "full")


# ---- the runtime on the real model against pyreft's formula -----------------------------------

@torch.no_grad()
def pyreft_logits(model, tokens: list[int], edits: list[tuple[int, list[int], OrderedDict]],
                  kind: str = "loreft") -> np.ndarray:
    """Logits with pyreft's edits as pyvene applies them: a forward hook per intervention on
    block L (sorted_keys order) that scatters the edited positions into its output in place."""
    from edge_reft.train.hf import decoder_layers
    handles = []
    for layer, rows, state in edits:
        def hook(module, args, out, rows=rows, state=state):
            h = out[0] if isinstance(out, tuple) else out
            h[:, rows] = pyreft_edit(state, h[:, rows].float(), kind).to(h.dtype)
        handles.append(decoder_layers(model)[layer].register_forward_hook(hook))
    try:
        return model(torch.tensor([tokens]), use_cache=False).logits[0].float().numpy()
    finally:
        for h in handles:
            h.remove()


EXACT = [  # kind, layers as pyreft lists them, positions, share_weights
    ("loreft", [5, 20, 5, 20], "f2+l2", False),
    ("noreft", [12], "l3", False),
    ("direft", [5, 20, 5, 20], "f2+l2", False),
    ("consreft", [12], "l3", False),
]


@pytest.mark.parametrize("kind,layers,positions,share", EXACT)
def test_runtime_matches_the_pyreft_formula(kind, layers, positions, share, engines_f32, hf_smol,
                                            smol_q4, tmp_path):
    from edge_reft.train.hf import reference_logits
    states = save_pyreft(tmp_path, layers, kind)
    patch = convert(tmp_path, smol_q4, tmp_path / "p.reft", positions, share, convention="end")
    engine = engines_f32["native"]
    toks = engine.prompt_tokens(PROMPT)
    rows = pyreft_locations(positions, share, len(toks), len(layers))
    ref = pyreft_logits(hf_smol, toks, list(zip(layers, rows, states.values())), kind)
    assert np.abs(ref - reference_logits(hf_smol, toks)).max() > 0.5, "the edit must matter"
    np.testing.assert_allclose(reference_logits(hf_smol, toks, [patch]), ref, rtol=0, atol=1e-4)
    np.testing.assert_allclose(engine.logits(toks, patch), ref, rtol=0, atol=1e-3)


# ---- the command line ------------------------------------------------------------------------

NO_TORCH = """
import sys
from edge_reft.services.cli import main
rc = main(sys.argv[1:])
print("TORCH:", "torch" in sys.modules)
sys.exit(rc)
"""


def test_cli_converts_without_torch_and_back(smol_q4, tmp_path):
    save_pyreft(tmp_path / "ck", [4, 15, 4, 15])
    out = tmp_path / "user.reft"
    args = ["convert", "pyreft", str(tmp_path / "ck"), "--base", str(smol_q4), "--positions", "f1+l1",
            "--dataset-convention", "end", "--out", str(out), "--name", "demo"]
    r = subprocess.run([sys.executable, "-c", NO_TORCH, *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "TORCH: False" in r.stdout and "name         demo" in r.stdout
    assert [str(iv.positions) for iv in load_patch(out).interventions] == ["f1+l0", "f1+l0", "f0+l1", "f0+l1"]
    r = subprocess.run([sys.executable, "-m", "edge_reft", "convert", "to-pyreft", str(out), "--out",
                        str(tmp_path / "back")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "positions='f1+l1', share_weights=False" in r.stdout, r.stderr
    bad = subprocess.run([sys.executable, "-m", "edge_reft", *args[:-4], "--share-weights", "--out",
                          str(tmp_path / "no.reft")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and bad.stderr.startswith("edge-reft convert: error:"), bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "no.reft").exists()
