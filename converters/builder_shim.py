"""onnxruntime-genai's model builder (pinned 0.18.0), run as ``python -m`` would run it, with
one adaptation: Gemma 3 under transformers 5.

transformers 5 keeps Gemma 3's RoPE per layer type (``rope_parameters = {"full_attention":
{...}, "sliding_attention": {...}}``) and re-nests a flattened config.json on load, while the
builder's Gemma3Model reads transformers 4's flat ``rope_parameters`` and
``rope_local_base_freq`` (its Gemma 4 code already reads the nested form).  The config object
is adapted before the builder's constructor sees it.  RoPE scaling is refused before this
(converters/onnx_export.py): the builder would apply it to the local layers too.

    python -m edge_reft.converters.builder_shim -i HF_FOLDER -o OUT -p fp32 -e cpu ...
"""
from __future__ import annotations

import importlib
import runpy


def _flat_gemma3_rope(config) -> None:
    text = getattr(config, "text_config", None) or config
    rope = getattr(text, "rope_parameters", None)
    if isinstance(rope, dict) and "full_attention" in rope:
        text.rope_local_base_freq = rope.get("sliding_attention", rope["full_attention"])["rope_theta"]
        text.rope_parameters = dict(rope["full_attention"])


def main() -> None:
    importlib.import_module("onnxruntime_genai.models")  # puts the builder's own folder on sys.path
    from builders import gemma  # the very module the builder imports its Gemma3Model from

    init = gemma.Gemma3Model.__init__

    def adapted(self, config, *args, **kwargs):
        _flat_gemma3_rope(config)
        init(self, config, *args, **kwargs)

    gemma.Gemma3Model.__init__ = adapted
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
