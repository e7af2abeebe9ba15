"""Training computed another way gives the same gradients: on a device (``--device
auto|cpu|cuda|mps``) as on the CPU within float tolerance; with blocks recomputed in
backward (``--recompute``) bit for bit.

The device comparisons run where torch sees the device (the device machine's
H200 for CUDA; Apple Silicon for MPS) and are skipped elsewhere; choosing a
device that is not there is one clear error everywhere.
"""
from __future__ import annotations

import pytest
import torch

import shapes
from edge_reft.errors import ReftError
from edge_reft.train.backbone import load_backbone, pick_device

DEVICES = [d for d, ok in (("cuda", torch.cuda.is_available()), ("mps", torch.backends.mps.is_available()))
           if ok]


def test_auto_picks_what_is_there_and_a_missing_device_is_named():
    assert pick_device("auto") == (DEVICES[0] if DEVICES else "cpu")
    assert pick_device("cpu") == "cpu"
    for d in ("cuda", "mps"):
        if d not in DEVICES:
            with pytest.raises(ReftError, match=f"--device {d}: this torch .* sees no {d.upper()} device"):
                pick_device(d)
    with pytest.raises(ReftError, match="--device 'tpu': expected one of auto, cpu, cuda, mps"):
        pick_device("tpu")


def _grads(device: str, arch: str, positions: str, calls: list | None = None, **config):
    from edge_reft.dataset import encode
    from edge_reft.runtime import prompter_for
    from edge_reft.train import TrainConfig
    from edge_reft.train.trainer import Trainer
    q = shapes.gguf(arch, "Q4_K_M")
    prompter, close = prompter_for(q)
    try:
        examples = encode([([{"role": "user", "content": f"What is {i} plus {2 * i}? Say it in words."}],
                            f"{3 * i}") for i in range(6)], prompter)
    finally:
        close()
    bb = load_backbone(q, device=device)
    t = Trainer(bb.model, examples, TrainConfig(layers=(0, 2), rank=3, positions=positions, batch_size=6,
                                                holdout=0, **config), bb.base.n_embd)
    t.prepare()
    if calls is not None:  # count the runs of the top block's own forward
        from edge_reft.train.hf import decoder_layers
        decoder_layers(bb.model)[2].register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # off the identity start, so every parameter gets a gradient
        for w in t.reft.W:
            w.add_((0.05 * torch.randn(w.shape, generator=gen)).to(w.device))
    loss, n = t.batch_loss(range(6))
    (loss / n).backward()
    return [p.grad.detach().cpu() for p in t.reft.parameters()] + [(loss / n).detach().cpu()]


@pytest.mark.parametrize("device", DEVICES or [pytest.param("cuda", marks=pytest.mark.skip("no GPU here"))])
@pytest.mark.parametrize("arch,positions", [("llama", "f1+l1"), ("qwen3", "all"), ("gemma3", "l1")])
def test_device_gradients_equal_the_cpu(device, arch, positions):
    cpu, dev = _grads("cpu", arch, positions), _grads(device, arch, positions)
    for a, b in zip(cpu, dev):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-5), (arch, (a - b).abs().max())


@pytest.mark.parametrize("arch,positions", [("llama", "f1+l1"), ("gemma3", "f1+l1"), ("phi3", "all")])
def test_recomputed_blocks_give_the_same_gradients_bit_for_bit(arch, positions):
    calls: dict[bool, list] = {False: [], True: []}
    kept, recomputed = (_grads("cpu", arch, positions, calls[on], recompute=on) for on in (False, True))
    for a, b in zip(kept, recomputed):
        assert torch.equal(a, b), (arch, (a - b).abs().max())
    assert (len(calls[False]), len(calls[True])) == (1, 2)  # recompute did run the block again


def test_recompute_turns_itself_on_when_a_batch_would_not_fit():
    from edge_reft.train.recompute import activation_bytes, auto_recompute
    bb = load_backbone(shapes.gguf("llama", "Q4_K_M"), device="cpu")
    cfg = bb.model.config
    assert activation_bytes(cfg, 3, 10) == 4 * 10 * 3 * (12 * cfg.hidden_size + 5 * cfg.intermediate_size)
    assert not auto_recompute(bb.model, 0, [40] * 100, 8)           # ~5 MB
    assert auto_recompute(bb.model, 0, [40] * 100 + [100_000], 8)   # the longest batch: ~7 GB
    # a Trainer counts what its steps run: with the prefix cache an l1 row is the prompt's last
    # token and the reply, however long the prompt (here 8 x 1200 tokens: ~650 MB in full)
    from edge_reft.dataset import Example
    from edge_reft.train import TrainConfig
    from edge_reft.train.trainer import Trainer
    long = [Example(tuple(range(3, 1203)), (5, 2)) for _ in range(8)]
    on = {p: Trainer(bb.model, long, TrainConfig(layers=(0,), positions=p, holdout=0), bb.base.n_embd).recompute
          for p in ("l1", "f1+l1")}
    assert on == {"l1": False, "f1+l1": True}
