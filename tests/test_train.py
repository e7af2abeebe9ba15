"""Training on the real SmolLM2 GGUF: exact backbone, the prefix cache, resume, the CLI."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from edge_reft.dataset import encode, read_jsonl
from edge_reft.runtime import prompter_for
from edge_reft.errors import ReftError
from edge_reft.fingerprint import from_gguf
from edge_reft.reftfile import load_patch
from edge_reft.tasks import sst2_records, write_jsonl
from edge_reft.train import TrainConfig, Trainer, load_backbone
from edge_reft.train.ggufq import dequantize


@pytest.fixture(scope="module")
def backbone(smol_q4):
    return load_backbone(smol_q4)


@pytest.fixture(scope="module")
def sst_file(tmp_path_factory):
    return write_jsonl(sst2_records("train", 32), tmp_path_factory.mktemp("data") / "sst32.jsonl")


@pytest.fixture(scope="module")
def examples(smol_q4, sst_file):
    prompter, close = prompter_for(smol_q4)
    try:
        return encode(read_jsonl(sst_file), prompter)
    finally:
        close()


def _quantized(qtype: int, rows: int = 64, cols: int = 256) -> tuple[np.ndarray, np.ndarray]:
    import gguf
    x = np.random.default_rng(qtype).standard_normal((rows, cols)).astype(np.float32)
    q = gguf.quants.quantize(x, gguf.GGMLQuantizationType(qtype))
    return q, gguf.quants.dequantize(q, gguf.GGMLQuantizationType(qtype))


@pytest.mark.parametrize("qtype", [0, 1, 2, 3, 6, 7, 8, 30])  # F32 F16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 BF16
def test_dequantize_matches_gguf_py(qtype):
    raw, want = _quantized(qtype)
    got = dequantize(torch.from_numpy(raw.view(np.uint8).reshape(raw.shape[0], -1)), qtype, want.shape)
    np.testing.assert_array_equal(got.numpy(), want)


def test_gguf_backbone_is_the_file_bit_for_bit(backbone, hf_smol):
    """Every linear runs on the GGUF's own Q4_1/Q8_0 blocks, and the model computes
    exactly what transformers computes on the same file dequantized."""
    from edge_reft.train.ggufq import GGUFLinear
    assert all(isinstance(m, GGUFLinear) for n, m in backbone.model.named_modules() if n.endswith("_proj"))
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 5646]])
    with torch.no_grad():
        assert torch.equal(backbone.model(ids).logits, hf_smol(ids).logits)
    assert backbone.base == from_gguf(backbone.source)


@pytest.mark.parametrize("positions,itype", [("l1", "loreft"), ("f1+l1", "loreft"), ("l3", "loreft"),
                                             ("all", "loreft"), ("f0+l3:-1", "loreft"), ("f1+l1", "direft"),
                                             ("l1", "nodireft"), ("l2", "noreft"), ("f1+l1", "lobireft")])
def test_prefix_cache_gives_the_same_gradients(backbone, examples, positions, itype):
    grads = []
    for cached in (True, False):
        gen = torch.Generator().manual_seed(0)
        t = Trainer(backbone.model, examples[:6], TrainConfig(layers=(9, 20), rank=3, positions=positions,
                                                              batch_size=6, prefix_cache=cached, type=itype), 576)
        t.prepare()
        with torch.no_grad():  # move off the identity start so every parameter gets a gradient
            for w in list(t.reft.W) + list(t.reft.b):
                w.add_(0.05 * torch.randn(w.shape, generator=gen))
        loss, n = t.batch_loss(range(6))
        (loss / n).backward()
        grads.append([p.grad.clone() for p in t.reft.parameters()] + [loss.detach() / n])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), (a - b).abs().max()


def test_lean_memory_settings_give_the_same_gradients(smol_q4, backbone, examples):
    """No dequantized weights kept (each layer dequantized at every use) and every prefix
    spilled to disk: the same numbers as the default caches, in less memory."""
    lean = load_backbone(smol_q4, cache_mb=0)
    grads = []
    for bb, prefix_mb, weights_mb in ((backbone, 1024, None), (lean, 0, 0)):
        gen = torch.Generator().manual_seed(0)
        t = Trainer(bb.model, examples[:6], TrainConfig(layers=(9, 20), rank=3, positions="f1+l1", batch_size=6,
                                                        prefix_cache_mb=prefix_mb, weights_cache_mb=weights_mb), 576)
        t.prepare()
        assert len(t.cache.disk) == (6 if prefix_mb == 0 else 0)
        with torch.no_grad():
            for w in t.reft.W:
                w.add_(0.05 * torch.randn(w.shape, generator=gen))
        loss, n = t.batch_loss(range(6))
        (loss / n).backward()
        grads.append([p.grad.clone() for p in t.reft.parameters()] + [loss.detach() / n])
        t.cache.close()
    assert lean.cache.used == 0 and backbone.cache.used > 0
    for a, b in zip(*grads):  # slices of rows go through BLAS in other block shapes: float rounding
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (a - b).abs().max()


def test_loss_goes_down_and_patch_runs(backbone, examples, engine_q4, tmp_path):
    t = Trainer(backbone.model, examples, TrainConfig(layers=(15,), rank=4, positions="l1", batch_size=8,
                                                      epochs=3), 576)
    t.prepare()
    t.run()
    assert np.mean(t.losses[-3:]) < 0.6 * np.mean(t.losses[:2]), t.losses
    patch = t.reft.to_patch(backbone.base, "sst")
    from edge_reft.reftfile import save_patch
    back = load_patch(save_patch(patch, tmp_path / "sst.reft"), model=engine_q4.base)
    assert max(abs(float(x)) for iv in back.interventions
               for x in (iv.rotate @ iv.rotate.T - np.eye(4)).ravel()) < 1e-6
    prompt = engine_q4.prompt_tokens(sst2_records("test", 1)[0]["prompt"])
    assert engine_q4.generate(prompt_tokens=prompt, patch=back, max_tokens=3, stream=False).tokens != \
        engine_q4.generate(prompt_tokens=prompt, max_tokens=3, stream=False).tokens or \
        not np.array_equal(engine_q4.logits(prompt, back)[-1], engine_q4.logits(prompt)[-1])


def test_resume_continues_bit_for_bit(backbone, examples, tmp_path):
    cfg = TrainConfig(layers=(18,), rank=2, positions="l2", batch_size=4, epochs=2, checkpoint_every=1000)
    straight = Trainer(backbone.model, examples[:12], cfg, 576)
    straight.prepare()
    straight.run()
    first = Trainer(backbone.model, examples[:12], cfg, 576, checkpoint_dir=tmp_path / "ck")
    first.prepare()

    def stop_at_three(step, loss):
        if step == 3:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        first.run(stop_at_three)
    again = Trainer(backbone.model, examples[:12], cfg, 576, checkpoint_dir=tmp_path / "ck")
    assert again.load_checkpoint() and again.step == 3
    again.prepare()
    again.run()
    assert again.losses == straight.losses
    for a, b in zip(again.reft.parameters(), straight.reft.parameters()):
        assert torch.equal(a, b)
    other = TrainConfig(layers=(18,), rank=3, positions="l2", batch_size=4, epochs=2)
    with pytest.raises(ReftError, match="other settings"):
        Trainer(backbone.model, examples[:12], other, 576, checkpoint_dir=tmp_path / "ck").load_checkpoint()


@pytest.mark.parametrize("itype", ["direft", "nodireft", "lobireft"])
def test_every_trainable_type_learns_and_runs(itype, backbone, examples, engines_f32, hf_smol, tmp_path):
    """Each type trains from the identity edit through its own rule, exports with only the
    tensors it stores, and the runtime applies it as the torch reference does."""
    from edge_reft.reftfile import save_patch
    from edge_reft.train.hf import reference_logits
    t = Trainer(backbone.model, examples[:16], TrainConfig(layers=(15,), rank=4, positions="l1", batch_size=8,
                                                           epochs=2, type=itype, holdout=0,
                                                           lr=5e-2 if itype == "lobireft" else 4e-3), 576)
    t.prepare()
    t.run()
    assert np.mean(t.losses[-2:]) < np.mean(t.losses[:2]), t.losses
    engine = engines_f32["native"]  # llama.cpp on the F32 twin: comparable to torch to float32 rounding
    back = load_patch(save_patch(t.reft.to_patch(backbone.base, itype), tmp_path / f"{itype}.reft"),
                      model=engine.base)
    iv = back.interventions[0]
    assert iv.type == itype and (iv.weight is None) == (itype == "lobireft")
    assert back.version == 2 and back.provenance == {}
    prompt = engine.prompt_tokens(sst2_records("test", 1)[0]["prompt"])
    ref = reference_logits(hf_smol, prompt, [back])
    assert np.abs(ref - reference_logits(hf_smol, prompt)).max() > 0.05, "the edit must matter"
    np.testing.assert_allclose(engine.logits(prompt, back), ref, rtol=0, atol=1e-3)


@pytest.mark.parametrize("config,match", [
    (dict(type="consreft"), "no identity start"), (dict(type="lora"), "not an intervention type"),
    (dict(layers=(40,)), "layer 40 does not exist"), (dict(rank=0), "rank"), (dict(positions="x1"), "position rule"),
    (dict(lr=5.0), "lr"), (dict(batch_size=0), "batch_size"), (dict(weights_cache_mb=-1), "weights_cache_mb"),
])
def test_bad_configs(backbone, examples, config, match):
    with pytest.raises(ReftError, match=match):
        Trainer(backbone.model, examples, TrainConfig(**config), 576)


def test_malformed_data_lists_every_bad_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "a", "response": "b"}\nnot json\n{"prompt": 3}\n'
                 '{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(ReftError) as e:
        read_jsonl(p)
    assert "3 malformed lines" in str(e.value) and "line 2" in str(e.value) and "line 4" in str(e.value)


def test_messages_render_like_the_runtime(smol_q4, engine_q4):
    prompter, close = prompter_for(smol_q4)
    try:
        msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
        prompt, target = prompter.example(msgs, "Hello!")
    finally:
        close()
    assert prompt == engine_q4.prompt_tokens(messages=msgs)
    assert engine_q4.native.vocab.is_eog(target[-1]) and target[:-1] == engine_q4._tokenize("Hello!", False)


def _cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "edge_reft", "train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_cli_ctrl_c_saves_and_resume_finishes(smol_q4, tmp_path):
    data = write_jsonl(sst2_records("train", 16), tmp_path / "sst16.jsonl")
    out = tmp_path / "u.reft"
    args = [str(smol_q4), "--data", str(data), "--out", str(out), "--epochs", "6", "--batch-size", "4",
            "--layers", "20", "--positions", "l1"]
    p = _cli(*args)
    deadline = time.time() + 300
    seen = ""
    while time.time() < deadline and "training" not in seen:  # wait for the loop to start
        seen += p.stderr.read(1)
    time.sleep(1.0)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 130, err
    assert (tmp_path / "u.reft.ckpt" / "state.json").exists() and not out.exists()
    step = json.loads((tmp_path / "u.reft.ckpt" / "state.json").read_text())["step"]
    assert 0 < step < 24
    r = subprocess.run([sys.executable, "-m", "edge_reft", "train", *args], capture_output=True, text=True)
    assert r.returncode == 1 and "--resume" in r.stderr  # refuses to silently start over
    r = subprocess.run([sys.executable, "-m", "edge_reft", "train", *args, "--resume"], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    patch = load_patch(out)
    assert patch.provenance["steps"] == 24 and not (tmp_path / "u.reft.ckpt").exists()
    assert patch.base.fingerprint == from_gguf(smol_q4).fingerprint


def test_hf_folder_trains_in_nf4_with_the_gguf_fingerprint(smol_q4, tmp_path):
    from edge_reft.train.hf import hf_dir
    from edge_reft.train import train
    folder = hf_dir(smol_q4)
    data = write_jsonl(sst2_records("train", 6), tmp_path / "sst6.jsonl")
    patch = train(folder, data, tmp_path / "nf4.reft",
                  TrainConfig(layers=(25,), rank=2, positions="l1", batch_size=3, max_steps=2), progress=False)
    assert patch.base.fingerprint == from_gguf(smol_q4).fingerprint
    assert patch.provenance["backbone"] == "nf4" and np.isfinite(patch.provenance["final_loss"])
    bb = load_backbone(folder)
    assert type(bb.model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"


def test_nf4_gradients_equal_the_dense_model_with_the_same_weights(smol_q4, examples):
    """bitsandbytes' CPU NF4 path must give the gradients of the same weights held
    densely (edge-reft keeps it off the inference-only repacked kernel, which has no
    backward and silently returns wrong gradients)."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM
    from edge_reft.train.hf import hf_dir
    from edge_reft.train.backbone import _dense_weight
    nf4 = load_backbone(hf_dir(smol_q4))
    dense = AutoModelForCausalLM.from_pretrained(hf_dir(smol_q4), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, m in nf4.model.named_modules():
            if isinstance(m, bnb.nn.Linear4bit):
                dense.get_submodule(name).weight.copy_(_dense_weight(m))
    dense.requires_grad_(False)
    grads = []
    for model in (nf4.model, dense):
        t = Trainer(model, examples[:4], TrainConfig(layers=(20,), rank=2, positions="l1", batch_size=4), 576)
        t.prepare()
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for w in t.reft.W:
                w.add_(0.05 * torch.randn(w.shape, generator=gen))
        loss, n = t.batch_loss(range(4))
        (loss / n).backward()
        grads.append([p.grad for p in t.reft.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_ctrl_c_while_caching_prefixes_resumes(smol_q4, backbone, tmp_path, monkeypatch):
    """Issue 14, item 6: an interrupt before the first step left a folder --resume could not use."""
    from edge_reft.train import prefix, train
    sst_file = write_jsonl(sst2_records("train", 8), tmp_path / "sst8.jsonl")
    out = tmp_path / "u.reft"
    cfg = TrainConfig(layers=(20,), rank=2, positions="l1", batch_size=8, max_steps=2)
    real = prefix.build

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(prefix, "build", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(smol_q4, sst_file, out, cfg, backbone=backbone, progress=False)
    assert (tmp_path / "u.reft.ckpt" / "state.json").exists() and not out.exists()
    monkeypatch.setattr(prefix, "build", real)
    with pytest.raises(ReftError, match="--resume"):
        train(smol_q4, sst_file, out, cfg, backbone=backbone, progress=False)
    patch = train(smol_q4, sst_file, out, cfg, backbone=backbone, progress=False, resume=True)
    assert patch.provenance["steps"] == 2 and not (tmp_path / "u.reft.ckpt").exists()


def test_rank_above_n_embd_is_refused_before_any_work(smol_q4, sst_file, tmp_path):
    from edge_reft.train import train
    t = time.perf_counter()
    with pytest.raises(ReftError, match="--rank 577: more than the model's hidden size n_embd 576"):
        train(smol_q4, sst_file, tmp_path / "u.reft", TrainConfig(rank=577), progress=False)
    assert time.perf_counter() - t < 5 and not list(tmp_path.iterdir())


def test_default_recipe_is_fixed_by_the_model_and_the_data():
    from edge_reft.train.trainer import auto_epochs, spread_layers
    c = TrainConfig().resolved(30, 100)
    assert (c.layers, c.positions, c.rank, c.epochs, c.lr) == ((4, 10, 16, 22), "f1+l1", 4, 6, 4e-3)
    assert c.holdout == 10  # 90 examples train: ceil(500 / 90) = 6 epochs
    assert spread_layers(18) == (2, 6, 10, 13) and spread_layers(2) == (0, 1)
    assert (auto_epochs(20), auto_epochs(100), auto_epochs(5000)) == (10, 5, 3)
    mine = TrainConfig(layers=(7,), epochs=2).resolved(30, 100)
    assert (mine.layers, mine.epochs) == ((7,), 2)  # given values are kept


def test_cli_preset_and_flags(smol_q4, tmp_path):
    """--preset classify is the measured SST-2 recipe (l1 at the middle block); a flag given
    as well wins; the chosen recipe is printed before training starts."""
    import subprocess
    import sys
    data = write_jsonl(sst2_records("train", 4), tmp_path / "d.jsonl")
    out = tmp_path / "c.reft"
    r = subprocess.run([sys.executable, "-m", "edge_reft", "train", "-m", str(smol_q4), "--data", str(data),
                        "--out", str(out), "--preset", "classify", "--rank", "2", "--max-steps", "1"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "layers 15 of 30, positions l1, rank 2, 3 epochs, lr 0.002" in r.stderr
    p = load_patch(out)
    assert [(iv.layer, str(iv.positions), iv.rank) for iv in p.interventions] == [(15, "l1", 2)]
    assert f"patch        {out}" in r.stdout  # the card names the file written
    helptext = subprocess.run([sys.executable, "-m", "edge_reft", "train", "--help"], capture_output=True,
                              text=True).stdout
    assert "facts: facts the model should know (rank 8, the first and last three prompt tokens)" in \
        " ".join(helptext.split())


def test_holdout_scores_each_epoch_stops_early_and_keeps_the_best(backbone, examples):
    """A learning rate far too high makes the held-out loss worse after its best epoch: training
    stops PATIENCE epochs later and the patch is the best epoch's (its loss recomputed equal)."""
    from edge_reft.train.trainer import PATIENCE
    cfg = TrainConfig(layers=(15,), rank=4, positions="l1", batch_size=8, epochs=12, lr=0.5, holdout=8)
    t = Trainer(backbone.model, examples, cfg, 576)
    assert t.n_train == 24 and t.per_epoch == 3
    t.prepare()
    seen = []
    t.run(on_epoch=lambda e, v, best: seen.append((e, v, best)))
    assert [e for e, _, _ in seen] == list(range(1, len(seen) + 1))
    assert t.stopped_early and len(seen) < 12, seen
    best = min(t.val_losses)
    assert len(t.val_losses) - 1 - t.val_losses.index(best) == PATIENCE
    assert t.step == len(seen) * 3  # the held-out examples were never trained on
    t.keep_best()
    assert t.held_out_loss() == pytest.approx(best, rel=1e-6)
    assert TrainConfig().resolved(30, 100).holdout == 10 and TrainConfig().resolved(30, 49).holdout == 0
