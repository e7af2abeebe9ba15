"""Training on a device (``--device auto|cpu|cuda|mps``): the same gradients as on the CPU.

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


def _grads(device: str, arch: str, positions: str):
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
                                                holdout=0), bb.base.n_embd)
    t.prepare()
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
