"""``edge-reft convert pyreft DIR --base MODEL --positions P --out F`` and
``edge-reft convert to-pyreft PATCH --out DIR``: pyreft checkpoints to `.reft` and back."""
from __future__ import annotations

import argparse

from .common import verb_parser


def parser() -> argparse.ArgumentParser:
    ap = verb_parser("convert", __doc__, "edge-reft convert pyreft ./pyreft_save --base model.gguf --positions l1 --out me.reft")
    sub = ap.add_subparsers(dest="source", required=True, metavar="{pyreft,to-pyreft}")
    p = sub.add_parser("pyreft", help="a pyreft save folder (or trainer checkpoint) to a .reft patch")
    p.add_argument("dir", help="folder with config.json and intkey_*.bin (or intervenable_model/)")
    p.add_argument("--base", required=True, help="the base model: a .gguf (any quantization) or an HF folder")
    p.add_argument("--positions", required=True,
                   help="the --positions the checkpoint was trained with: l1, f1+l1, f3+l3, ... "
                        "(pyreft does not save them)")
    p.add_argument("--share-weights", action="store_true",
                   help="it was trained with --share_weights (one intervention per layer for f<N>+l<M>)")
    from edge_reft.converters.pyreft import CONVENTIONS, DEFAULT_CONVENTION
    from edge_reft.interventions import TYPES
    p.add_argument("--dataset-convention", choices=list(CONVENTIONS), default=None,
                   help="which pyreft data module placed the positions (pyreft does not save it): "
                        + "; ".join(f"{k}: {v[0]}" for k, v in CONVENTIONS.items())
                        + f" (default: {DEFAULT_CONVENTION}, with a warning)")
    p.add_argument("--type", choices=list(TYPES),
                   default=None, help="the intervention class, needed only without config.json for "
                                      "NoReFT/NodiReFT or ConsReFT/LobiReFT (they save the same tensors)")
    p.add_argument("--out", required=True, help="the .reft file to write")
    p.add_argument("--name", default="", help="patch name (default: the folder's name)")
    p.add_argument("--force", action="store_true", help="replace an existing --out that is not a .reft file")
    r = sub.add_parser("to-pyreft", help="a .reft patch to a pyreft save folder (needs torch)")
    r.add_argument("patch", help="a .reft file")
    r.add_argument("--out", required=True, help="a new folder for config.json and intkey_*.bin")
    return ap


def main(argv: list[str]) -> int:
    a = parser().parse_args(argv)
    from edge_reft.converters import pyreft

    if a.source == "pyreft":
        from edge_reft.services.cli.inspect import format_patch
        patch = pyreft.convert(a.dir, a.base, a.out, a.positions, a.share_weights,
                               convention=a.dataset_convention, name=a.name, intervention_type=a.type,
                               force=a.force)
        print(format_patch(patch))
        return 0
    from edge_reft.reftfile import load_patch
    patch = load_patch(a.patch)
    setting = pyreft.to_pyreft(patch, a.out)
    print(f"wrote {a.out}: {len(patch.interventions)} interventions (pyvene 0.1.8 layout); "
          f"load them with {setting}")
    return 0
