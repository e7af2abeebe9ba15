"""``edge-reft export-onnx BASE --out DIR``: an ONNX Runtime model with patch inputs.

BASE is a model GGUF (any quantization: it is dequantized to an HF folder
first, cached) or an HF model folder.  Every chosen block gets --slots edit
slots (several interventions of a patch on one block fill them in order) of
rank up to --max-rank; patches are then fed to the graph per request:
`edge-reft run DIR --patch user.reft`.  Needs the [onnx-export] extra.
"""
from __future__ import annotations

import argparse


def parser() -> argparse.ArgumentParser:
    from .common import add_model, layer_list, verb_parser
    ap = verb_parser("export-onnx", __doc__, "edge-reft export-onnx -m model.gguf --out model-onnx/ --layers 8,15,22")
    add_model(ap, "a model .gguf or an HF model folder", "base")
    ap.add_argument("--out", required=True, help="the folder to write (replaced atomically)")
    ap.add_argument("--precision", choices=["int4", "int8", "fp32"], default="int4",
                    help="int4: 4-bit MatMulNBits weights (default, smallest); int8: 8-bit weights "
                         "(closest to llama.cpp's answers); fp32: exact float32 weights")
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--layers", type=layer_list, help="blocks that take patches, e.g. 8,15,22 (default: all)")
    where.add_argument("--all-layers", action="store_true", help="every block takes patches (the default)")
    ap.add_argument("--slots", type=int, default=2,
                    help="interventions per block a patch may stack (default 2)")
    ap.add_argument("--max-rank", type=int, default=16, help="the largest rank a patch may use (default 16)")
    ap.add_argument("--force", action="store_true", help="rebuild even if DIR is up to date, and replace a non-empty DIR that export-onnx did not write")
    return ap


def main(argv: list[str]) -> int:
    a = parser().parse_args(argv)
    from .common import model_of
    a.base = model_of(a, "base")
    from edge_reft.converters.onnx_export import export_onnx
    export_onnx(a.base, a.out, precision=a.precision, layers=list(a.layers) if a.layers else None, slots=a.slots,
                max_rank=a.max_rank, force=a.force)
    return 0
